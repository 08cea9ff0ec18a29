"""Training: plain, sparse (L1 on every BN γ), and refine of a pruned model — one loop, one artifact out.

The sparsity penalty is a hook, :func:`regularize`, called between ``backward()`` and ``step()``; it adds the
network-slimming subgradient s·sign(γ) to every BatchNorm weight gradient, or with ``regularizer="polar"`` the
polarization regularizer's (Zhuang et al., NeurIPS 2020). Refine can learn from a teacher (``teacher=``: the
unpruned model; knowledge distillation, Hinton et al. 2015): KL on softened logits plus the label loss.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimexport import distributed
from slimexport.channels import restore_bn_selections
from slimexport.checkpoint import fit_data, load_checkpoint, make_checkpoint, read_checkpoint, save_checkpoint
from slimexport.config import REGULARIZERS, TrainConfig
from slimexport.console import console, make_progress
from slimexport.data import Dataset
from slimexport.errors import CheckpointError, ConfigError, DeviceError, ModelCodeError, SlimExportError, first_line
from slimexport.fileio import output_lock
from slimexport.graph import BN_TYPES
from slimexport.models import create_model
from slimexport.models import is_builtin as _builtin_source


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is a :class:`DeviceError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was requested but CUDA is not available on this machine (torch sees no GPU)")
    if device != "cpu" and not device.startswith("cuda"):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or auto")
    return torch.device(device)


def bn_weights(model: nn.Module) -> list[torch.Tensor]:
    """The scale γ of every BatchNorm (1d, 2d, 3d, SyncBatchNorm) of any model."""
    return [m.weight for m in model.modules() if isinstance(m, BN_TYPES) and m.weight is not None]


@torch.no_grad()
def regularize(
    model: nn.Module,
    sparsity: float,
    weights: list[torch.Tensor] | None = None,
    regularizer: str = "l1",
    t: float = 1.2,
) -> None:
    """Add the sparsity subgradient to the gradient of every BN scale γ of any model: ``sparsity·sign(γ)`` (L1,
    the paper's), or with ``regularizer="polar"`` the polarization regularizer's (Zhuang et al., NeurIPS 2020),
    ``sparsity·(t·|γ|₁ − |γ − γ̄|₁)`` over all the model's γ with γ̄ their mean: it pulls every γ down (t > 1) but
    those below the mean t+1 times as hard as those above it (t−1), so |γ| splits into a group at 0 and a group
    that stays, with an empty gap between them where one global threshold falls.

    Call it after ``backward()`` and before ``step()`` (under DDP after backward, i.e. after the all-reduce, so
    every rank adds the same term; with a GradScaler after ``scaler.unscale_(optimizer)``)::

        loss.backward()
        slimexport.regularize(model, 1e-4)
        optimizer.step()
    """
    if sparsity <= 0:
        return
    ws = [w for w in (weights if weights is not None else bn_weights(model)) if w.grad is not None]
    if ws:
        torch._foreach_add_([w.grad for w in ws], penalty_grads(ws, regularizer, t), alpha=sparsity)


@torch.no_grad()
def penalty_grads(ws: list[torch.Tensor], regularizer: str = "l1", t: float = 1.2) -> list[torch.Tensor]:
    """The sparsity penalty's subgradient (for s = 1) at the γ tensors ``ws``: see :func:`regularize`."""
    if regularizer == "l1":
        return [torch.sign(w) for w in ws]
    if regularizer != "polar":
        raise ConfigError(f"unknown regularizer {regularizer!r}: {' or '.join(REGULARIZERS)}")
    mean = torch.cat([w.reshape(-1) for w in ws]).mean()
    above = [torch.sign(w - mean) for w in ws]
    # d/dγ_i of −Σ_j |γ_j − γ̄| = −sign(γ_i − γ̄) + mean_j sign(γ_j − γ̄)  (γ̄ depends on every γ)
    pull = torch.cat([a.reshape(-1) for a in above]).mean()
    return [t * torch.sign(w) - a + pull for w, a in zip(ws, above)]


def _autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on ``device`` where ``precision`` (resolved: fp32 or bf16) says so; a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def choose_precision(
    precision: str, model: nn.Module, ds: Dataset, device: torch.device, batch: int, probe_steps: int = 3
) -> tuple[str, str]:
    """(fp32 or bf16, why) for training ``model`` on ``device``. ``auto``: bf16 autocast on CUDA; on a CPU, bf16
    only where it has native bf16 instructions (AMX, AVX512-BF16) and a short timed probe (``probe_steps`` training
    steps in each precision, interleaved, at this batch size up to 32; the model is left as it was) shows bf16
    at least 10% faster for this model: on one Xeon with AMX it was ×1.4-1.5 for vgg11_bn and resnet18 but ×0.73
    for mobilenet_v2."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    if device.type == "cuda":
        return "bf16", "auto: bf16 autocast on CUDA"
    from slimexport.runtime import machine_facts

    if not machine_facts()["bf16"]:
        return "fp32", "auto: this CPU has no native bf16 instructions (AMX, AVX512-BF16)"
    times = _probe_step_times(model, ds, device, min(batch, 32), probe_steps)
    fp32, bf16 = (sorted(t)[len(t) // 2] for t in (times["fp32"], times["bf16"]))
    chosen = "bf16" if bf16 < 0.9 * fp32 else "fp32"
    return (
        chosen,
        f"auto: a training step took {bf16 * 1e3:.0f} ms in bf16, {fp32 * 1e3:.0f} ms in fp32 (batch {batch})",
    )


@contextmanager
def _left_as_it_was(model: nn.Module):
    """Run trial forward and backward passes: afterwards the model's weights, BN statistics and gradients are put
    back as they were."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


def _probe_step_times(model: nn.Module, ds: Dataset, device: torch.device, batch: int, steps: int) -> dict:
    """Seconds of ``steps`` forward+backward passes in fp32 and in bf16 autocast, interleaved after one warm-up of
    each; the model is left as it was."""
    x = ds.normalize(ds.x_train[:batch].cpu()).to(device)
    y = ds.y_train[:batch].to(device)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with _left_as_it_was(model):
        model.train()
        for i in range(steps + 1):
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                with _autocast(device, precision):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                if i:
                    times[precision].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress=None,
    shard: bool = True,
) -> float:
    """Top-1 accuracy (fraction) on the test split, in fp32 on every device (as onnxruntime measures it); the
    count stays on the device until the end, so there is no host sync per batch. Under torchrun (and ``shard``)
    every rank must call it: each evaluates its shard and the counts are summed."""
    device = torch.device(device)
    model.eval().to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    task = progress.add_task("evaluate", total=len(ds.y_test), info="") if progress is not None else None
    shard = shard and distributed.active()  # each rank its shard; the counts are summed
    parts = (distributed.rank(), distributed.world_size()) if shard else None
    for xb, yb in ds.test_batches(batch_size, shard=parts, device=device):
        logits = model(xb)
        correct += (logits.argmax(1) == yb).sum()
        if task is not None:
            progress.advance(task, len(yb))
    if task is not None:
        progress.remove_task(task)
    return int(distributed.all_sum(correct) if shard else correct) / len(ds.y_test)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 8:  # fewer steps than that leave a one-cycle phase empty
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25, div_factor=10.0, final_div_factor=100.0
        )
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.5), int(total * 0.75)], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def schedule_lrs(cfg: TrainConfig, n_train: int = 0, steps_per_epoch: int | None = None) -> list[float]:
    """The learning rate of every step of ``cfg``'s schedule, on ``n_train`` images (one process, the last batch
    kept) or at ``steps_per_epoch``."""
    per_epoch = steps_per_epoch if steps_per_epoch is not None else -(-n_train // cfg.batch_size)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sched = make_scheduler(opt, cfg, per_epoch)
    lrs = []
    for _ in range(cfg.epochs * per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def fit(
    model: nn.Module,
    ds: Dataset,
    cfg: TrainConfig,
    resume_path: Path | None = None,
    resume: bool = False,
    description: str = "train",
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; returns {history, best_accuracy, final_accuracy, seconds, images_per_s}.

    With ``resume_path``, the full training state is saved there (atomically) after every epoch, and with
    ``resume`` an existing state there is continued from instead of starting over. With ``teacher`` (and
    ``cfg.distill`` > 0) the loss is :func:`distill_loss` against the teacher's logits (the teacher in eval mode).
    """
    cfg.validate()
    device = distributed.setup(resolve_device(cfg.device))
    world = distributed.world_size()
    _check_ranks(cfg, ds, world)
    user_code = not is_builtin(model)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling, and augmentation on the CPU
    # Augmentation runs where the data is: on CUDA with the run's own CUDA generator (saved for resume), never the
    # global one, so a resumed run continues the same random stream.
    aug_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed + 1)
    model.to(device)
    channels_last = use_channels_last(device) and ds.x_train.dim() == 4  # image batches (N, C, H, W) only
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None and cfg.distill > 0:
        teacher = teacher.to(device).eval().requires_grad_(False)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    else:
        teacher = None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms once
    ds_dev = ds.to(device)  # a new Dataset on the device; the caller's stays where it was
    precision, precision_why = _precision(cfg, model, ds_dev, device, world)
    drop_last, steps = _steps(cfg, ds, world)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    sched = make_scheduler(opt, cfg, steps)
    history: list[dict[str, float]] = []
    start_epoch, train_seconds = 0, 0.0
    if resume and resume_path is not None and resume_path.exists():
        meta = _restore(resume_path, cfg, model, opt, sched, gen, aug_gen)
        start_epoch, history, train_seconds = meta["epoch"], meta["history"], meta["train_seconds"]
        if "precision" in meta:  # the interrupted run's choice, not a new probe's
            precision, precision_why = meta["precision"], meta["precision_reason"]
        console.print(f"resuming {description} from epoch {start_epoch} ({resume_path})")
    bn_kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    model, forward = _wrap(model, cfg, world, device)
    bn_ws = bn_weights(model)
    share = cfg.batch_size // world
    compile_seconds = _warm_up(model, forward, ds_dev, share, device, channels_last, precision) if cfg.compile else 0.0
    with make_progress() as progress:
        task = progress.add_task(description, total=cfg.epochs * steps, completed=start_epoch * steps, info="")
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            seen = 0
            for xb, yb in ds_dev.train_batches(cfg.batch_size, epoch, cfg.seed, gen, aug_gen, drop_last, cfg.augment,
                                               distributed.rank(), world, device):  # fmt: skip
                loss = _step(model, forward, opt, sched, ds.normalize(xb), yb, cfg, bn_ws, precision, channels_last,
                             user_code, epoch, teacher)  # fmt: skip
                loss_sum += loss * len(yb)
                seen += len(yb)
                progress.advance(task)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_s = time.perf_counter() - t0
            train_seconds += epoch_s
            if world > 1:
                totals = distributed.all_sum(torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]))
                loss_sum, seen = totals[0], int(totals[1])
            last = epoch + 1 == cfg.epochs
            acc = (
                evaluate(model, ds_dev, device, cfg.eval_batch_size)
                if last or (epoch + 1) % cfg.eval_every == 0
                else None
            )
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": float(loss_sum) / seen,
                    "accuracy": acc,
                    "seconds": epoch_s,
                    "images_per_s": seen / epoch_s,
                }
            )
            shown = "" if acc is None else f" acc {acc:.4f}"
            progress.update(task, info=f"epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['loss']:.3f}{shown}")
            if resume_path is not None and distributed.is_main():
                state = {"epoch": epoch + 1, "precision": precision, "precision_reason": precision_why,
                         "history": history, "train_seconds": train_seconds}  # fmt: skip
                _save_state(resume_path, model, cfg, opt, sched, gen, aug_gen, state)
    identical = distributed.same_on_every_rank(model)
    if not identical:
        raise RuntimeError("ranks ended training with different parameters")
    if cfg.sync_bn and world > 1:
        model = restore_bn_selections(_revert_sync_bn(model, bn_kinds))
    model.to("cpu").to(memory_format=torch.contiguous_format)
    n_images = sum(steps * cfg.batch_size if drop_last else len(ds.y_train) for _ in history)
    return {
        "model": model,
        "world_size": world,
        "compile_seconds": compile_seconds,
        "channels_last": channels_last,
        "precision": precision,
        "precision_reason": precision_why,
        "history": history,
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history if h["accuracy"] is not None),
        "train_seconds": train_seconds,
        "images_per_s": n_images / train_seconds if train_seconds else 0.0,
    }


def _precision(cfg: TrainConfig, model, ds_dev, device, world: int) -> tuple[str, str]:
    """fp32 or bf16 (``auto`` measures both here); under torchrun every rank takes rank 0's measured choice."""
    precision, why = choose_precision(cfg.precision, model, ds_dev, device, cfg.batch_size // world)
    if world > 1 and cfg.precision == "auto":
        flag = torch.tensor(float(precision == "bf16" and distributed.rank() == 0), device=device)
        precision = "bf16" if float(distributed.all_sum(flag)) > 0 else "fp32"
    return precision, why


def _steps(cfg: TrainConfig, ds: Dataset, world: int) -> tuple[bool, int]:
    """(drop the last partial batch, steps per epoch). torch.compile and DDP want static shapes, so they drop it."""
    drop_last = (cfg.compile or world > 1) and len(ds.y_train) >= cfg.batch_size
    return drop_last, ds.steps_per_epoch(cfg.batch_size, drop_last, world)


def _wrap(model: nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> tuple[nn.Module, Any]:
    """(the model, what to call forward on): SyncBatchNorm under --sync-bn, DDP under torchrun, torch.compile
    under --compile; the forward shares its parameters with the model."""
    if cfg.sync_bn and world > 1:
        model = restore_bn_selections(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, torch.compile(forward) if cfg.compile else forward


def _save_state(path: Path, model, cfg: TrainConfig, opt, sched, gen, aug_gen, state: dict[str, Any]) -> None:
    """Everything a resumed run needs to continue the same schedule and random streams, atomically."""
    meta = {
        "train_config": _cfg_key(cfg),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": gen.get_state(),
        **({"rng_device": aug_gen.get_state()} if aug_gen is not gen else {}),
        **state,
    }
    save_checkpoint(make_checkpoint(model, {}, meta), path)


def _check_ranks(cfg: TrainConfig, ds: Dataset, world: int) -> None:
    """Under torchrun the global batch is split by rank: it must divide, and every rank needs images."""
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must divide by the {world} ranks")
    if world > 1 and len(ds.y_train) < cfg.batch_size:  # one short batch, split by rank: some ranks get nothing
        raise ConfigError(
            f"the training split has {len(ds.y_train)} images, fewer than the global batch of {cfg.batch_size} "
            f"that the {world} ranks share; every rank needs images: lower --batch-size or use fewer ranks"
        )


def _restore(path: Path, cfg: TrainConfig, model, opt, sched, gen, aug_gen) -> dict[str, Any]:
    """Load an interrupted run's state from ``path`` into the model, optimiser, schedule and generators; returns
    its meta (epoch, history, train_seconds, precision)."""
    state = read_checkpoint(path)
    # an option an older version did not have counts as its default (that version's behaviour)
    older = {"precision": "auto", "regularizer": "l1", "polar_t": 1.2, "distill": 0.0, "temperature": 4.0}
    if older | state["meta"].get("train_config", {}) != _cfg_key(cfg):
        raise CheckpointError(
            f"{path} was written with other training options; rerun with the same ones or delete it to start over"
        )
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["meta"]["optimizer"])
    sched.load_state_dict(state["meta"]["scheduler"])
    gen.set_state(state["meta"]["rng"])
    if aug_gen is not gen and "rng_device" in state["meta"]:
        aug_gen.set_state(state["meta"]["rng_device"].cpu())
    return state["meta"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weight: float, temperature: float):
    """(1 − weight)·cross-entropy(labels) + weight·T²·KL(teacher ‖ student) on logits softened by T (Hinton et
    al. 2015; T² keeps the KL term's gradients at the scale of the label loss's)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1), reduction="batchmean",
                  log_target=True)  # fmt: skip
    return (1 - weight) * F.cross_entropy(student, labels) + weight * t * t * kl


def _step(
    model, forward, opt, sched, x, yb, cfg: TrainConfig, bn_ws, precision, channels_last, user_code, epoch, teacher
):
    """One training step: forward (the user's model's failures as one line), loss (with the teacher's KL term when
    distilling), backward, the sparsity term on every BN γ (after DDP's all-reduce, so every rank adds the same),
    SGD step, schedule step. Returns the loss."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, precision):
        logits = _forward(forward, x, user_code, f"training epoch {epoch + 1}")
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = distill_loss(logits, target, yb, cfg.distill, cfg.temperature)
        else:
            loss = F.cross_entropy(logits, yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the gradients are averaged over ranks here
    regularize(model, cfg.sparsity, bn_ws, cfg.regularizer, cfg.polar_t)
    opt.step()
    sched.step()
    return loss.detach()


def is_builtin(model: nn.Module) -> bool:
    """One of slimexport's own architectures (its forward failing is a bug of ours, not the user's code)."""
    return _builtin_source(getattr(model, "arch", None))


def _describe_output(out: object) -> str:
    if isinstance(out, dict):
        return f"a dict (keys {', '.join(map(str, list(out)[:4]))})"
    return f"a {type(out).__name__}"


def _forward(forward, x: torch.Tensor, user_code: bool, when: str) -> torch.Tensor:
    """``forward(x)``, where the user's model code raising, or returning anything but one logits tensor, is a
    one-line :class:`ModelCodeError` (for slimexport's own models a failure stays a bug, exit 3)."""
    if not user_code:
        return forward(x)
    try:
        out = forward(x)
    except SlimExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise ModelCodeError(f"the model's forward raised {type(e).__name__} in {when}: {first_line(e, 160)}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelCodeError(
            f"the model's forward returns {_describe_output(out)} in {when}; slimexport trains and exports a model "
            "whose forward returns the class logits as one tensor: wrap it so that it does"
        )
    return out


@torch.no_grad()
def probe_model(model: nn.Module, ds: Dataset, what: str) -> None:
    """Run the user's model once on two test images (eval mode, so no statistics change) before any long work:
    a forward that raises, returns a tuple or dict, or has another number of outputs than the data has classes
    (a factory that ignores ``num_classes``) is a one-line :class:`ModelCodeError` naming ``what``."""
    if is_builtin(model):
        return
    was = model.training
    model.eval()
    try:
        out = _forward(model, ds.normalize(ds.x_test[:2].cpu()), True, f"a first check on 2 test images ({what})")
    finally:
        model.train(was)
    want = (min(2, len(ds.y_test)), ds.num_classes)
    if tuple(out.shape) != want:
        raise ModelCodeError(
            f"{what} gives outputs of shape {tuple(out.shape)} for {want[0]} images; the data set has "
            f"{ds.num_classes} classes, so they must be {want} (does the model factory take num_classes?)"
        )


def _revert_sync_bn(module: nn.Module, kinds: dict[str, type], prefix: str = "") -> nn.Module:
    """SyncBatchNorm back to the BatchNorm it was (1d, 2d or 3d, as recorded in ``kinds`` by module name), keeping
    parameters, statistics and children (checkpoints hold plain BNs)."""
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        was = kinds.get(prefix, nn.BatchNorm2d)
        base = next((c for c in (nn.BatchNorm1d, nn.BatchNorm3d) if issubclass(was, c)), nn.BatchNorm2d)
        out = base(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats)  # fmt: skip
        out.load_state_dict(module.state_dict())
    for name, child in module.named_children():
        out.add_module(name, _revert_sync_bn(child, kinds, f"{prefix}.{name}" if prefix else name))
    return out


def use_channels_last(device: torch.device) -> bool:
    """Train in channels-last memory format where it was measured faster: on CUDA, and on CPUs with AVX-512
    (one training step ×1.06–×1.46 faster on this project's AMD EPYC for vgg19, vgg11_w25, preresnet20 and
    resnet18, about ×1.1 for VGG-19 on its Intel Xeon: ``python -m benchmarks.channels_last``). CPUs with AVX2
    only were not measured, so they keep the default layout."""
    if device.type == "cuda":
        return True
    from slimexport.runtime import machine_facts

    return device.type == "cpu" and machine_facts()["avx512f"]


def _warm_up(
    model: nn.Module,
    forward,
    ds: Dataset,
    batch: int,
    device: torch.device,
    channels_last: bool = False,
    precision: str = "fp32",
) -> float:
    """Compile ``forward`` (and its backward) outside the timed epochs: one forward and backward on a training-shaped
    batch, after which the model's weights, BN statistics and gradients are put back as they were. Returns seconds."""
    x = ds.normalize(ds.x_train[:batch])  # the shape every training step has (this rank's share under DDP)
    y = ds.y_train[:batch]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _left_as_it_was(model):
        t0 = time.perf_counter()
        model.train()
        with _autocast(device, precision):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds


def _cfg_key(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("device")
    d.pop("eval_batch_size")
    d.pop("eval_every")
    d.pop("compile")
    return d


def data_meta(ds: Dataset) -> dict[str, Any]:
    return {
        "name": ds.name,
        "mean": ds.mean,
        "std": ds.std,
        "image_size": list(ds.image_size),
        "label_names": ds.label_names,
    }


def adopt(
    out: str | os.PathLike,
    ds: Dataset,
    arch: str,
    weights: str | os.PathLike,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Take a trained model as it is: ``arch`` with ``weights`` (a state_dict file or ``torchvision:WEIGHTS``),
    measured on the test split and written as the checkpoint ``out``, without training. Returns its meta."""
    out = Path(out)
    model = create_model(arch, ds.num_classes, ds.in_channels)
    if "image_size" in model.config:
        model.config["image_size"] = list(ds.image_size)
    from slimexport.models.external import load_weights

    loaded = load_weights(model, weights)
    probe_model(model, ds, f"--arch {arch}")
    if loaded["reinitialised"]:
        console.print(
            f"[yellow]{arch}: the classifier ({', '.join(loaded['reinitialised'])}) is new for "
            f"{ds.num_classes} classes; the baseline's accuracy is before any training of it[/]"
        )
    accuracy = evaluate(model, ds, device)
    meta = {"stage": "baseline", "epochs": 0, "accuracy": accuracy, "weights": str(weights)} | loaded
    meta |= {"history": [], "train_seconds": 0.0, "images_per_s": None, "world_size": distributed.world_size()}
    with output_lock(out):
        if distributed.is_main():
            save_checkpoint(make_checkpoint(model.cpu(), data_meta(ds), meta), out)
    distributed.barrier()
    return meta


def initial_model(arch: str, ds: Dataset, seed: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """The model training from scratch starts from: ``arch`` for ``ds``, initialised from ``seed`` (or ``weights``)."""
    torch.manual_seed(seed)  # the initial weights too are a function of the seed
    try:
        model = create_model(arch, ds.num_classes, ds.in_channels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "image_size" in model.config:  # a traced model prunes at the data's image size
        model.config["image_size"] = list(ds.image_size)
    if weights is not None:
        from slimexport.models.external import load_weights

        load_weights(model, weights)
    return model


def train(
    out: str | os.PathLike,
    ds: Dataset,
    cfg: TrainConfig,
    arch: str | None = None,
    init: str | os.PathLike | None = None,
    stage: str | None = None,
    resume: bool = False,
    weights: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``arch`` from scratch, or continue from checkpoint ``init`` (refine); write the checkpoint ``out``.
    With ``teacher`` (a checkpoint: the unpruned model) and ``cfg.distill`` > 0, refine learns from its logits too.

    Returns the checkpoint's ``meta``. Training state is kept in ``out.resume`` until the run completes.
    """
    out = Path(out)
    if (arch is None) == (init is None):
        raise ConfigError("give exactly one of an architecture (train) or an initial checkpoint (refine)")
    if (teacher is not None) != (cfg.distill > 0):
        raise ConfigError("distillation needs both a teacher checkpoint and a --distill-weight above 0")
    teacher_model, teacher_meta = None, {}
    if teacher is not None:
        teacher_model, tck = load_checkpoint(teacher)
        ds = fit_data(tck, teacher, ds)
        teacher_meta = {"teacher": str(teacher), "teacher_accuracy": tck["meta"].get("accuracy")}
    prior_meta: dict[str, Any] = {}
    if init is not None:
        model, ckpt = load_checkpoint(init)
        ds = fit_data(ckpt, init, ds)
        prior_meta = ckpt["meta"]
    else:
        model = initial_model(arch, ds, cfg.seed, weights)
    stage = stage or ("refined" if init is not None else ("sparse" if cfg.sparsity > 0 else "baseline"))
    probe_model(model, ds, str(init) if init is not None else f"--arch {arch}")
    resume_path = out.with_name(out.name + ".resume")
    with output_lock(out):  # a second process writing the same checkpoint is refused, naming this one
        result = fit(model, ds, cfg, resume_path=resume_path, resume=resume, description=stage, teacher=teacher_model)
        model = result["model"]  # the same module (or, after --sync-bn, one with plain BatchNorms again)
        meta = {
            "stage": stage,
            "train_config": asdict(cfg),
            "accuracy": result["final_accuracy"],
            "best_accuracy": result["best_accuracy"],
            "history": result["history"],
            "train_seconds": result["train_seconds"],
            "images_per_s": result["images_per_s"],
            "compile_seconds": result["compile_seconds"],
            "channels_last": result["channels_last"],
            "precision": result["precision"],
            "precision_reason": result["precision_reason"],
            "parent": prior_meta.get("stage"),
        } | teacher_meta
        if "prune" in prior_meta:
            meta["prune"] = prior_meta["prune"]
        meta["world_size"] = result["world_size"]
        if distributed.is_main():  # rank 0 alone writes; the others wait until the file is there
            save_checkpoint(make_checkpoint(model, data_meta(ds), meta), out)
            resume_path.unlink(missing_ok=True)
    distributed.barrier()
    return meta

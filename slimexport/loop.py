"""The training loop, one for plain, sparse and refine training (:func:`fit`): its state in one object
(:class:`_Loop`), the step (forward, loss with the teacher's KL term when distilling, backward, the sparsity term,
SGD and the schedule), per-epoch evaluation, resume state, DDP under torchrun; and :func:`evaluate`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimexport import distributed
from slimexport.channels import restore_bn_selections
from slimexport.checkpoint import make_checkpoint, read_checkpoint, save_checkpoint
from slimexport.config import TrainConfig
from slimexport.console import console, make_progress
from slimexport.data import Dataset
from slimexport.errors import CheckpointError, ConfigError, DeviceError, ModelCodeError, SlimExportError, first_line
from slimexport.graph import BN_TYPES
from slimexport.models import is_builtin as _builtin_source
from slimexport.precision import autocast, choose_precision, use_channels_last, warm_up
from slimexport.regularizer import bn_weights, regularize


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is a :class:`DeviceError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was requested but CUDA is not available on this machine (torch sees no GPU)")
    if device != "cpu" and not device.startswith("cuda"):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or auto")
    return torch.device(device)


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
    _check_ranks(cfg, ds, distributed.world_size())
    loop = _Loop(model, ds, cfg, device, teacher)
    if resume and resume_path is not None and resume_path.exists():
        loop.restore(resume_path)
        console.print(f"resuming {description} from epoch {loop.start_epoch} ({resume_path})")
    loop.wrap()
    with make_progress() as progress:
        task = progress.add_task(description, total=cfg.epochs * loop.steps, completed=loop.start_epoch * loop.steps,
                                 info="")  # fmt: skip
        for epoch in range(loop.start_epoch, cfg.epochs):
            row = loop.epoch(epoch, lambda: progress.advance(task))
            shown = "" if row["accuracy"] is None else f" acc {row['accuracy']:.4f}"
            progress.update(task, info=f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f}{shown}")
            if resume_path is not None and distributed.is_main():
                loop.save(resume_path)
    return loop.finish()


class _Loop:
    """The state of one training run: the model and what its forward is called on (DDP, torch.compile), optimiser,
    schedule, random streams (shuffling, and augmentation where the data is), arithmetic and memory layout, the
    teacher, the history. :meth:`epoch` trains one epoch; :meth:`save` and :meth:`restore` are resume."""

    def __init__(self, model: nn.Module, ds: Dataset, cfg: TrainConfig, device: torch.device, teacher):
        self.cfg, self.device, self.world = cfg, device, distributed.world_size()
        self.user_code = not is_builtin(model)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # shuffling, and augmentation on the CPU
        # Augmentation runs where the data is: on CUDA with the run's own CUDA generator (saved for resume), never
        # the global one, so a resumed run continues the same random stream.
        self.aug_gen = self.gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed + 1)
        model.to(device)
        self.channels_last = use_channels_last(device) and ds.x_train.dim() == 4  # image batches (N, C, H, W) only
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.teacher = None
        if teacher is not None and cfg.distill > 0:
            self.teacher = teacher.to(device).eval().requires_grad_(False)
            if self.channels_last:
                self.teacher.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms once
        self.ds, self.ds_dev = ds, ds.to(device)  # a new Dataset on the device; the caller's stays where it was
        self.precision, self.precision_why = _precision(cfg, model, self.ds_dev, device, self.world)
        self.drop_last, self.steps = _steps(cfg, ds, self.world)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=True)  # fmt: skip
        self.sched = make_scheduler(self.opt, cfg, self.steps)
        self.model, self.forward = model, model
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.train_seconds, self.compile_seconds = 0, 0.0, 0.0
        self.bn_kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)}

    def restore(self, path: Path) -> None:
        meta = _restore(path, self.cfg, self.model, self.opt, self.sched, self.gen, self.aug_gen)
        self.start_epoch, self.history, self.train_seconds = meta["epoch"], meta["history"], meta["train_seconds"]
        if "precision" in meta:  # the interrupted run's choice, not a new probe's
            self.precision, self.precision_why = meta["precision"], meta["precision_reason"]

    def wrap(self) -> None:
        """SyncBatchNorm, DDP and torch.compile around the model (compiled outside the timed epochs)."""
        self.model, self.forward = _wrap(self.model, self.cfg, self.world, self.device)
        self.bn_ws = bn_weights(self.model)
        if self.cfg.compile:
            share = self.cfg.batch_size // self.world
            self.compile_seconds = warm_up(self.model, self.forward, self.ds_dev, share, self.device,
                                           self.channels_last, self.precision)  # fmt: skip

    def epoch(self, epoch: int, advance) -> dict[str, Any]:
        """Train one epoch (``advance`` after each step), evaluate when due; the history row."""
        cfg, device = self.cfg, self.device
        self.model.train()
        t0 = time.perf_counter()
        loss_sum, seen = torch.zeros((), device=device), 0
        for xb, yb in self.ds_dev.train_batches(cfg.batch_size, epoch, cfg.seed, self.gen, self.aug_gen,
                                                self.drop_last, cfg.augment, distributed.rank(), self.world,
                                                device):  # fmt: skip
            loss_sum += self.step(self.ds.normalize(xb), yb, epoch) * len(yb)
            seen += len(yb)
            advance()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        if self.world > 1:
            totals = distributed.all_sum(torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]))
            loss_sum, seen = totals[0], int(totals[1])
        due = epoch + 1 == cfg.epochs or (epoch + 1) % cfg.eval_every == 0
        acc = evaluate(self.model, self.ds_dev, device, cfg.eval_batch_size) if due else None
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / seen, "accuracy": acc, "seconds": seconds,
               "images_per_s": seen / seconds}  # fmt: skip
        self.history.append(row)
        return row

    def step(self, x: torch.Tensor, yb: torch.Tensor, epoch: int) -> torch.Tensor:
        """One training step: forward (the user's model's failures as one line), loss (with the teacher's KL term
        when distilling), backward, the sparsity term on every BN γ (after DDP's all-reduce, so every rank adds the
        same), SGD step, schedule step. Returns the loss."""
        cfg = self.cfg
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.precision):
            logits = forward_checked(self.forward, x, self.user_code, f"training epoch {epoch + 1}")
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(x)
                loss = distill_loss(logits, target, yb, cfg.distill, cfg.temperature)
            else:
                loss = F.cross_entropy(logits, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over ranks here
        regularize(self.model, cfg.sparsity, self.bn_ws, cfg.regularizer, cfg.polar_t)
        self.opt.step()
        self.sched.step()
        return loss.detach()

    def save(self, path: Path) -> None:
        state = {"epoch": self.history[-1]["epoch"], "precision": self.precision,
                 "precision_reason": self.precision_why, "history": self.history,
                 "train_seconds": self.train_seconds}  # fmt: skip
        _save_state(path, self.model, self.cfg, self.opt, self.sched, self.gen, self.aug_gen, state)

    def finish(self) -> dict[str, Any]:
        """The trained model back on the CPU in plain BatchNorms, and what the run measured."""
        if not distributed.same_on_every_rank(self.model):
            raise RuntimeError("ranks ended training with different parameters")
        model = self.model
        if self.cfg.sync_bn and self.world > 1:
            model = restore_bn_selections(_revert_sync_bn(model, self.bn_kinds))
        model.to("cpu").to(memory_format=torch.contiguous_format)
        n_train = self.steps * self.cfg.batch_size if self.drop_last else len(self.ds.y_train)
        n_images = n_train * len(self.history)
        return {
            "model": model,
            "world_size": self.world,
            "compile_seconds": self.compile_seconds,
            "channels_last": self.channels_last,
            "precision": self.precision,
            "precision_reason": self.precision_why,
            "history": self.history,
            "final_accuracy": self.history[-1]["accuracy"],
            "best_accuracy": max(h["accuracy"] for h in self.history if h["accuracy"] is not None),
            "train_seconds": self.train_seconds,
            "images_per_s": n_images / self.train_seconds if self.train_seconds else 0.0,
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


def is_builtin(model: nn.Module) -> bool:
    """One of slimexport's own architectures (its forward failing is a bug of ours, not the user's code)."""
    return _builtin_source(getattr(model, "arch", None))


def _describe_output(out: object) -> str:
    if isinstance(out, dict):
        return f"a dict (keys {', '.join(map(str, list(out)[:4]))})"
    return f"a {type(out).__name__}"


def forward_checked(forward, x: torch.Tensor, user_code: bool, when: str) -> torch.Tensor:
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


def _cfg_key(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("device")
    d.pop("eval_batch_size")
    d.pop("eval_every")
    d.pop("compile")
    return d

"""Training: plain, sparse (L1 on every BN γ), and refine of a pruned model — one loop, one artifact out.

The sparsity penalty is a hook, :func:`regularize`, called between ``backward()`` and ``step()``; it adds the
network-slimming subgradient s·sign(γ) to every BatchNorm weight gradient, or with ``regularizer="polar"`` the
polarization regularizer's (Zhuang et al., NeurIPS 2020). Refine can learn from a teacher (``teacher=``: the
unpruned model; knowledge distillation, Hinton et al. 2015): KL on softened logits plus the label loss.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport import distributed
from slimexport.checkpoint import fit_data, load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import TrainConfig
from slimexport.console import console
from slimexport.data import Dataset
from slimexport.errors import ConfigError, ModelCodeError
from slimexport.fileio import output_lock
from slimexport.loop import evaluate, fit, forward_checked, is_builtin
from slimexport.models import create_model


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
        out = forward_checked(
            model, ds.normalize(ds.x_test[:2].cpu()), True, f"a first check on 2 test images ({what})"
        )
    finally:
        model.train(was)
    want = (min(2, len(ds.y_test)), ds.num_classes)
    if tuple(out.shape) != want:
        raise ModelCodeError(
            f"{what} gives outputs of shape {tuple(out.shape)} for {want[0]} images; the data set has "
            f"{ds.num_classes} classes, so they must be {want} (does the model factory take num_classes?)"
        )


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

"""Training inside Ultralytics' own trainer (its losses, augmentation, EMA, AMP, schedule), through its public
extension points only (a callback, a trainer subclass's ``get_model``), so an Ultralytics release that changes
its internals does not break it:

- **sparse training**: :func:`sparsity_callback` registers, when the trainer has built its optimizer, an
  optimizer *step pre-hook* that adds the sparsity subgradient to every BN γ's gradient. The hook runs inside
  ``optimizer.step()``: after AMP's ``scaler.unscale_`` (so the term is not scaled by the loss scale, and a step
  the scaler skips for inf/NaN gradients adds nothing), after gradient clipping (the term is not clipped), and,
  under Ultralytics' DDP, on every rank after the gradients' all-reduce (the callback travels to the workers with
  the trainer). Nothing has to be turned off: AMP, the scaler, clipping and the EMA stay as they are.
- **fine-tuning a pruned model**: :class:`PrunedDetectionTrainer` trains the model it is given instead of
  rebuilding it from its yaml, so the pruned widths survive the trainer, its EMA and its checkpoints;
  :func:`train_detector` drives either from Python.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.errors import ConfigError
from slimexport.regularizer import bn_weights, regularize

try:  # the yolo extra (AGPL-3.0): only this package imports it
    from ultralytics.models.yolo.detect import DetectionTrainer
except ImportError:  # pragma: no cover - the message is raised where a detector is asked for
    DetectionTrainer = object  # type: ignore[misc,assignment]

YOLO_HINT = "Ultralytics is not installed: pip install 'slimexport[yolo]' (Ultralytics is AGPL-3.0)"


def require_ultralytics() -> None:
    if DetectionTrainer is object:
        raise ConfigError(YOLO_HINT)


class _SparsityHook:
    """The optimizer step pre-hook: adds ``sparsity``·∂penalty/∂γ to every BN γ's gradient (see the module)."""

    def __init__(self, model: nn.Module, sparsity: float, regularizer: str, t: float):
        self.weights = bn_weights(model)
        self.sparsity, self.regularizer, self.t = sparsity, regularizer, t
        self.steps = 0

    def __call__(self, optimizer, args, kwargs) -> None:
        regularize(None, self.sparsity, self.weights, self.regularizer, self.t)  # type: ignore[arg-type]
        self.steps += 1


class sparsity_callback:  # noqa: N801 - used as a function: trainer.add_callback(EVENT, sparsity_callback(1e-3))
    """An Ultralytics callback for ``on_pretrain_routine_end`` that makes the training sparse (see the module)::

        model = YOLO("best.pt")
        model.add_callback("on_pretrain_routine_end", sparsity_callback(1e-3))
        model.train(data="data.yaml", epochs=50)

    A plain object, so it survives Ultralytics' DDP launch (the trainer's callbacks are pickled to the workers)."""

    EVENT = "on_pretrain_routine_end"

    def __init__(self, sparsity: float, regularizer: str = "l1", t: float = 1.2):
        if sparsity < 0:
            raise ConfigError(f"sparsity must be >= 0, got {sparsity}")
        self.sparsity, self.regularizer, self.t = sparsity, regularizer, t
        self.hook: _SparsityHook | None = None

    def __call__(self, trainer) -> None:
        if self.sparsity <= 0:
            return
        self.hook = _SparsityHook(trainer.model, self.sparsity, self.regularizer, self.t)
        if not self.hook.weights:
            raise ConfigError(f"{type(trainer.model).__name__} has no BatchNorm: nothing for sparse training")
        trainer.optimizer.register_step_pre_hook(self.hook)


class PrunedDetectionTrainer(DetectionTrainer):  # type: ignore[misc,valid-type]
    """Ultralytics' ``DetectionTrainer`` that trains the model it is given, as it is, instead of building a new one
    from the model's yaml (which would bring the unpruned widths back). Use it with ``YOLO``::

        YOLO("pruned.pt").train(trainer=PrunedDetectionTrainer, data="data.yaml", epochs=20)

    or set ``trainer.model`` to a module before ``trainer.train()``."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        if isinstance(weights, nn.Module):
            nc = weights.model[-1].nc
            if nc != self.data["nc"]:
                raise ConfigError(f"the model detects {nc} classes but the data has {self.data['nc']}")
            return weights
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)


def train_detector(
    model: nn.Module,
    data: str | Path,
    out: str | Path,
    epochs: int,
    image_size: int,
    batch: int = 16,
    device: str = "cpu",
    seed: int = 0,
    sparsity: float = 0.0,
    regularizer: str = "l1",
    t: float = 1.2,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (a detection model, pruned or not; not modified) with Ultralytics' trainer on ``data`` (its
    data yaml) for ``epochs`` at ``image_size``, with the sparsity term on every BN γ where ``sparsity`` > 0.
    Ultralytics writes its logs and checkpoints to ``out``. ``overrides`` are Ultralytics' own training arguments
    (``lr0``, ``amp``, ``workers``, ``close_mosaic``, ...). Returns the final EMA model in float32 (not the half
    precision copy Ultralytics saves) and a record: epochs, seconds, steps with the sparsity term, and the trainer's
    own last validation (on the PyTorch model)."""
    require_ultralytics()
    out = Path(out)
    args = {
        "model": str(out / "model.yaml"),  # a name for Ultralytics' logs only: the module below is what trains
        "data": str(data),
        "epochs": epochs,
        "imgsz": image_size,
        "batch": batch,
        "device": device,
        "seed": seed,
        "deterministic": True,
        "project": str(out.parent),
        "name": out.name,
        "exist_ok": True,
        "plots": False,
        "verbose": False,
    } | overrides
    trainer = PrunedDetectionTrainer(overrides=args)
    trainer.model = copy.deepcopy(model).float().train()
    callback = sparsity_callback(sparsity, regularizer, t)
    trainer.add_callback(callback.EVENT, callback)
    for p in trainer.model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = _final_model(trainer)
    metrics = {k.split("/")[-1]: float(v) for k, v in (trainer.metrics or {}).items() if "mAP" in k}
    return trained, {
        "epochs": epochs,
        "seconds": seconds,
        "sparsity": sparsity,
        "regularizer": regularizer,
        "sparse_steps": callback.hook.steps if callback.hook else 0,
        "amp": bool(getattr(trainer, "amp", False)),
        "torch_val": metrics,
        "ultralytics_dir": str(trainer.save_dir),
    }


def _final_model(trainer) -> nn.Module:
    """The trainer's final EMA weights in float32: from memory where this process trained, else (Ultralytics' DDP
    trained in worker processes) from its ``last.pt``, the user's own run (read with Ultralytics' loader)."""
    ema = getattr(trainer, "ema", None)
    if ema is not None:
        model = copy.deepcopy(ema.ema).float()
    else:  # pragma: no cover - DDP on several GPUs
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(trainer.last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def bn_gamma_values(model: nn.Module) -> list[float]:
    """Every BN |γ| of the model, for the histogram."""
    return torch.cat([w.detach().abs().flatten().cpu() for w in bn_weights(model)]).tolist()

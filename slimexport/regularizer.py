"""The sparsity term of network slimming on every BatchNorm γ: a hook called between ``backward()`` and ``step()``
(:func:`regularize`) that adds the L1 subgradient s·sign(γ), or with ``regularizer="polar"`` the polarization
regularizer's (Zhuang et al., NeurIPS 2020). Every training loop uses it: slimexport's own, the Python API's,
the Lightning callback."""

from __future__ import annotations

import torch
from torch import nn

from slimexport.config import REGULARIZERS
from slimexport.errors import ConfigError
from slimexport.graph import BN_TYPES


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

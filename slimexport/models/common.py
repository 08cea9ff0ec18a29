"""Pieces shared by the architectures: channel selection, reference initialisation, and weight-slicing helpers."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn


class SlimModel(nn.Module):
    """The interface the pipeline uses, named once: the hand-written families (VGG, PreResNet, DenseNet) and
    :class:`~slimexport.models.external.GraphModel` (any CNN, through the graph engine) implement it, so no stage
    asks a model what it supports.

    Attributes every model sets: ``arch`` (its registry name or source), ``num_classes``, ``in_channels`` and
    ``config`` (plain data from which ``create_model`` rebuilds it, pruned or not).
    """

    arch: str
    num_classes: int
    in_channels: int
    config: dict

    def prunable_bns(self) -> list[tuple[str, nn.Module]]:
        """(name, BatchNorm) of every BN whose |γ| network slimming scores, in forward order."""
        raise NotImplementedError

    def pruned(self, keep: dict[str, torch.Tensor], round_to: int = 1, prune_stream: bool = False) -> SlimModel:
        """A physically smaller copy that keeps channels ``keep[bn_name]`` of every prunable BN."""
        raise NotImplementedError

    def selection_units(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        """(selection, the BN after it, its consumer) for every channel selection; none by default."""
        return []

    def stream_widths(self) -> list[int] | None:
        """The residual stream's segment widths, for networks that have one (``--prune-stream``)."""
        return None

    def for_export(self) -> nn.Module:
        """The module to export: an exact rewrite in ops that run faster in the runtimes, or the model itself."""
        return self

    def without_selections(self) -> nn.Module:
        """The same function with every selection absorbed into zero weights (``--selection dense``)."""
        return self


class ChannelSelection(nn.Module):
    """Picks a static subset of channels (dim 1) — the reference's ``channel_selection``, folded.

    The kept indices are fixed at construction and stored in the model's config, so the op is the cheapest
    exact static one: nothing when every channel is kept (training, before any pruning), a slice when they
    form one contiguous range (one ONNX ``Slice``), otherwise ``index_select`` on a constant index buffer
    (one ONNX ``Gather``). No numpy, no host synchronisation, no trainable parameter.
    """

    def __init__(self, num_channels: int, index: Sequence[int] | None = None):
        super().__init__()
        self.num_channels = int(num_channels)
        idx = None if index is None else [int(i) for i in index]
        if idx is not None:
            if not idx:
                raise ValueError("a channel selection must keep at least one channel")
            if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= self.num_channels:
                raise ValueError(f"invalid channel selection for {self.num_channels} channels: {idx}")
            if idx == list(range(self.num_channels)):
                idx = None
        self.index_list = idx
        if idx is None:
            self.mode, self.start, self.stop = "identity", 0, self.num_channels
        elif idx == list(range(idx[0], idx[0] + len(idx))):
            self.mode, self.start, self.stop = "slice", idx[0], idx[0] + len(idx)
        else:
            self.mode, self.start, self.stop = "gather", 0, 0
            self.register_buffer("index", torch.tensor(idx, dtype=torch.long), persistent=False)

    @property
    def out_channels(self) -> int:
        return self.num_channels if self.index_list is None else len(self.index_list)

    def indices(self) -> list[int]:
        """The kept channel indices (all of them for the identity)."""
        return list(range(self.num_channels)) if self.index_list is None else list(self.index_list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":
            return x
        if self.mode == "slice":
            return x[:, self.start : self.stop]
        return torch.index_select(x, 1, self.index)

    def extra_repr(self) -> str:
        return f"{self.num_channels} -> {self.out_channels}, {self.mode}"


class SelectingBatchNorm:
    """Mixed into a BatchNorm's own class by :func:`set_bn_selection`: the BN first picks its channels out of a
    wider input (a :class:`ChannelSelection` child, ``slim_selection``: nothing, one Slice or one Gather on a
    constant index), then normalises them. The graph engine gives this to a BN whose input other layers read too
    (pre-activation ResNets, DenseNet), so it can drop channels they keep. The BN keeps its name, its parameters
    and its state-dict keys (the index is plain data in the pruning plan, not a persistent buffer)."""

    slim_selection: ChannelSelection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.slim_selection(x))  # type: ignore[misc]


_SELECTING: dict[type, type] = {}


def set_bn_selection(bn: nn.Module, num_channels: int, index: Sequence[int]) -> None:
    """Make ``bn`` normalise channels ``index`` of an input with ``num_channels`` channels (see
    :class:`SelectingBatchNorm`). Works for any BatchNorm class (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d)."""
    if not isinstance(bn, SelectingBatchNorm):
        base = type(bn)
        cls = _SELECTING.get(base)
        if cls is None:
            cls = _SELECTING[base] = type(f"Selecting{base.__name__}", (SelectingBatchNorm, base), {})
            cls.__module__ = __name__
            globals().setdefault(cls.__name__, cls)  # found by name when such a module is pickled in this process
        bn.__class__ = cls
    bn.slim_selection = ChannelSelection(num_channels, index)


def restore_bn_selections(model: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` rebuilds every BN as a plain SyncBatchNorm (keeping its
    children): give the selecting ones back their selection."""
    for m in model.modules():
        sel = m._modules.get("slim_selection")
        if isinstance(sel, ChannelSelection) and not isinstance(m, SelectingBatchNorm):
            set_bn_selection(m, sel.num_channels, sel.indices())
    return model


def reference_init(model: nn.Module, linear_std: float | None = None) -> None:
    """The reference implementation's initialisation: He-normal convs (fan-out), BN γ = 0.5 and β = 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    """Copy the channels ``idx`` of ``src`` (γ, β and running statistics) into ``dst``."""
    dst.weight.copy_(src.weight[idx])
    dst.bias.copy_(src.bias[idx])
    dst.running_mean.copy_(src.running_mean[idx])
    dst.running_var.copy_(src.running_var[idx])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


@torch.no_grad()
def copy_conv(dst: nn.Conv2d, src: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> None:
    w = src.weight
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    dst.weight.copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias if out_idx is None else src.bias[out_idx])


@torch.no_grad()
def dropped_constant(bn: nn.BatchNorm2d, keep: torch.Tensor) -> torch.Tensor:
    """What each dropped channel of ``BN → ReLU`` still contributes, as a constant: relu(β); 0 where kept.

    A channel is dropped because its γ is (near) zero, so its output is (near) the constant relu(β). The
    reference simply loses that constant, which deepens the accuracy drop right after pruning; slimexport
    folds it into the next layer instead (see :func:`conv_shift`).
    """
    const = torch.relu(bn.bias.detach().float()).clone()
    const[keep] = 0.0
    return const


@torch.no_grad()
def conv_shift(conv: nn.Conv2d, const: torch.Tensor) -> torch.Tensor:
    """The constant a conv adds to each output channel when its inputs are the per-channel constants ``const``.

    Exact away from the zero-padded border.
    """
    return (conv.weight.detach().float() * const.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))


def as_index(keep: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(keep, dtype=torch.long).flatten()


@torch.no_grad()
def copy_matching(dst: nn.Module, src: nn.Module) -> None:
    """Copy every parameter and buffer whose name and shape agree."""
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    for k, v in dst_sd.items():
        if k in src_sd and src_sd[k].shape == v.shape:
            v.copy_(src_sd[k])


@torch.no_grad()
def widen_selection(
    sel: ChannelSelection, bn: nn.BatchNorm2d, consumer: nn.Module, wide_bn: nn.BatchNorm2d, wide_consumer: nn.Module
) -> None:
    """Absorb ``select → BN(k) → ReLU → consumer`` into ``BN(C) → ReLU → consumer`` with zero input weights.

    The unselected channels get γ = β = 0 (so their activations are exactly 0) and zero weights in the consumer
    (a conv or a linear layer), so the wide module computes exactly what the selected one did, with no index op.
    """
    idx = torch.as_tensor(sel.indices())
    for name, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        dst = getattr(wide_bn, name)
        dst.fill_(fill)
        dst[idx] = getattr(bn, name)
    wide_consumer.weight.zero_()
    wide_consumer.weight[:, idx] = consumer.weight


def for_export(model: nn.Module) -> nn.Module:
    """The module to export for ``model``: its ``for_export()`` rewrite where it has one (the same function, in ops
    that run faster in the runtimes), else the model itself."""
    return model.for_export() if isinstance(model, SlimModel) else model


@torch.no_grad()
def absorb_selections(model: nn.Module, absorb: Sequence[bool] | None = None) -> nn.Module:
    """A copy of a residual or dense ``model`` with selections absorbed into zero weights (no index op for them).

    ``model.selection_units()`` lists every (selection, the BN after it, the layer that consumes it); ``absorb``
    says, per unit, whether to absorb it (default: all). The config's ``select`` list and ``final_select`` follow
    the order of ``selection_units()``. The copy is built from the model's config with each absorbed selection set
    to keep all channels, and computes the same function.
    """
    units = model.selection_units()
    absorb = [True] * len(units) if absorb is None else list(absorb)
    if len(absorb) != len(units):
        raise ValueError(f"{len(absorb)} absorb flags for {len(units)} selection units")
    cfg = copy.deepcopy(model.config)
    for i, a in enumerate(absorb[:-1]):
        if a:
            cfg["select"][i] = None
    if absorb[-1]:
        cfg["final_select"] = None
    new = type(model)(model.arch, cfg, model.num_classes, model.in_channels)
    copy_matching(new, model)
    for a, (sel, bn, consumer), (_, wide_bn, wide_consumer) in zip(absorb, units, new.selection_units()):
        if a and sel.mode != "identity":
            widen_selection(sel, bn, consumer, wide_bn, wide_consumer)
    return new

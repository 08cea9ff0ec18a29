"""Static channel selections, the one module pruning adds to a model: :class:`ChannelSelection` (nothing, one Slice
or one Gather on a constant index) and :func:`set_bn_selection`, which makes a BatchNorm pick its channels out of a
wider input. The bottom layer: it imports nothing of slimexport."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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

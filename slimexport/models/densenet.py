"""DenseNet (depth 3n+4, growth 12, three dense blocks, pre-activation), the reference's ``densenet``.

Every BN reads the concatenated feature map shared with later layers, so no BN can shrink the map: each is
preceded by a :class:`ChannelSelection` (selecting first is exact, since BN is per-channel, and lets the BN
shrink to the kept channels). Conv and FC *inputs* shrink. Beyond the reference, a map channel that no selection
reads any more is not computed: its producer loses that output channel (see :meth:`DenseNet.pruned`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimexport.models.common import (
    ChannelSelection,
    SlimModel,
    absorb_selections,
    as_index,
    conv_shift,
    copy_bn,
    copy_conv,
    dropped_constant,
    reference_init,
)


def densenet_config(depth: int, growth: int = 12) -> dict[str, Any]:
    if depth < 7 or (depth - 4) % 3:
        raise ValueError(f"densenet depth must be 3n+4 with n >= 1 (7, 10, ..., 40), got {depth}")
    n = (depth - 4) // 3
    # "outputs": per producer of the shared maps (the stem, then every dense layer and transition in forward order),
    # the output channels it keeps (indices into its unpruned outputs), or None for all of them.
    return {
        "depth": depth,
        "growth": growth,
        "select": [None] * (3 * n + 2),
        "final_select": None,
        "outputs": [None] * (3 * n + 3),
    }


class DenseLayer(nn.Module):
    """select → BN → ReLU → conv3×3 (growth channels), concatenated onto the input."""

    def __init__(self, inplanes: int, growth: int, select: Sequence[int] | None):
        super().__init__()
        self.select = ChannelSelection(inplanes, select)
        self.bn1 = nn.BatchNorm2d(self.select.out_channels)
        self.conv1 = nn.Conv2d(self.select.out_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv1(F.relu(self.bn1(self.select(x))))), 1)


class Transition(nn.Module):
    """select → BN → ReLU → conv1×1 → avg-pool 2 (compression 1: width unchanged).

    For export, :func:`fold_transition_pools` turns conv1×1 → avg-pool 2 into one 2×2 stride-2 conv
    (``pool_folded``): the same function and MACs, without onnxruntime's slow AveragePool kernel.
    """

    def __init__(self, inplanes: int, outplanes: int, select: Sequence[int] | None):
        super().__init__()
        self.select = ChannelSelection(inplanes, select)
        self.bn1 = nn.BatchNorm2d(self.select.out_channels)
        self.conv1 = nn.Conv2d(self.select.out_channels, outplanes, 1, bias=False)
        self.pool_folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(self.select(x))))
        return y if self.pool_folded else F.avg_pool2d(y, 2)


class DenseNet(SlimModel):
    def __init__(self, arch: str, config: dict[str, Any], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        n, growth = (config["depth"] - 4) // 3, config["growth"]
        sel = iter(config["select"])
        outputs = iter(config.get("outputs") or [None] * (3 * n + 3))  # checkpoints before "outputs": all kept

        def kept(full: int) -> int:
            k = next(outputs)
            return full if k is None else len(k)

        width = kept(2 * growth)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        for s in range(3):
            layers = []
            for _ in range(n):
                g = kept(growth)
                layers.append(DenseLayer(width, g, next(sel)))
                width += g
            self.add_module(f"dense{s + 1}", nn.Sequential(*layers))
            if s < 2:
                # compression 1: unpruned, a transition keeps its input's width (pruned configs list every producer)
                out = kept(width)
                self.add_module(f"trans{s + 1}", Transition(width, out, next(sel)))
                width = out
        self.select = ChannelSelection(width, config["final_select"])
        self.bn = nn.BatchNorm2d(self.select.out_channels)
        self.fc = nn.Linear(self.select.out_channels, num_classes)
        reference_init(self)

    def units(self) -> list[DenseLayer | Transition]:
        """Every select→BN→ReLU→conv unit, in forward order."""
        return [*self.dense1, self.trans1, *self.dense2, self.trans2, *self.dense3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(x)))))
        x = F.relu(self.bn(self.select(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def selection_units(self) -> list[tuple[ChannelSelection, nn.BatchNorm2d, nn.Module]]:
        """(selection, the BN after it, the layer that consumes it), for every selection."""
        return [(u.select, u.bn1, u.conv1) for u in self.units()] + [(self.select, self.bn, self.fc)]

    def for_export(self) -> DenseNet:
        """The graph to export: this model with its transitions' pools folded (see :func:`fold_transition_pools`)."""
        return fold_transition_pools(self)

    def without_selections(self) -> DenseNet:
        """The same function with no index op (see :meth:`PreResNet.without_selections`)."""
        return absorb_selections(self)

    def producers(self) -> list[nn.Conv2d]:
        """The convs that write the shared maps, in the order of the config's ``outputs``: the stem, then every
        dense layer's and transition's conv."""
        return [self.conv1] + [u.conv1 for u in self.units()]

    @torch.no_grad()
    def pruned(self, keep: dict[str, torch.Tensor], round_to: int = 1, prune_stream: bool = False) -> DenseNet:
        """The smaller model that keeps the channels ``keep`` of every BN (by module name).

        As in the reference, every BN is reached through a selection of the shared map and conv/FC inputs shrink.
        Beyond the reference, a map channel that no later selection reads any more is not computed at all: its
        producer (the stem, a dense layer or a transition) loses that output channel (exact; every producer keeps
        at least one).
        """
        names = {id(m): n for n, m in self.named_modules()}
        n = (self.config["depth"] - 4) // 3
        units = self.units()
        kept_bn = [as_index(keep[names[id(u.bn1)]]) for u in units]
        kf = as_index(keep[names[id(self.bn)]])
        # Each selection's new indices into this model's maps ("map coordinates"), before compaction.
        reads = [[u.select.indices()[i] for i in k.tolist()] for u, k in zip(units, kept_bn)]
        reads.append([self.select.indices()[i] for i in kf.tolist()])
        # Per block: the map's producers as (producer index, first map channel, width); the readers: the block's
        # layers and the transition (or the final BN) after it.
        producers = self.producers()
        out_keep: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(producers)
        remap: list[dict[int, int]] = []
        for b in range(3):
            first = b * (n + 1)  # producer index of the block's input (the stem, then the transitions)
            segs, offset = [], 0
            for j in range(first, first + n + 1):
                width = producers[j].out_channels
                segs.append((j, offset, width))
                offset += width
            read = set().union(*[set(r) for r in reads[b * (n + 1) : b * (n + 1) + n + 1]])
            new_pos: dict[int, int] = {}
            for j, off, width in segs:
                live = [c for c in range(width) if off + c in read] or [0]  # never an empty layer
                out_keep[j] = torch.as_tensor(live, dtype=torch.long)
                for c in live:
                    new_pos[off + c] = len(new_pos)
            remap.append(new_pos)

        cfg = copy.deepcopy(self.config)
        for u in range(len(units)):
            cfg["select"][u] = [remap[u // (n + 1)][c] for c in reads[u]]
        cfg["final_select"] = [remap[2][c] for c in reads[-1]]
        old_outputs = self.config.get("outputs") or [None] * len(producers)
        cfg["outputs"] = [
            [(list(range(p.out_channels)) if old is None else old)[c] for c in k.tolist()]
            for p, old, k in zip(producers, old_outputs, out_keep)
        ]
        new = DenseNet(self.arch, cfg, self.num_classes, self.in_channels)
        copy_conv(new.conv1, self.conv1, out_keep[0], None)

        # `shift`: per channel of the shared map (map coordinates), the constant that dropped channels would have
        # added. Every BN that reads the map absorbs it into its running mean.
        shift = torch.zeros(self.conv1.out_channels)
        for u, (unit, nunit) in enumerate(zip(units, new.units())):
            k = kept_bn[u]
            copy_bn(nunit.bn1, unit.bn1, k)
            nunit.bn1.running_mean.sub_(shift[torch.as_tensor(reads[u], dtype=torch.long)])
            copy_conv(nunit.conv1, unit.conv1, out_keep[u + 1], k)
            delta = conv_shift(unit.conv1, dropped_constant(unit.bn1, k))
            shift = delta if isinstance(unit, Transition) else torch.cat((shift, delta))
        copy_bn(new.bn, self.bn, kf)
        new.bn.running_mean.sub_(shift[torch.as_tensor(reads[-1], dtype=torch.long)])
        new.fc.weight.copy_(self.fc.weight[:, kf])
        new.fc.bias.copy_(self.fc.bias + self.fc.weight @ dropped_constant(self.bn, kf))
        return new


@torch.no_grad()
def fold_transition_pools(model: DenseNet) -> DenseNet:
    """A copy of ``model`` whose transitions run conv1×1 → avg-pool 2 as one 2×2 stride-2 conv.

    Both are linear, so pooling the conv's output equals convolving with the 1×1 weights / 4 at each of the four
    taps, at stride 2: exact up to float rounding, and the same MACs (4 taps at a quarter of the positions).
    onnxruntime's CPU AveragePool is slow (on the development machine a 2×2 pool of a 168×32×32 map took about
    three times as long as the 100 → 168 channel 1×1 conv before it), and the folded conv runs in its blocked
    NCHWc kernels with no pool at all.
    For export only: training keeps the reference's layers.
    """
    new = copy.deepcopy(model)
    for t in (new.trans1, new.trans2):
        if t.pool_folded:
            continue
        w = t.conv1.weight
        conv = nn.Conv2d(w.shape[1], w.shape[0], 2, stride=2, bias=False).to(w.device, w.dtype)
        conv.weight.copy_(w.expand(-1, -1, 2, 2) / 4)
        t.conv1, t.pool_folded = conv, True
    return new

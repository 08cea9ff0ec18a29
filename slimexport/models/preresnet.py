"""Pre-activation bottleneck ResNet (depth 9n+2), the reference's ``preresnet``, with folded channel selection.

Each block is select → BN → ReLU → conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1, plus the residual.
The block input feeds both the residual and the first BN, so that BN cannot shrink the stream: a
:class:`ChannelSelection` picks the surviving channels for conv1 instead. Selecting *before* the first BN is
exact (BN is per-channel) and lets the BN itself shrink to the kept channels. The inner BNs are pruned
physically; the residual stream, the stem and the downsampling convs keep their width.
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
    absorb_selections,
    as_index,
    conv_shift,
    copy_bn,
    copy_conv,
    dropped_constant,
    reference_init,
)

EXPANSION = 4
STAGE_PLANES = (16, 32, 64)


def preresnet_config(depth: int) -> dict[str, Any]:
    """The unpruned config: per block the two inner widths and the first BN's selection (None: all)."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"preresnet depth must be 9n+2 with n >= 1 (11, 20, 29, ..., 164), got {depth}")
    n = (depth - 2) // 9
    blocks = [[planes, planes] for planes in STAGE_PLANES for _ in range(n)]
    return {"depth": depth, "blocks": blocks, "select": [None] * (3 * n), "final_select": None}


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, mid: Sequence[int], select: Sequence[int] | None, stride: int = 1):
        super().__init__()
        self.select = ChannelSelection(inplanes, select)
        c0 = self.select.out_channels
        self.bn1 = nn.BatchNorm2d(c0)
        self.conv1 = nn.Conv2d(c0, mid[0], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid[0])
        self.conv2 = nn.Conv2d(mid[0], mid[1], 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid[1])
        self.conv3 = nn.Conv2d(mid[1], planes * EXPANSION, 1, bias=False)
        self.downsample = None
        if stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(self.select(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class PreResNet(nn.Module):
    def __init__(self, arch: str, config: dict[str, Any], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        n = (config["depth"] - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        inplanes, b = 16, 0
        for s, planes in enumerate(STAGE_PLANES):
            blocks = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(Bottleneck(inplanes, planes, config["blocks"][b], config["select"][b], stride))
                inplanes, b = planes * EXPANSION, b + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.select = ChannelSelection(inplanes, config["final_select"])
        self.bn = nn.BatchNorm2d(self.select.out_channels)
        self.fc = nn.Linear(self.select.out_channels, num_classes)
        reference_init(self)

    def blocks(self) -> list[Bottleneck]:
        return [blk for layer in (self.layer1, self.layer2, self.layer3) for blk in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(self.select(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """All BNs rank in the global threshold: the first BN of each block and the final BN through their
        selections, the inner ones physically."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def selection_units(self) -> list[tuple[ChannelSelection, nn.BatchNorm2d, nn.Module]]:
        """(selection, the BN after it, the layer that consumes it), for every selection."""
        return [(b.select, b.bn1, b.conv1) for b in self.blocks()] + [(self.select, self.bn, self.fc)]

    def without_selections(self) -> PreResNet:
        """The same function with no index op: every selection absorbed into zero weights of the next layer.

        For runtimes where a Gather costs more than the wider conv it saves (onnxruntime's blocked CPU layout has
        to leave and re-enter its NCHWc format around every Gather); see ``export --selection dense``.
        """
        return absorb_selections(self)

    @torch.no_grad()
    def pruned(self, keep: dict[str, torch.Tensor]) -> PreResNet:
        names = {id(m): n for n, m in self.named_modules()}
        cfg = copy.deepcopy(self.config)
        for b, blk in enumerate(self.blocks()):
            k1, k2, k3 = (as_index(keep[names[id(bn)]]) for bn in (blk.bn1, blk.bn2, blk.bn3))
            cfg["select"][b] = [blk.select.indices()[i] for i in k1.tolist()]
            cfg["blocks"][b] = [len(k2), len(k3)]
        kf = as_index(keep[names[id(self.bn)]])
        cfg["final_select"] = [self.select.indices()[i] for i in kf.tolist()]
        new = PreResNet(self.arch, cfg, self.num_classes, self.in_channels)
        new.conv1.load_state_dict(self.conv1.state_dict())

        # `shift` is the constant that dropped channels would have added to the residual stream; every BN that
        # reads the stream absorbs it into its running mean, so the pruned net computes what the full one did.
        shift = torch.zeros(16)
        for blk, nblk in zip(self.blocks(), new.blocks()):
            k1, k2, k3 = (as_index(keep[names[id(bn)]]) for bn in (blk.bn1, blk.bn2, blk.bn3))
            sel = torch.as_tensor(nblk.select.indices())
            copy_bn(nblk.bn1, blk.bn1, k1)
            nblk.bn1.running_mean.sub_(shift[sel])
            copy_conv(nblk.conv1, blk.conv1, k2, k1)
            copy_bn(nblk.bn2, blk.bn2, k2)
            nblk.bn2.running_mean.sub_(conv_shift(blk.conv1, dropped_constant(blk.bn1, k1))[k2])
            copy_conv(nblk.conv2, blk.conv2, k3, k2)
            copy_bn(nblk.bn3, blk.bn3, k3)
            nblk.bn3.running_mean.sub_(conv_shift(blk.conv2, dropped_constant(blk.bn2, k2))[k3])
            copy_conv(nblk.conv3, blk.conv3, None, k3)
            if blk.downsample is not None:
                nblk.downsample.load_state_dict(blk.downsample.state_dict())
                shift = conv_shift(blk.downsample[0], shift)
            shift = shift + conv_shift(blk.conv3, dropped_constant(blk.bn3, k3))
        sel = torch.as_tensor(new.select.indices())
        copy_bn(new.bn, self.bn, kf)
        new.bn.running_mean.sub_(shift[sel])
        new.fc.weight.copy_(self.fc.weight[:, kf])
        new.fc.bias.copy_(self.fc.bias + self.fc.weight @ dropped_constant(self.bn, kf))
        return new

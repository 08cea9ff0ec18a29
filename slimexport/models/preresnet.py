"""Pre-activation bottleneck ResNet (depth 9n+2), the reference's ``preresnet``, with folded channel selection.

Each block is select → BN → ReLU → conv1x1 → BN → ReLU → conv3x3 → BN → ReLU → conv1x1, plus the residual.
The block input feeds both the residual and the first BN, so that BN cannot shrink the stream: a
:class:`ChannelSelection` picks the surviving channels for conv1 instead. Selecting *before* the first BN is
exact (BN is per-channel) and lets the BN itself shrink to the kept channels. The inner BNs are pruned
physically; the residual stream, the stem and the downsampling convs keep their width, as in the paper, with two
refinements:

- the last stage's stream has no reader but the selections (no downsampling conv reads it), so a stream channel
  that every one of them drops is read by nothing; it is not computed (exact, always on);
- with ``prune_stream`` (opt-in, beyond the paper's rules) the same rule also applies to the stem's and the first
  two stages' streams, whose only other reader is the next stage's downsampling conv. That conv loses the input
  channel; the mean the channel had (measured by the BN that reads the same tensor) is carried on as a constant,
  so the pruned net is off only by the channel's variation around its mean, which refine recovers.
"""

from __future__ import annotations

import copy
import math
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

EXPANSION = 4
STAGE_PLANES = (16, 32, 64)
STEM_WIDTH = 16
# the residual stream's segments: the stem's output, then each stage's output
STREAM_WIDTHS = (STEM_WIDTH, *(planes * EXPANSION for planes in STAGE_PLANES))


def preresnet_config(depth: int) -> dict[str, Any]:
    """The unpruned config: per block the two inner widths and the first BN's selection (None: all).

    A pruned config may also carry ``stream``: the width of each stream segment (stem, stage 1, 2, 3) where
    channels that nothing reads were removed; without it the segments have their full widths.
    """
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"preresnet depth must be 9n+2 with n >= 1 (11, 20, 29, ..., 164), got {depth}")
    n = (depth - 2) // 9
    blocks = [[planes, planes] for planes in STAGE_PLANES for _ in range(n)]
    return {"depth": depth, "blocks": blocks, "select": [None] * (3 * n), "final_select": None}


class Bottleneck(nn.Module):
    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        mid: Sequence[int],
        select: Sequence[int] | None,
        stride: int = 1,
        downsample: bool = False,
    ):
        super().__init__()
        self.select = ChannelSelection(inplanes, select)
        c0 = self.select.out_channels
        self.bn1 = nn.BatchNorm2d(c0)
        self.conv1 = nn.Conv2d(c0, mid[0], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid[0])
        self.conv2 = nn.Conv2d(mid[0], mid[1], 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid[1])
        self.conv3 = nn.Conv2d(mid[1], outplanes, 1, bias=False)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(self.select(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class PreResNet(SlimModel):
    def __init__(self, arch: str, config: dict[str, Any], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        n = (config["depth"] - 2) // 9
        stream = self.stream_widths()
        self.conv1 = nn.Conv2d(in_channels, stream[0], 3, padding=1, bias=False)
        inplanes, b = stream[0], 0
        for s in range(len(STAGE_PLANES)):
            blocks = []
            for i in range(n):  # every stage's first block changes the width (16 -> 64 in the first) or the size
                stride = 2 if (s > 0 and i == 0) else 1
                cfg_b, sel_b = config["blocks"][b], config["select"][b]
                blocks.append(Bottleneck(inplanes, stream[s + 1], cfg_b, sel_b, stride, downsample=i == 0))
                inplanes, b = stream[s + 1], b + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.select = ChannelSelection(inplanes, config["final_select"])
        self.bn = nn.BatchNorm2d(self.select.out_channels)
        self.fc = nn.Linear(self.select.out_channels, num_classes)
        reference_init(self)

    def stream_widths(self) -> list[int]:
        """The widths of the residual stream's segments: the stem's output, then each stage's output."""
        return list(self.config.get("stream") or STREAM_WIDTHS)

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

    def block_segments(self) -> list[int]:
        """For each block, the stream segment it reads (it writes the next one in its stage)."""
        n = (self.config["depth"] - 2) // 9
        return [s if i == 0 else s + 1 for s in range(len(STAGE_PLANES)) for i in range(n)]

    @torch.no_grad()
    def pruned(self, keep: dict[str, torch.Tensor], round_to: int = 1, prune_stream: bool = False) -> PreResNet:
        """The physically smaller model that keeps, for each prunable BN, the channels ``keep`` names.

        Stream channels that no selection reads any more are removed from the last stage (exact), and with
        ``prune_stream`` from every segment (see the module docstring); each segment keeps at least the channels
        some selection reads, topped up to a multiple of ``round_to`` (never beyond its width).
        """
        names = {id(m): n for n, m in self.named_modules()}
        blocks, seg_of = self.blocks(), self.block_segments()
        widths = self.stream_widths()
        last = len(widths) - 1

        # every selection, in the current model's stream coordinates
        kept = [[as_index(keep[names[id(bn)]]) for bn in (b.bn1, b.bn2, b.bn3)] for b in blocks]
        sels = [[blk.select.indices()[i] for i in k[0].tolist()] for blk, k in zip(blocks, kept)]
        kf = as_index(keep[names[id(self.bn)]])
        fsel = [self.select.indices()[i] for i in kf.tolist()]

        # the channels each stream segment keeps: all of them where a downsampling conv still reads it
        seg_keep = []
        for g, width in enumerate(widths):
            if g < last and not prune_stream:
                seg_keep.append(torch.arange(width))
                continue
            read = set().union(*[set(sel) for sel, sg in zip(sels, seg_of) if sg == g], set(fsel) if g == last else ())
            target = min(width, math.ceil(len(read) / round_to) * round_to)
            if target > len(read):  # top up with the unread channels whose readers' largest |γ| is largest
                score = torch.full((width,), -1.0)
                readers = [(b.select, b.bn1) for b, sg in zip(blocks, seg_of) if sg == g]
                for sel, bn in readers + ([(self.select, self.bn)] if g == last else []):
                    idx = torch.as_tensor(sel.indices())
                    score[idx] = torch.maximum(score[idx], bn.weight.detach().abs().float())
                score[sorted(read)] = float("inf")
                read = set(torch.topk(score, target).indices.tolist())
            seg_keep.append(torch.tensor(sorted(read), dtype=torch.long))
        pos = [{int(c): i for i, c in enumerate(k)} for k in seg_keep]

        cfg = copy.deepcopy(self.config)
        cfg["select"] = [[pos[g][c] for c in sel] for sel, g in zip(sels, seg_of)]
        cfg["blocks"] = [[len(k[1]), len(k[2])] for k in kept]
        cfg["final_select"] = [pos[last][c] for c in fsel]
        cfg["stream"] = [len(k) for k in seg_keep]
        if cfg["stream"] == list(STREAM_WIDTHS):
            cfg.pop("stream")
        new = PreResNet(self.arch, cfg, self.num_classes, self.in_channels)
        copy_conv(new.conv1, self.conv1, seg_keep[0], None)

        # `shift` (in the current model's coordinates of the segment at hand) is the constant that dropped channels
        # would have added to the residual stream; every BN that reads the stream absorbs it into its running mean,
        # so the pruned net computes what the full one did.
        shift = torch.zeros(widths[0])
        for blk, nblk, (k1, k2, k3), sel, g in zip(blocks, new.blocks(), kept, sels, seg_of):
            copy_bn(nblk.bn1, blk.bn1, k1)
            nblk.bn1.running_mean.sub_(shift[sel])
            copy_conv(nblk.conv1, blk.conv1, k2, k1)
            copy_bn(nblk.bn2, blk.bn2, k2)
            nblk.bn2.running_mean.sub_(conv_shift(blk.conv1, dropped_constant(blk.bn1, k1))[k2])
            copy_conv(nblk.conv2, blk.conv2, k3, k2)
            copy_bn(nblk.bn3, blk.bn3, k3)
            nblk.bn3.running_mean.sub_(conv_shift(blk.conv2, dropped_constant(blk.bn2, k2))[k3])
            copy_conv(nblk.conv3, blk.conv3, seg_keep[g + 1] if blk.downsample is not None else seg_keep[g], k3)
            if blk.downsample is not None:
                conv = blk.downsample[0]
                copy_conv(nblk.downsample[0], conv, seg_keep[g + 1], seg_keep[g])
                # a removed input channel's whole value is lost; what it carried on average is its mean, which
                # this block's first BN measured (on the channels it read; 0 for any other)
                mean = torch.zeros(widths[g])
                mean[blk.select.indices()] = blk.bn1.running_mean.float()
                lost = torch.ones(widths[g], dtype=torch.bool)
                lost[seg_keep[g]] = False
                shift = conv_shift(conv, torch.where(lost, mean, shift))
            shift = shift + conv_shift(blk.conv3, dropped_constant(blk.bn3, k3))
        copy_bn(new.bn, self.bn, kf)
        new.bn.running_mean.sub_(shift[fsel])
        new.fc.weight.copy_(self.fc.weight[:, kf])
        new.fc.bias.copy_(self.fc.bias + self.fc.weight @ dropped_constant(self.bn, kf))
        return new

"""The reference's CIFAR-style VGG: 3×3 convs without bias, BN, ReLU, max-pool at 'M', global pooling, one Linear."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimexport.models.common import (
    SlimModel,
    as_index,
    conv_shift,
    copy_bn,
    copy_conv,
    dropped_constant,
    reference_init,
)

VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def vgg_config(depth: int, width: int = 100) -> dict[str, Any]:
    """The unpruned config of VGG-``depth`` at ``width`` percent of the reference channel counts."""
    if depth not in VGG_CFGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
    if not 1 <= width <= 400:
        raise ValueError(f"VGG width must be 1..400 percent of the reference, got {width}")
    cfg = [v if v == "M" else max(1, round(v * width / 100)) for v in VGG_CFGS[depth]]
    return {"cfg": cfg}


class VGG(SlimModel):
    def __init__(self, arch: str, config: dict[str, Any], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        layers: list[nn.Module] = []
        c = in_channels
        for v in config["cfg"]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(c, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        reference_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """Every BN of VGG is pruned; conv in/out channels and the FC input follow."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def without_selections(self) -> VGG:
        """VGG has no channel selections."""
        return self

    @torch.no_grad()
    def pruned(self, keep: dict[str, torch.Tensor], round_to: int = 1, prune_stream: bool = False) -> VGG:
        """A physically smaller copy that keeps channels ``keep[bn_name]`` of every BN."""
        bns = self.prunable_bns()
        idxs = [as_index(keep[name]) for name, _ in bns]
        cfg, i = [], 0
        for v in self.config["cfg"]:
            if v == "M":
                cfg.append("M")
            else:
                cfg.append(len(idxs[i]))
                i += 1
        new = VGG(self.arch, {"cfg": cfg}, self.num_classes, self.in_channels)
        old_convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        new_convs = [m for m in new.features if isinstance(m, nn.Conv2d)]
        new_bns = [m for m in new.features if isinstance(m, nn.BatchNorm2d)]
        for k, ((_, bn), idx) in enumerate(zip(bns, idxs)):
            copy_conv(new_convs[k], old_convs[k], idx, idxs[k - 1] if k else None)
            copy_bn(new_bns[k], bn, idx)
        # BN → ReLU [→ MaxPool] → conv → BN: a dropped channel's constant lands in the next BN's running mean.
        for k, ((_, bn), idx) in enumerate(zip(bns, idxs)):
            const = dropped_constant(bn, idx)
            if k + 1 < len(bns):
                shift = conv_shift(old_convs[k + 1], const)[idxs[k + 1]]
                new_bns[k + 1].running_mean.sub_(shift.to(new_bns[k + 1].running_mean.dtype))
        w = self.classifier.weight
        new.classifier.weight.copy_(w[:, idxs[-1]])
        new.classifier.bias.copy_(self.classifier.bias + w @ const.to(w))
        return new

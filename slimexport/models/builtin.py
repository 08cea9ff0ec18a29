"""The paper's three architectures as plain ``nn.Module`` builders: CIFAR-style VGG, pre-activation bottleneck
ResNet (depth 9n+2) and DenseNet (depth 3n+4, growth 12), as the reference implementation builds them.

They know nothing about pruning: the graph engine (:mod:`slimexport.graph_prune`) prunes them like any other
model, and a pruned one is rebuilt from its unpruned builder plus the pruning plan. Names:

- ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``, and ``vgg11_w25`` etc. for the same layout at 25% width;
- ``preresnet{9n+2}``: ``preresnet164`` is the reference, ``preresnet20`` a small one;
- ``densenet{3n+4}``: ``densenet40`` is the reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slimexport.errors import ConfigError

VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}
EXPANSION, STAGE_PLANES, STEM_WIDTH = 4, (16, 32, 64), 16


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


class VGG(nn.Module):
    """3×3 convs without bias, BN, ReLU, max-pool at 'M', global average pooling, one Linear."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(c, int(v), 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        reference_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Bottleneck(nn.Module):
    """BN → ReLU → conv1×1 → BN → ReLU → conv3×3 → BN → ReLU → conv1×1, plus the residual."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet, depth 9n+2 (n blocks per stage, three stages)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, STEM_WIDTH, 3, padding=1, bias=False)
        inplanes = STEM_WIDTH
        for s, planes in enumerate(STAGE_PLANES):
            blocks = []
            for i in range(n):  # every stage's first block changes the width (16 -> 64 in the first) or the size
                blocks.append(Bottleneck(inplanes, planes, 2 if (s > 0 and i == 0) else 1, downsample=i == 0))
                inplanes = planes * EXPANSION
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


class DenseLayer(nn.Module):
    """BN → ReLU → conv3×3 (growth channels), concatenated onto the input."""

    def __init__(self, inplanes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv1(F.relu(self.bn1(x)))), 1)


class Transition(nn.Module):
    """BN → ReLU → conv1×1 → average pooling 2 (compression 1: the width stays)."""

    def __init__(self, inplanes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, inplanes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    """DenseNet (BC-less, compression 1), depth 3n+4, three dense blocks of n layers."""

    def __init__(self, depth: int, growth: int = 12, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 3
        width = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        for s in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(width, growth))
                width += growth
            self.add_module(f"dense{s + 1}", nn.Sequential(*layers))
            if s < 2:
                self.add_module(f"trans{s + 1}", Transition(width))
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


def _vgg(m: re.Match, num_classes: int, in_channels: int) -> nn.Module:
    depth, width = int(m.group(1)), int(m.group(2) or 100)
    if depth not in VGG_CFGS:
        raise ConfigError(f"--arch {m.group(0)}: VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
    if not 1 <= width <= 400:
        raise ConfigError(f"--arch {m.group(0)}: VGG width must be 1..400 percent of the reference, got {width}")
    cfg = [v if v == "M" else max(1, round(v * width / 100)) for v in VGG_CFGS[depth]]
    return VGG(cfg, num_classes, in_channels)


def _preresnet(m: re.Match, num_classes: int, in_channels: int) -> nn.Module:
    depth = int(m.group(1))
    if depth < 11 or (depth - 2) % 9:
        raise ConfigError(f"--arch {m.group(0)}: preresnet depth must be 9n+2 with n >= 1 (11, 20, ..., 164)")
    return PreResNet(depth, num_classes, in_channels)


def _densenet(m: re.Match, num_classes: int, in_channels: int) -> nn.Module:
    depth = int(m.group(1))
    if depth < 7 or (depth - 4) % 3:
        raise ConfigError(f"--arch {m.group(0)}: densenet depth must be 3n+4 with n >= 1 (7, 10, ..., 40)")
    return DenseNet(depth, 12, num_classes, in_channels)


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str
    build: Callable[[re.Match, int, int], nn.Module]
    examples: tuple[str, ...]
    description: str


FAMILIES: tuple[Family, ...] = (
    Family("vgg", r"vgg(\d+)(?:_w(\d+))?", _vgg, ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_w25"),
           "CIFAR-style VGG (depth 11/13/16/19; _wP = P% width)"),
    Family("preresnet", r"preresnet(\d+)", _preresnet, ("preresnet20", "preresnet56", "preresnet164"),
           "pre-activation bottleneck ResNet (depth 9n+2); its stream is selected by each block's first BN"),
    Family("densenet", r"densenet(\d+)", _densenet, ("densenet16", "densenet40"),
           "DenseNet, growth 12 (depth 3n+4); every BN selects from the concatenated map"),
)  # fmt: skip


def is_builtin(arch: object) -> bool:
    """Whether ``arch`` names one of the built-in families (it may still be an invalid member: vgg12)."""
    return isinstance(arch, str) and any(re.fullmatch(f.pattern, arch) for f in FAMILIES)


def build_builtin(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The unpruned network ``arch``; an unknown or invalid name is a one-line :class:`ConfigError`."""
    for fam in FAMILIES:
        m = re.fullmatch(fam.pattern, arch)
        if m:
            return fam.build(m, num_classes, in_channels)
    known = ", ".join(ex for fam in FAMILIES for ex in fam.examples)
    raise ConfigError(
        f"unknown architecture {arch!r}; known: {known} (any vggD[_wP], preresnet9n+2, densenet3n+4), "
        "torchvision:NAME, timm:NAME, FILE.py:FACTORY"
    )

"""Model registry: an architecture is a name plus a config of plain data, from which the model is rebuilt.

``create_model("vgg19", num_classes=10, in_channels=3)`` builds the unpruned network; passing the ``config``
stored in a pruned checkpoint rebuilds the pruned one. Names:

- ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` — and ``vgg11_w25`` etc. for the same layout at 25% width;
- ``preresnet{9n+2}`` — ``preresnet164`` is the reference, ``preresnet20`` a small one for tests;
- ``densenet{3n+4}`` — growth 12; ``densenet40`` is the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimexport.errors import ConfigError
from slimexport.models.common import ChannelSelection
from slimexport.models.densenet import DenseNet, densenet_config
from slimexport.models.external import GraphModel, check_source, external_config, is_external
from slimexport.models.preresnet import PreResNet, preresnet_config
from slimexport.models.vgg import VGG, vgg_config

__all__ = ["ChannelSelection", "Family", "FAMILIES", "create_model", "default_config", "list_models", "count_params"]


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str
    default_config: Callable[[re.Match], dict[str, Any]]
    cls: type[nn.Module]
    examples: tuple[str, ...]
    description: str


FAMILIES: tuple[Family, ...] = (
    Family(
        "vgg",
        r"vgg(\d+)(?:_w(\d+))?",
        lambda m: vgg_config(int(m.group(1)), int(m.group(2) or 100)),
        VGG,
        ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_w25"),
        "CIFAR-style VGG (depth 11/13/16/19; _wP = P% width); every BN pruned physically",
    ),
    Family(
        "preresnet",
        r"preresnet(\d+)",
        lambda m: preresnet_config(int(m.group(1))),
        PreResNet,
        ("preresnet20", "preresnet56", "preresnet164"),
        "pre-activation bottleneck ResNet (depth 9n+2); inner BNs pruned, block inputs selected",
    ),
    Family(
        "densenet",
        r"densenet(\d+)",
        lambda m: densenet_config(int(m.group(1))),
        DenseNet,
        ("densenet16", "densenet40"),
        "DenseNet, growth 12 (depth 3n+4); every BN selected, conv/FC inputs shrink",
    ),
)


def _resolve(arch: str) -> tuple[Family, re.Match]:
    for fam in FAMILIES:
        m = re.fullmatch(fam.pattern, arch)
        if m:
            return fam, m
    known = ", ".join(ex for fam in FAMILIES for ex in fam.examples)
    raise ConfigError(f"unknown architecture {arch!r}; known: {known} (any vggD[_wP], preresnet9n+2, densenet3n+4)")


def _family_config(fam: Family, m: re.Match, arch: str) -> dict[str, Any]:
    """The family's unpruned config; a name the family's pattern takes but its builder refuses (vgg12,
    preresnet15) is a one-line :class:`ConfigError` naming the architecture."""
    try:
        return fam.default_config(m)
    except ConfigError:
        raise
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--arch {arch}: {e.args[0] if e.args else e}") from None


def default_config(arch: str) -> dict[str, Any]:
    """The unpruned config of ``arch``."""
    if is_external(arch):
        check_source(arch)
        return external_config(arch)
    fam, m = _resolve(arch)
    return _family_config(fam, m, arch)


def create_model(arch: str, num_classes: int = 10, in_channels: int = 3, config: dict[str, Any] | None = None):
    """Build ``arch``; with ``config`` (from a checkpoint) the pruned variant, else the unpruned one. ``arch`` is a
    registered name (vgg19, preresnet164, ...) or ``torchvision:NAME`` (pruned by the graph engine)."""
    if is_external(arch):
        return GraphModel(arch, external_config(arch) if config is None else config, num_classes, in_channels)
    fam, m = _resolve(arch)
    return fam.cls(arch, _family_config(fam, m, arch) if config is None else config, num_classes, in_channels)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (selections hold none)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def list_models() -> list[tuple[str, str]]:
    """(example name, family description) for every registered family."""
    return [(ex, fam.description) for fam in FAMILIES for ex in fam.examples]

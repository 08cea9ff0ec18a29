"""Model sources: an architecture is a name plus a config of plain data, from which the model is rebuilt.

Every model, built-in or not, is a :class:`~slimexport.models.external.GraphModel`: the unpruned network from its
source, plus the pruning plan the graph engine made (kept channel indices per module). ``create_model("vgg19",
num_classes=10, in_channels=3)`` builds the unpruned network; the ``config`` stored in a pruned checkpoint rebuilds
the pruned one. Sources: the built-in families (:mod:`slimexport.models.builtin`: vgg, preresnet, densenet),
``torchvision:NAME``, ``timm:NAME`` and the user's ``FILE.py:FACTORY`` / ``module:factory``.
"""

from __future__ import annotations

from typing import Any

from slimexport.models.builtin import FAMILIES, Family, build_builtin, is_builtin
from slimexport.models.external import GraphModel, check_source, external_config, is_external
from slimexport.stats import count_params

__all__ = [
    "Family", "FAMILIES", "GraphModel", "build_builtin", "create_model", "default_config", "is_builtin", "list_models",
    "count_params",
]  # fmt: skip

# the input size a built-in network is traced at until the data says otherwise (CIFAR's)
BUILTIN_IMAGE_SIZE = (32, 32)


def default_config(arch: str) -> dict[str, Any]:
    """The unpruned config of ``arch`` (checks that the source exists and can be built)."""
    if is_external(arch):
        check_source(arch)
        return external_config(arch)
    build_builtin(arch, 2, 3)  # a one-line error for vgg12, preresnet15, densenet11, an unknown name
    return external_config(arch, image_size=BUILTIN_IMAGE_SIZE)


def create_model(arch: str, num_classes: int = 10, in_channels: int = 3, config: dict[str, Any] | None = None):
    """Build ``arch``; with ``config`` (from a checkpoint) the pruned variant, else the unpruned one."""
    return GraphModel(arch, default_config(arch) if config is None else config, num_classes, in_channels)


def list_models() -> list[tuple[str, str]]:
    """(example name, family description) for every built-in family."""
    return [(ex, fam.description) for fam in FAMILIES for ex in fam.examples]

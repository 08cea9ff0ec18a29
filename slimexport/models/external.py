"""Models slimexport did not write: torchvision builders (``torchvision:NAME``), pruned by the graph engine.

A :class:`GraphModel` wraps the user's network (``.net``) with the interface the pipeline uses (``arch``,
``num_classes``, ``in_channels``, ``config``, ``prunable_bns``). Its config is plain data: the source to build
the original from (builder name and keyword arguments), the input size the graph was traced at, and the pruning
plan (kept channel indices per module, relative to the original). A checkpoint rebuilds the model by building the
original and re-applying the plan; no module is pickled.

Grayscale data (one channel) fed to a three-channel network is repeated to three equal channels inside
``forward``, so the exported model takes the data's own images.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimexport.errors import ConfigError

PREFIXES = ("torchvision:",)


def is_external(arch: str) -> bool:
    return arch.startswith(PREFIXES)


def _net_in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return m.in_channels
    raise ConfigError(f"{type(net).__name__} has no convolution: slimexport prunes convolutional networks")


def build_source(source: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The unpruned network named by ``source`` (``torchvision:NAME``), with random weights (nothing downloads)."""
    kind, _, name = source.partition(":")
    kwargs = dict(kwargs or {})
    if kind == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise ConfigError(f"unknown torchvision model {name!r}; classification models: {', '.join(known[:8])}, ...")
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"torchvision:{name} cannot be built with {kwargs}: {e}") from None
    raise ConfigError(f"unknown model source {source!r}: use torchvision:NAME")


def compose_plans(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The plan that applies ``first`` and then ``second`` (whose indices are relative to ``first``'s result),
    relative to the original model."""
    out = copy.deepcopy(first)
    for name, p in second.items():
        e = out.setdefault(name, {"kind": p["kind"]})
        for side in ("inp", "out"):
            if side in p:
                e[side] = [e[side][i] for i in p[side]] if side in e else list(p[side])
    return out


class GraphModel(nn.Module):
    """A network from elsewhere, with slimexport's model interface."""

    def __init__(self, arch: str, config: dict[str, Any], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        from slimexport.graph_prune import apply_plan

        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        self.net = build_source(config["source"], num_classes, config.get("kwargs"))
        self.net_channels = _net_in_channels(self.net)
        if in_channels not in (1, self.net_channels):
            raise ConfigError(f"{arch} takes {self.net_channels}-channel images; the data has {in_channels} channels")
        if config.get("plan"):
            apply_plan(self.net, config["plan"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and self.net_channels != 1:
            x = x.expand(-1, self.net_channels, -1, -1)  # grayscale as equal channels
        return self.net(x)

    def prunable_bns(self) -> list[tuple[str, nn.Module]]:
        from slimexport.graph import BN_TYPES

        return [(n, m) for n, m in self.named_modules() if isinstance(m, BN_TYPES) and m.weight is not None]

    def example_input(self, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        size = tuple(image_size or self.config.get("image_size") or (224, 224))
        return torch.zeros(1, self.net_channels, *size)

    def pruned_by_graph(self, **kw) -> tuple[GraphModel, dict[str, Any]]:
        """Prune by the graph engine; the new model's config holds the plan relative to the original."""
        from slimexport.graph_prune import prune_graph

        net, record = prune_graph(self.net, self.example_input(), **kw)
        cfg = copy.deepcopy(self.config)
        cfg["plan"] = compose_plans(cfg.get("plan") or {}, record["plan"])
        new = GraphModel(self.arch, cfg, self.num_classes, self.in_channels)
        new.net.load_state_dict(net.state_dict())
        for layer in record["layers"]:
            layer["name"] = f"net.{layer['name']}"
        return new, record


def external_config(arch: str, kwargs: dict[str, Any] | None = None, image_size=None) -> dict[str, Any]:
    return {"source": arch, "kwargs": dict(kwargs or {}), "image_size": list(image_size or (224, 224)), "plan": {}}

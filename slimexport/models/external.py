"""Where a network comes from (``--arch``), and the one model type every stage handles. Sources:

- a built-in name (``vgg19``, ``preresnet164``, ``densenet40``: :mod:`slimexport.models.builtin`);
- ``torchvision:NAME``: any torchvision classification builder (random weights; nothing downloads);
- ``timm:NAME``: a timm model, where timm is installed (``pip install -e '.[timm]'``);
- ``path/to/file.py:factory`` or ``package.module:factory``: the user's own code; ``factory`` gets
  ``num_classes=K`` when it takes that argument. A file is stored by its absolute path and imported again from
  there (only while it is there) when a checkpoint is loaded.

Trust: a checkpoint is data, and loading one never imports or calls what it names unless the user named it too.
The registries (``torchvision:NAME``, ``timm:NAME``) are data: a name looked up in a list, built with no
arguments from the file. A model file or module factory stored in a checkpoint is run only inside
:func:`trusted_code` naming that source (the CLI's ``--arch SOURCE``), or with ``everything=True`` (the CLI's
``--trust-model-code``); otherwise :func:`check_trusted` raises a one-line :class:`UntrustedCodeError` that says
how to opt in.

A :class:`GraphModel` wraps a network (``.net``) from any source (the built-in families too) with what slimexport
needs to rebuild it (``arch``, ``num_classes``, ``in_channels``, ``config``). Its config is plain data: the source
to build the original from (builder name and keyword arguments), the input size the graph is traced at, and the
pruning plan (kept channel indices per module, relative to the original). A checkpoint rebuilds the model by
building the original and re-applying the plan; no module is pickled.

Grayscale data (one channel) fed to a three-channel network is repeated to three equal channels inside
``forward``, so the exported model takes the data's own images.
"""

from __future__ import annotations

import contextvars
import copy
import importlib
import importlib.util
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.errors import ConfigError, ModelCodeError, UntrustedCodeError, first_line
from slimexport.models.builtin import build_builtin, is_builtin
from slimexport.plan import apply_plan, compose_plans

PREFIXES = ("torchvision:", "timm:")
# (trust every source, the canonical sources the user named): set by trusted_code for the current context.
_TRUST: contextvars.ContextVar[tuple[bool, frozenset[str]]] = contextvars.ContextVar(
    "slimexport_trusted_code", default=(False, frozenset())
)


def is_external(arch: str) -> bool:
    """``torchvision:NAME``, ``timm:NAME`` or an import string ``file.py:factory`` / ``pkg.module:factory``."""
    return ":" in arch


def is_registry(arch: str) -> bool:
    """``torchvision:NAME`` or ``timm:NAME``: a name looked up in a registry, not code named by a string."""
    return arch.startswith(PREFIXES)


@contextmanager
def trusted_code(*sources: str | None, everything: bool = False) -> Iterator[None]:
    """Within the block, a checkpoint whose model is built by one of ``sources`` (a model file or module factory,
    as the user named it) may be loaded, which imports and calls that code; ``everything`` trusts whatever a
    checkpoint names (the CLI's ``--trust-model-code``). Nests; registry names need no trust."""
    all_before, known = _TRUST.get()
    named = {canonical_source(s) for s in sources if s and is_external(s) and not is_registry(s)}
    token = _TRUST.set((all_before or everything, known | named))
    try:
        yield
    finally:
        _TRUST.reset(token)


def check_trusted(source: object, kwargs: object, where: str) -> None:
    """Refuse (one line, before anything is imported) a model source read from ``where`` (a file) that would run
    code the user did not name: a model file or module factory outside :func:`trusted_code`, or keyword arguments
    (slimexport stores none) for any builder."""
    everything, known = _TRUST.get()
    if everything:
        return
    if is_builtin(source) and not kwargs:
        return
    if not isinstance(source, str) or not is_external(source):
        raise UntrustedCodeError(f"{where}: its model source {source!r} is not a model name slimexport knows")
    if not is_registry(source) and canonical_source(source) not in known:
        raise UntrustedCodeError(
            f"{where} builds its model by importing and calling {source}, code named by the file, not by you; "
            f"if you trust that code, name it: --arch {source} (or pass --trust-model-code)"
        )
    if kwargs:
        raise UntrustedCodeError(
            f"{where} passes keyword arguments {sorted(kwargs) if isinstance(kwargs, dict) else kwargs!r} to the "
            f"builder of {source} (slimexport writes none); if you trust this file, pass --trust-model-code"
        )


def canonical_source(arch: str) -> str:
    """The source as stored in a checkpoint: a model file by its absolute path."""
    if arch.startswith(PREFIXES):
        return arch
    target, _, factory = arch.rpartition(":")
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{factory}"
    return arch


def _factory(source: str):
    """The callable an import string names; one-line errors for a missing file, module or attribute."""
    target, _, name = source.rpartition(":")
    if not target or not name.isidentifier():
        raise ConfigError(f"--arch {source!r}: expected torchvision:NAME, timm:NAME, FILE.py:FACTORY or MODULE:FACTORY")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file {path} not found (named by --arch or stored in the checkpoint)")
        spec = importlib.util.spec_from_file_location(f"slimexport_user_{abs(hash(str(path.resolve())))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file may raise anything
            raise ConfigError(f"importing {path} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"cannot import {target!r} for --arch {source!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{target} has no callable {name!r}")
    return fn


def _net_in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return m.in_channels
    raise ConfigError(f"{type(net).__name__} has no convolution: slimexport prunes convolutional networks")


def build_source(
    source: str, num_classes: int, kwargs: dict[str, Any] | None = None, in_channels: int = 3
) -> nn.Module:
    """The unpruned network named by ``source`` (a built-in name, ``torchvision:NAME``, ``timm:NAME``, the user's
    ``FILE.py:FACTORY``), with random weights (nothing downloads). Only a built-in takes ``in_channels``; the
    others take three-channel images (:class:`GraphModel` repeats a grayscale channel)."""
    if not is_external(source):
        if kwargs:
            raise ConfigError(f"{source} takes no keyword arguments, got {sorted(kwargs)}")
        return build_builtin(source, num_classes, in_channels)
    kind, _, name = source.partition(":")
    kwargs = dict(kwargs or {})
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError("timm is not installed: pip install -e '.[timm]' (or pip install timm)") from None
        if name not in timm.list_models():
            raise ConfigError(f"unknown timm model {name!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if kind == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise ConfigError(f"unknown torchvision model {name!r}; classification models: {', '.join(known[:8])}, ...")
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"torchvision:{name} cannot be built with {kwargs}: {e}") from None
    fn = _factory(source)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("num_classes", num_classes)
    try:
        net = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
        raise ModelCodeError(
            f"the model factory {source} raised {type(e).__name__} when called with {given}: {first_line(e, 160)}"
        ) from None
    if not isinstance(net, nn.Module):
        raise ModelCodeError(f"{source} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


class GraphModel(nn.Module):
    """A network with the data slimexport needs to rebuild it: ``arch`` (its source), ``num_classes``,
    ``in_channels`` and ``config`` (plain data: the source, the input size the graph is traced at, the pruning
    plan). The network itself is ``.net``; every model slimexport trains, prunes and exports is one of these."""

    def __init__(
        self,
        arch: str,
        config: dict[str, Any],
        num_classes: int = 10,
        in_channels: int = 3,
        net: nn.Module | None = None,
    ):
        """Build the network from its source and apply its plan (the one rebuild path, :func:`apply_plan`), or,
        with ``net``, hold that network, already built with this config's plan (as a prune returns it)."""
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.config = copy.deepcopy(config)
        if net is None:
            net = build_source(config["source"], num_classes, config.get("kwargs"), in_channels)
            if config.get("plan"):
                net = apply_plan(net, config["plan"])
        self.net = net
        self.net_channels = _net_in_channels(self.net)
        if in_channels not in (1, self.net_channels):
            raise ConfigError(f"{arch} takes {self.net_channels}-channel images; the data has {in_channels} channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and self.net_channels != 1:
            x = x.expand(-1, self.net_channels, -1, -1)  # grayscale as equal channels
        return self.net(x)

    def example_input(self, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """An input of the size the graph is traced at (random, so that no channel looks constant by accident)."""
        size = tuple(image_size or self.config.get("image_size") or (224, 224))
        return torch.randn(2, self.net_channels, *size, generator=torch.Generator().manual_seed(0))

    def with_plan(self, plan: dict[str, Any], net: nn.Module) -> GraphModel:
        """A new model: this one's source with ``plan`` (relative to this model) composed onto its own, holding
        ``net`` (this model's network with ``plan`` applied; not rebuilt: a prune comes back once)."""
        cfg = copy.deepcopy(self.config)
        cfg["plan"] = compose_plans(cfg.get("plan") or {}, plan)
        return GraphModel(self.arch, cfg, self.num_classes, self.in_channels, net=net)


def external_config(arch: str, kwargs: dict[str, Any] | None = None, image_size=None) -> dict[str, Any]:
    return {
        "source": canonical_source(arch),
        "kwargs": dict(kwargs or {}),
        "image_size": list(image_size or (224, 224)),
        "plan": {},
    }


def check_source(arch: str) -> None:
    """Fail early (before data or training) on a source that cannot be built."""
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(
                f"unknown torchvision classification model {name!r} (see slimexport models --torchvision)"
            )
    elif kind == "timm":
        build_source(arch, 2)
    else:
        _factory(canonical_source(arch))


def torchvision_weights_file(arch: str, spec: str) -> Path:
    """The file in the torch hub cache that holds torchvision's pretrained weights ``spec`` for ``arch``
    (``torchvision:IMAGENET1K_V1``, ``torchvision:DEFAULT`` or the builder's enum, ``ResNet18_Weights.IMAGENET1K_V1``),
    looked up by torchvision's weights API. Nothing is downloaded: a file not in the cache is a one-line error naming
    where to put it."""
    import torch.hub
    import torchvision

    kind, _, name = arch.partition(":")
    if kind != "torchvision":
        raise ConfigError(
            f"--weights {spec}: torchvision's pretrained weights go with --arch torchvision:NAME, not {arch}"
        )
    member = spec.partition(":")[2]
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"--weights {spec}: torchvision has no pretrained weights for {name}") from None
    member = member.rpartition(".")[2] if member.startswith(enum.__name__ + ".") else member
    if member not in enum.__members__:
        raise ConfigError(f"--weights {spec}: {enum.__name__} has {', '.join(enum.__members__)}")
    url = enum[member].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise ConfigError(
            f"--weights {spec}: {path.name} is not in the torch hub cache ({path}); slimexport downloads nothing: "
            f"fetch {url} where there is internet and put it there (or set TORCH_HOME)"
        )
    return path


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Start from a state_dict the user saved, or from torchvision's pretrained weights by name
    (``torchvision:IMAGENET1K_V1``, from the torch hub cache), loaded with ``torch.load(weights_only=True)``; keys
    may or may not carry the ``net.`` prefix of a GraphModel. The classifier whose outputs are the data's classes
    (its weight and bias) is kept freshly initialised where the file's has another number of classes (ImageNet's
    1000), as fine-tuning does; any other mismatch is a one-line error naming the first mismatched key. Returns
    what was loaded: {"file", "reinitialised"}."""
    import pickle
    import zipfile

    spec = str(path)
    if spec.startswith("torchvision:"):
        path = torchvision_weights_file(getattr(model, "arch", ""), spec)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ConfigError(f"--weights {path} is not a readable state_dict ({str(e).splitlines()[0][:120]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path} does not hold a state_dict (a dict of tensors)")
    target = model.net if isinstance(model, GraphModel) and not any(k.startswith("net.") for k in sd) else model
    own = target.state_dict()
    classes = getattr(model, "num_classes", None)
    head = [k for k, v in own.items() if classes and k in sd and v.shape[:1] == (classes,) and v.shape != sd[k].shape]
    head = head if head and all(k.rpartition(".")[0] == head[0].rpartition(".")[0] for k in head) else []
    for k, v in own.items():
        if k not in sd:
            raise ConfigError(f"--weights {path} does not fit the model: key {k!r} is missing")
        if tuple(sd[k].shape) != tuple(v.shape) and k not in head:
            raise ConfigError(
                f"--weights {path} does not fit the model: {k!r} has shape {tuple(sd[k].shape)}, the model's is "
                f"{tuple(v.shape)}"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise ConfigError(f"--weights {path} does not fit the model: unexpected key {extra[0]!r}")
    target.load_state_dict({k: (own[k] if k in head else v) for k, v in sd.items()})
    return {"file": str(path), "reinitialised": head}


def torchvision_table(num_classes: int = 10, image_size: int = 32) -> list[dict[str, Any]]:
    """torchvision's classification models: params, MACs at ``image_size``, whether they have BatchNorm. Built on
    the meta device (no memory, no weights), so listing all of them takes seconds."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from slimexport.graph import BN_TYPES

    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        row: dict[str, Any] = {"name": name, "params": None, "macs": None, "bn": None}
        try:
            with torch.device("meta"):
                m = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
                row["params"] = sum(p.numel() for p in m.parameters())
                row["bn"] = any(isinstance(x, BN_TYPES) for x in m.modules())
                with FlopCounterMode(display=False) as counter:
                    m(torch.zeros(1, 3, image_size, image_size))
                row["macs"] = counter.get_total_flops() // 2
        except Exception:  # noqa: BLE001 - too small an input for this model, or a builder that needs real data
            pass
        rows.append(row)
    return rows

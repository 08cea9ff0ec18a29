"""Checkpoints: the architecture as plain data plus weights, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict::

    {"format": "slimexport", "version": 1, "arch": "vgg19", "num_classes": 10, "in_channels": 3,
     "config": {...},          # plain data from which create_model rebuilds the (pruned) architecture
     "state_dict": {...},
     "data": {"name", "mean", "std", "image_size", "label_names"},   # how inputs were normalised
     "meta": {"stage", "epochs", "accuracy", "history", "args", "prune", ...}}

Nothing but tensors and plain Python values is stored, so no arbitrary object is ever unpickled. A checkpoint
of a model from the user's own code (a model file or module factory) names that code; loading it runs the code
only where the user named it too (:func:`slimexport.models.external.trusted_code`), never because a file said so.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.errors import (
    CheckpointError,
    ConfigError,
    OutputError,
    SlimExportError,
    first_line,
    system_refusal,
)
from slimexport.fileio import atomic_path
from slimexport.models import create_model
from slimexport.models.external import check_trusted, trusted_code

FORMAT, VERSION = "slimexport", 2
# Version 1 stored slimexport's own architectures in their hand-written form (config {"cfg"}, {"blocks", "select"},
# ...; state-dict keys without "net."). Version 2 stores every model as its source plus the graph engine's plan.


def make_checkpoint(model: nn.Module, data: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": data,
        "meta": meta,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomic: written to a temporary file beside ``path`` and renamed."""
    with atomic_path(path, suffix=".pt") as tmp:
        try:
            torch.save(ckpt, tmp)
        except OSError as e:
            raise OutputError(system_refusal(e) or f"cannot write checkpoint {path}: {first_line(e)}") from None
        except RuntimeError as e:  # torch's zip writer: "[enforce fail at inline_container.cc] ... file write failed"
            free = shutil.disk_usage(Path(path).parent).free
            why = "the disk is full" if free < 1 << 20 else first_line(e, 120)
            raise OutputError(f"cannot write checkpoint {path}: {why} ({free:,} bytes free on its disk)") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint dict; one-line :class:`CheckpointError` for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        from slimexport.models.program import is_program

        if is_program(path):  # asked only of a file torch.load refused: no extra read on every checkpoint
            raise CheckpointError(
                f"{path} holds the torch.export programs of a model with no source (save_pruned without source=): "
                "load it with slimexport.load_pruned and export it with slimexport.export_onnx; the commands read "
                "checkpoints"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a slimexport checkpoint")
    if ckpt.get("version") == 1:
        return _from_version_1(ckpt, path)
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, this slimexport reads {VERSION}")
    return ckpt


def _from_version_1(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """A version-1 checkpoint in today's form. A model pruned by the graph engine (torchvision, timm, your own
    code) already is; an unpruned built-in architecture gets its source config and ``net.`` keys; a built-in one
    pruned by the retired hand-written rules cannot be rebuilt, and the error says how to redo it."""
    from slimexport.models import default_config, is_builtin

    arch = ckpt.get("arch")
    if not is_builtin(arch) or "source" in (ckpt.get("config") or {}):
        return ckpt | {"version": VERSION}
    meta = ckpt.get("meta") or {}
    if meta.get("prune") or meta.get("stage") in ("pruned", "refined"):
        source = (meta.get("prune") or {}).get("source", "the sparse checkpoint")
        raise CheckpointError(
            f"{path} is a {arch} pruned by slimexport's retired hand-written rules (checkpoint version 1): prune "
            f"{source} again with this version (slimexport prune {source}) and refine that"
        )
    state = {f"net.{k}": v for k, v in ckpt.get("state_dict", {}).items()}
    config = default_config(arch) | {"image_size": list(ckpt.get("data", {}).get("image_size") or (32, 32))}
    return ckpt | {"version": VERSION, "config": config, "state_dict": state}


def load_checkpoint(path: str | os.PathLike, trust: tuple[str, ...] | bool = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (pruned or not) from the checkpoint alone. A model from the user's
    own code is built only if ``trust`` (or an enclosing :func:`trusted_code`) names its source, or ``trust`` is
    True; otherwise :class:`~slimexport.errors.UntrustedCodeError`, before anything is imported."""
    ckpt = read_checkpoint(path)
    with trusted_code(*(() if isinstance(trust, bool) else trust), everything=trust is True):
        check_checkpoint_source(ckpt, path)
        return _build(ckpt, path)


def check_checkpoint_source(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose model would be built by code the user did not name (see :func:`load_checkpoint`)."""
    arch = ckpt.get("arch")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path} names no architecture")
    # What builds the model is the config's source, whatever the arch says (a file naming a built-in arch and a
    # model file as its source must not get the built-in's pass)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    check_trusted(config.get("source", arch), config.get("kwargs"), f"checkpoint {path}")


def _build(ckpt: dict[str, Any], path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    try:
        model = create_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"], ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except SlimExportError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # a plan or config
        # that does not fit the model it names: a corrupt or edited file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: weights do not match its {ckpt.get('arch')} architecture ({first[:160]})"
        ) from None
    return model, ckpt


def fit_data(ckpt: dict[str, Any], path: str | os.PathLike, ds):
    """The data set as the checkpoint's model takes it: resized to its image size; its channels and classes must
    match (a one-line :class:`ConfigError` otherwise). The one home of this check for every stage."""
    from slimexport.data import conform

    ds = conform(ds, ckpt["data"].get("image_size"), str(path))
    if (ckpt["in_channels"], ckpt["num_classes"]) != (ds.in_channels, ds.num_classes):
        raise ConfigError(
            f"{path} takes {ckpt['in_channels']}-channel input images and {ckpt['num_classes']} classes; "
            f"the data set {ds.name} has {ds.in_channels} and {ds.num_classes}"
        )
    return ds

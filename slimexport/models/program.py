"""A pruned model that has no source to rebuild it from (a class defined in a notebook): stored as torch.export
programs, graphs of torch operators with their weights and no pickled code. Two programs, one traced in eval mode
and one in training mode (BatchNorm's batch statistics and running updates), share their parameters and buffers,
so the loaded :class:`ProgramModel` runs, fine-tunes in your own loop and exports to ONNX.

The file is a zip: ``slimexport.json`` (what it is: classes, input channels and size, the prune's record),
``eval.pt2`` and ``train.pt2`` (``torch.export.save``). Before torch.export reads a program, every part it would
unpickle is checked: a weight or constant stored as a pickle, or sample inputs that do not load with
``weights_only=True``, refuse the file (torch.export would otherwise fall back to an unrestricted unpickler).
"""

from __future__ import annotations

import copy
import io
import json
import os
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.errors import CheckpointError, ConfigError
from slimexport.fileio import atomic_path

FORMAT = "slimexport-program"
PARTS = ("eval.pt2", "train.pt2")


class ProgramModel(nn.Module):
    """A model loaded from its torch.export programs: ``forward`` runs the eval graph, or in training mode the
    training graph; both read the same parameters and buffers."""

    def __init__(self, eval_graph: nn.Module, train_graph: nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.graph = eval_graph
        object.__setattr__(self, "_train_graph", train_graph)  # not a submodule: its tensors are the graph's
        self.meta = meta
        self.num_classes, self.in_channels = int(meta["num_classes"]), int(meta["in_channels"])
        self._tie()

    def _tie(self) -> None:
        """The training graph reads the eval graph's parameters and buffers (the very tensors, so that a step and
        BatchNorm's running statistics show in both)."""
        for kind in ("parameters", "buffers"):
            for name, t in getattr(self.graph, f"named_{kind}")():
                owner, _, leaf = name.rpartition(".")
                mod = self._train_graph.get_submodule(owner) if owner else self._train_graph
                if kind == "parameters":
                    setattr(mod, leaf, t)
                else:
                    mod.register_buffer(leaf, t)

    def _apply(self, fn, recurse: bool = True):  # .to(device) may replace buffers: tie again
        out = super()._apply(fn, recurse)
        self._tie()
        return out

    def train(self, mode: bool = True) -> ProgramModel:  # the exported graphs do not switch modes themselves
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._train_graph if self.training else self.graph)(x)

    def example_input(self, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        size = tuple(image_size or self.meta["image_size"])
        return torch.randn(2, self.in_channels, *size, generator=torch.Generator().manual_seed(0))


def save_program(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, record: dict) -> Path:
    """Write ``model`` (pruned, any ``nn.Module``) as its eval and training programs at ``path``, atomically.
    ``example_input``: a batch of what its forward takes (a dynamic batch axis is exported)."""
    x = example_input.detach()
    x = x if len(x) >= 2 else torch.cat([x, x])  # BatchNorm in training mode needs two samples
    was = model.training
    try:
        with torch.no_grad():
            num_classes = int(model.eval()(x).shape[1])
    finally:
        model.train(was)  # the exports below work on copies
    blobs = {}
    for part, training in zip(PARTS, (False, True)):
        copy_ = copy.deepcopy(model).train(training)  # exporting must not touch the caller's statistics
        batch = torch.export.Dim("batch", min=2, max=65536)
        try:
            ep = torch.export.export(copy_, (x,), dynamic_shapes=({0: batch},))
        except Exception as e:  # noqa: BLE001 - export raises many kinds of errors for what it cannot capture
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"torch.export cannot capture {type(model).__name__} ({first}); give save_pruned a "
                              "source= to rebuild it from instead") from None  # fmt: skip
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        blobs[part] = buf.getvalue()
    meta = {"format": FORMAT, "num_classes": num_classes, "in_channels": int(x.shape[1]),
            "image_size": list(x.shape[2:]), "prune": record}  # fmt: skip
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as z:
        z.writestr("slimexport.json", json.dumps(meta))
        for part, blob in blobs.items():
            z.writestr(part, blob)
    return Path(path)


def is_program(path: str | os.PathLike) -> bool:
    """A file :func:`save_program` wrote (a zip with its ``slimexport.json``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return "slimexport.json" in z.namelist() and all(p in z.namelist() for p in PARTS)
    except (OSError, zipfile.BadZipFile):
        return False


def load_program(path: str | os.PathLike) -> ProgramModel:
    """The model :func:`save_program` wrote, in eval mode; a file that is not one, or whose programs hold pickles,
    is a one-line :class:`CheckpointError`."""
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("slimexport.json"))
            blobs = {p: z.read(p) for p in PARTS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a slimexport program file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a slimexport program file (format {meta.get('format')!r})")
    graphs = []
    for part, blob in blobs.items():
        _check_no_pickles(blob, f"{path}:{part}")
        try:
            graph = torch.export.load(io.BytesIO(blob)).module()
            # each program is traced in one mode: .train()/.eval() leave it as it is (torch.export's module raises)
            graph.train = types.MethodType(lambda self, mode=True: self, graph)
            graph.eval = types.MethodType(lambda self: self, graph)
            graphs.append(graph)
        except Exception as e:  # noqa: BLE001 - a damaged program fails in many ways
            raise CheckpointError(f"{path}: its program {part} does not load ({type(e).__name__}: {e})") from None
    return ProgramModel(graphs[0], graphs[1], meta).eval()


def _check_no_pickles(blob: bytes, where: str) -> None:
    """Refuse a program archive whose weights or constants are stored as pickles, or whose sample inputs need more
    than ``weights_only`` loading: torch.export would unpickle those without restriction."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for name in z.namelist():
                if name.endswith(("model_weights_config.json", "model_constants_config.json")):
                    if _pickled(json.loads(z.read(name))):
                        raise CheckpointError(f"{where} stores tensors as pickles; slimexport loads no pickles")
                elif "/sample_inputs/" in name:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - weights_only refusing, a broken zip
        raise CheckpointError(f"{where} is not a plain program ({type(e).__name__}: {str(e)[:120]})") from None


def _pickled(node: Any) -> bool:
    """Any ``"use_pickle": true`` in a program's weights or constants config."""
    if isinstance(node, dict):
        return node.get("use_pickle") is True or any(_pickled(v) for v in node.values())
    return isinstance(node, list) and any(_pickled(v) for v in node)

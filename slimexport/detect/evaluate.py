"""A detector's artifacts and measurements: slimexport's plain-data checkpoint (no pickle: the model's yaml, the
pruning plan and the weights), the Ultralytics ``.pt`` that ``YOLO(...)`` loads, ONNX with Ultralytics' metadata
(verified against PyTorch, simplified), and mAP measured by Ultralytics' validator on the ONNX model in
onnxruntime."""

from __future__ import annotations

import contextlib
import copy
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimexport.config import ExportConfig
from slimexport.errors import CheckpointError, ModelFileError
from slimexport.export import TensorInputs, export_model
from slimexport.fileio import atomic_path
from slimexport.plan import apply_plan

FORMAT = "slimexport-yolo"


def _module_names(yaml: dict[str, Any]) -> list[str]:
    return [str(layer[2]) for part in ("backbone", "head") for layer in yaml.get(part, []) if len(layer) > 2]


def check_yaml_modules(yaml: dict[str, Any], where: str) -> None:
    """Ultralytics builds a model by looking each layer's module name up among its own names: refuse any name that
    is not an ``nn.Module`` class of Ultralytics or ``torch.nn`` (a file's string never becomes another call)."""
    from ultralytics.nn import tasks

    for name in _module_names(yaml):
        obj = getattr(torch.nn, name[3:], None) if name.startswith("nn.") else vars(tasks).get(name)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise CheckpointError(f"{where}: layer module {name!r} is not an Ultralytics or torch.nn module")


def build(yaml: dict[str, Any], nc: int, plan: dict[str, Any] | None, where: str) -> nn.Module:
    """An Ultralytics model from its yaml dict (checked), pruned by ``plan``."""
    from ultralytics.nn.tasks import DetectionModel

    check_yaml_modules(yaml, where)
    with contextlib.redirect_stdout(io.StringIO()):
        model = DetectionModel(copy.deepcopy(yaml), nc=nc, verbose=False)
    return ultralytics_form(apply_plan(model, plan)) if plan else model


def ultralytics_form(model: nn.Module) -> nn.Module:
    """The pruned model as Ultralytics' code can take it. Where the engine let a BN select its channels out of a
    wider input (YOLO11's head: a depthwise conv whose input other layers read), the selection goes back into
    zero weights (:func:`slimexport.rewrite.absorb_selections`: the same function), and the BN becomes a plain
    BatchNorm again, so Ultralytics' conv+BN fusing (``val``, ``predict``, ``export``) and a pickled ``pruned.pt``
    work. Then the split blocks' widths are synced (:func:`sync_widths`). Returns a new model where it changes one."""
    from slimexport.channels import SelectingBatchNorm

    if any(isinstance(m, SelectingBatchNorm) for m in model.modules()):
        model = _widen_selections(copy.deepcopy(model))
    for m in model.modules():
        if isinstance(m, SelectingBatchNorm) and m.slim_selection.num_channels == m.num_features:
            m.__class__ = next(b for b in type(m).__mro__[1:] if b is not SelectingBatchNorm)
            del m._modules["slim_selection"]
    return sync_widths(model)


@torch.no_grad()
def _widen_selections(model: nn.Module) -> nn.Module:
    """Each selecting BN of an Ultralytics ``Conv`` back to the full width of its conv: the channels it dropped get
    γ = β = 0 (so SiLU(BN) = 0 there) and zero weights in the conv that reads them, the next module of the same
    ``Sequential`` (YOLO11's head: DWConv → Conv). The same function, with no index op."""
    from slimexport.channels import SelectingBatchNorm, set_bn_selection

    mods = dict(model.named_modules())
    for name, bn in list(mods.items()):
        if not isinstance(bn, SelectingBatchNorm) or bn.slim_selection.num_channels == bn.num_features:
            continue
        owner = name.rsplit(".", 1)[0]
        parent, _, pos = owner.rpartition(".")
        nxt = mods.get(f"{parent}.{int(pos) + 1}") if pos.isdigit() else None
        reader = getattr(nxt, "conv", nxt)
        if not (isinstance(reader, nn.Conv2d) and reader.groups == 1 and reader.in_channels == bn.num_features):
            raise CheckpointError(f"{name}: a channel selection Ultralytics' modules cannot hold (prune with "
                                  "--round-to 1 or report the model)")  # fmt: skip
        idx, width = torch.as_tensor(bn.slim_selection.indices()), bn.slim_selection.num_channels
        for attr, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            old = getattr(bn, attr)
            wide = torch.full((width,), fill, dtype=old.dtype)
            wide[idx] = old
            setattr(bn, attr, nn.Parameter(wide) if isinstance(old, nn.Parameter) else wide)
        bn.num_features = width
        set_bn_selection(bn, width, range(width))
        w = torch.zeros(reader.out_channels, width, *reader.weight.shape[2:], dtype=reader.weight.dtype)
        w[:, idx] = reader.weight
        reader.weight, reader.in_channels = nn.Parameter(w), width
    return model


def sync_widths(model: nn.Module) -> nn.Module:
    """Set the hidden width ``c`` that Ultralytics' split blocks (C2f, C3k2, C2PSA, ...) keep as an attribute to what
    pruning left in their ``cv1`` (two halves of ``c``): their ``forward`` chunks the tensor it gets, but the
    ``forward_split`` its exporter switches to, and their attention blocks, split by ``(c, c)``."""
    for m in model.modules():
        cv1 = getattr(getattr(m, "cv1", None), "conv", None)
        if isinstance(getattr(m, "c", None), int) and isinstance(cv1, nn.Conv2d) and 2 * m.c != cv1.out_channels:
            if cv1.out_channels % 2 == 0 and hasattr(m, "forward_split"):
                m.c = cv1.out_channels // 2
    return model


def save_detector(model: nn.Module, path: str | os.PathLike, plan: dict[str, Any] | None, meta: dict[str, Any]) -> None:
    """slimexport's checkpoint of a detector, plain data (``torch.load(weights_only=True)`` reads it)."""
    ckpt = {
        "format": FORMAT,
        "yaml": _plain(model.yaml),
        "nc": nc_of(model),
        "names": names_of(model),
        "stride": [float(s) for s in model.stride],
        "plan": plan or {},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def nc_of(model: nn.Module) -> int:
    """The classes a detection model detects (its head's ``nc``: a model built from a yaml has no ``model.nc``)."""
    return int(model.model[-1].nc)


def names_of(model: nn.Module) -> dict[int, str]:
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    return {int(k): str(v) for k, v in names.items()}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def load_detector(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The model of :func:`save_detector`'s file, rebuilt from its yaml and plan (float32, eval mode), and the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a slimexport detector checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a slimexport detector checkpoint")
    model = build(ckpt["yaml"], ckpt["nc"], ckpt["plan"], str(path))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        why = str(e).strip().splitlines()[0][:150]
        raise CheckpointError(f"{path}: weights do not fit its model ({why})") from None
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    model.stride = torch.tensor(ckpt["stride"])
    model.model[-1].stride = model.stride
    return model.float().eval(), ckpt


def read_user_model(path: str | os.PathLike) -> nn.Module:
    """A model the user named on the command line: a ``.yaml`` (built untrained) or an Ultralytics ``.pt`` (a
    pickle: loaded with Ultralytics' own loader only because the user named it). Never downloads."""
    p = Path(path).expanduser()
    packaged = p.suffix in (".yaml", ".yml") and p.parent == Path(".") and not p.is_file()  # yolo11n.yaml
    if not p.is_file() and not packaged:
        raise ModelFileError(f"model file {p} not found (Ultralytics' own names like yolov8n.pt are not downloaded)")
    if p.suffix in (".yaml", ".yml"):
        from ultralytics.nn.tasks import yaml_model_load

        try:  # a file, or one of Ultralytics' packaged model yamls by name (read from its install, never fetched)
            yaml = yaml_model_load(str(p))
        except Exception as e:  # noqa: BLE001 - YAML errors of several kinds
            raise ModelFileError(f"model yaml {p}: {str(e).splitlines()[0][:150]}") from None
        return _detector_only(build(yaml, int(yaml.get("nc", 80)), None, str(p)), p)
    from ultralytics.nn.tasks import load_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = load_checkpoint(str(p))
    except Exception as e:  # noqa: BLE001 - a pickle can fail in any way
        raise ModelFileError(f"{p}: not an Ultralytics model ({str(e).strip().splitlines()[0][:150]})") from None
    for q in model.parameters():
        q.requires_grad_(False)
    return _detector_only(model.float().eval(), p)


def _detector_only(model: nn.Module, p: Path) -> nn.Module:
    """Detection models with a plain ``Detect`` head (YOLOv8, YOLO11 and their kind); segmentation, pose, OBB and
    end-to-end heads are refused with one line."""
    from ultralytics.nn.tasks import DetectionModel

    head = type(model.model[-1]).__name__ if hasattr(model, "model") else type(model).__name__
    if type(model) is not DetectionModel or head != "Detect" or getattr(model.model[-1], "end2end", False):
        raise ModelFileError(f"{p}: a {type(model).__name__} with a {head} head; slimexport's detector pipeline "
                             "takes detection models with a Detect head (YOLOv8, YOLO11)")  # fmt: skip
    return model


def save_ultralytics(model: nn.Module, path: str | os.PathLike, train_args: dict[str, Any] | None = None) -> None:
    """An Ultralytics checkpoint (a pickle, as Ultralytics writes them) that ``YOLO(path)`` loads for ``predict``,
    ``val``, ``train`` (with :class:`~slimexport.detect.train.PrunedDetectionTrainer`) and ``export``; in float32,
    not half, so it measures what slimexport measured."""
    from ultralytics import __version__

    m = ultralytics_form(copy.deepcopy(model).float().eval())
    m.args = {k: v for k, v in (train_args or {}).items() if isinstance(v, (bool, int, float, str))}
    ckpt = {"date": datetime.now(timezone.utc).isoformat(), "version": __version__, "license": "AGPL-3.0",
            "model": m, "train_args": m.args}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def letterboxed(images: list[Path], size: int) -> torch.Tensor:
    """Images as Ultralytics feeds them at ``size``: RGB, letterboxed onto grey 114, scaled to [0, 1]."""
    from PIL import Image

    out = np.full((len(images), size, size, 3), 114, dtype=np.uint8)
    for i, f in enumerate(images):
        with Image.open(f) as im:
            im = im.convert("RGB")
            r = size / max(im.size)
            w, h = max(1, round(im.width * r)), max(1, round(im.height * r))
            im = im.resize((w, h), Image.BILINEAR)
            top, left = (size - h) // 2, (size - w) // 2
            out[i, top : top + h, left : left + w] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def export_detector(
    model: nn.Module, path: str | os.PathLike, sample: torch.Tensor, task_meta: dict[str, Any], cfg: ExportConfig
) -> dict[str, Any]:
    """ONNX of a detection model as Ultralytics exports it (the Detect head's decoded boxes and class scores,
    ``(N, 4 + nc, anchors)``, dynamic batch) with Ultralytics' metadata, so ``YOLO(path)`` validates and predicts
    with it; verified against PyTorch on ``sample`` (images in [0, 1]) and simplified. Returns the export record."""
    m = copy.deepcopy(model).float().eval()
    head = m.model[-1]
    head.export, head.format, head.dynamic = True, "onnx", True
    size = list(sample.shape[2:])
    metadata = {
        "description": "slimexport (Ultralytics YOLO)",
        "author": "slimexport",
        "stride": int(max(m.stride)),
        "task": "detect",
        "batch": 1,
        "imgsz": size,
        "names": names_of(m),
        "channels": int(sample.shape[1]),
        "end2end": False,
    } | task_meta
    return export_model(m, path, TensorInputs(sample), cfg, {k: str(v) for k, v in metadata.items()})


def onnx_map(path: str | os.PathLike, data: str | os.PathLike, image_size: int, batch: int = 1) -> dict[str, float]:
    """mAP50-95 and mAP50 of an ONNX (or INT8 ONNX) detector measured by Ultralytics' validator, the model run in
    onnxruntime on the CPU."""
    from ultralytics import YOLO

    with contextlib.redirect_stdout(io.StringIO()):
        metrics = YOLO(str(path), task="detect").val(
            data=str(data),
            imgsz=image_size,
            batch=batch,
            rect=False,
            device="cpu",
            plots=False,
            verbose=False,
            workers=0,
        )
    return {"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50)}

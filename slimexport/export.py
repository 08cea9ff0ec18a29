"""ONNX export: torch's default (dynamo) exporter with a dynamic batch axis, onnx.checker, onnxsim, and a parity
check against PyTorch on real test images. Export is not done until the parity check passes; a mismatch beyond
tolerance raises :class:`ParityError` and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from slimexport.checkpoint import fit_data, load_checkpoint
from slimexport.config import SELECTION_MODES, BenchConfig, ExportConfig
from slimexport.data import Dataset
from slimexport.errors import ConfigError, ParityError, SlimExportError
from slimexport.fileio import atomic_path
from slimexport.records import ExportResult
from slimexport.rewrite import absorb_selections, for_export
from slimexport.runtime import INPUT_NAME, OUTPUT_NAME, latency, ort_session
from slimexport.selection import candidates

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportConfig",
    "TensorInputs",
    "export",
    "export_model",
    "ort_session",
    "parity",
]


class TensorInputs:
    """Images already normalised (float N, C, H, W), in the shape of a :class:`Dataset`'s test split, for the
    parity check of :func:`export_onnx`."""

    def __init__(self, x: torch.Tensor):
        self.x_test = x.detach().float().cpu()
        self.y_test = torch.zeros(len(x), dtype=torch.long)

    def test_batches(self, batch_size: int, images: int | None = None, device=None):
        """As :meth:`Dataset.test_batches`: the first ``images`` inputs in batches (already normalised)."""
        n = len(self.y_test) if images is None else min(images, len(self.y_test))
        for i in range(0, n, batch_size):
            yield self.x_test[i : min(i + batch_size, n)], self.y_test[i : min(i + batch_size, n)]


def _export_torch(model: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME] + [f"{OUTPUT_NAME}_{i}" for i in range(1, _n_outputs(model, sample))],
                external_data=False,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; report the first line, keep the log for debugging
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimExportError(
            f"torch.onnx.export failed for {getattr(model, 'arch', type(model).__name__)}: {first[:200]}"
        ) from e


@torch.no_grad()
def _n_outputs(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """How many tensors the model returns (1 for a classifier; a detector's heads: several)."""
    return len(tree_flatten(model.eval()(sample[:1]))[0])


def op_counts(model_proto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model_proto.graph.node).items()))


@torch.no_grad()
def parity(model: torch.nn.Module, onnx_path: Path, ds: Dataset, n_images: int, batch: int) -> dict[str, float]:
    """Max |ONNX − PyTorch| over the logits of the first ``n_images`` test images, and top-1 agreement."""
    sess = ort_session(onnx_path, threads=os.cpu_count() or 1)
    model.eval()
    n = min(n_images, len(ds.y_test))
    max_diff, agree = 0.0, 0
    for x, _ in ds.test_batches(batch, images=n, device="cpu"):
        refs = [t.numpy() for t in tree_flatten(model(x))[0]]  # several outputs (a detector's heads): all of them
        gots = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        if [g.shape for g in gots] != [r.shape for r in refs]:
            shapes = [g.shape for g in gots], [r.shape for r in refs]
            raise ParityError(f"ONNX output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
        max_diff = max([max_diff] + [float(np.abs(g - r).max()) for g, r in zip(gots, refs)])
        agree += int((gots[0].argmax(1) == refs[0].argmax(1)).all(axis=tuple(range(1, refs[0].ndim - 1))).sum())
    return {"max_abs_diff": max_diff, "top1_agreement": agree / n, "images": n}


def export(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, ds: Dataset, cfg: ExportConfig | None = None
) -> ExportResult:
    """Export a checkpoint to ONNX at ``out`` (atomically, only once checked, simplified and verified)."""
    model, ckpt = load_checkpoint(ckpt_path)
    ds = fit_data(ckpt, ckpt_path, ds)
    cfg = cfg or ExportConfig()
    if cfg.selection not in SELECTION_MODES:
        raise ConfigError(f"--selection must be one of {', '.join(SELECTION_MODES)}, got {cfg.selection!r}")
    metadata = {
        "arch": ckpt["arch"],
        "stage": ckpt["meta"].get("stage", ""),
        "mean": json.dumps(ckpt["data"].get("mean")),
        "std": json.dumps(ckpt["data"].get("std")),
        "labels": json.dumps(ckpt["data"].get("label_names")),
    }
    if cfg.selection == "auto":
        return _export_fastest(model, out, ds, cfg, metadata)
    exported = absorb_selections(model) if cfg.selection == "dense" else model
    return export_model(exported, out, ds, cfg, metadata, reference=model)


def _export_fastest(
    model: torch.nn.Module, out: str | os.PathLike, ds: Dataset, cfg: ExportConfig, metadata: dict[str, str]
) -> ExportResult:
    """``--selection auto``: export every candidate, time them side by side in onnxruntime, keep the fastest."""
    image_shape = (ds.in_channels, *ds.image_size)
    cands, per_unit = candidates(model, image_shape, cfg.tune_batch, cfg.tune_threads, cfg.tune_device)
    if len(cands) == 1:  # nothing to choose (no selection removes a channel)
        res = export_model(model, out, ds, cfg, metadata, reference=model)
        res["selection"] = {"chosen": "gather", "absorbed": cands["gather"][1], "candidates": {}, "units": per_unit}
        return res
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.candidates-") as tmp:
        results, paths = {}, {}
        for name, (m, _) in cands.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            results[name] = export_model(m, paths[name], ds, cfg, metadata | {"selection": name}, reference=model)
        bcfg = BenchConfig(
            batches=[cfg.tune_batch], threads=[cfg.tune_threads], seconds=cfg.tune_seconds, device=cfg.tune_device
        )
        rows = latency(paths, image_shape, bcfg)
        timing = {r["model"]: r["median_ms"] for r in rows}
        chosen = min(timing, key=lambda n: (timing[n], n != "gather"))  # a tie goes to the fewest MACs
        os.replace(paths[chosen], out)
    res = results[chosen] | {"path": str(out)}
    res["selection"] = {
        "chosen": chosen,
        "absorbed": cands[chosen][1],  # per selection unit, in the order of rewrite.selection_units
        "batch": cfg.tune_batch,
        "threads": cfg.tune_threads,
        "tuned_on": cfg.tune_device,
        "candidates": {n: {"median_ms": timing[n], "op_counts": results[n]["op_counts"]} for n in cands},
        "units": per_unit,
    }
    return res


def export_model(
    model: torch.nn.Module,
    out: str | os.PathLike,
    ds: Dataset,
    cfg: ExportConfig | None = None,
    metadata: dict[str, str] | None = None,
    reference: torch.nn.Module | None = None,
) -> ExportResult:
    """Export any image classifier module taking (N, C, H, W) normalised inputs; see :func:`export`.

    Parity is checked against ``reference`` (default: ``model`` itself).
    """
    import onnx

    cfg = cfg or ExportConfig()
    if cfg.atol <= 0:
        raise ConfigError(f"--atol must be positive, got {cfg.atol}")
    model.eval()
    t0 = time.perf_counter()
    sample = next(ds.test_batches(2, images=2, device="cpu"))[0]
    with atomic_path(out, suffix=".onnx") as tmp:
        _export_torch(for_export(model) if cfg.rewrite else model, sample, tmp, cfg.opset)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        ops_exported = op_counts(proto)
        simplified = False
        if cfg.simplify:
            import onnxsim

            try:
                simp, ok = onnxsim.simplify(proto)
            except Exception as e:
                raise SlimExportError(f"onnxsim failed on {out}: {str(e).strip().splitlines()[0][:200]}") from e
            if not ok:
                raise SlimExportError(f"onnxsim could not validate the simplified model for {out}")
            proto, simplified = simp, True
            onnx.checker.check_model(proto, full_check=True)
        del proto.metadata_props[:]
        for k, v in ({"producer": "slimexport"} | (metadata or {})).items():
            proto.metadata_props.add(key=k, value=str(v))
        onnx.save(proto, str(tmp))
        par = parity(reference if reference is not None else model, tmp, ds, cfg.parity_images, cfg.parity_batch)
        par["atol"] = cfg.atol
        if not (par["max_abs_diff"] <= cfg.atol):
            raise ParityError(
                f"ONNX output differs from PyTorch by {par['max_abs_diff']:.3g} > atol {cfg.atol:g} "
                f"(top-1 agreement {par['top1_agreement']:.4f}); {out} not written"
            )
        size = tmp.stat().st_size
    return {
        "path": str(out),
        "onnx_bytes": size,
        "opset": cfg.opset,
        "simplified": simplified,
        "op_counts": op_counts(proto),
        "op_counts_before_simplify": ops_exported,
        "parity": par,
        "export_seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }

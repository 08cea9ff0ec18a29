"""Benchmarking in onnxruntime: latency (warm-up, then interleaved repeated runs; median and p90), test-set
accuracy measured by onnxruntime itself, and the share of time spent in each op type (onnxruntime profiler).

Models are timed side by side: for each (batch, threads) setting every model gets its own session, and runs
alternate between models so that machine noise hits them alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from slimexport.console import make_progress
from slimexport.data import Dataset, conform
from slimexport.errors import ModelFileError, SlimExportError
from slimexport.records import BenchResult
from slimexport.runtime import (
    BenchConfig,
    check_input_shape,
    is_ncnn,
    latency,
    ort_session,
    parse_device,
    predictor,
    provider_for,
    require_model,
    run_logits,
    static_image_size,
)

__all__ = ["BenchConfig", "bench", "index_op_cost", "latency", "op_time_shares", "ort_accuracy", "provider_for"]


def ort_accuracy(path: Path, ds: Dataset, device: str = "cpu", batch_size: int = 256, progress=None) -> float:
    """Top-1 accuracy of the model on the whole test split, computed by its runtime (onnxruntime, or ncnn for an
    ``.ncnn.param`` model)."""
    provider, device_id = provider_for(device), parse_device(device)[1]
    shape = (ds.in_channels, *ds.image_size)
    predict = predictor(path, os.cpu_count() or 1, provider, shape, device_id)
    correct = 0
    task = progress.add_task(f"accuracy {Path(path).name}", total=len(ds.y_test), info="") if progress else None
    for xb, yb in ds.test_batches(batch_size, device="cpu"):
        logits = predict(xb.numpy())
        correct += int((logits.argmax(1) == yb.numpy()).sum())
        if task is not None:
            progress.advance(task, len(yb))
    if task is not None:
        progress.remove_task(task)
    return correct / len(ds.y_test)


def op_time_shares(
    path: Path, image_shape: tuple[int, ...], runs: int = 50, threads: int = 1, device: str = "cpu"
) -> dict[str, Any]:
    """Per op type, the share of onnxruntime node time at batch 1 (from onnxruntime's profiler), on the provider of
    ``device`` (the one the bench targets); the record names it."""
    provider, device_id = parse_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(
            path, threads=threads, provider=provider_for(device), profile_prefix=os.path.join(tmp, "ort"),
            device_id=device_id,
        )  # fmt: skip
        x = np.zeros((1, *image_shape), np.float32)
        for _ in range(runs):
            run_logits(sess, x)
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    dur: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            dur[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0)
    total = sum(dur.values())
    if total <= 0:
        raise SlimExportError(f"the onnxruntime profiler recorded no node time for {path}")
    shares = {op: d / total for op, d in sorted(dur.items(), key=lambda kv: -kv[1])}
    return {
        "shares": shares,
        "gather_slice_share": shares.get("Gather", 0.0) + shares.get("Slice", 0.0),
        "runs": runs,
        "threads": threads,
        "provider": provider,
    }


def _channel_count(node, inits: dict[str, np.ndarray]) -> int | None:
    """Output channels of a channel Gather (axis 1, constant indices) or Slice (axis 1, constant bounds)."""
    if node.op_type == "Gather":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        idx = inits.get(node.input[1])
        return int(idx.size) if axis == 1 and idx is not None and idx.ndim == 1 else None
    if node.op_type == "Slice" and len(node.input) >= 4:
        starts, ends, axes = (inits.get(n) for n in node.input[1:4])
        steps = inits.get(node.input[4]) if len(node.input) > 4 else None
        if any(v is None or v.size != 1 for v in (starts, ends, axes)) or int(axes[0]) != 1:
            return None
        if steps is not None and int(steps.reshape(-1)[0]) != 1:
            return None
        return int(ends.reshape(-1)[0]) - int(starts.reshape(-1)[0])
    return None


def with_index_ops_doubled(proto) -> tuple[Any, int]:
    """A copy of ``proto`` in which each channel Gather/Slice is followed by a second Gather of the same size (the
    channels in reverse order, so that no runtime can drop it as an identity). The output is wrong, the work of
    everything else is unchanged: the latency difference is what the index ops cost. Returns (copy, ops doubled)."""
    import onnx
    from onnx import helper, numpy_helper

    new = onnx.ModelProto()
    new.CopyFrom(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    nodes, doubled = [], 0
    for node in new.graph.node:
        nodes.append(node)
        c = _channel_count(node, inits)
        if c is None or c <= 0:
            continue
        out = node.output[0]
        moved, idx = f"{out}__before_double", f"{out}__reverse_index"
        node.output[0] = moved
        new.graph.initializer.append(numpy_helper.from_array(np.arange(c - 1, -1, -1, dtype=np.int64), idx))
        nodes.append(helper.make_node("Gather", [moved, idx], [out], axis=1, name=f"{node.name}__double"))
        doubled += 1
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    return new, doubled


def index_op_cost(path: Path, image_shape: tuple[int, ...], batch: int = 1, threads: int = 1, seconds: float = 2.0):
    """The time a model's channel Gather/Slice nodes take, measured without the profiler: the model timed side by
    side with :func:`with_index_ops_doubled`'s copy; the difference of the medians is the index ops' cost.

    The profiler adds a fixed cost to every node it records (a few µs on the development machine, as much as a
    small Gather itself takes), which inflates the share of many small nodes; this measure has no profiler.
    Returns {index_ops, median_ms, doubled_median_ms, cost_ms, share}.
    """
    import onnx

    proto = onnx.load(str(path))
    doubled, n = with_index_ops_doubled(proto)
    if n == 0:
        return {"index_ops": 0, "cost_ms": 0.0, "share": 0.0}
    cfg = BenchConfig(batches=[batch], threads=[threads], seconds=seconds, accuracy=False, profile=False)
    rows = latency({"model": Path(path), "doubled": doubled.SerializeToString()}, image_shape, cfg)
    ms = {r["model"]: r["median_ms"] for r in rows}
    cost = ms["doubled"] - ms["model"]
    return {
        "index_ops": n,
        "median_ms": ms["model"],
        "doubled_median_ms": ms["doubled"],
        "cost_ms": cost,
        "share": cost / ms["model"],
    }


def bench(models: dict[str, str | os.PathLike], ds: Dataset, cfg: BenchConfig | None = None) -> BenchResult:
    """Benchmark one or more ONNX models side by side; returns {models: {name: {...}}, latency: [...], config}."""
    cfg = cfg or BenchConfig()
    cfg.validate()
    provider_for(cfg.device)
    paths = {}
    sizes: dict[str, list[int]] = {}  # the fixed input size of each model that has one
    for name, p in models.items():  # every file loads and fits the data before anything is timed
        paths[name], fmt = require_model(p, ("onnx", "ort", "ncnn"), "bench")
        if fmt == "ncnn":
            predictor(p)  # loads, or a one-line error; ncnn records no input shape
            continue
        sess = ort_session(paths[name])
        size = static_image_size(sess)
        if size is not None:
            sizes[str(p)] = size
            if len({tuple(v) for v in sizes.values()}) > 1:
                shown = ", ".join(f"{k} {v[0]}×{v[1]}" for k, v in sizes.items())
                raise ModelFileError(f"the models take images of different sizes ({shown}); bench compares models "
                                     "on the same images: give it models of one input size")  # fmt: skip
        ds = conform(ds, size, str(p))
        check_input_shape(sess, (ds.in_channels, *ds.image_size), str(p))
    image_shape = (ds.in_channels, *ds.image_size)
    out: BenchResult = {"models": {n: {"path": str(p), "onnx_bytes": p.stat().st_size} for n, p in paths.items()}}
    with make_progress() as progress:
        out["latency"] = latency(paths, image_shape, cfg, progress)
        for name, p in paths.items():
            if cfg.accuracy:
                out["models"][name]["accuracy"] = ort_accuracy(p, ds, cfg.device, progress=progress)
            if cfg.profile and not is_ncnn(p):
                out["models"][name]["op_time"] = op_time_shares(p, image_shape, device=cfg.device)
    out["config"] = asdict(cfg)
    return out


def model_names(paths: list[Path]) -> list[str]:
    """Short unique names for models given as paths: file stems, else file names, else numbered."""
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def latency_table(res: BenchResult, ref: str, title: str = "onnxruntime"):
    """:func:`bench`'s latencies as a rich table, with each row's speed-up over model ``ref`` in the same setting."""
    from rich.table import Table

    base = {(r["batch"], r["threads"]): r["median_ms"] for r in res["latency"] if r["model"] == ref}
    table = Table(title=title)
    for col in ("model", "batch", "threads", "median ms", "p90 ms", f"speed-up vs {ref}"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in res["latency"]:
        table.add_row(
            r["model"],
            str(r["batch"]),
            str(r["threads"]),
            f"{r['median_ms']:.3f}",
            f"{r['p90_ms']:.3f}",
            f"×{base[(r['batch'], r['threads'])] / r['median_ms']:.2f}",
        )
    return table

"""Latency as the pruning target (``--target-speedup``, ``--max-latency``): a probe that exports a candidate
pruned model to ONNX and times it side by side with the unpruned model on the target runtime, so the prune's
search (:func:`slimexport.graph_prune.prune_graph`) asks "is this fast enough?" of the runtime itself rather than
of a proxy (channels, MACs).

Each measurement is cached on disk per (unpruned model, candidate, runtime, batch, threads, input shape, CPU),
keyed by the ONNX bytes themselves: a search repeated on the same sparse model (another target, a resumed run)
times nothing it has timed before. The cache lives in ``$XDG_CACHE_HOME/slimexport/latency`` (``~/.cache``) or
``SLIMEXPORT_LATENCY_CACHE``; it holds numbers only."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.config import BenchConfig, PruneConfig
from slimexport.errors import ConfigError
from slimexport.export import _export_torch
from slimexport.fileio import write_json
from slimexport.rewrite import for_export
from slimexport.runtime import latency, machine_facts, provider_for

SECONDS = 0.5  # timing budget per probe and model (after the minimum runs); the chosen model is re-timed longer
TABLE_SECONDS = 1.0  # per group of the latency table: a group's saving is a few % of the model's time


def cache_dir() -> Path:
    env = os.environ.get("SLIMEXPORT_LATENCY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimexport" / "latency"


def read_cache(path: Path) -> dict[str, Any]:
    """A cache file's measurements; an absent, unreadable or foreign file is an empty cache."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict[str, Any]) -> None:
    """Write a cache file (atomically); a read-only cache only costs time next run, so it never stops a prune."""
    try:
        write_json(path, data)
    except OSError:
        pass


def _device(runtime: str) -> str:
    """The device ``latency`` times on for ``runtime`` (ncnn runs on the CPU), or a one-line error where the
    runtime is not installed."""
    if runtime == "onnxruntime-cuda":
        provider_for("cuda")  # a one-line error where onnxruntime has no CUDA here
        return "cuda"
    if runtime == "ncnn":
        from slimexport.deploy import ncnn_available
        from slimexport.runtime import NCNN_HINT

        if not ncnn_available():
            raise ConfigError(f"--runtime ncnn: {NCNN_HINT}")
    return "cpu"


class LatencyProbe:
    """Times candidate pruned models against the unpruned ``model`` on the runtime ``cfg`` names. Calling it
    with a candidate returns ``(candidate_ms, speedup)``; :meth:`fits` says whether a candidate meets the target.
    ``probes`` records every measurement, ``seconds`` the time spent."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, cfg: PruneConfig):
        if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
            raise ConfigError("a latency target needs a model with one image input (N, C, H, W)")
        self.cfg = cfg
        self.device = _device(cfg.runtime)
        self.x = example_input[:1].detach().cpu()
        self.shape = tuple(self.x.shape[1:])
        self.bench = BenchConfig(batches=[cfg.latency_batch], threads=[cfg.latency_threads], device=self.device,
                                 seconds=SECONDS, warmup=3, min_runs=10)  # fmt: skip
        self.t0 = time.perf_counter()
        self.base = self._onnx(model)
        self.key = hashlib.sha256(self.base + json.dumps(self._settings(), sort_keys=True).encode()).hexdigest()[:32]
        self.cache_file = cache_dir() / f"{self.key}.json"
        self.cache = read_cache(self.cache_file)
        self.probes: list[dict[str, Any]] = []
        self.retimed: dict[str, float] | None = None
        self.layer_table: dict[str, Any] | None = None

    def _settings(self) -> dict[str, Any]:
        cpu = machine_facts().get("cpu", "")
        return {"runtime": self.cfg.runtime, "batch": self.cfg.latency_batch, "threads": self.cfg.latency_threads,
                "shape": list(self.shape), "cpu": cpu}  # fmt: skip

    def _onnx(self, model: nn.Module) -> bytes:
        """The candidate as onnxruntime will run it. For speed the TorchScript exporter (about 5× faster than
        the dynamo exporter the pipeline's export uses; onnxruntime fuses both graphs the same way), the dynamo
        exporter where it cannot follow the model. The unpruned model goes the same way, so ratios compare."""
        model = for_export(model.eval())
        try:
            buf = io.BytesIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (self.x,), buf, dynamo=False, opset_version=17)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - the legacy exporter fails in many ways; the dynamo one is the reference
            with tempfile.TemporaryDirectory(prefix="slimexport-latency-") as tmp:
                path = Path(tmp) / "m.onnx"
                _export_torch(model, self.x, path, 20)
                return path.read_bytes()

    def _timed(self, models: dict[str, bytes], cfg: BenchConfig) -> dict[str, float]:
        """Median ms of each ONNX model, side by side, on the runtime (ncnn: converted by pnnx first)."""
        if self.cfg.runtime != "ncnn":
            return {r["model"]: r["median_ms"] for r in latency(models, self.shape, cfg)}
        from slimexport.deploy import pnnx_convert

        with tempfile.TemporaryDirectory(prefix="slimexport-ncnn-") as tmp:
            params = {}
            for name, onnx in models.items():
                (Path(tmp) / name).mkdir()
                src = Path(tmp) / name / f"{name}.onnx"
                src.write_bytes(onnx)
                params[name] = pnnx_convert(src, src.parent, (self.cfg.latency_batch, *self.shape))[0]
            return {r["model"]: r["median_ms"] for r in latency(params, self.shape, cfg)}

    def _measure(self, model: nn.Module, bench: BenchConfig | None = None) -> tuple[dict[str, float], bool]:
        """``{ms, base_ms}`` of ``model`` timed side by side with the unpruned one (cached), and whether it was."""
        onnx = self._onnx(model)
        key = hashlib.sha256(onnx).hexdigest()[:32]
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        ms = self._timed({"base": self.base, "cand": onnx}, bench or self.bench)
        self.cache[key] = {"ms": ms["cand"], "base_ms": ms["base"]}
        write_cache(self.cache_file, self.cache)
        return self.cache[key], False

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        hit, cached = self._measure(model)
        speedup = hit["base_ms"] / hit["ms"]
        self.probes.append({"ms": hit["ms"], "base_ms": hit["base_ms"], "speedup": speedup, "cached": cached})
        return hit["ms"], speedup

    def fits(self, model: nn.Module) -> bool:
        ms, speedup = self(model)
        if self.cfg.target_speedup is not None:
            return speedup >= self.cfg.target_speedup
        return ms <= self.cfg.max_latency

    def retime(self, model: nn.Module, seconds: float = 2.0) -> dict[str, float]:
        """The chosen model timed again against the unpruned one, longer and past the cache: the search's answer
        checked by a measurement of its own."""
        cfg = BenchConfig(batches=self.bench.batches, threads=self.bench.threads, device=self.device, seconds=seconds)
        ms = self._timed({"base": self.base, "cand": self._onnx(model)}, cfg)
        self.retimed = {"ms": ms["cand"], "base_ms": ms["base"], "speedup": ms["base"] / ms["cand"]}
        return self.retimed

    def group_costs(self, groups: Iterator[tuple[str, int, int, nn.Module]]) -> dict[str, float]:
        """The latency table of ``--allocate latency``, measured in the whole model: for each group (a producing
        layer's channels: ``(name, channels, removed, the unpruned model with ``removed`` of them pruned)``), the
        ms saved per channel removed, timed side by side with the unpruned model on the runtime (cached). Each
        layer alone in a one-conv graph would also time the layout conversions around it, which a whole model
        does not do (``python -m benchmarks.table_context``: mobilenet_v2's blocks at 112×112 to 28×28 came out
        1.4-2.2× too expensive, its 14×14 and 7×7 ones 0.7-1.2×). Returns name → ms per channel (≥ 0: a saving
        below the timer's noise is 0)."""
        t0 = time.perf_counter()
        bench = dataclasses.replace(self.bench, seconds=TABLE_SECONDS)
        rows, costs = [], {}
        for name, channels, removed, candidate in groups:
            hit, cached = self._measure(candidate, bench)
            costs[name] = max(0.0, hit["base_ms"] - hit["ms"]) / removed
            rows.append({"layer": name, "channels": channels, "removed": removed, "ms": hit["ms"],
                         "base_ms": hit["base_ms"], "ms_per_channel": costs[name], "cached": cached})  # fmt: skip
        self.layer_table = {"groups": rows, "seconds": time.perf_counter() - t0}
        return costs

    def record(self) -> dict[str, Any]:
        table = self.layer_table
        target = ({"target_speedup": self.cfg.target_speedup} if self.cfg.target_speedup is not None
                  else {"max_latency_ms": self.cfg.max_latency})  # fmt: skip
        return target | {
            "runtime": self.cfg.runtime, "batch": self.cfg.latency_batch, "threads": self.cfg.latency_threads,
            "image_shape": list(self.shape), "probes": self.probes, "search_seconds": time.perf_counter() - self.t0,
            "cache": str(self.cache_file), "retimed": self.retimed, "allocate": self.cfg.allocate,
        } | ({"latency_table": table} if table is not None else {})  # fmt: skip


def _graph(nodes: list, weights: list, in_shape: list[int]) -> bytes:
    """A serialized ONNX model of ``nodes`` from ``input`` to ``logits`` (the names slimexport's exports use)."""
    from onnx import TensorProto, helper

    from slimexport.runtime import INPUT_NAME, OUTPUT_NAME

    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None)
    proto = helper.make_model(helper.make_graph(nodes, "probe", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    proto.ir_version = 8
    return proto.SerializeToString()


def _weight(name: str, shape: tuple[int, ...]):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


STEP_WIDTHS = range(33, 65)  # every candidate block below has whole blocks here (and 64 is the last width)
STEP_CANDIDATES = (32, 16, 8, 4, 2)
STEP_SHARE = 0.15  # a block is free where rounding up to it costs at most this share of what the channels would
# cost if time followed the channel count (a runtime that steps every b channels: about 0 at b, 0.25-0.5 at 2b;
# onnxruntime 1.32 on an Intel Xeon with AVX-512: 0.00-0.03 at 16, 0.26-0.29 at 32 over four fresh measurements)
# The probes: two convolutions with the scanned width between them, as pruning changes one layer's outputs and the
# next one's inputs together (the graph's own input and output keep their widths, so their layout conversions
# cost the same at every width). A 3×3 and a 1×1 pair, most of a CNN's time, about 0.6 ms each on a CPU core.
STEP_PAIRS = ((3, 28, 64), (1, 56, 64))  # (kernel, height = width, channels outside the pair)


def step_from(times: dict[int, float]) -> tuple[int, dict[int, dict[str, float]]]:
    """The runtime's channel block, read from ``times`` (width → ms, over :data:`STEP_WIDTHS`): the largest
    candidate block b whose rounding up is nearly free. A runtime that computes in blocks of b channels takes as
    long at 49 channels as at 64, so rounding up to b costs nothing and a channel pruned inside a block saves
    nothing. Rounding width c up to a multiple of b is priced against the fastest width at or above c (where a
    runtime is slow off its blocks, onnxruntime's CPU convolutions at widths that are not a multiple of 4, more
    channels can be faster), as a share of what those channels would cost if time were proportional to them; b is
    free where the mean share is at most :data:`STEP_SHARE`. Where timing noise leaves none that free, the block
    with the smallest share still beats exact counts as long as that share is under a half (exact counts would land
    on the slow widths); 1 where none is (time follows the count). Returns (block, {b: {cost, share}})."""
    widths = sorted(times)
    best = {c: min(times[d] for d in widths if d >= c) for c in widths}  # the fastest width at or above c
    out = {}
    for b in STEP_CANDIDATES:
        up = {c: -(-c // b) * b for c in STEP_WIDTHS}
        cost = sum((times[up[c]] - best[c]) / best[c] for c in STEP_WIDTHS) / len(STEP_WIDTHS)
        proportional = sum((up[c] - c) / c for c in STEP_WIDTHS) / len(STEP_WIDTHS)
        out[b] = {"cost": float(cost), "share": float(cost / proportional)}
    free = next((b for b in STEP_CANDIDATES if out[b]["share"] <= STEP_SHARE), None)
    if free is None:  # noise: the cheapest block, where rounding to it still costs well under proportional
        cheapest = min(STEP_CANDIDATES, key=lambda b: out[b]["share"])
        free = cheapest if out[cheapest]["share"] < 0.5 else 1
    return free, out


def _pair_graph(k: int, hw: int, other: int, width: int, batch: int) -> bytes:
    from onnx import helper

    from slimexport.runtime import INPUT_NAME, OUTPUT_NAME

    pads = [k // 2] * 4
    nodes = [helper.make_node("Conv", [INPUT_NAME, "w1"], ["h"], kernel_shape=[k, k], pads=pads),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], [OUTPUT_NAME], kernel_shape=[k, k], pads=pads)]  # fmt: skip
    weights = [_weight("w1", (width, other, k, k)), _weight("w2", (other, width, k, k))]
    return _graph(nodes, weights, [batch, other, hw, hw])


def kernel_step(runtime: str = "onnxruntime", batch: int = 1) -> tuple[int, str, dict[str, Any]]:
    """``--round-to auto``, measured: the channel count in whose multiples ``runtime``'s convolutions step here.
    Each probe of :data:`STEP_PAIRS` is timed at every width from 33 to 64 side by side (one thread: the block is
    the kernels' SIMD width, and threads only add noise), the two summed per width, and :func:`step_from` reads
    the block off them. Cached per runtime, batch, CPU and onnxruntime version (a few seconds, once). Returns
    (block, why, the record)."""
    import onnxruntime as ort

    device = _device(runtime)
    cpu = machine_facts().get("cpu", "")
    key = json.dumps([runtime, batch, cpu, ort.__version__, STEP_PAIRS, list(STEP_WIDTHS)])
    cache_file = cache_dir() / "steps.json"
    cache = read_cache(cache_file)
    t0 = time.perf_counter()
    hit = cache.get(key)
    if not (isinstance(hit, dict) and set(hit) == {str(c) for c in STEP_WIDTHS}
            and all(isinstance(v, float) and v > 0 for v in hit.values())):  # fmt: skip
        bench = BenchConfig(batches=[batch], threads=[1], device=device, seconds=0.1, warmup=3, min_runs=20)
        times = dict.fromkeys(STEP_WIDTHS, 0.0)
        for k, hw, other in STEP_PAIRS:
            graphs = {str(c): _pair_graph(k, hw, other, c, batch) for c in STEP_WIDTHS}
            for r in latency(graphs, (other, hw, hw), bench):
                times[int(r["model"])] += r["median_ms"]
        cache[key] = {str(c): t for c, t in times.items()}
        write_cache(cache_file, cache)
    times = {int(c): t for c, t in cache[key].items()}
    block, costs = step_from(times)
    where = {"onnxruntime": "onnxruntime CPU", "onnxruntime-cuda": "onnxruntime CUDA"}.get(runtime, runtime)

    def said(b: int) -> str:
        return f"to {b} costs {100 * costs[b]['cost']:.1f}%"

    if block > 1:
        why = (f"auto: measured on {where}, convolutions step every {block} channels (rounding up {said(block)}"
               + (f", {said(2 * block)}" if 2 * block in costs else "") + " of the latency)")  # fmt: skip
    else:
        why = f"auto: measured on {where}, time follows the channel count (rounding up {said(2)}): exact counts"
    record = {"block": block, "rounding": {str(b): c for b, c in costs.items()},
              "ms": {str(c): t for c, t in times.items()}, "seconds": time.perf_counter() - t0,
              "cache": str(cache_file)}  # fmt: skip
    return block, why, record

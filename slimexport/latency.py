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
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
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


def cache_dir() -> Path:
    env = os.environ.get("SLIMEXPORT_LATENCY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimexport" / "latency"


def _device(runtime: str) -> str:
    if runtime == "onnxruntime":
        return "cpu"
    if runtime == "onnxruntime-cuda":
        provider_for("cuda")  # a one-line error where onnxruntime has no CUDA here
        return "cuda"
    raise ConfigError(f"--runtime {runtime}: latency targets are measured in onnxruntime for now "
                      "(--runtime onnxruntime or onnxruntime-cuda)")  # fmt: skip


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
        self.cache = self._read_cache()
        self.probes: list[dict[str, Any]] = []
        self.base_ms: float | None = None

    def _settings(self) -> dict[str, Any]:
        cpu = machine_facts().get("cpu", "")
        return {"runtime": self.cfg.runtime, "batch": self.cfg.latency_batch, "threads": self.cfg.latency_threads,
                "shape": list(self.shape), "cpu": cpu}  # fmt: skip

    def _read_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self.cache_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

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

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        onnx = self._onnx(model)
        key = hashlib.sha256(onnx).hexdigest()[:32]
        hit = self.cache.get(key)
        cached = hit is not None
        if hit is None:
            rows = latency({"base": self.base, "cand": onnx}, self.shape, self.bench)
            ms = {r["model"]: r["median_ms"] for r in rows}
            hit = {"ms": ms["cand"], "base_ms": ms["base"]}
            self.cache[key] = hit
            try:
                write_json(self.cache_file, self.cache)
            except OSError:  # a read-only cache is no reason to stop a prune: it only costs time next run
                pass
        self.base_ms = hit["base_ms"] if self.base_ms is None else self.base_ms
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
        rows = latency({"base": self.base, "cand": self._onnx(model)}, self.shape, cfg)
        ms = {r["model"]: r["median_ms"] for r in rows}
        self.retimed = {"ms": ms["cand"], "base_ms": ms["base"], "speedup": ms["base"] / ms["cand"]}
        return self.retimed

    def record(self) -> dict[str, Any]:
        target = ({"target_speedup": self.cfg.target_speedup} if self.cfg.target_speedup is not None
                  else {"max_latency_ms": self.cfg.max_latency})  # fmt: skip
        return target | {
            "runtime": self.cfg.runtime, "batch": self.cfg.latency_batch, "threads": self.cfg.latency_threads,
            "image_shape": list(self.shape), "probes": self.probes, "search_seconds": time.perf_counter() - self.t0,
            "cache": str(self.cache_file), "retimed": getattr(self, "retimed", None),
        }  # fmt: skip

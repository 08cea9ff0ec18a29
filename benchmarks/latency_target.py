"""Issue 36's first figure: pruning to a measured speed-up (--target-speedup) on onnxruntime CPU, batch 1, one
thread, for torchvision models at 224×224 and the built-in VGG at 32×32, targets ×1.5, ×2 and ×3.

Per model and target: slimexport's search (prune_model with target_speedup, --round-to auto), then the chosen
model exported the way the pipeline exports it (onnx.checker, onnxsim, parity) and timed again side by side with
the unpruned model exported the same way, in a separate interleaved onnxruntime run (--seconds per model): that
independent speed-up against the target, the search's own re-timing, the MACs ratio, and the search's time.
Random weights with random BN γ (seeded): the structure comes from random |γ|; this measures reaching a speed,
not accuracy.

    python -m benchmarks.latency_target [--models resnet18,...] [--targets 1.5,2,3] [--seconds 3]

Writes benchmarks/results/<machine>/latency_target.json; finished rows are kept in --work so an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine_tag
from benchmarks.graph_coverage import randomize
from slimexport import export_onnx, prune_model
from slimexport.config import BenchConfig
from slimexport.fileio import write_json
from slimexport.models import create_model
from slimexport.prune import resolve_round_to
from slimexport.report import machine, versions
from slimexport.runtime import latency
from slimexport.stats import count_macs_on

ROOT = Path(__file__).resolve().parent
MODELS = "resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,regnet_x_400mf,vgg11_w25"


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("vgg"):
        return randomize(create_model(name, 10, 3)), torch.randn(1, 3, 32, 32)
    import torchvision

    return randomize(torchvision.models.get_model(name, weights=None, num_classes=10)), torch.randn(1, 3, 224, 224)


def one(name: str, target: float, seconds: float, allocate: str = "gamma") -> dict:
    model, x = build(name)
    round_to, _ = resolve_round_to("auto")
    t0 = time.perf_counter()
    pruned, rec = prune_model(model, None, example_input=x, target_speedup=target, round_to=round_to,
                              allocate=allocate)  # fmt: skip
    search = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"baseline": Path(tmp) / "b.onnx", "pruned": Path(tmp) / "p.onnx"}
        for key, m in (("baseline", model), ("pruned", pruned)):
            export_onnx(m, x, paths[key], atol=1e-2)
        rows = latency(paths, tuple(x.shape[1:]), BenchConfig(batches=[1], threads=[1], seconds=seconds))
    ms = {r["model"]: r["median_ms"] for r in rows}
    t = rec["latency_target"]
    return {
        "model": name, "image_size": int(x.shape[-1]), "target": target, "round_to": round_to, "allocate": allocate,
        "independent_speedup": ms["baseline"] / ms["pruned"], "median_ms": ms,
        "error_pct": 100 * (ms["baseline"] / ms["pruned"] / target - 1),
        "search_retimed_speedup": t["retimed"]["speedup"], "unreachable": t.get("unreachable"),
        "macs_ratio": count_macs_on(model, x) / count_macs_on(pruned, x), "pruned_fraction": rec["pruned_fraction"],
        "candidates": len(t["probes"]), "search_seconds": search,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--allocate", default="gamma", help="gamma, latency, or both: gamma,latency")
    ap.add_argument("--latency-targets", default="2", help="the targets --allocate latency is run at")
    ap.add_argument("--latency-models", default=None, help="the models --allocate latency is run on (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "latency_target")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "latency_target.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    models = a.models.split(",")
    jobs = [(n, float(t), "gamma") for n in models for t in a.targets.split(",")] if "gamma" in a.allocate else []
    if "latency" in a.allocate:
        lat_models = a.latency_models.split(",") if a.latency_models else models
        jobs += [(n, float(t), "latency") for n in lat_models for t in a.latency_targets.split(",")]
    for name, target, allocate in jobs:
        done = a.work / f"{name}-{target:g}-{allocate}.json"
        if done.is_file():
            row = json.loads(done.read_text())
        else:
            row = one(name, target, a.seconds, allocate)
            done.write_text(json.dumps(row))
        rows.append(row)
        print(json.dumps(row), flush=True)
    reached = [r for r in rows if not r["unreachable"] and r["allocate"] == "gamma"]
    errors = [abs(r["error_pct"]) for r in reached]
    write_json(a.out, {
        "kind": "latency_target", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
        "command": "python -m benchmarks.latency_target " + shlex.join(sys.argv[1:]), "rows": rows,
        "summary": {"rows": len(rows), "reached": len(reached),
                    "within_7pct": sum(e <= 7 for e in errors),
                    "median_abs_error_pct": statistics.median(errors) if errors else None,
                    "median_search_seconds": statistics.median(r["search_seconds"] for r in rows)}})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

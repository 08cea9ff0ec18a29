"""Issue 36's second figure: at one measured speed-up, latency-aware allocation (--allocate latency) against the
global |γ| threshold (--allocate gamma), after the same refine, over seeds, on a CPU-trainable set-up: the default
run (vgg11_w25 on the embedded Fashion-MNIST subset, `slimexport pipeline`) with --target-speedup X.

    python -m benchmarks.allocate [--target 2] [--seeds 0,1,2]

Per run: onnxruntime accuracy of baseline and pruned, the speed-up the pipeline's bench measured on the exported
models (batch 1, one thread; independent of the search), MACs and parameter ratios.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from slimexport.fileio import write_json
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent


def _torch_pruning(run: Path, target: float, seed: int) -> dict:
    """Torch-Pruning's BN-scale pruner on the same sparse checkpoint, its global ratio bisected until the exported
    model measures ``target`` times faster than the unpruned one (the same probe slimexport's search uses), then
    refined with the pipeline's refine schedule and measured in onnxruntime."""
    import dataclasses

    from benchmarks.peers import torch_pruning_model
    from slimexport.bench import ort_accuracy
    from slimexport.checkpoint import load_checkpoint
    from slimexport.config import ExportConfig, PipelineConfig, PruneConfig
    from slimexport.data import load_dataset
    from slimexport.export import export_model
    from slimexport.latency import LatencyProbe
    from slimexport.loop import fit

    ds = load_dataset("embedded")
    sparse, _ = load_checkpoint(run / "sparse.pt")
    probe = LatencyProbe(sparse, ds.normalize(ds.x_test[:1]), PruneConfig(percent=None, target_speedup=target))
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):  # the smallest ratio that is fast enough
        mid = (lo + hi) / 2
        model = torch_pruning_model(run / "sparse.pt", ds, mid)
        fast = probe(model)[1] >= target
        best = (mid, model) if fast else best
        lo, hi = (lo, mid) if fast else (mid, hi)
    ratio, model = best if best is not None else (hi, torch_pruning_model(run / "sparse.pt", ds, hi))
    retimed = probe.retime(model)
    cfg = dataclasses.replace(PipelineConfig(seed=seed).train_config("refine"))
    fit(model, ds, cfg, description="torch-pruning refine")
    onnx = run.parent / f"tp-{seed}.onnx"
    export_model(model, onnx, ds, ExportConfig())
    return {"seed": seed, "ratio": ratio, "retimed_speedup": retimed["speedup"], "accuracy": ort_accuracy(onnx, ds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimexport-allocate"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "allocate.json")
    a = ap.parse_args()
    rows, peers = [], []
    for seed in a.seeds.split(","):
        for allocate in ("gamma", "latency"):
            out = a.work / f"{allocate}-{seed}"
            cmd = [sys.executable, "-m", "slimexport", "pipeline", "--out", str(out), "--force", "--seed", seed,
                   "--target-speedup", a.target, "--allocate", allocate, "--batch", "1", "--threads", "1",
                   "--seconds", "2"]  # fmt: skip
            if not (out / "report.json").is_file():  # a finished run is kept: an interrupted benchmark resumes
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"{shlex.join(cmd)} failed:\n{res.stderr[-3000:]}")
            rep = json.loads((out / "report.json").read_text())
            sp = next(s for s in rep["ratios"]["speedup"] if s["batch"] == 1 and s["threads"] == 1)
            row = {"seed": int(seed), "allocate": allocate, "baseline_accuracy": rep["baseline"]["accuracy"],
                   "accuracy": rep["pruned"]["accuracy"], "speedup": sp["speedup"], "macs_ratio": rep["ratios"]["macs"],
                   "params_ratio": rep["ratios"]["params"], "pruned_fraction": rep["prune"]["pruned_fraction"],
                   "search_retimed": rep["prune"]["latency_target"]["retimed"]["speedup"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        peers.append(_torch_pruning(a.work / f"gamma-{seed}", float(a.target), int(seed)))
        print(json.dumps(peers[-1]), flush=True)

    def stat(allocate: str, key: str) -> dict:
        xs = [r[key] for r in rows if r["allocate"] == allocate]
        return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    summary = {al: {k: stat(al, k) for k in ("accuracy", "speedup", "macs_ratio", "params_ratio")}
               for al in ("gamma", "latency")}  # fmt: skip
    diffs = [100 * (b["accuracy"] - g["accuracy"]) for g, b in zip(rows[0::2], rows[1::2])]
    tp = [100 * (g["accuracy"] - p["accuracy"]) for g, p in zip(rows[0::2], peers)]
    summary["gamma_minus_torch_pruning_pt"] = {"mean": statistics.mean(tp), "sd": statistics.stdev(tp) if len(tp) > 1
                                               else 0.0}  # fmt: skip
    summary["latency_minus_gamma_pt"] = {"mean": statistics.mean(diffs),
                                         "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}  # fmt: skip
    write_json(a.out, {"kind": "allocate", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
                       "command": "python -m benchmarks.allocate " + shlex.join(sys.argv[1:]), "target": a.target,
                       "rows": rows, "torch_pruning": peers, "summary": summary})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

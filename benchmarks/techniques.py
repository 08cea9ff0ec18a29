#!/usr/bin/env python3
"""What each accuracy technique buys, and what it costs in training time: one pipeline per technique and seed,
side by side on the same baseline (and, where the technique leaves sparse training alone, the same sparse model).

Rows: none (the paper's one-shot prune and refine), distill (--distill, the baseline teaches refine), steps
(--prune-steps 3, the refine epochs split among the steps), polar (--regularizer polar: its own sparse training),
auto (--sparsity auto: its own sparse training at the probe's s), all (polar + distill + steps). Every row prunes
to the same compute budget (--max-macs: the lowest global threshold that fits it), so the rows compare at equal
MACs.

Usage (from the repository root): python -m benchmarks.techniques [--arch vgg11_w25] [--dataset embedded]
    [--epochs 10] [--refine-epochs 10] [--max-macs 0.12] [--seeds 0 1 2] [--only none distill ...]
Writes benchmarks/results/<machine-tag>/techniques-<arch>-<dataset>-m<max-macs>-....json; finished runs are kept in
benchmarks/work/techniques/ and reused by a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from slimexport.config import BenchConfig, PipelineConfig, PruneConfig
from slimexport.fileio import write_json
from slimexport.pipeline import run_pipeline
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent
TECHNIQUES = ("none", "distill", "steps", "polar", "auto", "all")


def _config(args, seed: int, name: str, work: Path) -> PipelineConfig:
    base = work / "none"
    cfg = PipelineConfig(
        out=str(work / name), arch=args.arch, dataset=args.dataset, epochs=args.epochs,
        refine_epochs=args.refine_epochs, seed=seed, device="cpu", precision="fp32",
        prune=PruneConfig(percent=None, max_macs=args.max_macs, round_to=1),
        bench=BenchConfig(batches=[1], threads=[1], seconds=0.2, accuracy=True, profile=False), force=True,
    )  # fmt: skip
    if name == "none":
        return cfg
    cfg = dataclasses.replace(cfg, baseline=str(base / "baseline.pt"))
    if name in ("distill", "steps"):
        cfg = dataclasses.replace(cfg, sparse=str(base / "sparse.pt"))
    if name in ("distill", "all"):
        cfg = dataclasses.replace(cfg, distill=True)
    if name in ("steps", "all"):
        cfg = dataclasses.replace(cfg, prune_steps=3)
    if name == "polar":
        cfg = dataclasses.replace(cfg, regularizer="polar")
    if name == "auto":
        cfg = dataclasses.replace(cfg, sparsity="auto")
    if name == "all":
        cfg = dataclasses.replace(cfg, regularizer="polar", sparse=str(work / "polar" / "sparse.pt"))
    return cfg


def _row(report: dict, name: str, seed: int, seconds: float) -> dict:
    st = report["stages"]
    return {
        "technique": name,
        "seed": seed,
        "baseline_accuracy": report["baseline"]["accuracy"],
        "sparse_accuracy": report["pruned"]["sparse_accuracy"],
        "pruned_accuracy_before_refine": report["pruned"]["accuracy_before_refine"],
        "accuracy": report["pruned"]["accuracy"],
        "macs_ratio": report["ratios"]["macs"],
        "params_ratio": report["ratios"]["params"],
        "sparsity": st["sparse"].get("sparsity"),
        "sparse_seconds": st["sparse"]["seconds"],
        "refine_seconds": st["refine"]["seconds"] + (st["prune"]["seconds"] if "steps" in report["prune"] else 0.0),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg11_w25")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--refine-epochs", type=int, default=10)
    ap.add_argument("--max-macs", type=float, default=0.12, help="the compute budget, a fraction of the MACs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=TECHNIQUES, default=list(TECHNIQUES))
    args = ap.parse_args()
    tag = f"{args.arch}-{Path(args.dataset).stem}-m{round(100 * args.max_macs)}-e{args.epochs}-r{args.refine_epochs}"
    rows = []
    for seed in args.seeds:
        work = ROOT / "work" / "techniques" / tag / f"seed{seed}"
        for name in TECHNIQUES:  # in order: later ones reuse "none"'s baseline and sparse model, "polar"'s sparse
            if name not in args.only and name not in ("none", "polar"):
                continue
            out = work / name
            if not (out / "report.json").is_file():
                t0 = time.perf_counter()
                report = run_pipeline(_config(args, seed, name, work), command=f"benchmarks.techniques {name}")
                (out / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            report = json.loads((out / "report.json").read_text())
            row = _row(report, name, seed, float((out / "seconds.txt").read_text()))
            rows.append(row)
            print(f"seed {seed} {name:8s} acc {row['accuracy']:.4f} (before refine "
                  f"{row['pruned_accuracy_before_refine']:.4f}) MACs x{row['macs_ratio']:.2f} refine "
                  f"{row['refine_seconds']:.0f} s", flush=True)  # fmt: skip
    summary = {}
    for name in TECHNIQUES:
        rs = [r for r in rows if r["technique"] == name]
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        drop = [r["accuracy"] - r["baseline_accuracy"] for r in rs]
        summary[name] = {
            "seeds": len(rs),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "drop_mean": statistics.mean(drop),
            "drop_sd": statistics.stdev(drop) if len(drop) > 1 else 0.0,
            "macs_ratio_mean": statistics.mean(r["macs_ratio"] for r in rs),
            "params_ratio_mean": statistics.mean(r["params_ratio"] for r in rs),
            "refine_seconds_median": statistics.median(r["refine_seconds"] for r in rs),
            "sparse_seconds_median": statistics.median(r["sparse_seconds"] for r in rs),
        }
    out = ROOT / "results" / machine_tag() / f"techniques-{tag}.json"
    write_json(out, {
        "kind": "techniques", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.techniques " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
        "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs, "refine_epochs": args.refine_epochs,
        "max_macs": args.max_macs, "seeds": args.seeds, "rows": rows, "summary": summary,
    })  # fmt: skip
    for name, s in summary.items():
        print(f"{name:8s} {100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_sd']:.2f} "
              f"(Δ {100 * s['drop_mean']:+.2f}) MACs x{s['macs_ratio_mean']:.2f} "
              f"refine {s['refine_seconds_median']:.0f} s")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Issue 26's converged runs: how much accuracy the accuracy options keep at a fixed compute budget, on all of
CIFAR-10, against Torch-Pruning at equal MACs with the same refine recipe.

The trained models come from `slimexport train` (benchmarks/keep_accuracy.sh has the commands and runs them in
two one-thread streams); this script runs everything after them, one job per call, and each job's row is kept in
benchmarks/work/keep/rows/ so that an interrupted suite resumes where it stopped:

    vgg:RECIPE:SEED     vgg11_w25's polar sparse model pruned to --percent (one global threshold, exact channel
                        counts) through `run_pipeline` (--baseline/--sparse reuse the trained models), refined with
                        RECIPE: plain, distill (--distill, the baseline teaches), steps (--prune-steps 3) or all
                        (distill + steps); the same pipeline a user runs.
    vgg+VARIANT:RECIPE:SEED  the same with other prune options (VARIANTS: --normalize mean, --min-keep 0.25),
                        at the plain seed-0 run's MACs (--max-macs), the compute Torch-Pruning is given.
    vgg-l1:RECIPE:SEED  the same on the L1 sparse model (the paper's regularizer), where it was trained.
    tp:RECIPE:SEED      Torch-Pruning's BN-scale pruner (global) on the same polar sparse model, at the pruning ratio
                        whose MACs come closest to ours from below (bisection), refined with the same recipe
                        (plain or distill; the same refine schedule, seed and teacher).
    mobilenet           torchvision's mobilenet_v2 trained on all of CIFAR-10: its polar sparse model pruned to
                        --max-macs 0.5 with --round-to auto, refined; Torch-Pruning at equal MACs (same round-to)
                        refined with the same schedule; the three ONNX models timed side by side in onnxruntime.
    render              every row so far → benchmarks/results/<machine-tag>/keep-accuracy.json (RESULTS.md's
                        section `python -m benchmarks.run --render-only`).

Usage: python -m benchmarks.keep_accuracy --data-dir DIR vgg:plain:0 tp:plain:0 ... | render
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine_tag
from benchmarks.torchvision_speed import tp_at_macs
from slimexport.bench import bench
from slimexport.checkpoint import load_checkpoint
from slimexport.config import BenchConfig, ExportConfig, PipelineConfig, PruneConfig
from slimexport.data import load_dataset
from slimexport.export import export_model
from slimexport.fileio import write_json
from slimexport.loop import fit
from slimexport.pipeline import run_pipeline
from slimexport.prune import resolve_round_to
from slimexport.report import machine, versions
from slimexport.stats import count_macs, count_params

ROOT = Path(__file__).resolve().parent
RECIPES = {
    "plain": {},
    "distill": {"distill": True},
    "steps": {"prune_steps": 3},
    "all": {"distill": True, "prune_steps": 3},
}
# the trained models' recipes (benchmarks/keep_accuracy.sh trains them with exactly these)
VGG = dict(arch="vgg11_w25", dataset="cifar10", epochs=30, refine_epochs=20, sparsity=8e-4, eval_every=None)
MOBILENET = dict(arch="torchvision:mobilenet_v2", dataset="cifar10", epochs=5, refine_epochs=3, sparsity=1e-3, lr=0.05)
# vgg+VARIANT:RECIPE:SEED jobs: other prune options at the plain run's MACs (the compute Torch-Pruning is given)
VARIANTS = {
    "mean": {"normalize": "mean"},
    "keep25": {"normalize": "max", "min_keep": 0.25},
    "mean-keep25": {"normalize": "mean", "min_keep": 0.25},
}
QUIET_BENCH = BenchConfig(batches=[1], threads=[1], seconds=0.2, accuracy=True, profile=False)


def _vgg_config(args, regularizer: str, recipe: str, seed: int, variant: str = "") -> PipelineConfig:
    prune = {"percent": args.percent, "normalize": args.normalize}
    if variant:  # the variant's options, at (at most) the MACs of the plain seed-0 run, as Torch-Pruning is
        prune = {"percent": None, "max_macs": _plain_macs_fraction(args)} | VARIANTS[variant]
    src = args.work / "vgg"
    return PipelineConfig(
        out=str(args.work / "runs" / f"vgg-{regularizer}-{recipe}{'+' + variant if variant else ''}-s{seed}"),
        data_dir=args.data_dir,
        **(VGG | {"dataset": args.dataset}),
        regularizer=regularizer, seed=seed, device="cpu", precision="fp32", force=True,
        baseline=str(src / "baseline.pt"), sparse=str(src / f"sparse-{regularizer}.pt"),
        prune=PruneConfig(**prune, round_to=1), bench=QUIET_BENCH,
        **RECIPES[recipe],
    )  # fmt: skip


def _plain_macs_fraction(args) -> float:
    """The MACs of the plain seed-0 run's pruned model, as a fraction of its baseline's."""
    run = args.work / "runs" / "vgg-polar-plain-s0"
    if not (run / "pruned.pt").is_file():
        raise SystemExit("needs vgg:plain:0 first (its pruned model sets the MACs of the comparison)")
    macs = []
    for name in ("pruned.pt", "baseline.pt"):
        model, ck = load_checkpoint(run / name)
        macs.append(count_macs(model, model.in_channels, tuple(ck["data"]["image_size"])))
    return macs[0] / macs[1]


def _pipeline_row(cfg: PipelineConfig, job: str) -> dict:
    t0 = time.perf_counter()
    rep = run_pipeline(cfg, command=f"benchmarks.keep_accuracy {job}")
    st = rep["stages"]
    return {
        "job": job,
        "accuracy": rep["pruned"]["accuracy"],
        "accuracy_before_refine": rep["pruned"]["accuracy_before_refine"],
        "baseline_accuracy": rep["baseline"]["accuracy"],
        "sparse_accuracy": rep["pruned"]["sparse_accuracy"],
        "macs": rep["pruned"]["macs"],
        "params": rep["pruned"]["params"],
        "macs_ratio": rep["ratios"]["macs"],
        "params_ratio": rep["ratios"]["params"],
        "refine_seconds": st["refine"]["seconds"] + (st["prune"]["seconds"] if cfg.prune_steps > 1 else 0.0),
        "seconds": time.perf_counter() - t0,
        "run_dir": cfg.out,
        "normalize": cfg.prune.normalize,
        "min_keep": cfg.prune.min_keep,
        "max_macs": cfg.prune.max_macs,
    }


def _tp_row(args, recipe: str, seed: int, job: str) -> dict:
    """Torch-Pruning on the polar sparse model at our plain seed-0 run's MACs, refined with the same recipe."""
    ours = args.work / "runs" / "vgg-polar-plain-s0" / "pruned.pt"
    if not ours.is_file():
        raise SystemExit(f"{job}: needs vgg:plain:0 first (its pruned model sets the MACs)")
    cfg = dataclasses.replace(_vgg_config(args, "polar", recipe, seed), prune_steps=1)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    x = ds.normalize(ds.x_test[:1])
    target = count_macs(load_checkpoint(ours)[0], ds.in_channels, ds.image_size)
    sparse, _ = load_checkpoint(cfg.sparse)
    peer, ratio = tp_at_macs(sparse.eval(), x, target)
    teacher = load_checkpoint(cfg.baseline)[0] if cfg.distill else None
    t0 = time.perf_counter()
    res = fit(peer, ds, cfg.train_config("refine"), description=f"torch-pruning {recipe} {seed}", teacher=teacher)
    base = load_checkpoint(cfg.baseline)[0]
    base_macs = count_macs(base, ds.in_channels, ds.image_size)
    return {
        "job": job,
        "library": f"torch-pruning {importlib.metadata.version('torch-pruning')}",
        "pruning_ratio": ratio,
        "accuracy": res["final_accuracy"],
        "macs": count_macs(peer, ds.in_channels, ds.image_size),
        "params": count_params(peer),
        "target_macs": target,
        "macs_ratio": base_macs / count_macs(peer, ds.in_channels, ds.image_size),
        "params_ratio": count_params(base) / count_params(peer),
        "refine_seconds": time.perf_counter() - t0,
    }


def _mobilenet_row(args) -> dict:
    src = args.work / "mnv2"
    cfg = PipelineConfig(
        out=str(args.work / "runs" / "mobilenet_v2"), data_dir=args.data_dir,
        **(MOBILENET | {"dataset": args.dataset}), regularizer="polar",
        device="cpu", precision="fp32", force=True, baseline=str(src / "baseline.pt"),
        sparse=str(src / "sparse-polar.pt"), prune=PruneConfig(percent=None, max_macs=0.5, round_to="auto"),
        bench=BenchConfig(batches=[1, 32], threads=[1], accuracy=True, profile=False),
    )  # fmt: skip
    row = _pipeline_row(cfg, "mobilenet")
    run = Path(cfg.out)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    round_to, _ = resolve_round_to("auto")
    sparse, _ = load_checkpoint(cfg.sparse)
    peer, ratio = tp_at_macs(sparse.eval(), ds.normalize(ds.x_test[:1]), row["macs"], round_to)
    t0 = time.perf_counter()
    res = fit(peer, ds, cfg.train_config("refine"), description="torch-pruning refine")
    peer_onnx = run / "torch_pruning.onnx"
    export_model(peer.eval(), peer_onnx, ds, ExportConfig())
    timed = bench(
        {"baseline": run / "baseline.onnx", "slimexport": run / "pruned.onnx", "torch_pruning": peer_onnx},
        ds,
        BenchConfig(batches=[1, 32], threads=[1], seconds=3.0, accuracy=True, profile=False),
    )
    lat = {(r["model"], r["batch"]): r["median_ms"] for r in timed["latency"]}
    base_macs = row["macs"] * row["macs_ratio"]
    row["torch_pruning"] = {
        "library": f"torch-pruning {importlib.metadata.version('torch-pruning')}",
        "pruning_ratio": ratio, "round_to": round_to, "accuracy": res["final_accuracy"],
        "ort_accuracy": timed["models"]["torch_pruning"]["accuracy"],
        "macs": count_macs(peer, ds.in_channels, ds.image_size), "params": count_params(peer),
        "refine_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    row["torch_pruning"]["macs_ratio"] = base_macs / row["torch_pruning"]["macs"]
    row["round_to"] = round_to
    row["ort_accuracy"] = {n: m["accuracy"] for n, m in timed["models"].items()}
    row["latency"] = [
        {
            "batch": b,
            "baseline_ms": lat[("baseline", b)],
            "slimexport_ms": lat[("slimexport", b)],
            "torch_pruning_ms": lat[("torch_pruning", b)],
            "slimexport_speedup": lat[("baseline", b)] / lat[("slimexport", b)],
            "torch_pruning_speedup": lat[("baseline", b)] / lat[("torch_pruning", b)],
        }  # fmt: skip
        for b in (1, 32)
    ]
    return row


def run_job(args, job: str) -> dict:
    kind, *rest = job.split(":")
    if kind == "mobilenet":
        return _mobilenet_row(args)
    recipe, seed = rest[0], int(rest[1])
    if recipe not in RECIPES:
        raise SystemExit(f"{job}: recipe must be one of {', '.join(RECIPES)}")
    if kind == "vgg":
        return _pipeline_row(_vgg_config(args, "polar", recipe, seed), job)
    if kind.startswith("vgg+") and kind[4:] in VARIANTS:
        return _pipeline_row(_vgg_config(args, "polar", recipe, seed, kind[4:]), job)
    if kind == "vgg-l1":
        return _pipeline_row(_vgg_config(args, "l1", recipe, seed), job)
    if kind == "tp":
        if recipe not in ("plain", "distill"):
            raise SystemExit(f"{job}: Torch-Pruning is refined plain or with distill")
        return _tp_row(args, recipe, seed, job)
    raise SystemExit(f"unknown job {job!r}")


def _summary(rows: list[dict]) -> dict:
    acc = [r["accuracy"] for r in rows]
    out = {
        "seeds": len(rows),
        "accuracy_mean": statistics.fmean(acc),
        "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else None,
        "macs_ratio": statistics.fmean(r["macs_ratio"] for r in rows),
        "params_ratio": statistics.fmean(r["params_ratio"] for r in rows),
        "refine_seconds_median": statistics.median(r["refine_seconds"] for r in rows),
    }
    if "baseline_accuracy" in rows[0]:
        drop = [r["accuracy"] - r["baseline_accuracy"] for r in rows]
        out |= {"drop_mean": statistics.fmean(drop), "drop_sd": statistics.stdev(drop) if len(drop) > 1 else None}
    return out


def render(args) -> Path:
    rows = [json.loads(p.read_text()) for p in sorted((args.work / "rows").glob("*.json"))]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["job"] != "mobilenet":
            groups.setdefault(r["job"].rsplit(":", 1)[0], []).append(r)
    summary = {k: _summary(v) for k, v in groups.items()}
    paired = {}
    for key in groups:  # every vgg variant against Torch-Pruning refined with the same recipe, seed by seed
        kind, recipe = key.split(":")
        if not kind.startswith("vgg") or kind == "vgg-l1" or recipe not in ("plain", "distill"):
            continue
        ours = {int(r["job"].rsplit(":", 1)[1]): r["accuracy"] for r in groups[key]}
        peer = {int(r["job"].rsplit(":", 1)[1]): r["accuracy"] for r in groups.get(f"tp:{recipe}", [])}
        diffs = [ours[s] - peer[s] for s in sorted(ours.keys() & peer.keys())]
        if diffs:
            name = recipe if kind == "vgg" else f"{kind[4:]}:{recipe}"
            paired[name] = {"seeds": len(diffs), "difference_mean": statistics.fmean(diffs),
                            "difference_sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                            "wins": sum(d > 0 for d in diffs)}  # fmt: skip
    times = {}
    for p in sorted(args.work.glob("*/*.pt")):  # the trained models' own wall time
        meta = torch.load(p, map_location="cpu", weights_only=True).get("meta", {})
        if "train_seconds" in meta:
            times[f"{p.parent.name}/{p.stem}"] = meta["train_seconds"]
    out = ROOT / "results" / machine_tag() / f"keep-accuracy{args.suffix}.json"
    write_json(out, {
        "kind": "keep_accuracy", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.keep_accuracy " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
        "vgg": VGG | {"percent": args.percent, "normalize": args.normalize}, "mobilenet_v2": MOBILENET,
        "rows": rows, "summary": summary, "paired": paired, "train_seconds": times,
        "suite_seconds": sum(times.values()) + sum(r.get("seconds", r.get("refine_seconds", 0)) for r in rows),
    })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", nargs="+", help="vgg:RECIPE:SEED, vgg-l1:RECIPE:SEED, tp:RECIPE:SEED, mobilenet, render")
    ap.add_argument("--data-dir", help="the folder holding cifar10.npz")
    ap.add_argument("--percent", type=float, default=0.7, help="VGG's prune (and so Torch-Pruning's MACs)")
    ap.add_argument("--normalize", default="max", help="VGG's prune --normalize (none empties two layers at 70%%)")
    ap.add_argument("--dataset", default="cifar10", help="the models' data (a smoke check: embedded)")
    ap.add_argument("--suffix", default="", help="render: appended to the result's file name")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "keep", help="the trained models, runs and rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    (args.work / "rows").mkdir(parents=True, exist_ok=True)
    for job in args.jobs:
        if job == "render":
            print(f"wrote {render(args)}")
            continue
        path = args.work / "rows" / f"{job.replace(':', '-')}.json"
        if path.is_file():
            print(f"{job}: done earlier ({path.name})")
            continue
        row = run_job(args, job)
        write_json(path, row)
        print(f"{job}: accuracy {100 * row['accuracy']:.2f}%, MACs ×{row['macs_ratio']:.2f}, "
              f"params ×{row['params_ratio']:.2f}, refine {row['refine_seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

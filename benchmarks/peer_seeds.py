#!/usr/bin/env python3
"""How much of the accuracy gap between slimexport and Torch-Pruning at equal MACs is refine noise.

Takes a run directory of `benchmarks/run.py` (its `sparse.pt`, `baseline.pt` and `report.json`), prunes the
sparse model with Torch-Pruning (as run.py does; deterministic) and with slimexport at Torch-Pruning's MACs
(`prune --max-macs`; deterministic), then refines each with the run's schedule once per seed. Seed 0 is the
seed run.py uses, so it repeats that run's figures. Reports per-seed test accuracies, their mean and standard
deviation, and the per-seed difference (paired: both sides see the same seed's data order and augmentation).

With --prune-stream, slimexport's side also prunes the residual stream (`prune --prune-stream`, beyond the paper's
rules), as Torch-Pruning does. With --peer-from an earlier seeds file of the same sparse model, Torch-Pruning's
side is taken from it instead of refined again (it does not depend on slimexport's options, such as --normalize);
the file must name the same model, data, percent, refine schedule and Torch-Pruning MACs.

Writes benchmarks/results/<machine-tag>/seeds-<run-dir-name>[-stream].json.
Usage: python -m benchmarks.peer_seeds benchmarks/work/cpu-preresnet20-cifar10-p40 [--seeds 0 1 2] [--prune-stream]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import shlex
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from benchmarks.peers import torch_pruning_model
from slimexport.checkpoint import load_checkpoint
from slimexport.config import PipelineConfig, PruneConfig
from slimexport.data import load_dataset
from slimexport.fileio import write_json
from slimexport.loop import fit
from slimexport.prune import prune
from slimexport.report import machine, versions
from slimexport.stats import count_macs
from slimexport.train import train

ROOT = Path(__file__).resolve().parent


def _earlier_peer(path: Path, cfg: PipelineConfig, peer_macs: int) -> dict[int, float]:
    """Torch-Pruning's accuracy per seed from an earlier seeds file, when it was measured on the same footing."""
    e = json.loads(path.read_text())
    want = (cfg.arch, cfg.dataset, cfg.prune.percent, cfg.refine_epochs, cfg.preset, peer_macs)
    got = (e["arch"], e["dataset"], e["percent"], e["refine_epochs"], e["preset"], e["macs"]["torch_pruning"])
    if got != want:
        raise SystemExit(f"--peer-from {path}: measured for {got}, not {want}")
    return {r["seed"]: r["torch_pruning"] for r in e["runs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prune-stream", action="store_true", help="slimexport also prunes the residual stream")
    ap.add_argument(
        "--seed0-from-run",
        action="store_true",
        help="take seed 0 from the run's own result (run.py refined both sides with seed 0 and recorded their "
        "PyTorch accuracies) instead of refining it again",
    )
    ap.add_argument(
        "--peer-from",
        type=Path,
        help="an earlier seeds-*.json of the same sparse model: reuse its Torch-Pruning accuracies per seed",
    )
    args = ap.parse_args()
    earlier = ROOT / "results" / machine_tag() / f"{args.run_dir.name}.json"
    seed0 = None
    if args.seed0_from_run and 0 in args.seeds and not args.prune_stream and earlier.is_file():
        r0 = json.loads(earlier.read_text())
        if "slimexport_matched" in r0 and "torch_pruning" in r0:
            seed0 = {
                "seed": 0,
                "slimexport": r0["slimexport_matched"]["torch_accuracy"],
                "torch_pruning": r0["torch_pruning"]["torch_accuracy"],
                "from": earlier.name,
            }
    rep = json.loads((args.run_dir / "report.json").read_text())
    c = rep["config"]
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    flat = ("percent", "min_channels", "normalize", "round_to")  # a report written before PruneConfig was nested
    pcfg = PruneConfig(**(c.get("prune") or {k: c[k] for k in flat if k in c}))
    cfg = PipelineConfig(
        **{k: v for k, v in c.items() if k in fields and k not in ("bench", "export", "quantize", "prune")},
        prune=pcfg,
    )
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    size = ds.image_size
    base_macs = count_macs(load_checkpoint(args.run_dir / "baseline.pt")[0], ds.in_channels, size)
    sparse = args.run_dir / "sparse.pt"
    peer_macs = count_macs(torch_pruning_model(sparse, ds, cfg.prune.percent), ds.in_channels, size)
    reused = _earlier_peer(args.peer_from, cfg, peer_macs) if args.peer_from else {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "matched_pruned.pt"
        budget = dataclasses.replace(pcfg, percent=None, max_macs=peer_macs / base_macs, prune_stream=args.prune_stream)
        meta = prune(sparse, pruned, budget, ds=ds)
        for seed in args.seeds:
            if seed == 0 and seed0 is not None:
                runs.append(seed0)
                print(f"seed 0: from {earlier.name}")
                continue
            refine_cfg = dataclasses.replace(cfg.train_config("refine"), seed=seed)
            ours = train(Path(tmp) / f"refined-{seed}.pt", ds, refine_cfg, init=pruned, stage="refined")
            if seed in reused:
                runs.append({"seed": seed, "slimexport": ours["accuracy"], "torch_pruning": reused[seed]})
                runs[-1]["torch_pruning_from"] = args.peer_from.name
            else:
                peer_model = torch_pruning_model(sparse, ds, cfg.prune.percent)
                peer = fit(peer_model, ds, refine_cfg, description=f"torch-pruning {seed}")
                runs.append({"seed": seed, "slimexport": ours["accuracy"], "torch_pruning": peer["final_accuracy"]})
            r = runs[-1]
            print(
                f"seed {seed}: slimexport {100 * r['slimexport']:.2f}%, Torch-Pruning {100 * r['torch_pruning']:.2f}%"
            )

    def summary(key: str) -> dict:
        xs = [r[key] for r in runs]
        return {"mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    diffs = [r["slimexport"] - r["torch_pruning"] for r in runs]
    out = ROOT / "results" / machine_tag() / f"seeds-{args.run_dir.name}{'-stream' if args.prune_stream else ''}.json"
    result = {
        "kind": "peer_seeds",
        "run": args.run_dir.name,
        "arch": cfg.arch,
        "dataset": cfg.dataset,
        "percent": cfg.prune.percent,
        "prune_stream": args.prune_stream,
        "normalize": cfg.prune.normalize,
        "slimexport_percent": meta["prune"]["percent"],
        "refine_epochs": cfg.refine_epochs,
        "preset": cfg.preset,
        "macs": {"baseline": base_macs, "slimexport": meta["prune"]["macs_after"], "torch_pruning": peer_macs},
        "library": f"torch-pruning {importlib.metadata.version('torch-pruning')}",
        "runs": runs,
        "slimexport": summary("slimexport"),
        "torch_pruning": summary("torch_pruning"),
        "difference": {
            "mean": statistics.fmean(diffs),
            "stdev": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "wins": sum(d >= 0 for d in diffs),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(),
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.peer_seeds " + shlex.join(sys.argv[1:]),
    }
    write_json(out, result)
    d = result["difference"]
    print(
        f"{cfg.arch} {cfg.dataset} at {peer_macs:,} MACs, {len(runs)} seeds: slimexport "
        f"{100 * result['slimexport']['mean']:.2f} ± {100 * result['slimexport']['stdev']:.2f}%, Torch-Pruning "
        f"{100 * result['torch_pruning']['mean']:.2f} ± {100 * result['torch_pruning']['stdev']:.2f}%; "
        f"difference {100 * d['mean']:+.2f} ± {100 * d['stdev']:.2f} pt, slimexport ahead or equal in "
        f"{d['wins']}/{len(runs)}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

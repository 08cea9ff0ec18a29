"""β folding: accuracy right after pruning (before any refine), with and without folding, over seeds.

A torchvision model is sparse-trained briefly on a CIFAR-10 training subset (the pipeline's sparse stage: L1 on
every BN γ), then pruned at a few percents twice from the same sparse checkpoint, ``--fold`` and ``--no-fold``,
and each pruned model's test accuracy is measured on the whole test split. Also records, per model, the
exactness check's relative output error against the γ-zeroed original with and without folding.

    python -m benchmarks.fold_accuracy --data-dir ~/data [--arch torchvision:resnet18] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_tag
from benchmarks.run import ROOT, dataset_source
from slimexport.checkpoint import load_checkpoint
from slimexport.config import PruneConfig, TrainConfig
from slimexport.data import load_dataset
from slimexport.fileio import write_json
from slimexport.graph_prune import exactness
from slimexport.prune import prune
from slimexport.report import machine, versions
from slimexport.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=1e-3)
    ap.add_argument("--percents", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    work = ROOT / "work" / "fold_accuracy"
    work.mkdir(parents=True, exist_ok=True)
    dataset, data_dir = dataset_source(
        {"dataset": args.dataset, "train_subset": args.train_subset}, args.data_dir, work
    )
    ds = load_dataset(dataset, data_dir)
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            sparse = Path(tmp) / "sparse.pt"
            cfg = TrainConfig(epochs=args.epochs, sparsity=args.sparsity, seed=seed, device="cpu")
            t0 = time.perf_counter()
            meta = train(sparse, ds, cfg, arch=args.arch)
            row = {"seed": seed, "sparse_accuracy": meta["accuracy"], "train_seconds": time.perf_counter() - t0}
            model = load_checkpoint(sparse)[0]
            for pct in args.percents:
                for fold in (True, False):
                    out = Path(tmp) / f"p{pct}-{fold}.pt"
                    m = prune(sparse, out, PruneConfig(percent=pct, round_to=1, fold=fold), ds=ds)
                    row[f"p{int(pct * 100)}_{'fold' if fold else 'nofold'}"] = m["accuracy"]
                ex = exactness(model.net, model.example_input(), pct)
                row[f"p{int(pct * 100)}_error"] = {"folded": ex["folded_error"], "unfolded": ex["unfolded_error"]}
            print(row, flush=True)
            runs.append(row)
    summary = {}
    for pct in args.percents:
        k = f"p{int(pct * 100)}"
        diffs = [100 * (r[f"{k}_fold"] - r[f"{k}_nofold"]) for r in runs]
        summary[k] = {
            "fold": [r[f"{k}_fold"] for r in runs],
            "nofold": [r[f"{k}_nofold"] for r in runs],
            "gain_pt_mean": statistics.mean(diffs),
            "gain_pt_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        }
    result = {
        "arch": args.arch,
        "dataset": args.dataset,
        "train_subset": args.train_subset,
        "epochs": args.epochs,
        "sparsity": args.sparsity,
        "runs": runs,
        "summary": summary,
        "machine_tag": machine_tag(),
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.fold_accuracy " + " ".join(__import__("sys").argv[1:]),
    }
    path = ROOT / "results" / machine_tag() / f"fold-accuracy-{args.arch.replace(':', '-')}.json"
    write_json(path, result)
    for k, v in summary.items():
        print(f"{k}: fold {v['fold']} vs no fold {v['nofold']}: {v['gain_pt_mean']:+.2f} ± {v['gain_pt_sd']:.2f} pt")
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()

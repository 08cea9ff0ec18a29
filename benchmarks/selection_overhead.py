#!/usr/bin/env python3
"""Issue-3 figures: what channel selection costs, in training and in onnxruntime.

1. Training: retired with the hand-written architectures (0.2): an unpruned model has no selection at all now.
2. Inference: `preresnet164` and `densenet40` sparse-trained briefly, pruned at 40% and 60%, exported; the share
   of onnxruntime CPU node time spent in Gather/Slice at batch 1 (profiler, and without it: the latency added by
   doubling every index op, `slimexport.bench.index_op_cost`), the parameter and MACs cuts next
   to the reference's published counts, and onnxruntime CPU speed-ups at batch 1 and 32.
3. Export rewrites: densenet40 (unpruned and 60% gather) exported with and without its transition-pool fold,
   timed in the same run.

Writes benchmarks/results/<machine-tag>/selection.json; `python benchmarks/run.py --render-only` puts it into
RESULTS.md. Usage: python -m benchmarks.selection_overhead [--train-images 3000]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_tag
from slimexport.bench import bench, index_op_cost
from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import BenchConfig, ExportConfig, TrainConfig
from slimexport.data import from_arrays, load_dataset
from slimexport.errors import DataError
from slimexport.export import export
from slimexport.fileio import write_json
from slimexport.loop import fit
from slimexport.models import create_model
from slimexport.prune import prune_model
from slimexport.report import machine, versions
from slimexport.rewrite import absorb_selections, for_export
from slimexport.stats import count_macs, count_params
from slimexport.train import data_meta

ROOT = Path(__file__).resolve().parent

FORBIDDEN = ("NonZero", "GatherND", "Where", "ScatterND", "Transpose")
PUBLISHED = {  # CIFAR-10 parameters after pruning (Liu et al. 2017, Table 1)
    ("preresnet164", 0.4): 1.45e6,
    ("preresnet164", 0.6): 1.12e6,
    ("densenet40", 0.4): 0.69e6,
    ("densenet40", 0.6): 0.49e6,
}


def cifar_subset(n_train: int):
    try:
        ds = load_dataset("cifar10")
    except DataError as e:
        print(f"{e}; using random images of CIFAR's shape instead")
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n_train + 1000, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n_train + 1000)
        return from_arrays("random-cifar-shape", x[:n_train], y[:n_train], x[n_train:], y[n_train:]), False
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(ds.y_train), generator=g)[:n_train]
    te = torch.randperm(len(ds.y_test), generator=g)[:1000]
    sub = from_arrays(
        "cifar10-subset", ds.x_train[tr].numpy(), ds.y_train[tr].numpy(), ds.x_test[te].numpy(), ds.y_test[te].numpy()
    )
    return sub, True


# (round_to, --selection) variants exported from each pruned model: the published method with the default export,
# the same channels with the export chosen by timing, and channel counts rounded to onnxruntime's block of 16.
VARIANTS = ((1, "gather"), (1, "auto"), (16, "auto"))


def inference_figures(n_train: int, work: Path, seconds: float, reuse: bool) -> tuple[list[dict], list[dict]]:
    ds, real = cifar_subset(n_train)
    rows, rewrites = [], []
    for arch in ("preresnet164", "densenet40"):
        base_ck = work / f"{arch}-base.pt"
        if reuse and base_ck.exists():
            model, _ = load_checkpoint(base_ck)
            print(f"reusing {base_ck}")
        else:
            torch.manual_seed(0)
            model = create_model(arch, 10, 3)
            cfg = TrainConfig(epochs=1, batch_size=64, sparsity=1e-5, device="cpu")
            fit(model, ds, cfg, description=arch)
            save_checkpoint(make_checkpoint(model, data_meta(ds), {"stage": "sparse"}), base_ck)
        export(base_ck, work / f"{arch}-base.onnx", ds, ExportConfig(parity_images=64))
        models = {"baseline": work / f"{arch}-base.onnx"}
        pruned = {}
        for pct in (0.4, 0.6):
            for round_to, selection in VARIANTS:
                name = f"p{int(pct * 100)}-r{round_to}-{selection}"
                p, rec = prune_model(model, pct, round_to=round_to)
                ck = work / f"{arch}-{name}.pt"
                save_checkpoint(make_checkpoint(p, data_meta(ds), {"stage": "pruned"}), ck)
                ex = export(ck, work / f"{arch}-{name}.onnx", ds, ExportConfig(parity_images=64, selection=selection))
                print(f"{arch} {name}: {ex.get('selection', {}).get('chosen', selection)}", flush=True)
                models[name] = work / f"{arch}-{name}.onnx"
                pruned[name] = (pct, round_to, selection, p, ex)
        unrewritten = {}
        if for_export(model) is not model:  # what the export rewrites gain: the same models exported without them
            for name, ck in (("baseline", base_ck), ("p60-r1-gather", work / f"{arch}-p60-r1-gather.pt")):
                path = work / f"{arch}-{name}-no-rewrite.onnx"
                export(ck, path, ds, ExportConfig(parity_images=64, rewrite=False))
                models[unrewritten.setdefault(name, f"{name}, no rewrite")] = path
        b = bench(models, ds, BenchConfig(batches=[1, 32], threads=[1], seconds=seconds, accuracy=False))
        base_lat = {r["batch"]: r["median_ms"] for r in b["latency"] if r["model"] == "baseline"}
        for name, plain in unrewritten.items():
            ms = {m: {r["batch"]: r["median_ms"] for r in b["latency"] if r["model"] == m} for m in (name, plain)}
            rewrites.append(
                {
                    "arch": arch,
                    "model": name,
                    "latency_ms": ms[name],
                    "latency_ms_without_rewrite": ms[plain],
                    "speedup": {bb: ms[plain][bb] / ms[name][bb] for bb in ms[name]},
                    "op_time_shares": b["models"][name]["op_time"]["shares"],
                    "op_time_shares_without_rewrite": b["models"][plain]["op_time"]["shares"],
                }
            )
        for name, (pct, round_to, selection, p, ex) in pruned.items():
            lat = {r["batch"]: r["median_ms"] for r in b["latency"] if r["model"] == name}
            ops = ex["op_counts"]
            tuned = ex.get("selection", {})
            absorbed = tuned.get("absorbed")
            exported = absorb_selections(p, absorbed) if absorbed and any(absorbed) else p
            rows.append(
                {
                    "arch": arch,
                    "percent": pct,
                    "round_to": round_to,
                    "selection": selection,
                    "chosen": ex.get("selection", {}).get("chosen", selection),
                    "candidates_ms": {
                        n: c["median_ms"] for n, c in ex.get("selection", {}).get("candidates", {}).items()
                    },
                    "selections_absorbed": sum(absorbed or []),
                    "data": ds.name,
                    "real_data": real,
                    "params_before": count_params(model),
                    "params_after": count_params(p),
                    "params_published_after": PUBLISHED[(arch, pct)],
                    "macs_before": count_macs(model, 3, (32, 32)),
                    "macs_after": count_macs(p, 3, (32, 32)),
                    "macs_exported": count_macs(exported, 3, (32, 32)),  # with absorbed selections' zero weights
                    "gather_nodes": ops.get("Gather", 0),
                    "slice_nodes": ops.get("Slice", 0),
                    "forbidden_nodes": {k: ops[k] for k in FORBIDDEN if k in ops},
                    "gather_slice_share_b1": b["models"][name]["op_time"]["gather_slice_share"],
                    # the same without the profiler (whose fixed per-node cost inflates many small nodes)
                    "index_op_cost_b1": index_op_cost(models[name], (3, 32, 32), seconds=seconds),
                    "latency_ms": lat,
                    "baseline_latency_ms": base_lat,
                    "speedup": {bb: base_lat[bb] / lat[bb] for bb in lat},
                }
            )
    return rows, rewrites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reuse", action="store_true", help="reuse the sparse models of an earlier run when present")
    args = ap.parse_args()
    work = ROOT / "work" / "selection"
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "results" / machine_tag() / "selection.json"
    rows, rewrites = inference_figures(args.train_images, work, args.seconds, args.reuse)
    for r in rows:
        print(
            f"{r['arch']} {r['percent']:.0%} round-to {r['round_to']} --selection {r['selection']} "
            f"({r['chosen']}): params {r['params_after']:,} "
            f"(published {r['params_published_after']:,.0f}), "
            f"MACs ×{r['macs_before'] / r['macs_after']:.2f}, Gather {r['gather_nodes']} Slice {r['slice_nodes']}, "
            f"Gather/Slice share {100 * r['gather_slice_share_b1']:.2f}% "
            f"(without the profiler {100 * r['index_op_cost_b1']['share']:.2f}%), speed-up b1 ×{r['speedup'][1]:.2f} "
            f"b32 ×{r['speedup'][32]:.2f}"
        )
    for r in rewrites:
        print(
            f"{r['arch']} {r['model']}: export rewrites (pool folded) ×{r['speedup'][1]:.2f} at b1, "
            f"×{r['speedup'][32]:.2f} at b32 ({r['latency_ms_without_rewrite'][1]:.3f} → {r['latency_ms'][1]:.3f} ms)"
        )
    write_json(
        out,
        {
            "kind": "selection",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine_tag": machine_tag(),
            "machine": machine(),
            "versions": versions(),
            "command": "python -m benchmarks.selection_overhead " + shlex.join(sys.argv[1:]),
            "pruned": rows,
            "rewrites": rewrites,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`make benchmark`: slimexport's full pipeline and the Torch-Pruning peer, side by side, per model.

For each entry of a suite this runs `slimexport pipeline` (baseline → sparse → prune → refine → export → bench),
then prunes the *same* sparse checkpoint with Torch-Pruning's BN-scale pruner (global pruning, same percent),
refines it with the same schedule and seed, and exports it through the same exporter. Because the same percent
gives the two libraries different MACs, slimexport is also pruned to Torch-Pruning's MACs (`prune --max-macs`)
and refined the same way. Residual and dense networks are also exported with `--selection auto`. All ONNX models
(baseline, slimexport, its auto export, slimexport at the peer's MACs, Torch-Pruning) are timed in one
interleaved onnxruntime run. Sparse training is shared because Torch-Pruning's `regularize` adds the same
s·sign(γ) subgradient as slimexport's.

Writes benchmarks/results/<machine-tag>/<suite>-<arch>-<dataset>-p<percent>.json and regenerates
benchmarks/RESULTS.md from every result file.

Usage: python -m benchmarks.run --suite quick|cpu|full|smoke [--only ARCH] [--percent P] [--round-to N] [--epochs N]
       [--refine-epochs N] [--data-dir DIR] [--device auto|cpu|cuda] [--no-peer] [--reuse-trained] [--resume]
       [--render-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.common import machine_tag, run_name
from benchmarks.peers import torch_pruning_peer
from benchmarks.render import render_results
from slimexport.bench import bench, ort_accuracy
from slimexport.checkpoint import load_checkpoint, read_checkpoint
from slimexport.config import BenchConfig, ExportConfig, PipelineConfig, PruneConfig
from slimexport.data import find_fashion_mnist, load_dataset
from slimexport.export import export
from slimexport.fileio import atomic_path, write_json, write_text
from slimexport.pipeline import run_pipeline
from slimexport.prune import prune
from slimexport.report import machine, versions
from slimexport.rewrite import absorb_selections
from slimexport.stats import count_macs, count_params
from slimexport.train import train

ROOT = Path(__file__).resolve().parent

# the converged suite's shared settings (issue 15)
_VGG = dict(arch="vgg11_w25", dataset="cifar10", epochs=30, refine_epochs=20, sparsity=8e-4, eval_every=2)
_MOBILENET = dict(
    arch="torchvision:mobilenet_v2",
    dataset="cifar10",
    percent=0.5,
    epochs=15,
    refine_epochs=10,
    sparsity=5e-3,
    lr=0.05,
    train_subset=10000,
    eval_every=2,
)

# Each entry: one pipeline run. Epoch counts are per stage (baseline and sparse each; refine separately).
SUITES: dict[str, list[dict]] = {
    # CPU, minutes: small models on Fashion-MNIST (the full 60k/10k set when found, see --data-dir).
    "quick": [
        dict(
            arch="vgg11_w50",
            dataset="fashion-mnist",
            percent=0.7,
            epochs=2,
            refine_epochs=1,
            sparsity=3e-3,
            train_subset=20000,
        ),
        dict(
            arch="preresnet20",
            dataset="fashion-mnist",
            percent=0.4,
            epochs=2,
            refine_epochs=1,
            sparsity=1e-3,
            train_subset=8000,
            auto_row=False,  # to stay within 15 minutes: the budget-matched rows are exported with auto already
        ),
    ],
    # CPU, about an hour: full data sets at few epochs (VGG at 70% on all of Fashion-MNIST; small-depth residual and
    # dense networks on all of CIFAR-10, 40% and 60% from one sparse model).
    "cpu": [
        dict(arch="vgg11", dataset="fashion-mnist", percent=0.7, epochs=1, refine_epochs=1, sparsity=3e-3),
        dict(arch="vgg11", dataset="fashion-mnist", percent=0.7, epochs=1, refine_epochs=1, sparsity=3e-3, round_to=16),
        dict(arch="preresnet20", dataset="cifar10", percent=0.4, epochs=1, refine_epochs=1, sparsity=1e-3),
        dict(arch="preresnet20", dataset="cifar10", percent=0.6, epochs=1, refine_epochs=1, sparsity=1e-3, peer=False),
        dict(arch="densenet10", dataset="cifar10", percent=0.4, epochs=1, refine_epochs=1, sparsity=1e-3, peer=False),
        dict(arch="densenet10", dataset="cifar10", percent=0.6, epochs=1, refine_epochs=1, sparsity=1e-3, peer=False),
        # a torchvision model through the graph engine (ImageNet stem at 32×32), with the peer at equal MACs
        dict(
            arch="torchvision:resnet18",
            dataset="cifar10",
            percent=0.5,
            epochs=1,
            refine_epochs=1,
            sparsity=1e-3,
            train_subset=10000,
        ),  # fmt: skip
    ],
    # A few minutes: checks that the harness itself works (peer, budget-matched and auto rows); its results are written
    # under benchmarks/work/smoke-results, not into RESULTS.md.
    "smoke": [
        dict(
            arch="preresnet11",
            dataset="fashion-mnist",
            percent=0.4,
            epochs=1,
            refine_epochs=1,
            sparsity=1e-3,
            train_subset=1000,
        ),  # fmt: skip
    ],
    # Issue 15's converged runs on the CPU (`make benchmark-converged`: benchmarks/converged.sh runs them in two
    # one-thread streams, about 130 min on two cores by an estimate from measured parts): a narrow VGG
    # on all of CIFAR-10 with one-cycle schedules that anneal to zero, and a sparsity whose L1 reach s·Σlr/(1−μ)
    # (4.8 here, reported as gamma.l1_reach; γ starts at 0.5) polarises |γ|; every VGG entry prunes one sparse
    # model. Then `python -m benchmarks.peer_seeds` on the two 50% runs for the equal-MACs comparison's seed spread
    # (converged.sh has the commands).
    "converged": [
        _VGG | dict(percent=0.5),
        _VGG | dict(percent=0.7),
        # the largest percent whose narrowest layers keep more than one channel here (a scan of prune on the sparse
        # model: 57.5% floors features.23, 70% floors features.19 and .23 to one channel each, and refine stays at
        # chance), the first at ≥ 5× fewer parameters; refined 40 epochs (20 gave 85.91%, −0.96 pt, at a final
        # training loss of 0.303; 40 reach 0.268); without the peer, to save time: the equal-MACs comparison is in
        # the 50% entries
        _VGG | dict(percent=0.55, refine_epochs=40, peer=False),
        # The same sparse model with each layer's |γ| divided by its largest (`--normalize max`): a BN followed by
        # ReLU and a conv can scale its γ freely, and the raw threshold above empties the last layers whose γ the L1
        # term shrank as a whole. At 50% with the peer (the equal-MACs comparison), and at 70%.
        _VGG | dict(percent=0.5, normalize="max"),
        _VGG | dict(percent=0.7, normalize="max", peer=False),
        # torchvision's mobilenet_v2 (ImageNet stem, 32×32 input) trains at ~420 images/s on these two cores, so a
        # full-CIFAR schedule (80 epochs) would take 2.6 h alone: it trains on a 10k subset for 15+15+10 epochs
        # instead, with s raised so that the L1 term's reach s·Σlr/(1−μ) (1.5, γ starts at 1) still polarises |γ|
        # over its ten times fewer steps. Peak lr 0.05: at the preset's 0.1 its baseline's loss rose from 2.31 to
        # 2.71 at the peak and ended at 32% (measured, then stopped).
        _MOBILENET,
        # the same sparse model pruned to multiples of 16 channels (--round-to 16, what the pipeline's default `auto`
        # picks with AVX-512; also a multiple of AVX2's 8): exact counts leave onnxruntime's blocked convs for its
        # slow path, and the exactly pruned model above runs slower than its baseline
        _MOBILENET | dict(round_to=16),
    ],
    # The GPU path in one command (`make benchmark SUITE=gpu`): VGG-19 on CIFAR-10 at 70%, the whole pipeline on
    # CUDA with bf16, resident data and torch.compile; per-stage images/s, compile time and wall time in the result.
    # Needs cifar10.npz (python ../shared/tools/fetch_cifar10.py DIR, then --data-dir DIR); nothing is downloaded.
    "gpu": [
        dict(
            arch="vgg19",
            dataset="cifar10",
            percent=0.7,
            epochs=30,
            refine_epochs=30,
            sparsity=1e-4,
            compile=True,
            peer=False,
            device="cuda",
        ),  # fmt: skip
    ],
    # The reference architectures on CIFAR-10, meant for a GPU (`fast` preset).
    "full": [
        dict(arch="vgg19", dataset="cifar10", percent=0.7, epochs=30, refine_epochs=30, sparsity=1e-4),
        dict(arch="vgg19", dataset="cifar10", percent=0.7, epochs=30, refine_epochs=30, sparsity=1e-4, round_to=16),
        dict(arch="preresnet164", dataset="cifar10", percent=0.4, epochs=30, refine_epochs=30, sparsity=1e-5),
        dict(arch="preresnet164", dataset="cifar10", percent=0.6, epochs=30, refine_epochs=30, sparsity=1e-5),
        dict(arch="densenet40", dataset="cifar10", percent=0.4, epochs=30, refine_epochs=30, sparsity=1e-5),
        dict(arch="densenet40", dataset="cifar10", percent=0.6, epochs=30, refine_epochs=30, sparsity=1e-5),
    ],
}


def dataset_source(entry: dict, data_dir: str | None, work: Path) -> tuple[str, str | None]:
    """The --dataset value for this entry: the named set, or a stratified training subset of it as .npz."""
    name = entry["dataset"]
    if name == "fashion-mnist" and data_dir is None:
        shared = ROOT.parents[1] / "shared" / "data" / "fashion-mnist"
        data_dir = str(shared) if find_fashion_mnist(shared) else None
    n = entry.get("train_subset")
    if not n:
        return name, data_dir
    path = work / f"{name}-train{n}.npz"
    if not path.exists():
        ds = load_dataset(name, data_dir)
        rng = np.random.default_rng(0)
        y = ds.y_train.numpy()
        per = n // ds.num_classes
        idx = np.sort(
            np.concatenate([rng.choice(np.flatnonzero(y == c), per, replace=False) for c in range(ds.num_classes)])
        )
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                x_train=ds.x_train.numpy()[idx],
                y_train=y[idx],
                x_test=ds.x_test.numpy(),
                y_test=ds.y_test.numpy(),
                label_names=np.array(ds.label_names or [str(i) for i in range(ds.num_classes)]),
            )
    return str(path), data_dir


def _variant(name: str, model, ex: dict, b: dict, ds, base_macs: int, speedups) -> dict:
    """Params, MACs and latency of one exported variant; with --selection auto, of the graph actually exported
    (absorbed selections bring their zero weights and MACs with them)."""
    absorbed = ex.get("selection", {}).get("absorbed")
    graph = absorb_selections(model, absorbed) if absorbed and any(absorbed) else model
    macs = count_macs(graph, ds.in_channels, ds.image_size)
    return {
        "params": count_params(graph),
        "macs": macs,
        "accuracy": b["models"][name]["accuracy"],
        "op_counts": ex["op_counts"],
        "gather_slice_share": b["models"][name]["op_time"]["gather_slice_share"],
        "onnx_bytes": ex["onnx_bytes"],
        "latency": speedups(name, base_macs / macs),
        "selection": {k: v for k, v in ex.get("selection", {}).items() if k != "units"},
    }


def training_curves(paths: dict[str, Path]) -> dict[str, list[dict]]:
    """Per training stage, its per-epoch loss and (where evaluated) test accuracy, from the checkpoints' meta."""
    out = {}
    for stage, path in paths.items():
        if path.is_file():
            meta = read_checkpoint(path)["meta"]
            out[stage] = [
                {"epoch": h["epoch"], "loss": h["loss"], "accuracy": h["accuracy"]} for h in meta.get("history", [])
            ]
    return out


def enrich(result: dict, rep: dict, run_dir: Path, cfg: PipelineConfig, out_dir: Path, tag: str) -> dict:
    """Add what the converged table needs: |γ| statistics (from the pipeline's report ``rep``), training curves,
    and the γ histogram kept beside the result (the run directory under benchmarks/work is not committed)."""
    result["gamma"] = rep.get("gamma")
    result["curves"] = training_curves(
        {
            "baseline": Path(cfg.baseline) if cfg.baseline else run_dir / "baseline.pt",
            "sparse": Path(cfg.sparse) if cfg.sparse else run_dir / "sparse.pt",
            "refine": run_dir / "refined.pt",
        }
    )
    hist = run_dir / "gamma_hist.png"
    if hist.is_file():
        dest = out_dir / f"{tag}-gamma_hist.png"
        with atomic_path(dest, suffix=".png") as tmp:
            shutil.copyfile(hist, tmp)
        result["gamma_plot"] = str(dest.relative_to(ROOT))
    return result


def _earlier_training(work: Path, key: tuple, args) -> Path | None:
    """A run directory left by an earlier invocation whose baseline and sparse models were trained exactly as
    ``key`` asks (same arch, data, sparsity, epochs, lr, preset and seed), for --reuse-trained."""
    for d in sorted(work.iterdir()):
        rep = d / "report.json"
        if not (rep.is_file() and (d / "baseline.pt").is_file() and (d / "sparse.pt").is_file()):
            continue
        c = json.loads(rep.read_text())["config"]
        same = (c["arch"], c["dataset"], c["sparsity"], c["epochs"], c.get("lr"), c["seed"]) == (*key, 0)
        if same and c["preset"] == args.preset:
            print(f"reusing the baseline and sparse models of {d}")
            return d
    return None


def _pipeline(entry: dict, args, work: Path, run_dir: Path, tag: str, trained: dict):
    """Run the pipeline for ``entry``; entries that differ only in percent share one baseline and one sparse model,
    as a user sweeping would. Returns (its config, its report, its wall time, the data)."""
    round_to, normalize = entry.get("round_to", 1), entry.get("normalize", "none")
    dataset, data_dir = dataset_source(entry, args.data_dir, work)
    key = (entry["arch"], dataset, entry["sparsity"], args.epochs or entry["epochs"], entry.get("lr"))
    reuse = trained.get(key)
    if reuse is None and args.reuse_trained:
        reuse = _earlier_training(work, key, args)
    first = json.loads((reuse / "report.json").read_text()) if reuse else None  # read before run_dir is replaced
    cfg = PipelineConfig(
        out=str(run_dir),
        arch=entry["arch"],
        dataset=dataset,
        data_dir=data_dir,
        epochs=args.epochs or entry["epochs"],
        refine_epochs=args.refine_epochs or entry["refine_epochs"],
        sparsity=entry["sparsity"],
        prune=PruneConfig(percent=entry["percent"], round_to=round_to, normalize=normalize),
        device=entry.get("device", args.device),
        compile=entry.get("compile", False),
        force=True,
        resume=args.resume and (work / f".{tag}.partial").is_dir(),
        eval_every=entry.get("eval_every"),
        lr=entry.get("lr"),
        refine_lr=entry.get("refine_lr"),
        preset=args.preset,
        # the pipeline's bench gives the accuracies its report needs; its latency is a 0.2 s formality (the
        # interleaved run of _bench_all times every model)
        bench=BenchConfig(batches=[1], threads=[1], seconds=0.2, accuracy=True, profile=False),
        baseline=str(reuse / "baseline.pt") if reuse else None,
        sparse=str(reuse / "sparse.pt") if reuse else None,
    )
    t0 = time.perf_counter()
    rep = run_pipeline(cfg, command="benchmarks/run.py")
    pipeline_s = time.perf_counter() - t0
    if reuse:  # report the training stages of the run that trained them
        for k in ("baseline", "sparse"):
            rep["stages"][k] = first["stages"][k] | {"shared_with": first["stages"][k].get("shared_with", reuse.name)}
    else:
        trained[key] = run_dir
    return cfg, rep, pipeline_s, load_dataset(dataset, data_dir)


def _peer(entry: dict, args, run_dir: Path, ds, refine_cfg, models: dict) -> dict | None:
    """Torch-Pruning on the same sparse model at the same percent, refined alike (None where it is not run)."""
    if args.no_peer or not entry.get("peer", True):
        return None
    try:
        peer = torch_pruning_peer(run_dir, ds, entry["percent"], refine_cfg, run_dir / "torch_pruning.onnx")
    except ImportError:
        print("torch-pruning is not installed (pip install -e '.[bench]'); skipping the peer comparison")
        return None
    models["torch-pruning"] = run_dir / "torch_pruning.onnx"
    return peer


def _variants(entry: dict, rep: dict, run_dir: Path, ds, cfg, refine_cfg, peer, models: dict):
    """slimexport's other exports of the run: the same refined weights with ``--selection auto``, and (beside the
    peer) the same sparse model pruned to the peer's MACs (``prune --max-macs``), refined with the same schedule
    and seed; a residual network also with --prune-stream, which prunes the stream as Torch-Pruning does."""
    has_selections = any(sel in rep["pruned"]["op_counts"] for sel in ("Gather", "Slice"))
    auto_export = None
    if has_selections and entry.get("auto_row", True):
        auto_export = export(run_dir / "refined.pt", run_dir / "pruned_auto.onnx", ds, ExportConfig(selection="auto"))
        models["slimexport-auto"] = run_dir / "pruned_auto.onnx"
    matched = {}
    if peer is None:
        return auto_export, matched
    budget = peer["macs"] / rep["baseline"]["macs"]
    variants = [("", False)] + ([("_stream", True)] if entry["arch"].startswith("preresnet") else [])
    for suffix, prune_stream in variants:
        name = f"matched{suffix}"
        pcfg = dataclasses.replace(cfg.prune, percent=None, max_macs=budget, prune_stream=prune_stream)
        m_meta = prune(run_dir / "sparse.pt", run_dir / f"{name}_pruned.pt", pcfg, ds=ds)
        refined = run_dir / f"{name}_refined.pt"
        r_meta = train(refined, ds, refine_cfg, init=run_dir / f"{name}_pruned.pt", stage="refined")
        sel_mode = "auto" if has_selections else "gather"
        m_export = export(refined, run_dir / f"{name}.onnx", ds, ExportConfig(selection=sel_mode))
        models[f"slimexport-{name.replace('_', '-')}"] = run_dir / f"{name}.onnx"
        matched[name] = (m_meta, r_meta, m_export)
    return auto_export, matched


def _bench_all(models: dict, ds, rep: dict, seconds: float) -> dict:
    """One interleaved latency run for all models, so that they share the machine's noise; accuracy in
    onnxruntime for those the pipeline did not measure."""
    b = bench(models, ds, BenchConfig(batches=[1, 32], seconds=seconds, accuracy=False))
    b["models"]["baseline"]["accuracy"] = rep["baseline"]["accuracy"]
    b["models"]["slimexport"]["accuracy"] = rep["pruned"]["accuracy"]
    for name, path in models.items():
        if "accuracy" not in b["models"][name]:
            b["models"][name]["accuracy"] = ort_accuracy(path, ds)
    return b


def _result(suite: str, entry: dict, cfg, rep: dict, b: dict, pipeline_s: float, speedups) -> dict:
    B, P = rep["baseline"], rep["pruned"]
    return {
        "suite": suite,
        "arch": entry["arch"],
        "dataset": entry["dataset"],
        "train_subset": entry.get("train_subset"),
        "percent": entry["percent"],
        "round_to": cfg.prune.round_to,
        "normalize": cfg.prune.normalize,
        "sparsity": entry["sparsity"],
        "epochs": cfg.epochs,
        "refine_epochs": cfg.refine_epochs,
        "lr": cfg.lr,
        "refine_lr": cfg.refine_lr,
        "preset": cfg.preset,
        "device": rep["config"]["resolved_device"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(),
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "pipeline_seconds": pipeline_s,
        "baseline": {
            "params": B["params"],
            "macs": B["macs"],
            "accuracy": B["accuracy"],
            "onnx_bytes": B["onnx_bytes"],
            "latency": speedups("baseline", 1.0),
        },
        "slimexport": {
            "params": P["params"],
            "macs": P["macs"],
            "onnx_bytes": P["onnx_bytes"],
            "sparse_accuracy": P["sparse_accuracy"],
            "accuracy_before_refine": P["accuracy_before_refine"],
            "accuracy": b["models"]["slimexport"]["accuracy"],
            "torch_accuracy": P["torch_accuracy"],
            "op_counts": P["op_counts"],
            "gather_slice_share": b["models"]["slimexport"]["op_time"].get("gather_slice_share"),
            "latency": speedups("slimexport", B["macs"] / P["macs"]),
            "prune": rep["prune"],
        },
        "stages": rep["stages"],
    }


def run_entry(suite: str, entry: dict, args, work: Path, out_dir: Path, trained: dict) -> Path:
    """One suite entry: the pipeline (reusing a baseline and sparse model trained for the same settings), the peer
    and slimexport's variants beside it, one interleaved timing of every model, and the result JSON."""
    round_to, normalize = entry.get("round_to", 1), entry.get("normalize", "none")
    tag = run_name(suite, entry["arch"], entry["dataset"], entry["percent"], round_to, normalize)
    run_dir = work / tag
    cfg, rep, pipeline_s, ds = _pipeline(entry, args, work, run_dir, tag, trained)
    models = {"baseline": run_dir / "baseline.onnx", "slimexport": run_dir / "pruned.onnx"}
    refine_cfg = cfg.train_config("refine")
    peer = _peer(entry, args, run_dir, ds, refine_cfg, models)
    auto_export, matched = _variants(entry, rep, run_dir, ds, cfg, refine_cfg, peer, models)
    b = _bench_all(models, ds, rep, args.seconds)
    lat = {n: [r for r in b["latency"] if r["model"] == n] for n in models}

    def speedups(name, macs_ratio):
        base = {(r["batch"], r["threads"]): r["median_ms"] for r in lat["baseline"]}
        return [
            {
                "batch": r["batch"],
                "threads": r["threads"],
                "median_ms": r["median_ms"],
                "p90_ms": r["p90_ms"],
                "speedup": base[(r["batch"], r["threads"])] / r["median_ms"],
                "macs_ratio": macs_ratio,
            }
            for r in lat[name]
        ]

    result = _result(suite, entry, cfg, rep, b, pipeline_s, speedups)
    enrich(result, rep, run_dir, cfg, out_dir, tag)
    B = rep["baseline"]
    if "slimexport-auto" in models:
        result["slimexport_auto"] = result["slimexport"] | _variant(
            "slimexport-auto", load_checkpoint(run_dir / "refined.pt")[0], auto_export, b, ds, B["macs"], speedups
        )
        result["slimexport_auto"]["note"] = "same weights as slimexport, exported with --selection auto"
    for name, (m_meta, r_meta, m_export) in matched.items():
        model = load_checkpoint(run_dir / f"{name}_refined.pt")[0]
        rec = m_meta["prune"]
        label = f"slimexport-{name.replace('_', '-')}"
        stream = ", --prune-stream" if rec.get("prune_stream") else ""
        result[f"slimexport_{name}"] = _variant(label, model, m_export, b, ds, B["macs"], speedups) | {
            "params_model": count_params(model),
            "macs_model": count_macs(model, ds.in_channels, ds.image_size),
            "accuracy_before_refine": m_meta["accuracy"],
            "torch_accuracy": r_meta["accuracy"],
            "prune": rec,
            "stages": {"refine": {"seconds": r_meta["train_seconds"], "images_per_s": r_meta["images_per_s"]}},
            "note": f"pruned to Torch-Pruning's MACs (--max-macs {rec['max_macs']:.4f}{stream}: global percent "
            f"{rec['percent']:.4f}), same refine; exported with --selection {m_export['config']['selection']}",
        }
    if peer is not None:
        peer["accuracy"] = b["models"]["torch-pruning"]["accuracy"]
        peer["latency"] = speedups("torch-pruning", B["macs"] / peer["macs"])
        result["torch_pruning"] = peer
    path = out_dir / f"{tag}.json"
    write_json(path, result)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="quick")
    ap.add_argument("--only", help="run only entries whose arch contains this text")
    ap.add_argument("--percent", type=float, help="run only entries with this percent")
    ap.add_argument("--round-to", type=int, help="run only entries with this --round-to (1: those without)")
    ap.add_argument("--normalize", help="run only entries with this --normalize (none: those without)")
    ap.add_argument("--epochs", type=int, help="override the baseline/sparse epochs")
    ap.add_argument("--refine-epochs", type=int, help="override the refine epochs")
    ap.add_argument("--data-dir", help="where fashion-mnist / cifar10.npz live (default: ../shared for Fashion-MNIST)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="fast", choices=["fast", "paper"])
    ap.add_argument("--seconds", type=float, help="latency budget per model and setting (default: 1 for quick, else 2)")
    ap.add_argument(
        "--reuse-trained",
        action="store_true",
        help="reuse baseline and sparse models that an earlier run trained with the same settings (benchmarks/work)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning comparison")
    ap.add_argument("--resume", action="store_true", help="continue entries an interrupted run left unfinished")
    ap.add_argument("--render-only", action="store_true", help="only regenerate RESULTS.md")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 1.0 if args.suite in ("quick", "smoke") else 2.0
    results_root = ROOT / "results"
    if not args.render_only:
        work = ROOT / "work"
        work.mkdir(exist_ok=True)
        out_dir = work / "smoke-results" if args.suite == "smoke" else results_root / machine_tag()
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = [
            e
            for e in SUITES[args.suite]
            if (not args.only or args.only in e["arch"])
            and (args.percent is None or abs(e["percent"] - args.percent) < 1e-9)
            and (args.round_to is None or e.get("round_to", 1) == args.round_to)
            and (args.normalize is None or e.get("normalize", "none") == args.normalize)
        ]
        t0 = time.perf_counter()
        trained: dict = {}
        for e in entries:
            print(f"== {args.suite}: {e['arch']} on {e['dataset']} at {e['percent']:.0%}", flush=True)
            print(f"   -> {run_entry(args.suite, e, args, work, out_dir, trained)}", flush=True)
            if args.suite != "smoke":
                write_text(ROOT / "RESULTS.md", render_results(results_root))
        print(f"suite {args.suite}: {len(entries)} entries in {time.perf_counter() - t0:.0f} s")
    write_text(ROOT / "RESULTS.md", render_results(results_root))
    print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()

"""The one pruning engine against the retired hand-written rules, and selections on torchvision models.

1. preresnet164 and densenet40, sparse-trained briefly on a CIFAR-10 subset, pruned at 40% and 60% with exact
   channel counts exported as Gathers, exact counts with ``--selection auto``, and ``--round-to 16`` with
   ``auto``: once by this version (the one engine) and once by the hand-written rules of an earlier commit (run
   from a git worktree of it, from the same sparse weights), all timed in one interleaved onnxruntime run (batch
   1, one thread). Parameters and MACs of both, and each row's speed-up over the unpruned model.
2. torchvision densenet121 and efficientnet_b0 (random weights with random BN statistics), pruned 50% with
   ``--round-to auto`` at 224×224: exported with ``--selection gather`` and ``auto``, timed beside the unpruned
   model (batch 1, one thread).

    python -m benchmarks.one_engine --data-dir ~/data [--compare-with 40e8dc1] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_tag
from benchmarks.graph_coverage import randomize
from slimexport.bench import bench
from slimexport.checkpoint import make_checkpoint, save_checkpoint
from slimexport.config import BenchConfig, ExportConfig, TrainConfig
from slimexport.data import from_arrays, load_dataset
from slimexport.export import export
from slimexport.fileio import write_json
from slimexport.loop import fit
from slimexport.models import create_model
from slimexport.prune import prune_model, resolve_round_to
from slimexport.report import machine, versions
from slimexport.stats import count_macs, count_params
from slimexport.train import data_meta

ROOT = Path(__file__).resolve().parent
VARIANTS = ((1, "gather"), (1, "auto"), (16, "auto"))
PERCENTS = (0.4, 0.6)

# Run inside a worktree of the earlier commit: its hand-written rules prune the same sparse weights, its export
# writes the ONNX files. Arguments: the arch, the sparse checkpoint (this version's), the data .npz, the out dir.
OLD_SIDE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from slimexport.checkpoint import make_checkpoint, save_checkpoint
    from slimexport.data import from_arrays
    from slimexport.config import ExportConfig
    from slimexport.export import export
    from slimexport.models import create_model
    from slimexport.prune import prune_model
    from slimexport.stats import count_macs, count_params
    from slimexport.train import data_meta

    arch, sparse, data, out = sys.argv[1:5]
    variants, percents = json.loads(sys.argv[5]), json.loads(sys.argv[6])
    z = np.load(data)
    ds = from_arrays("cifar10-subset", z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    state = torch.load(sparse, weights_only=True)["state_dict"]
    model = create_model(arch, 10, 3)
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    rows = {}
    for pct in percents:
        for round_to, sel in variants:
            name = f"old-{arch}-p{int(pct * 100)}-r{round_to}-{sel}"
            p, _ = prune_model(model, pct, round_to=round_to)
            ck = f"{out}/{name}.pt"
            save_checkpoint(make_checkpoint(p, data_meta(ds), {"stage": "pruned"}), ck)
            ex = export(ck, f"{out}/{name}.onnx", ds, ExportConfig(parity_images=64, selection=sel))
            rows[name] = {"params": count_params(p), "macs": count_macs(p, 3, (32, 32)),
                          "chosen": ex.get("selection", {}).get("chosen", sel)}
    print("RESULT " + json.dumps(rows))
    """
)


def cifar_subset(data_dir: str | None, n_train: int, work: Path):
    ds = load_dataset("cifar10", data_dir)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(ds.y_train), generator=g)[:n_train]
    te = torch.randperm(len(ds.y_test), generator=g)[:1000]
    arrays = {
        "x_train": ds.x_train[tr].numpy(), "y_train": ds.y_train[tr].numpy(),
        "x_test": ds.x_test[te].numpy(), "y_test": ds.y_test[te].numpy(),
    }  # fmt: skip
    path = work / f"cifar10-{n_train}.npz"
    np.savez(path, **arrays)
    return from_arrays("cifar10-subset", *arrays.values()), path


def old_engine(commit: str, arch: str, sparse: Path, data: Path, out: Path) -> dict:
    """The hand-written rules of ``commit`` on the same sparse weights, run from a temporary git worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT.parent), "worktree", "add", "-f", "--detach", str(tree), commit],
                       check=True, capture_output=True)  # fmt: skip
        try:
            script = Path(tmp) / "old_side.py"
            script.write_text(OLD_SIDE)
            env = dict(os.environ, PYTHONPATH=str(tree))
            res = subprocess.run(
                [sys.executable, str(script), arch, str(sparse), str(data), str(out),
                 json.dumps(VARIANTS), json.dumps(PERCENTS)],
                cwd=tree, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if res.returncode:
                raise RuntimeError(f"the earlier commit's side failed: {res.stderr[-2000:]}")
            line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
            return json.loads(line[len("RESULT ") :])
        finally:
            subprocess.run(["git", "-C", str(ROOT.parent), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)  # fmt: skip


def selection_table(args, work: Path) -> list[dict]:
    ds, data = cifar_subset(args.data_dir, args.train_images, work)
    rows = []
    for arch in ("preresnet164", "densenet40"):
        torch.manual_seed(0)
        model = create_model(arch, 10, 3)
        fit(model, ds, TrainConfig(epochs=1, batch_size=64, sparsity=1e-5, device="cpu"), description=arch)
        sparse = work / f"{arch}-sparse.pt"
        save_checkpoint(make_checkpoint(model, data_meta(ds), {"stage": "sparse"}), sparse)
        export(sparse, work / f"{arch}-base.onnx", ds, ExportConfig(parity_images=64))
        models = {"baseline": work / f"{arch}-base.onnx"}
        new = {}
        for pct in PERCENTS:
            for round_to, sel in VARIANTS:
                name = f"new-{arch}-p{int(pct * 100)}-r{round_to}-{sel}"
                p, _ = prune_model(model, pct, round_to=round_to)
                ck = work / f"{name}.pt"
                save_checkpoint(make_checkpoint(p, data_meta(ds), {"stage": "pruned"}), ck)
                ex = export(ck, work / f"{name}.onnx", ds, ExportConfig(parity_images=64, selection=sel))
                new[name] = {"params": count_params(p), "macs": count_macs(p, 3, (32, 32)),
                             "chosen": ex.get("selection", {}).get("chosen", sel)}  # fmt: skip
                models[name] = work / f"{name}.onnx"
        old = old_engine(args.compare_with, arch, sparse, data, work) if args.compare_with else {}
        models |= {name: work / f"{name}.onnx" for name in old}
        b = bench(models, ds, BenchConfig(batches=[1], threads=[1], seconds=args.seconds, accuracy=False))
        ms = {r["model"]: r["median_ms"] for r in b["latency"]}
        for pct in PERCENTS:
            for round_to, sel in VARIANTS:
                key = f"{arch}-p{int(pct * 100)}-r{round_to}-{sel}"
                row = {"arch": arch, "percent": pct, "round_to": round_to, "selection": sel,
                       "baseline_ms": ms["baseline"], "macs_before": count_macs(model, 3, (32, 32))}  # fmt: skip
                for side, info in (("new", new), ("old", old)):
                    name = f"{side}-{key}"
                    if name in info:
                        row[side] = info[name] | {"median_ms": ms[name], "speedup": ms["baseline"] / ms[name]}
                rows.append(row)
                print(row, flush=True)
    return rows


def torchvision_table(args, work: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 224, 224, 3), dtype=np.uint8)
    ds = from_arrays("random-224", x[:10], np.arange(10), x[10:], np.arange(10))  # all ten classes in each split
    round_to, why = resolve_round_to("auto")
    rows = []
    for name in ("densenet121", "efficientnet_b0"):
        torch.manual_seed(0)
        gm = create_model(f"torchvision:{name}", 10, 3)
        gm.config["image_size"] = [224, 224]
        randomize(gm)
        base = work / f"{name}-base.pt"
        save_checkpoint(make_checkpoint(gm, data_meta(ds), {"stage": "baseline"}), base)
        export(base, work / f"{name}-base.onnx", ds, ExportConfig(parity_images=8))
        p, rec = prune_model(gm, 0.5, round_to=round_to)
        ck = work / f"{name}-p50.pt"
        save_checkpoint(make_checkpoint(p, data_meta(ds), {"stage": "pruned"}), ck)
        models, chosen = {"baseline": work / f"{name}-base.onnx"}, {}
        for sel in ("gather", "auto"):
            ex = export(ck, work / f"{name}-p50-{sel}.onnx", ds, ExportConfig(parity_images=8, selection=sel))
            models[sel] = work / f"{name}-p50-{sel}.onnx"
            chosen[sel] = ex.get("selection", {}).get("chosen", sel)
        b = bench(models, ds, BenchConfig(batches=[1], threads=[1], seconds=args.seconds, accuracy=False))
        ms = {r["model"]: r["median_ms"] for r in b["latency"]}
        row = {
            "model": name, "round_to": round_to, "round_to_reason": why,
            "macs_ratio": count_macs(gm, 3, (224, 224)) / count_macs(p, 3, (224, 224)),
            "selecting_bns": sum(1 for q in rec["plan"].values() if q.get("select")),
            "baseline_ms": ms["baseline"], "gather_ms": ms["gather"], "auto_ms": ms["auto"],
            "auto_chosen": chosen["auto"],
            "speedup_gather": ms["baseline"] / ms["gather"], "speedup_auto": ms["baseline"] / ms["auto"],
        }  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    return rows


def redo_new(result: dict, work: Path, data_dir: str | None, train_images: int, round_to: int) -> None:
    """Prune and export this version's rows of one --round-to again from the same sparse checkpoints (after a change
    to the engine), keeping the rules' side; time them with --retime."""
    from slimexport.checkpoint import load_checkpoint

    ds = from_arrays("cifar10-subset", *(np.load(work / f"cifar10-{train_images}.npz")[k]
                                         for k in ("x_train", "y_train", "x_test", "y_test")))  # fmt: skip
    for row in (r for r in result["selection"] if r["round_to"] == round_to):
        model, _ = load_checkpoint(work / f"{row['arch']}-sparse.pt")
        name = f"new-{row['arch']}-p{int(row['percent'] * 100)}-r{round_to}-{row['selection']}"
        p, _ = prune_model(model, row["percent"], round_to=round_to)
        save_checkpoint(make_checkpoint(p, data_meta(ds), {"stage": "pruned"}), work / f"{name}.pt")
        ex = export(
            work / f"{name}.pt", work / f"{name}.onnx", ds, ExportConfig(parity_images=64, selection=row["selection"])
        )
        row["new"] = {"params": count_params(p), "macs": count_macs(p, 3, (32, 32)),
                      "chosen": ex.get("selection", {}).get("chosen", row["selection"])}  # fmt: skip
        print(name, row["new"], flush=True)


def retime(result: dict, work: Path, seconds: float) -> None:
    """Time the ONNX files of an earlier run again, in one interleaved run per model family with nothing else on the
    machine (the exports themselves are not redone), and update the rows."""
    from slimexport.runtime import latency

    cfg = BenchConfig(batches=[1], threads=[1], seconds=seconds)
    for arch in sorted({r["arch"] for r in result["selection"]}):
        files = {"baseline": work / f"{arch}-base.onnx"} | {
            f.stem: f for f in sorted(work.glob(f"*-{arch}-p*.onnx")) if f.stem.split("-")[0] in ("new", "old")
        }
        ms = {r["model"]: r["median_ms"] for r in latency(files, (3, 32, 32), cfg)}
        for row in (r for r in result["selection"] if r["arch"] == arch):
            key = f"{arch}-p{int(row['percent'] * 100)}-r{row['round_to']}-{row['selection']}"
            row["baseline_ms"] = ms["baseline"]
            for side in ("new", "old"):
                if side in row:
                    row[side] |= {"median_ms": ms[f"{side}-{key}"], "speedup": ms["baseline"] / ms[f"{side}-{key}"]}
    for row in result.get("torchvision", []):
        name = row["model"]
        files = {"baseline": work / f"{name}-base.onnx", "gather": work / f"{name}-p50-gather.onnx",
                 "auto": work / f"{name}-p50-auto.onnx"}  # fmt: skip
        ms = {r["model"]: r["median_ms"] for r in latency(files, (3, 224, 224), cfg)}
        row |= {"baseline_ms": ms["baseline"], "gather_ms": ms["gather"], "auto_ms": ms["auto"]}
        row |= {"speedup_gather": ms["baseline"] / ms["gather"], "speedup_auto": ms["baseline"] / ms["auto"]}
    result["retimed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument(
        "--compare-with", default="40e8dc1", help="the commit whose hand-written rules to compare ('' none)"
    )
    ap.add_argument("--only", choices=("selection", "torchvision"), default=None)
    ap.add_argument("--retime", action="store_true", help="time the earlier run's ONNX files again, alone")
    ap.add_argument("--redo-new", type=int, metavar="ROUND_TO", help="prune and export this version's rows again")
    args = ap.parse_args()
    work = ROOT / "work" / "one_engine"
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "results" / machine_tag() / "one-engine.json"
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    if args.redo_new:
        redo_new(earlier, work, args.data_dir, args.train_images, args.redo_new)
    if args.retime:
        retime(earlier, work, args.seconds)
    if args.redo_new or args.retime:
        earlier["command"] += " && python -m benchmarks.one_engine " + shlex.join(sys.argv[1:])
        write_json(out, earlier)
        print(f"wrote {out}")
        return
    result = {
        "kind": "one_engine",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(),
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.one_engine " + shlex.join(sys.argv[1:]),
        "compare_with": args.compare_with,
        "selection": selection_table(args, work) if args.only != "torchvision" else earlier.get("selection", []),
        "torchvision": torchvision_table(args, work) if args.only != "selection" else earlier.get("torchvision", []),
    }
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

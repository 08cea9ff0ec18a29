"""Speed of the result for torchvision models: slimexport's graph engine at 50% with --round-to (the CPU's
onnxruntime channel block), against Torch-Pruning 1.6.1's BN-scale pruner at equal MACs (given the same round-to),
timed side by side in one interleaved onnxruntime run: batch 1 and 32, one thread.

Random weights with random BN statistics (seeded): the structure comes from random |γ|, so this measures how the
pruned shapes run, not accuracy. Per model: MACs ratio, latency speed-up, and speed-up / MACs ratio (1.0 would be
a runtime that turns every saved MAC into time). Where that falls below 0.8, onnxruntime's profiler says where
the time went: each node's time, by kind (dense conv, depthwise conv, grouped conv, linear, NCHWc layout
reorders, the rest: element-wise, pooling, concat), baseline against pruned.

Usage (from the repository root): python -m benchmarks.torchvision_speed [--models resnet50 mobilenet_v2 ...]
    [--size 224] [--round-to auto] [--seconds 2] [--batches 1 32]
Writes benchmarks/results/<machine-tag>/torchvision-speed.json; finished rows are kept in benchmarks/work/ so that
an interrupted run resumes (--fresh starts over).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from benchmarks.common import machine_tag
from benchmarks.graph_coverage import randomize
from slimexport.config import BenchConfig, ExportConfig
from slimexport.data import from_arrays
from slimexport.export import export_model
from slimexport.fileio import write_json
from slimexport.graph_prune import prune_graph
from slimexport.prune import resolve_round_to
from slimexport.report import machine, versions
from slimexport.runtime import latency, ort_session, run_logits
from slimexport.stats import count_macs_on

ROOT = Path(__file__).resolve().parent
MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "densenet121", "regnet_y_400mf", "regnet_x_400mf", "shufflenet_v2_x1_0", "mnasnet1_0", "googlenet",
          "vgg11_bn"]  # fmt: skip
CONVS = ("Conv", "FusedConv")


def _kind(op: str, shapes: list) -> str:
    """A profiled node's kind, from its op and input shapes (a conv's weight says depthwise or grouped)."""
    if op in CONVS and len(shapes) > 1 and len(shapes[1]) == 4 and len(shapes[0]) == 4:
        cin, per_group = shapes[0][1], shapes[1][1]
        if per_group == 1 and cin > 1:
            return "depthwise conv"
        return "grouped conv" if per_group < cin else "conv"
    if op in CONVS:
        return "conv"
    if op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
        return "linear"
    if op.startswith("Reorder"):
        return "NCHWc reorder"
    return "other (element-wise, pooling, concat)"


def op_kinds_ms(path: Path, size: int, runs: int = 20) -> dict[str, float]:
    """Milliseconds per batch-1 run spent in each kind of node (onnxruntime's profiler, one thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, threads=1, provider="CPUExecutionProvider", profile_prefix=os.path.join(tmp, "p"))
        x = np.zeros((1, 3, size, size), np.float32)
        for _ in range(runs):
            run_logits(sess, x)
        events = json.loads(Path(sess.end_profiling()).read_text())
    ms: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            a = ev.get("args", {})
            shapes = [next(iter(d.values())) for d in a.get("input_type_shape", [])]
            k = _kind(a.get("op_name", "?"), shapes)
            ms[k] = ms.get(k, 0.0) + ev.get("dur", 0) / 1000 / runs
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


def why_slow(base: dict[str, float], pruned: dict[str, float], macs_ratio: float) -> str:
    """The kind of node that keeps the pruned model furthest from its MACs ratio: the one whose pruned time most
    exceeds what it would take had it sped up by the MACs ratio."""
    excess = {k: pruned.get(k, 0.0) - base.get(k, 0.0) / macs_ratio for k in base}
    k = max(excess, key=excess.get)
    total = sum(pruned.values())
    return (f"{k}: {100 * pruned.get(k, 0) / total:.0f}% of the pruned model's time, sped up ×"
            f"{base[k] / max(pruned.get(k, 0), 1e-9):.2f} against MACs ×{macs_ratio:.2f}")  # fmt: skip


def tp_at_macs(model: nn.Module, x: torch.Tensor, target_macs: float, round_to: int = 1) -> tuple[nn.Module, float]:
    """Torch-Pruning's BN-scale pruner (global, ``round_to`` as ours) at the pruning ratio whose MACs come closest
    to ``target_macs`` from below (bisection over the ratio)."""
    import torch_pruning as tp

    def at(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        tp.pruner.BNScalePruner(m, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                pruning_ratio=ratio, ignored_layers=heads,
                                round_to=round_to if round_to > 1 else None).step()  # fmt: skip
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = at(mid)
        if count_macs_on(m, x) <= target_macs:
            hi, best = mid, (m, mid)
        else:
            lo = mid
    if best is None:
        best = (at(hi), hi)
    return best


def measure(name: str, x: torch.Tensor, ds, args, round_to: int) -> dict:
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    base = randomize(torchvision.models.get_model(name, weights=None, **kw))
    s = x.shape[-1]
    ours, rec = prune_graph(base, x, percent=args.percent, round_to=round_to)
    full, ours_macs = count_macs_on(base, x), count_macs_on(ours, x)
    models = {"baseline": base, "slimexport": ours}
    row = {"model": name, "input": s, "round_to": round_to, "percent": args.percent,
           "bn_removed": rec["pruned_fraction"]}  # fmt: skip
    try:
        peer, ratio = tp_at_macs(base, x, ours_macs, round_to)
        models["torch-pruning"] = peer
        row["torch_pruning_ratio"] = ratio
    except Exception as e:  # noqa: BLE001 - the peer's failure is a result too
        row["tp_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    row["macs"] = {tag: count_macs_on(m, x) for tag, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for tag, m in models.items():
            paths[tag] = Path(tmp) / f"{tag}.onnx"
            export_model(m, paths[tag], ds, ExportConfig(parity_images=4))
        cfg = BenchConfig(batches=args.batches, threads=[1], seconds=args.seconds, accuracy=False, profile=False,
                          min_runs=args.min_runs)  # fmt: skip
        lat = latency(paths, (3, s, s), cfg)
        row["latency"] = lat
        ms = {(r["model"], r["batch"]): r["median_ms"] for r in lat}
        for tag in models:
            if tag == "baseline":
                continue
            v = {"macs_ratio": full / row["macs"][tag]}
            for b in args.batches:
                v[f"speedup_b{b}"] = ms[("baseline", b)] / ms[(tag, b)]
                v[f"fraction_b{b}"] = v[f"speedup_b{b}"] / v["macs_ratio"]
            if min(v[f"fraction_b{b}"] for b in args.batches) < 0.8:
                kinds = {t: op_kinds_ms(paths[t], s) for t in ("baseline", tag)}
                v["op_ms_b1"] = kinds
                v["why"] = why_slow(kinds["baseline"], kinds[tag], v["macs_ratio"])
            row[tag] = v
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--fresh", action="store_true", help="start over instead of reusing finished rows")
    args = ap.parse_args()
    round_to, why = resolve_round_to(args.round_to)
    rng = np.random.default_rng(0)
    s = args.size
    ds = from_arrays("random", rng.integers(0, 255, (8, s, s, 3), dtype=np.uint8), np.arange(8) % 2,
                     rng.integers(0, 255, (8, s, s, 3), dtype=np.uint8), np.arange(8) % 2)  # fmt: skip
    x = torch.randn(1, 3, s, s)
    cache = ROOT / "work" / "torchvision-speed-rows.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        cache.unlink(missing_ok=True)
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            if r.get("input") == s and r.get("round_to") == round_to and r.get("percent") == args.percent:
                done[r["model"]] = r
    rows = []
    for name in args.models:
        row = done.get(name) or measure(name, x, ds, args, round_to)
        if name not in done:
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
        o, p = row["slimexport"], row.get("torch-pruning", {})
        line = " ".join(f"b{b} x{o[f'speedup_b{b}']:.2f} ({o[f'fraction_b{b}']:.2f})" for b in args.batches)
        peer = (
            " ".join(f"b{b} x{p[f'speedup_b{b}']:.2f}" for b in args.batches) if p else row.get("torch_pruning_error")
        )
        print(f"{name}: MACs x{o['macs_ratio']:.2f}; {line} | TP MACs x{p.get('macs_ratio', 0):.2f} {peer}"
              + (f" | why: {o['why']}" if "why" in o else ""), flush=True)  # fmt: skip
    out = ROOT / "results" / machine_tag() / "torchvision-speed.json"
    write_json(out, {
        "kind": "torchvision_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.torchvision_speed " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(), "machine": machine(),
        "versions": versions() | {"torch_pruning": importlib.metadata.version("torch-pruning")},
        "batches": args.batches, "round_to_reason": why, "rows": rows,
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

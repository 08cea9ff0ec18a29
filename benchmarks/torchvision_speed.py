"""Speed of the result for torchvision models: slimexport's graph engine at 50% with --round-to (the CPU's
onnxruntime channel block), against Torch-Pruning 1.6.1's BN-scale pruner at equal MACs, timed side by side in one
interleaved onnxruntime run (batch 1; one thread and all cores).

Random weights with random BN statistics (seeded): the structure comes from random |γ|, so this measures how the
pruned shapes run, not accuracy. Per model: MACs ratio, latency speed-up, and speed-up / MACs ratio (1.0 would be
a runtime that turns every saved MAC into time).

Usage (from the repository root): python -m benchmarks.torchvision_speed [--models resnet50 mobilenet_v2]
    [--size 224] [--round-to auto] [--seconds 3]
Writes benchmarks/results/<machine-tag>/torchvision-speed.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
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
from slimexport.data import from_arrays
from slimexport.export import ExportConfig, export_model
from slimexport.fileio import write_json
from slimexport.graph_prune import prune_graph
from slimexport.prune import resolve_round_to
from slimexport.report import machine, versions
from slimexport.runtime import BenchConfig, latency
from slimexport.stats import count_macs_on

ROOT = Path(__file__).resolve().parent


def tp_at_macs(model: nn.Module, x: torch.Tensor, target_macs: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's BN-scale pruner (global) at the pruning ratio whose MACs come closest to ``target_macs``
    from below (bisection over the ratio)."""
    import torch_pruning as tp

    def at(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        tp.pruner.BNScalePruner(m, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                pruning_ratio=ratio, ignored_layers=heads).step()  # fmt: skip
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    round_to, why = resolve_round_to(args.round_to)
    rng = np.random.default_rng(0)
    s = args.size
    ds = from_arrays("random", rng.integers(0, 255, (8, s, s, 3), dtype=np.uint8), np.arange(8) % 2,
                     rng.integers(0, 255, (8, s, s, 3), dtype=np.uint8), np.arange(8) % 2)  # fmt: skip
    x = torch.randn(1, 3, s, s)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        base = randomize(torchvision.models.get_model(name, weights=None))
        ours, rec = prune_graph(base, x, percent=args.percent, round_to=round_to)
        full, ours_macs = count_macs_on(base, x), count_macs_on(ours, x)
        peer, ratio = tp_at_macs(base, x, ours_macs)
        peer_macs = count_macs_on(peer, x)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for tag, m in (("baseline", base), ("slimexport", ours), ("torch-pruning", peer)):
                paths[tag] = Path(tmp) / f"{tag}.onnx"
                export_model(m, paths[tag], ds, ExportConfig(parity_images=4))
            cfg = BenchConfig(batches=[1], threads=[1, 2], seconds=args.seconds, accuracy=False, profile=False)
            lat = latency(paths, (3, s, s), cfg)
        ms = {(r["model"], r["threads"]): r["median_ms"] for r in lat}
        row = {"model": name, "input": s, "round_to": round_to, "percent": args.percent,
               "macs": {"baseline": full, "slimexport": ours_macs, "torch-pruning": peer_macs},
               "torch_pruning_ratio": ratio, "latency": lat}  # fmt: skip
        for tag, macs in (("slimexport", ours_macs), ("torch-pruning", peer_macs)):
            row[tag] = {
                "macs_ratio": full / macs,
                "speedup_t1": ms[("baseline", 1)] / ms[(tag, 1)],
                "speedup_t2": ms[("baseline", 2)] / ms[(tag, 2)],
            }
            row[tag]["fraction_of_macs_ratio_t1"] = row[tag]["speedup_t1"] / row[tag]["macs_ratio"]
        rows.append(row)
        o, p = row["slimexport"], row["torch-pruning"]
        print(f"{name}: MACs x{o['macs_ratio']:.2f} (TP x{p['macs_ratio']:.2f}); b1 t1 speed-up x{o['speedup_t1']:.2f}"
              f" = {o['fraction_of_macs_ratio_t1']:.2f} of the MACs ratio (TP x{p['speedup_t1']:.2f}); "
              f"t2 x{o['speedup_t2']:.2f} (TP x{p['speedup_t2']:.2f})", flush=True)  # fmt: skip
    out = ROOT / "results" / machine_tag() / "torchvision-speed.json"
    write_json(out, {
        "kind": "torchvision_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.torchvision_speed " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(), "machine": machine(),
        "versions": versions() | {"torch_pruning": importlib.metadata.version("torch-pruning")},
        "round_to_reason": why, "rows": rows,
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

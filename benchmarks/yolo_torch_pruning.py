"""Issue 35's peer: Torch-Pruning (the `bench` extra) on the same sparse YOLO models as `benchmarks.yolo_pipeline`,
at the same MACs as slimexport's pruned model, fine-tuned the same epochs with the same seed, measured the same way
(ONNX in onnxruntime, Ultralytics' validator).

Torch-Pruning's YOLOv8 procedure, as its example does it: C2f (and YOLO11's C3k2, a C2f) rebuilt with two convs
instead of `cv1(x).chunk(2)` (Torch-Pruning cannot follow the chunk: on the stock model its BN-scale importance
fails with an IndexError), the Detect head ignored, channels ranked by |γ| (its BNScaleImportance, network
slimming), one global ratio, found here by bisection to match slimexport's MACs. The example prunes in 16 steps
with fine-tuning between; here one step then the same fine-tune as slimexport's refine, so both get equal epochs.

    python -m benchmarks.yolo_torch_pruning [--work /tmp/slimexport-yolo-bench]   # after benchmarks.yolo_pipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine_tag
from slimexport.config import ExportConfig
from slimexport.detect import evaluate as ev
from slimexport.detect.data import images_of
from slimexport.detect.pipeline import train_args
from slimexport.detect.train import train_detector
from slimexport.fileio import write_json
from slimexport.report import machine, versions
from slimexport.stats import count_macs_on

ROOT = Path(__file__).resolve().parent


class SplitC2f(nn.Module):
    """C2f with ``cv1`` split into two convs (``cv0`` for the first half): the same function, no chunk."""

    def __init__(self, c2f: nn.Module):
        super().__init__()
        conv = c2f.cv1
        half = conv.conv.out_channels // 2
        self.cv0, self.cv1 = copy.deepcopy(conv), copy.deepcopy(conv)
        for sub, rows in ((self.cv0, slice(0, half)), (self.cv1, slice(half, 2 * half))):
            sub.conv.weight = nn.Parameter(conv.conv.weight.data[rows].clone())
            sub.conv.out_channels = half
            bn = sub.bn
            bn.num_features = half
            for name in ("weight", "bias"):
                setattr(bn, name, nn.Parameter(getattr(conv.bn, name).data[rows].clone()))
            bn.running_mean = conv.bn.running_mean[rows].clone()
            bn.running_var = conv.bn.running_var[rows].clone()
        self.m, self.cv2 = c2f.m, c2f.cv2
        for k in ("f", "i", "type", "np"):
            if hasattr(c2f, k):
                setattr(self, k, getattr(c2f, k))

    def forward(self, x):
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module) -> nn.Module:
    from ultralytics.nn.modules.block import C2f

    for name, child in list(model.named_children()):
        if isinstance(child, C2f):
            setattr(model, name, SplitC2f(child))
        else:
            split_c2f(child)
    return model


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp
    from ultralytics.nn.modules import Detect

    m = split_c2f(copy.deepcopy(model)).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    ignored = [mod for mod in m.modules() if isinstance(mod, Detect)]
    ignored += [mod for mod in m.modules() if type(mod).__name__ in ("C2PSA", "Attention")]  # split by (c, c)
    pruner = tp.pruner.BNScalePruner(m, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                     pruning_ratio=ratio, ignored_layers=ignored)  # fmt: skip
    pruner.step()
    return m.eval()


def match_macs(model: nn.Module, x: torch.Tensor, target: int) -> tuple[nn.Module, float]:
    """Torch-Pruning's ratio whose pruned model has ``target`` MACs (bisection; within 1%)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, x, mid)
        macs = count_macs_on(pruned, x)
        best = (pruned, mid, macs) if best is None or abs(macs - target) < abs(best[2] - target) else best
        if abs(macs - target) <= 0.01 * target:
            break
        lo, hi = (mid, hi) if macs > target else (lo, mid)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimexport-yolo-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "yolo_torch_pruning.json")
    a = ap.parse_args()
    data = a.work / "data" / "data.yaml"
    results = {}
    for model_dir in sorted(p for p in a.work.iterdir() if (p / "run-0" / "report.json").is_file()):
        rows = []
        for run in sorted(model_dir.glob("run-*")):
            cfg = json.loads((run / "config.json").read_text())
            rep = json.loads((run / "report.json").read_text())
            size, seed = cfg["image_size"], cfg["seed"]
            sparse, _ = ev.load_detector(run / "sparse.ckpt")
            x = ev.letterboxed(images_of(data, "val")[:1], size)
            pruned, ratio = match_macs(sparse, x, rep["pruned"]["macs"])
            tuned, rec = train_detector(pruned, data, a.work / model_dir.name / f"ul-tp-{seed}", cfg["refine_epochs"],
                                        size, seed=seed, **train_args(cfg["train_args"]))  # fmt: skip
            onnx = a.work / model_dir.name / f"tp-{seed}.onnx"
            ev.export_detector(tuned, onnx, ev.letterboxed(images_of(data, "val")[:8], size), {}, ExportConfig())
            row = {"seed": seed, "ratio": ratio, "macs": count_macs_on(tuned, x),
                   "slimexport_macs": rep["pruned"]["macs"], "params": sum(p.numel() for p in tuned.parameters()),
                   "map": ev.onnx_map(onnx, data, size),
                   "slimexport_map": rep["pruned"]["map"], "refine_seconds": rec["seconds"]}  # fmt: skip
            rows.append(row)
            print(model_dir.name, json.dumps(row), flush=True)
        diffs = [100 * (r["slimexport_map"]["map50_95"] - r["map"]["map50_95"]) for r in rows]
        results[model_dir.name] = {
            "rows": rows,
            "slimexport_minus_tp_pt": {
                "mean": statistics.mean(diffs),
                "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "n": len(diffs),
            },
        }
    import torch_pruning

    write_json(a.out, {
        "kind": "yolo_torch_pruning", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(), "machine": machine(),
        "versions": versions() | {"ultralytics": __import__("ultralytics").__version__,
                                  "torch_pruning": torch_pruning.__version__},
        "command": "python -m benchmarks.yolo_torch_pruning " + shlex.join(sys.argv[1:]),
        "results": results})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

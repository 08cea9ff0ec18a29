"""Ultralytics YOLOv8n and YOLO11n (built from their yaml, random weights and BN statistics) pruned 50% through the
Python API, exported to ONNX with parity, and timed beside the unpruned detector in onnxruntime at 640×640 (batch
1, one thread, interleaved, median). Needs the `yolo` extra (pip install -e '.[yolo]').

    python -m benchmarks.yolo [--seconds 5] [--round-to auto]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine_tag
from benchmarks.graph_coverage import randomize
from slimexport import export_onnx, prune_model
from slimexport.config import BenchConfig
from slimexport.fileio import write_json
from slimexport.prune import resolve_round_to
from slimexport.report import machine, versions
from slimexport.runtime import latency
from slimexport.stats import count_macs_on, count_params

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--percent", type=float, default=0.5)
    args = ap.parse_args()
    from ultralytics.nn.tasks import DetectionModel

    round_to, why = resolve_round_to(args.round_to)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in ("yolov8n.yaml", "yolo11n.yaml"):
            torch.manual_seed(0)
            m = randomize(DetectionModel(cfg, nc=80, verbose=False))
            x = torch.randn(1, 3, 640, 640)
            pruned, rec = prune_model(m, args.percent, example_input=x, round_to=round_to)
            paths, parity = {}, {}
            for name, model in (("baseline", m), ("pruned", pruned)):
                paths[name] = Path(tmp) / f"{cfg}-{name}.onnx"
                parity[name] = export_onnx(model, x, paths[name], atol=1e-2)["parity"]
            lat = latency(paths, (3, 640, 640), BenchConfig(batches=[1], threads=[1], seconds=args.seconds))
            ms = {r["model"]: r["median_ms"] for r in lat}
            row = {
                "model": cfg.removesuffix(".yaml"),
                "percent": args.percent,
                "round_to": round_to,
                "round_to_reason": why,
                "bn_channels_removed": rec["pruned_fraction"],
                "params": [count_params(m), count_params(pruned)],
                "macs_ratio": count_macs_on(m, x) / count_macs_on(pruned, x),
                "median_ms": ms,
                "speedup": ms["baseline"] / ms["pruned"],
                "parity_max_abs_diff": parity["pruned"]["max_abs_diff"],
                "unprunable": sorted({r for u in rec["unprunable"] for r in u["reasons"]})[:8],
            }
            rows.append(row)
            print(row, flush=True)
    out = ROOT / "results" / machine_tag() / "yolo.json"
    write_json(
        out,
        {
            "kind": "yolo",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine_tag": machine_tag(),
            "machine": machine(),
            "versions": versions() | {"ultralytics": __import__("ultralytics").__version__},
            "command": "python -m benchmarks.yolo " + shlex.join(sys.argv[1:]),
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

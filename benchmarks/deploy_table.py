"""The deploy table from `slimexport pipeline --int8` run directories: baseline FP32 → pruned FP32 → pruned INT8
(and baseline INT8), bytes, onnxruntime accuracy, latency at batch 1 and 32, the combined speed-up.

Usage (from the repository root): python -m benchmarks.deploy_table runs/deploy-vgg19-embedded [RUN ...]
Writes benchmarks/results/<machine-tag>/deploy.json (RESULTS.md renders it).
"""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from slimexport.fileio import write_json
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent


def summarize(run: Path) -> dict:
    r = json.loads((run / "report.json").read_text())
    rows = {v["name"]: v for v in r["variants"]}
    if "pruned-int8" not in rows:
        raise SystemExit(f"{run} has no INT8 variants: run the pipeline with --int8")
    q = r["stages"].get("quantize_pruned", {})
    return {
        "run": run.name,
        "arch": r["config"]["arch"],
        "dataset": r["config"]["data"],
        "percent": r["prune"]["percent"],
        "round_to": r["prune"]["round_to"],
        "params": {"baseline": r["baseline"]["params"], "pruned": r["pruned"]["params"]},
        "macs": {"baseline": r["baseline"]["macs"], "pruned": r["pruned"]["macs"]},
        "int8_types": rows["pruned-int8"].get("types"),
        "quantize_seconds": q.get("seconds"),
        "variants": [
            {k: v[k] for k in ("name", "bytes", "accuracy", "latency", "parity") if k in v} for v in r["variants"]
        ],
        "command": r["command"],
    }


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:]]
    if not runs:
        raise SystemExit(__doc__)
    out = ROOT / "results" / machine_tag() / "deploy.json"
    write_json(out, {
        "kind": "deploy",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.deploy_table " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
        "runs": [summarize(r) for r in runs],
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

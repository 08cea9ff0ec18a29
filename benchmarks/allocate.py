"""Issue 36's second figure: at one measured speed-up, latency-aware allocation (--allocate latency) against the
global |γ| threshold (--allocate gamma), after the same refine, over seeds, on a CPU-trainable set-up: the default
run (vgg11_w25 on the embedded Fashion-MNIST subset, `slimexport pipeline`) with --target-speedup X.

    python -m benchmarks.allocate [--target 2] [--seeds 0,1,2]

Per run: onnxruntime accuracy of baseline and pruned, the speed-up the pipeline's bench measured on the exported
models (batch 1, one thread; independent of the search), MACs and parameter ratios.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from slimexport.fileio import write_json
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimexport-allocate"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "allocate.json")
    a = ap.parse_args()
    rows = []
    for seed in a.seeds.split(","):
        for allocate in ("gamma", "latency"):
            out = a.work / f"{allocate}-{seed}"
            cmd = [sys.executable, "-m", "slimexport", "pipeline", "--out", str(out), "--force", "--seed", seed,
                   "--target-speedup", a.target, "--allocate", allocate, "--batch", "1", "--threads", "1",
                   "--seconds", "2"]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{shlex.join(cmd)} failed:\n{res.stderr[-3000:]}")
            rep = json.loads((out / "report.json").read_text())
            sp = next(s for s in rep["ratios"]["speedup"] if s["batch"] == 1 and s["threads"] == 1)
            row = {"seed": int(seed), "allocate": allocate, "baseline_accuracy": rep["baseline"]["accuracy"],
                   "accuracy": rep["pruned"]["accuracy"], "speedup": sp["speedup"], "macs_ratio": rep["ratios"]["macs"],
                   "params_ratio": rep["ratios"]["params"], "pruned_fraction": rep["prune"]["pruned_fraction"],
                   "search_retimed": rep["prune"]["latency_target"]["retimed"]["speedup"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    def stat(allocate: str, key: str) -> dict:
        xs = [r[key] for r in rows if r["allocate"] == allocate]
        return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    summary = {al: {k: stat(al, k) for k in ("accuracy", "speedup", "macs_ratio", "params_ratio")}
               for al in ("gamma", "latency")}  # fmt: skip
    diffs = [100 * (b["accuracy"] - g["accuracy"]) for g, b in zip(rows[0::2], rows[1::2])]
    summary["latency_minus_gamma_pt"] = {"mean": statistics.mean(diffs),
                                         "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}  # fmt: skip
    write_json(a.out, {"kind": "allocate", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
                       "command": "python -m benchmarks.allocate " + shlex.join(sys.argv[1:]), "target": a.target,
                       "rows": rows, "summary": summary})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

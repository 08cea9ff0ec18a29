#!/usr/bin/env python3
"""Is channels-last faster for CPU training on this machine? One training step (forward, backward, SGD step) of
each model at batch 128, 32×32, in the default (contiguous) and channels-last memory formats, interleaved step by
step so both see the same machine noise; medians and their ratio.

Writes benchmarks/results/<machine-tag>/channels-last.json.
Usage: python -m benchmarks.channels_last [--steps 15] [--models vgg19 vgg11_w25 preresnet20 torchvision:resnet18]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.common import machine_tag
from slimexport.fileio import write_json
from slimexport.models import create_model
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent


def step_times(arch: str, steps: int, batch: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    cfg = {"source": arch, "image_size": [32, 32]} if ":" in arch else None
    models = {fmt: create_model(arch, 10, 3, cfg) for fmt in ("contiguous", "channels_last")}
    models["channels_last"].load_state_dict(models["contiguous"].state_dict())
    models["channels_last"].to(memory_format=torch.channels_last)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 3):  # 3 warm-up steps each
        for k, m in models.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(inputs[k]), y)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["vgg19", "vgg11_w25", "preresnet20", "torchvision:resnet18"])
    args = ap.parse_args()
    rows = []
    for arch in args.models:
        t = step_times(arch, args.steps, args.batch)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append({"model": arch, "median_s": med, "speedup": med["contiguous"] / med["channels_last"]})
        print(f"{arch}: contiguous {med['contiguous']:.3f} s, channels-last {med['channels_last']:.3f} s, "
              f"×{rows[-1]['speedup']:.2f}", flush=True)  # fmt: skip
    out = ROOT / "results" / machine_tag() / "channels-last.json"
    write_json(
        out,
        {
            "kind": "channels_last",
            "batch": args.batch,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "models": rows,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine_tag": machine_tag(),
            "machine": machine(),
            "versions": versions(),
            "command": "python -m benchmarks.channels_last " + shlex.join(sys.argv[1:]),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

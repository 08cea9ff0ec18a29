"""Issue 36's INT8 fallback: when INT8 loses more than --int8-max-drop, which convolutions go back to FP32. Ranked by
measurement (NNCF's accuracy control: each conv alone back in FP32 on a ranking subset of calibration images, what
`--int8-keep auto` does, :func:`slimexport.deploy.rank_layers`) against ranked by weight error (per-channel INT8
error of the weights, data-free: what it did before).

    python -m benchmarks.int8_keep [--archs vgg11_w25,torchvision:mobilenet_v2] [--epochs 6] [--seeds 0,1,2]

Per architecture and seed: a model trained --epochs on the embedded Fashion-MNIST subset (seeded) and exported;
plain INT8's drop against FP32 (onnxruntime, the 2000 test images); then, with the budget at --budget of that drop,
each ranking's convs go back to FP32 one at a time (as `--int8-keep auto` does) until the drop fits or half the
convs are back: how many convs it took, the drop left, and INT8's latency against FP32's (batch 1, one thread, side
by side). `--per-tensor`: per-tensor weight scales, where INT8 loses accuracy (with per-channel scales these models
lose none, and nothing falls back). The budget is relative so that every run needs a fallback; the speed gate of
`--int8-keep auto` (INT8 must be faster than FP32 here) is left out, so both rankings are compared on every model.

Writes benchmarks/results/<machine>/int8_keep.json; finished rows are kept in --work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine_tag
from slimexport.config import QuantizeConfig, preset_config
from slimexport.data import load_dataset
from slimexport.deploy import _ms_b1, compare, quantize_onnx, rank_layers, weight_errors
from slimexport.export import export
from slimexport.fileio import write_json
from slimexport.report import machine, versions
from slimexport.train import train

ROOT = Path(__file__).resolve().parent


def _fall_back(onnx: Path, out: Path, images, cfg: QuantizeConfig, ds, ranked: list[str], budget: float) -> dict:
    """Put ``ranked`` convs back to FP32 one at a time until the drop is within ``budget`` (or half are back)."""
    tries = []
    for k in range(1, max(1, len(ranked) // 2) + 1):
        m = quantize_onnx(onnx, out, images, cfg, lambda dst: compare(onnx, dst, ds), exclude=ranked[:k])["measured"]
        tries.append({"fp32_convs": k, "drop": m["reference_accuracy"] - m["accuracy"]})
        if tries[-1]["drop"] <= budget:
            break
    fp32_ms, int8_ms = _ms_b1(onnx, out, (ds.in_channels, *ds.image_size))
    last = tries[-1]
    return {"fits": last["drop"] <= budget, "fp32_convs": last["fp32_convs"], "drop": last["drop"],
            "int8_ms": int8_ms, "fp32_ms": fp32_ms, "tries": tries, "order": ranked}  # fmt: skip


def one(arch: str, seed: int, epochs: int, budget_share: float, per_channel: bool) -> dict:
    ds = load_dataset("embedded")
    with tempfile.TemporaryDirectory(prefix="int8-keep-") as tmp:
        tmp = Path(tmp)
        train(tmp / "m.pt", ds, preset_config("fast", epochs, device="cpu", seed=seed), arch=arch)
        export(tmp / "m.pt", tmp / "m.onnx", ds)
        onnx, out = tmp / "m.onnx", tmp / "m.int8.onnx"
        cfg = QuantizeConfig(seed=seed, per_channel=per_channel)
        idx = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))  # quantize's subset
        images = ds.normalize(ds.x_train[idx[: cfg.calib_images]]).numpy()
        plain = quantize_onnx(onnx, out, images, cfg, lambda dst: compare(onnx, dst, ds))["measured"]
        drop = plain["reference_accuracy"] - plain["accuracy"]
        row = {"arch": arch, "seed": seed, "epochs": epochs, "per_channel": per_channel,
               "fp32_accuracy": plain["reference_accuracy"],
               "int8_drop": drop, "convs": len(weight_errors(onnx))}  # fmt: skip
        if drop <= 0:
            return row | {"note": "plain INT8 lost nothing: no fallback to compare"}
        budget = budget_share * drop
        t0 = time.perf_counter()
        measured = [r["layer"] for r in rank_layers(onnx, out, images, cfg)]
        row |= {"budget": budget, "ranking_seconds": time.perf_counter() - t0}
        row["measured"] = _fall_back(onnx, out, images, cfg, ds, measured, budget)
        row["weight_error"] = _fall_back(onnx, out, images, cfg, ds, [n for n, _ in weight_errors(onnx)], budget)
        return row


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for arch in sorted({r["arch"] for r in rows}):
        rs = [r for r in rows if r["arch"] == arch and "measured" in r]
        if not rs:
            continue
        out[arch] = {"runs": len(rs), "int8_drop": _stat([r["int8_drop"] for r in rs])}
        for sub in ("measured", "weight_error"):
            runs = [r[sub] for r in rs]
            out[arch][sub] = {"fp32_convs": _stat([x["fp32_convs"] for x in runs]),
                              "drop": _stat([x["drop"] for x in runs]), "fits": sum(x["fits"] for x in runs),
                              "speedup_vs_fp32": _stat([x["fp32_ms"] / x["int8_ms"] for x in runs])}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="vgg11_w25,torchvision:mobilenet_v2")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=float, default=0.5, help="the budget as a share of plain INT8's drop")
    ap.add_argument(
        "--per-tensor",
        action="store_true",
        help="per-tensor weight scales (as some NPUs require): "
        "INT8 then loses accuracy where per-channel scales lose none, and the fallback has work to do",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "int8_keep")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "int8_keep.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in a.archs.split(","):
        for seed in map(int, a.seeds.split(",")):
            done = a.work / f"{arch.replace(':', '_')}-{seed}-{a.epochs}-{'tensor' if a.per_tensor else 'channel'}.json"
            row = (
                json.loads(done.read_text())
                if done.is_file()
                else one(arch, seed, a.epochs, a.budget, not a.per_tensor)
            )
            done.write_text(json.dumps(row))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("measured", "weight_error")}), flush=True)
    write_json(a.out, {
        "kind": "int8_keep", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
        "command": "python -m benchmarks.int8_keep " + shlex.join(sys.argv[1:]), "rows": rows,
        "summary": _summary(rows)})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

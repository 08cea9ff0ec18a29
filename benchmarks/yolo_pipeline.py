"""Issue 35's figures: YOLOv8n and YOLO11n through `slimexport pipeline` on the offline Fashion-MNIST detection
set, against the control (the baseline trained the same extra epochs without pruning), over seeds.

For each model: a baseline trained by Ultralytics' trainer from its yaml (seed 0), saved as an Ultralytics .pt;
then per seed the pipeline from it with --baseline-epochs 0 (sparse, prune, refine, export, INT8, mAP in
onnxruntime, latency at the training size and 640, batch 1, one thread) and the control: the baseline trained
--sparse-epochs + --refine-epochs more epochs with the same seed, exported and measured the same way.

    python -m benchmarks.yolo_pipeline [--models yolov8n,yolo11n] [--seeds 0,1,2] [--image-size 128]

Writes benchmarks/results/<machine>/yolo_pipeline.json (only when every run finished).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine_tag
from slimexport.config import ExportConfig
from slimexport.detect import evaluate as ev
from slimexport.detect.data import images_of, make_dataset
from slimexport.detect.train import train_detector
from slimexport.fileio import write_json
from slimexport.report import machine, versions

ROOT = Path(__file__).resolve().parent


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="yolov8n,yolo11n")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--baseline-epochs", type=int, default=30)
    ap.add_argument("--sparse-epochs", type=int, default=10)
    ap.add_argument("--refine-epochs", type=int, default=10)
    ap.add_argument("--sparsity", default="3e-3")
    ap.add_argument("--percent", default=None, help="(default: --max-macs)")
    ap.add_argument("--max-macs", default="0.45", help="the fraction of the MACs kept (the issue's aim: ×2 fewer)")
    ap.add_argument("--train-args", default="nbs=16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimexport-yolo-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "yolo_pipeline.json")
    return ap.parse_args()


def _train_args(text: str) -> dict:
    from slimexport.detect.pipeline import train_args

    return train_args(text)


def _baseline(a, model: str, data: Path) -> tuple[Path, dict]:
    pt = a.work / model / "baseline.pt"
    if pt.is_file():
        return pt, json.loads((a.work / model / "baseline.json").read_text())
    net = ev.read_user_model(f"{model}.yaml")
    net = ev.build(net.yaml, 10, None, model)
    trained, rec = train_detector(net, data, a.work / model / "ul-baseline", a.baseline_epochs, a.image_size,
                                  seed=0, **_train_args(a.train_args))  # fmt: skip
    ev.save_ultralytics(trained, pt)
    (a.work / model / "baseline.json").write_text(json.dumps(rec))
    return pt, rec


def _control(a, model: str, data: Path, pt: Path, seed: int) -> dict:
    done = a.work / model / f"control-{seed}.json"  # it does not depend on the prune settings: kept across reruns
    if done.is_file():
        return json.loads(done.read_text())
    net = ev.read_user_model(pt)
    t0 = time.perf_counter()
    trained, rec = train_detector(net, data, a.work / model / f"ul-control-{seed}",
                                  a.sparse_epochs + a.refine_epochs, a.image_size, seed=seed,
                                  **_train_args(a.train_args))  # fmt: skip
    onnx = a.work / model / f"control-{seed}.onnx"
    sample = ev.letterboxed(images_of(data, "val")[:8], a.image_size)
    ev.export_detector(trained, onnx, sample, {}, ExportConfig())
    res = {"seconds": time.perf_counter() - t0, "epochs": rec["epochs"], "map": ev.onnx_map(onnx, data, a.image_size)}
    done.write_text(json.dumps(res))
    return res


def _pipeline(a, model: str, data: Path, pt: Path, seed: int) -> dict:
    out = a.work / model / f"run-{seed}"
    cmd = [sys.executable, "-m", "slimexport", "pipeline", "--arch", f"ultralytics:{pt}", "--dataset",
           f"ultralytics:{data}", "--out", str(out), "--force", "--baseline-epochs", "0",
           "--epochs", str(a.sparse_epochs), "--refine-epochs", str(a.refine_epochs), "--image-size",
           str(a.image_size), "--sparsity", a.sparsity, "--seed", str(seed),
           *(["--percent", a.percent] if a.percent else ["--max-macs", a.max_macs]),
           "--train-args", a.train_args, "--int8", "--batch", "1", "--threads", "1", "--seconds", "3"]  # fmt: skip
    t0 = time.perf_counter()
    if (out / "report.json").is_file() and json.loads((out / "config.json").read_text())["seed"] == seed:
        seconds = sum(v["seconds"] for v in json.loads((out / "stages.json").read_text()).values())  # a finished run
    else:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{res.stderr[-3000:]}")
        seconds = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "command": shlex.join(["slimexport", *cmd[3:]]), "report": {
        k: rep[k] for k in ("baseline", "pruned", "ratios", "int8", "training", "prune")}}  # fmt: skip


def _summary(rows: list[dict]) -> dict:
    def ms(xs):
        return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    pr = [r["pipeline"]["report"] for r in rows]
    speed = {}
    for s in pr[0]["ratios"]["speedup"]:
        key = (s["batch"], s["threads"], s["image_size"])
        speed[f"{key[2]}px_b{key[0]}_t{key[1]}"] = ms([next(x["speedup"] for x in p["ratios"]["speedup"]
                                                             if (x["batch"], x["threads"], x["image_size"]) == key)
                                                        for p in pr])  # fmt: skip
    return {
        "baseline_map50_95": pr[0]["baseline"]["map"]["map50_95"],
        "pruned_map50_95": ms([p["pruned"]["map"]["map50_95"] for p in pr]),
        "control_map50_95": ms([r["control"]["map"]["map50_95"] for r in rows]),
        "pruned_minus_control_pt": ms(
            [100 * (p["pruned"]["map"]["map50_95"] - r["control"]["map"]["map50_95"]) for p, r in zip(pr, rows)]
        ),  # fmt: skip
        "pruned_int8_map50_95": ms([p["int8"]["pruned.int8"]["map50_95"] for p in pr]),
        "params_ratio": ms([p["ratios"]["params"] for p in pr]),
        "macs_ratio": ms([p["ratios"]["macs"] for p in pr]),
        "speedup": speed,
        "pipeline_seconds": ms([r["pipeline"]["seconds"] for r in rows]),
        "control_seconds": ms([r["control"]["seconds"] for r in rows]),
    }


def main() -> None:
    a = _args()
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / "data" / "data.yaml"
    if not data.is_file():
        make_dataset(data.parent, train=a.train, val=a.val, image_size=a.image_size, seed=0, force=True)
    results = {}
    for model in a.models.split(","):
        pt, base_rec = _baseline(a, model, data)
        rows = []
        for seed in (int(s) for s in a.seeds.split(",")):
            rows.append({"seed": seed, "pipeline": _pipeline(a, model, data, pt, seed),
                         "control": _control(a, model, data, pt, seed)})  # fmt: skip
            print(model, seed, json.dumps(_summary(rows)), flush=True)
        results[model] = {"baseline_training": base_rec, "summary": _summary(rows), "rows": rows}
    out = a.out
    write_json(out, {
        "kind": "yolo_pipeline", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine_tag": machine_tag(), "machine": machine(),
        "versions": versions() | {"ultralytics": __import__("ultralytics").__version__},
        "command": "python -m benchmarks.yolo_pipeline " + shlex.join(sys.argv[1:]), "settings": vars(a) | {
            "work": str(a.work), "out": str(a.out)}, "results": results})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

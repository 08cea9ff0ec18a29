"""Image folders at realistic resolution (issue 25): memory and speed of streaming against the in-memory path, bf16
against fp32 training steps, and the whole pipeline from a trained baseline on JPEG files.

    python -m benchmarks.imagefolder_scale write DIR --size 224 --train 20000 --val 1000   # CIFAR-10 as JPEGs
    python -m benchmarks.imagefolder_scale memory DIR --arch vgg11_w12        # peak RSS, img/s: --data-cache off, ram
    python -m benchmarks.imagefolder_scale throughput DIR --arch torchvision:resnet18
    python -m benchmarks.imagefolder_scale precision --size 224       # one training step, fp32 vs bf16, and auto
    python -m benchmarks.imagefolder_scale precision-accuracy         # test accuracy fp32 vs bf16 over 3 seeds
    python -m benchmarks.imagefolder_scale pipeline DIR --arch torchvision:mobilenet_v2   # trained baseline → pipeline

CIFAR-10 comes from DATA/cifar10.npz (``python3 ../shared/tools/fetch_cifar10.py DATA``), upscaled to the size
asked (bicubic) and written as JPEG quality 90. Each command adds its figures to
``benchmarks/results/<machine>/imagefolder-scale.json`` (rendered into RESULTS.md). Memory is the peak resident
set (VmHWM) of the training process, and, separately, the largest total PSS (private memory plus a share of
what they share with the main process) of its DataLoader workers, polled every 0.2 s. Run them one at a time:
two jobs on two cores slow each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.common import machine_tag

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _out_file() -> Path:
    return RESULTS / machine_tag() / "imagefolder-scale.json"


def _save(key: str, value: dict) -> None:
    from slimexport.fileio import write_json
    from slimexport.runtime import machine_facts

    path = _out_file()
    data = json.loads(path.read_text()) if path.is_file() else {"kind": "imagefolder_scale", "runs": {}}
    data["machine_tag"], data["machine"] = machine_tag(), machine_facts()
    value |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.imagefolder_scale " + shlex.join(sys.argv[1:])}  # fmt: skip
    data["runs"][key] = value
    write_json(path, data)
    print(json.dumps(value, indent=1))


def write(args) -> None:
    from PIL import Image

    z = np.load(Path(args.data_dir).expanduser() / "cifar10.npz")
    names = [str(s) for s in z["label_names"]] if "label_names" in z.files else [str(i) for i in range(10)]
    t0 = time.perf_counter()
    for split, key, n in (("train", "train", args.train), ("val", "test", args.val)):
        x, y = z[f"x_{key}"][:n], z[f"y_{key}"][:n].reshape(-1)
        for c in names:
            (args.dir / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(x, y)):
            im = Image.fromarray(img).resize((args.size, args.size), Image.BICUBIC)
            im.save(args.dir / split / names[int(label)] / f"{i:06d}.jpg", quality=90)
    files = sum(1 for _ in args.dir.rglob("*.jpg"))
    size = sum(p.stat().st_size for p in args.dir.rglob("*.jpg"))
    print(f"{files} JPEGs at {args.size}×{args.size}, {size / 2**20:.0f} MiB, in {time.perf_counter() - t0:.0f} s")


def _tree(pid: int) -> list[int]:
    """pid's descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
                out += map(int, kids)
                todo += map(int, kids)
        except OSError:
            pass
    return out


def _kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: a worker's private memory plus its share of pages shared with its parent (RSS would
    count the libraries and copy-on-write pages a forked worker shares, once per worker)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its peak RSS (VmHWM, polled to its end), its workers' largest total PSS, and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main_peak = workers_peak = 0
    while proc.poll() is None:
        main_peak = max(main_peak, _kb(proc.pid, "VmHWM"))
        workers_peak = max(workers_peak, sum(_pss_kb(p) for p in _tree(proc.pid)))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed: {err.strip().splitlines()[-1:]}")
    return {"main_peak_mib": main_peak / 1024, "workers_peak_mib": workers_peak / 1024,
            "wall_s": time.perf_counter() - t0, "stdout": out.strip().splitlines()[-1:]}  # fmt: skip


def _train(dir_: Path, arch: str, cache: str, size: int, epochs: int, batch: int, out: Path, extra=()) -> dict:
    cmd = [sys.executable, "-m", "slimexport", "train", "--arch", arch, "--dataset", f"imagefolder:{dir_}",
           "--image-size", str(size), "--data-cache", cache, "--epochs", str(epochs), "--batch-size", str(batch),
           "--device", "cpu", "--precision", "fp32", "--out", str(out), "--force", *extra]  # fmt: skip
    m = _measured(cmd)
    from slimexport.checkpoint import read_checkpoint

    meta = read_checkpoint(out)["meta"]
    m |= {"images_per_s": meta["images_per_s"], "train_seconds": meta["train_seconds"], "accuracy": meta["accuracy"],
          "cache": cache}  # fmt: skip
    return m


def _images(dir_: Path) -> dict:
    return {s: sum(1 for _ in (dir_ / s).rglob("*.jpg")) for s in ("train", "val")}


def memory(args) -> None:
    work = ROOT / "benchmarks" / "work" / "imagefolder"
    work.mkdir(parents=True, exist_ok=True)
    n = _images(args.dir)
    old = json.loads(_out_file().read_text())["runs"] if _out_file().is_file() else {}
    rows = dict(old.get(f"memory-{args.arch}-{args.size}", {}).get("rows", {}))  # rerun one cache, keep the other
    for cache in args.caches.split(","):
        rows[cache] = _train(args.dir, args.arch, cache, args.size, 1, args.batch, work / f"mem-{cache}.pt")
        print(cache, rows[cache])
    decoded = (n["train"] + n["val"]) * 3 * args.size**2 / 2**20
    _save(f"memory-{args.arch}-{args.size}", {"arch": args.arch, "size": args.size, "images": n, "batch": args.batch,
                                              "decoded_mib": decoded, "rows": rows})  # fmt: skip


def throughput(args) -> None:
    work = ROOT / "benchmarks" / "work" / "imagefolder"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for cache in ("ram", "off"):
        rows[cache] = _train(args.dir, args.arch, cache, args.size, args.epochs, args.batch, work / f"tp-{cache}.pt")
        print(cache, f"{rows[cache]['images_per_s']:.1f} img/s")
    ratio = rows["off"]["images_per_s"] / rows["ram"]["images_per_s"]
    facts = {"arch": args.arch, "size": args.size, "images": _images(args.dir), "batch": args.batch}
    _save(f"throughput-{args.arch}-{args.size}", facts | {"rows": rows, "off_over_ram": ratio})


def precision(args) -> None:
    import torch

    from slimexport.data import from_arrays
    from slimexport.models import create_model
    from slimexport.precision import _probe_step_times, choose_precision
    from slimexport.runtime import machine_facts

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    n = args.batch
    ds = from_arrays("random", rng.integers(0, 255, (n, args.size, args.size, 3), np.uint8), np.arange(n) % 10,
                     rng.integers(0, 255, (10, args.size, args.size, 3), np.uint8),
                     np.arange(10) % min(n, 10))  # fmt: skip
    rows = {}
    for arch in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(arch, 10, 3)
        times = _probe_step_times(model, ds, torch.device("cpu"), n, args.steps)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        chosen, why = choose_precision("auto", model, ds, torch.device("cpu"), n, args.steps)
        rows[arch] = {"fp32_ms": med["fp32"] * 1e3, "bf16_ms": med["bf16"] * 1e3, "speedup": med["fp32"] / med["bf16"],
                      "auto": chosen, "auto_reason": why}  # fmt: skip
        print(arch, rows[arch])
    _save(f"precision-{args.size}", {"size": args.size, "batch": n, "steps": args.steps, "bf16_native":
                                     machine_facts()["bf16"], "rows": rows})  # fmt: skip


def precision_accuracy(args) -> None:
    """Test accuracy after training in fp32 and in bf16 autocast, over seeds (mean ± sd): is bf16 within noise?"""
    import statistics

    from slimexport.checkpoint import read_checkpoint

    work = ROOT / "benchmarks" / "work" / "imagefolder"
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for precision in ("fp32", "bf16"):
        accs, secs = [], []
        for seed in range(args.seeds):
            out = work / f"prec-{precision}-{seed}.pt"
            _measured([sys.executable, "-m", "slimexport", "train", "--arch", args.arch, "--dataset", args.dataset,
                       "--epochs", str(args.epochs), "--seed", str(seed), "--precision", precision, "--device", "cpu",
                       "--out", str(out), "--force"])  # fmt: skip
            meta = read_checkpoint(out)["meta"]
            accs.append(100 * meta["accuracy"])
            secs.append(meta["train_seconds"])
        rows[precision] = {"accuracies": accs, "mean": statistics.mean(accs), "sd": statistics.stdev(accs),
                           "train_seconds": statistics.median(secs)}  # fmt: skip
        print(precision, rows[precision])
    _save(f"precision-accuracy-{args.arch}", {"arch": args.arch, "dataset": args.dataset, "epochs": args.epochs,
                                              "rows": rows})  # fmt: skip


def pipeline(args) -> None:
    work = ROOT / "benchmarks" / "work" / "imagefolder"
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"trained-{args.arch.replace(':', '-')}.pt"
    data = ["--dataset", f"imagefolder:{args.dir}", "--image-size", str(args.size), "--data-cache", args.cache,
            "--device", "cpu", "--precision", "fp32", "--batch-size", str(args.batch)]  # fmt: skip
    trained = _measured([sys.executable, "-m", "slimexport", "train", "--arch", args.arch, *data, "--epochs",
                         str(args.baseline_epochs), "--out", str(base), "--force"])  # fmt: skip
    run = work / f"pipeline-{args.arch.replace(':', '-')}"
    piped = _measured([sys.executable, "-m", "slimexport", "pipeline", "--arch", args.arch, "--baseline", str(base),
                       "--baseline-epochs", "0", *data, "--epochs", str(args.epochs), "--refine-epochs",
                       str(args.refine_epochs), "--percent", str(args.percent), "--batch", "1,32", "--threads", "1",
                       "--out", str(run), "--force"])  # fmt: skip
    r = json.loads((run / "report.json").read_text())
    sp = {f"b{s['batch']}_t{s['threads']}": s["speedup"] for s in r["ratios"]["speedup"]}
    _save(f"pipeline-{args.arch}-{args.size}", {
        "arch": args.arch, "size": args.size, "images": _images(args.dir), "cache": args.cache,
        "baseline_epochs": args.baseline_epochs, "epochs": args.epochs, "refine_epochs": args.refine_epochs,
        "percent": args.percent, "baseline_train": trained, "pipeline": piped,
        "accuracy": {"baseline": r["baseline"]["accuracy"], "sparse": r["pruned"]["sparse_accuracy"],
                     "before_refine": r["pruned"]["accuracy_before_refine"], "refined": r["pruned"]["accuracy"]},
        "params": [r["baseline"]["params"], r["pruned"]["params"]],
        "macs": [r["baseline"]["macs"], r["pruned"]["macs"]],
        "speedup": sp, "stage_seconds": {k: v["seconds"] for k, v in r["stages"].items()},
    })  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir", type=Path)
    w.add_argument("--data-dir", default="~/data")
    w.add_argument("--size", type=int, default=224)
    w.add_argument("--train", type=int, default=20000)
    w.add_argument("--val", type=int, default=1000)
    for name, arch, size, batch in (("memory", "vgg11_w12", 224, 64), ("throughput", "torchvision:resnet18", 224, 32),
                                    ("pipeline", "torchvision:mobilenet_v2", 128, 64)):  # fmt: skip
        s = sub.add_parser(name)
        s.add_argument("dir", type=Path)
        s.add_argument("--arch", default=arch)
        s.add_argument("--size", type=int, default=size)
        s.add_argument("--batch", type=int, default=batch)
        s.add_argument("--epochs", type=int, default=1)
        if name == "memory":
            s.add_argument("--caches", default="off,ram")
        if name == "pipeline":
            s.add_argument("--baseline-epochs", type=int, default=4)
            s.add_argument("--refine-epochs", type=int, default=2)
            s.add_argument("--percent", type=float, default=0.5)
            s.add_argument("--cache", default="off")
    pr = sub.add_parser("precision")
    pr.add_argument("--size", type=int, default=224)
    pr.add_argument("--batch", type=int, default=16)
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--models", default="torchvision:vgg11_bn,torchvision:resnet18,torchvision:mobilenet_v2")
    pa = sub.add_parser("precision-accuracy")
    pa.add_argument("--arch", default="vgg11_w25")
    pa.add_argument("--dataset", default="embedded")
    pa.add_argument("--epochs", type=int, default=3)
    pa.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    {
        "precision-accuracy": precision_accuracy,
        "write": write,
        "memory": memory,
        "throughput": throughput,
        "precision": precision,
        "pipeline": pipeline,
    }[args.cmd](args)


if __name__ == "__main__":
    main()

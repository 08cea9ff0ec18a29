"""The whole workflow into one run directory: baseline → sparse → prune → refine → export ×2 → bench → report.

The run is built in a hidden sibling directory and renamed into place only when it completes, so an
interrupted run leaves any earlier run directory as it was; an existing run directory is replaced only with
``force``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimexport.bench import BenchConfig, bench, provider_for
from slimexport.checkpoint import load_checkpoint, make_checkpoint, read_checkpoint, save_checkpoint
from slimexport.console import console
from slimexport.data import EMBEDDED, load_dataset
from slimexport.errors import CheckpointError, ConfigError, OutputExistsError
from slimexport.export import ExportConfig, export
from slimexport.fileio import write_json
from slimexport.models import create_model, default_config
from slimexport.prune import bn_gammas, check_percent, check_prune_stream, prune
from slimexport.report import build_report, plot_channels, plot_gammas, plot_latency, write_report
from slimexport.stats import count_macs, count_params
from slimexport.train import PRESETS, TrainConfig, data_meta, evaluate, resolve_device, train

DEFAULT_ARCH = "vgg11_w25"


@dataclass
class PipelineConfig:
    out: str = "runs/slim"
    arch: str | None = None  # None: DEFAULT_ARCH, or the --baseline checkpoint's
    dataset: str = EMBEDDED
    data_dir: str | None = None
    epochs: int = 10  # baseline and sparse training, each
    refine_epochs: int = 10
    sparsity: float = 3e-3
    percent: float = 0.6
    min_channels: int = 1
    round_to: int = 1
    prune_stream: bool = False  # residual networks: also prune the stream (beyond the paper's rules)
    eval_every: int | None = None  # None: only after the last epoch of each stage
    compile: bool = False  # torch.compile the training forward
    baseline: str | None = None
    sparse: str | None = None  # reuse a sparse-trained checkpoint (e.g. to sweep --percent)
    preset: str = "fast"
    lr: float | None = None  # None: the preset's
    refine_lr: float | None = None  # None: lr / 5
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    force: bool = False
    bench: BenchConfig = field(default_factory=BenchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        check_percent(self.percent)
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}: {', '.join(PRESETS)}")
        if self.epochs < 1 or self.refine_epochs < 1:
            raise ConfigError("--epochs and --refine-epochs must be at least 1")
        if self.sparsity <= 0:
            raise ConfigError(f"--sparsity must be positive for network slimming, got {self.sparsity}")
        self.bench.validate()

    def train_config(self, epochs: int, sparsity: float, lr: float | None) -> TrainConfig:
        p = PRESETS[self.preset]
        return TrainConfig(
            epochs=epochs,
            lr=lr or p["lr"],
            batch_size=self.batch_size or p["batch_size"],
            weight_decay=p["weight_decay"],
            schedule=p["schedule"],
            sparsity=sparsity,
            seed=self.seed,
            device=self.device,
            eval_every=self.eval_every or epochs,
            compile=self.compile,
        )


def _reuse(src: Path, dst: Path, ds, device: torch.device) -> dict[str, Any]:
    """Copy a given checkpoint into the run (re-measuring its accuracy on this data set); returns its meta."""
    model, ck = load_checkpoint(src)
    if (ck["num_classes"], ck["in_channels"]) != (ds.num_classes, ds.in_channels):
        raise CheckpointError(
            f"{src} is for {ck['num_classes']} classes and {ck['in_channels']} channels; "
            f"{ds.name} has {ds.num_classes} and {ds.in_channels}"
        )
    meta = ck["meta"] | {"accuracy": evaluate(model, ds, device), "reused": str(src)}
    save_checkpoint(make_checkpoint(model.cpu(), data_meta(ds), meta), dst)
    return meta


def _stage_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """What a training stage reports: its accuracy, its speed, and where a reused checkpoint came from."""
    facts = {"accuracy": meta["accuracy"], "images_per_s": meta.get("images_per_s")}
    return facts | ({"reused": meta["reused"]} if "reused" in meta else {})


def run_pipeline(cfg: PipelineConfig, command: str = "") -> dict[str, Any]:
    """Run every stage; returns the report (also written to ``cfg.out``/report.json)."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise OutputExistsError(f"run directory {out} already exists; pass --force to replace it")
    device = resolve_device(cfg.device)
    if cfg.bench.device == "cuda":
        provider_for("cuda")
    baseline_src = Path(cfg.baseline) if cfg.baseline else None
    if baseline_src is not None:
        ck = read_checkpoint(baseline_src)
        if cfg.arch is not None and ck["arch"] != cfg.arch:
            raise CheckpointError(f"--baseline {baseline_src} holds a {ck['arch']} model, not the requested {cfg.arch}")
        cfg.arch = ck["arch"]
    if cfg.sparse is not None:
        ck = read_checkpoint(cfg.sparse)
        if cfg.arch is not None and ck["arch"] != cfg.arch:
            raise CheckpointError(
                f"--sparse {cfg.sparse} holds a {ck['arch']} model, not the {cfg.arch} of the baseline"
            )
        cfg.arch = ck["arch"]
    cfg.arch = cfg.arch or DEFAULT_ARCH
    try:  # fail now, not after loading data or training
        default_config(cfg.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.prune_stream:
        check_prune_stream(create_model(cfg.arch, 10, 3), True)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    console.print(f"[bold]slimexport pipeline[/] {cfg.arch} on {ds.summary()}, device {device}")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        report = _run(cfg, ds, device, work, baseline_src, command)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _run(
    cfg: PipelineConfig, ds, device: torch.device, work: Path, baseline_src: Path | None, command: str
) -> dict[str, Any]:
    config = asdict(cfg) | {"resolved_device": str(device), "data": ds.summary()}
    write_json(work / "config.json", config)
    stages: dict[str, dict[str, Any]] = {}
    size = ds.image_size

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        res = fn(*a, **kw)
        stages[name] = {"seconds": time.perf_counter() - t0}
        return res

    base_ckpt = work / "baseline.pt"
    if baseline_src is None:
        meta = timed("baseline", train, base_ckpt, ds, cfg.train_config(cfg.epochs, 0.0, cfg.lr), arch=cfg.arch)
    else:
        meta = timed("baseline", _reuse, baseline_src, base_ckpt, ds, device)
    stages["baseline"] |= _stage_facts(meta)

    sparse_ckpt = work / "sparse.pt"
    if cfg.sparse is None:
        meta = timed(
            "sparse", train, sparse_ckpt, ds, cfg.train_config(cfg.epochs, cfg.sparsity, cfg.lr), arch=cfg.arch
        )
    else:
        meta = timed("sparse", _reuse, Path(cfg.sparse), sparse_ckpt, ds, device)
    stages["sparse"] |= _stage_facts(meta)
    sparse_acc = meta["accuracy"]

    pruned_ckpt = work / "pruned.pt"
    meta = timed(
        "prune",
        prune,
        sparse_ckpt,
        pruned_ckpt,
        cfg.percent,
        cfg.min_channels,
        ds=ds,
        round_to=cfg.round_to,
        prune_stream=cfg.prune_stream,
        device=str(device),
    )
    record = meta["prune"]
    stages["prune"] |= {"accuracy": meta["accuracy"]}
    before_refine = meta["accuracy"]

    refined_ckpt = work / "refined.pt"
    refine_lr = cfg.refine_lr or (cfg.lr or PRESETS[cfg.preset]["lr"]) / 5
    meta = timed(
        "refine",
        train,
        refined_ckpt,
        ds,
        cfg.train_config(cfg.refine_epochs, 0.0, refine_lr),
        init=pruned_ckpt,
        stage="refined",
    )
    stages["refine"] |= {"accuracy": meta["accuracy"], "images_per_s": meta["images_per_s"]}

    models = {}
    for name, ckpt in (("baseline", base_ckpt), ("pruned", refined_ckpt)):
        ex = timed(f"export_{name}", export, ckpt, work / f"{name}.onnx", ds, cfg.export)
        model, ck = load_checkpoint(ckpt)
        models[name] = {
            "params": count_params(model),
            "macs": count_macs(model, ds.in_channels, size),
            "checkpoint": ckpt.name,
            "onnx": f"{name}.onnx",
            "onnx_bytes": ex["onnx_bytes"],
            "torch_accuracy": ck["meta"]["accuracy"],
            "parity": ex["parity"],
            "op_counts": ex["op_counts"],
        }

    res = timed("bench", bench, {n: work / f"{n}.onnx" for n in models}, ds, cfg.bench)
    for name, m in models.items():
        m["latency"] = [
            {k: r[k] for k in ("provider", "batch", "threads", "median_ms", "p90_ms", "runs")}
            for r in res["latency"]
            if r["model"] == name
        ]
        m["accuracy"] = res["models"][name].get("accuracy")
        if "op_time" in res["models"][name]:
            m["op_time"] = res["models"][name]["op_time"]
    models["pruned"] |= {"sparse_accuracy": sparse_acc, "accuracy_before_refine": before_refine}

    report = build_report(models["baseline"], models["pruned"], record, stages, config, command)
    sparse_model, _ = load_checkpoint(sparse_ckpt)
    gam = torch.cat(list(bn_gammas(sparse_model).values())).tolist()
    plot_gammas(
        gam,
        record["threshold"],
        work / "gamma_hist.png",
        f"{cfg.arch}: BN |γ| after sparse training (s={cfg.sparsity:g})",
    )
    plot_channels(
        record["layers"], work / "channels.png", f"{cfg.arch}: channels per BN layer, {cfg.percent:.0%} pruned"
    )
    plot_latency(report, work / "latency.png")
    write_report(work, report)
    return report

"""train, prune and refine: a checkpoint in (or none), a checkpoint out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimexport.cli.app import app, check_out, handle_errors, say, trusting
from slimexport.cli.options import (
    AllocateOpt,
    ArchOpt,
    BatchOpt,
    CompileOpt,
    D,
    DataCacheOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    DistillTempOpt,
    DistillWeightOpt,
    EvalEveryOpt,
    FoldOpt,
    ForceOpt,
    ImageSizeOpt,
    LatencyBatchOpt,
    LatencyThreadsOpt,
    LrOpt,
    MaxLatencyOpt,
    MaxMacsOpt,
    MinChOpt,
    MinKeepOpt,
    NormalizeOpt,
    PercentOpt,
    PolarTOpt,
    PrecisionOpt,
    PresetOpt,
    RegularizerOpt,
    ResumeOpt,
    RoundOpt,
    RuntimeOpt,
    SeedOpt,
    StreamOpt,
    SyncBnOpt,
    TargetSpeedupOpt,
    TrustArchOpt,
    TrustOpt,
    WeightsOpt,
    fill,
    plain,
)
from slimexport.config import PipelineConfig, PruneConfig
from slimexport.records import latency_line, undone_line

EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", min=1, help="Training epochs.")]


def _train_settings(options: dict, **fields) -> PipelineConfig:
    """The run settings a train or refine command gives; :meth:`PipelineConfig.train_config` makes the
    :class:`TrainConfig` from them, the one mapping from options to a training schedule."""
    return fill(PipelineConfig, options | fields)


@app.command()
@handle_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")] = Path("baseline.pt"),
    arch: ArchOpt = D.arch,
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    epochs: EpochsOpt = 10,
    sparsity: Annotated[
        float,
        typer.Option(
            "--sparsity",
            "-s",
            help="L1 strength s on every BN γ (subgradient s·sign(γ)); 0 trains a plain baseline. Reference: 1e-4 "
            "VGG, 1e-5 ResNet/DenseNet.",
        ),
    ] = 0.0,
    regularizer: RegularizerOpt = D.regularizer,
    polar_t: PolarTOpt = D.polar_t,
    lr: LrOpt = D.lr,
    batch_size: BatchOpt = D.batch_size,
    preset: PresetOpt = D.preset,
    seed: SeedOpt = D.seed,
    device: DeviceOpt = D.device,
    eval_every: EvalEveryOpt = D.eval_every,
    compile: CompileOpt = D.compile,
    weights: WeightsOpt = D.weights,
    image_size: ImageSizeOpt = D.image_size,
    data_cache: DataCacheOpt = D.data_cache,
    precision: PrecisionOpt = D.precision,
    sync_bn: SyncBnOpt = D.sync_bn,
    resume: ResumeOpt = False,
    force: ForceOpt = D.force,
):
    """Train a model from scratch: a plain baseline, or with --sparsity the network-slimming sparse training."""
    from slimexport.data import load_dataset
    from slimexport.pipeline import DEFAULT_ARCH
    from slimexport.train import train as train_fn

    check_out(out, force, resume)
    cfg = _train_settings(locals()).train_config("sparse" if sparsity else "baseline", sparsity=sparsity)
    cfg.validate()
    if arch:
        from slimexport.models import default_config

        default_config(arch)  # an unknown or unbuildable architecture fails before the data loads
    ds = load_dataset(dataset, data_dir, image_size, data_cache.value)
    meta = train_fn(out, ds, cfg, arch=arch or DEFAULT_ARCH, resume=resume, weights=weights)
    say(
        f"{meta['stage']} {arch or DEFAULT_ARCH}: accuracy {meta['accuracy']:.4f} after {epochs} epochs "
        f"({meta['train_seconds']:.0f} s, {meta['images_per_s']:.0f} img/s) -> {out}"
    )


@app.command()
@handle_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="A (sparse-trained) checkpoint.")],
    percent: PercentOpt = None,
    max_macs: MaxMacsOpt = D.max_macs,
    target_speedup: TargetSpeedupOpt = D.target_speedup,
    max_latency: MaxLatencyOpt = D.max_latency,
    runtime: RuntimeOpt = D.runtime,
    allocate: AllocateOpt = D.allocate,
    latency_batch: LatencyBatchOpt = D.latency_batch,
    latency_threads: LatencyThreadsOpt = D.latency_threads,
    out: Annotated[Path, typer.Option("--out", "-o", help="Pruned checkpoint to write.")] = Path("pruned.pt"),
    min_channels: MinChOpt = D.min_channels,
    min_keep: MinKeepOpt = D.min_keep,
    normalize: NormalizeOpt = D.normalize,
    round_to: RoundOpt = D.round_to,
    prune_stream: StreamOpt = D.prune_stream,
    fold: FoldOpt = D.fold,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="Also measure the pruned model's accuracy (before refine) on this data set."
        ),
    ] = None,
    data_dir: DataDirOpt = D.data_dir,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = D.force,
):
    """Prune with one global threshold on BN |γ| and write a physically smaller model."""
    from slimexport.data import load_dataset
    from slimexport.prune import prune as prune_fn

    cfg = PruneConfig.from_options(**{k: plain(v) for k, v in locals().items()}).validate()
    check_out(out, force)
    ds = load_dataset(dataset, data_dir) if dataset else None
    with trusting(arch, trust_model_code):
        meta = prune_fn(checkpoint, out, cfg, ds=ds, device="cpu")
    say(_pruned_line(meta, out))


def _pruned_line(meta: dict, out: Path) -> str:
    r = meta["prune"]
    acc = f", accuracy before refine {meta['accuracy']:.4f}" if "accuracy" in meta else ""
    budget = f" (--max-macs {r['max_macs']:g}: global percent {r['percent']:.4f})" if r.get("max_macs") else ""
    stream = " (--prune-stream)" if r.get("prune_stream") else ""
    folded = f", β folded into {len(r['folded'])} layers" if r.get("folded") else ""
    rounded = f", round-to {r['round_to']} ({r['round_to_reason']})" if r["round_to"] > 1 else ""
    scale = f" (|γ| ÷ each layer's {r['normalize']})" if r["normalize"] != "none" else ""
    return (
        f"pruned {r['channels_before'] - r['channels_after']}/{r['channels_before']} channels{budget}{rounded} at "
        f"threshold {r['threshold']}{scale}: params {r['params_before']:,} -> {r['params_after']:,} "
        f"(×{r['params_before'] / r['params_after']:.2f}), MACs ×{r['macs_before'] / r['macs_after']:.2f}"
        f"{stream}{folded}{acc} -> {out}"
        + (f"; NOTE: {undone_line(r['undone'])}" if r.get("undone") else "")
        + (f"; {latency_line(r['latency_target'])}" if r.get("latency_target") else "")
    )


@app.command()
@handle_errors
def refine(
    checkpoint: Annotated[Path, typer.Argument(help="A pruned checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Refined checkpoint to write.")] = Path("refined.pt"),
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    epochs: EpochsOpt = 5,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate of the fine-tuning (default: the preset's lr × 0.2, 0.02)."),
    ] = None,
    batch_size: BatchOpt = D.batch_size,
    preset: PresetOpt = D.preset,
    seed: SeedOpt = D.seed,
    device: DeviceOpt = D.device,
    eval_every: EvalEveryOpt = D.eval_every,
    compile: CompileOpt = D.compile,
    sync_bn: SyncBnOpt = D.sync_bn,
    data_cache: DataCacheOpt = D.data_cache,
    precision: PrecisionOpt = D.precision,
    resume: ResumeOpt = False,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="Distil from this checkpoint (the unpruned model, baseline or sparse): the loss adds the KL to its "
            "softened logits; one more forward per batch.",
        ),
    ] = None,
    distill_weight: DistillWeightOpt = D.distill_weight,
    distill_temperature: DistillTempOpt = D.distill_temperature,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = D.force,
):
    """Fine-tune a pruned checkpoint (the model is rebuilt from the checkpoint alone)."""
    from slimexport.data import load_dataset
    from slimexport.train import train as train_fn

    check_out(out, force, resume)
    settings = _train_settings(
        locals(), arch=None, refine_epochs=epochs, refine_lr=lr, distill=teacher is not None, teacher="baseline"
    )
    cfg = settings.train_config("refine")
    cfg.validate()
    ds = load_dataset(dataset, data_dir, cache=data_cache.value)
    with trusting(arch, trust_model_code):
        meta = train_fn(out, ds, cfg, init=checkpoint, stage="refined", resume=resume, teacher=teacher)
    say(f"refined: accuracy {meta['accuracy']:.4f} after {epochs} epochs ({meta['train_seconds']:.0f} s) -> {out}")

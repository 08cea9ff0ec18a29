"""``slimexport sweep``: several targets from one sparse checkpoint, each pruned, refined, exported and timed, and
the accuracy-against-latency chart to choose from."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimexport.cli.app import app, handle_errors, say, trusting
from slimexport.cli.deploying import bench_config
from slimexport.cli.options import (
    AllocateOpt,
    BatchesOpt,
    D,
    DataCacheOpt,
    DataDirOpt,
    DatasetOpt,
    ForceOpt,
    LatencyBatchOpt,
    LatencyThreadsOpt,
    MinChOpt,
    MinKeepOpt,
    NormalizeOpt,
    RoundOpt,
    RuntimeOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustArchOpt,
    TrustOpt,
    fill,
    plain,
)
from slimexport.config import PipelineConfig, PruneConfig


@app.command()
@handle_errors
def sweep(
    checkpoint: Annotated[Path, typer.Argument(help="A sparse-trained checkpoint (the unpruned model).")],
    targets: Annotated[str, typer.Option("--targets", help=(
        "Comma-separated KIND:VALUE, KIND one of speedup (measured, --runtime), latency (ms), percent (of BN "
        "channels), macs (fraction kept), e.g. speedup:1.5,speedup:2,speedup:3."))] = "speedup:1.5,speedup:2,speedup:3",
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Sweep directory (sweep.png, report.md, sweep.json)."))] = Path("runs/sweep"),
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    data_cache: DataCacheOpt = D.data_cache,
    refine_epochs: Annotated[int, typer.Option("--refine-epochs", min=0, help=(
        "Epochs of refine per target (a short schedule; 0: none)."))] = 3,
    baseline: Annotated[Path | None, typer.Option("--baseline", help=(
        "The unpruned model the chart marks (default: the sparse checkpoint itself)."))] = None,
    round_to: RoundOpt = D.round_to,
    min_channels: MinChOpt = D.min_channels,
    min_keep: MinKeepOpt = D.min_keep,
    normalize: NormalizeOpt = D.normalize,
    runtime: RuntimeOpt = D.runtime,
    allocate: AllocateOpt = D.allocate,
    latency_batch: LatencyBatchOpt = D.latency_batch,
    latency_threads: LatencyThreadsOpt = D.latency_threads,
    batch: BatchesOpt = "1",
    threads: ThreadsOpt = "1",
    seconds: SecondsOpt = D.seconds,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep (same options).")] = False,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = D.force,
):  # fmt: skip
    """Prune one sparse checkpoint to several targets (speed-ups measured on the runtime, latencies, percents),
    refine each briefly, export, time all side by side: sweep.png plots accuracy against latency."""
    from slimexport.data import load_dataset
    from slimexport.sweep import run_sweep

    options = {k: plain(v) for k, v in locals().items()}
    prune_cfg = PruneConfig.from_options(**(options | {"percent": None, "target_speedup": 2.0}))
    prune_cfg.target_speedup = None  # each target sets its own
    refine = fill(PipelineConfig, options | {"refine_epochs": max(refine_epochs, 1)}).train_config("refine")
    bench = bench_config(batch, threads, "cpu", seconds)
    ds = load_dataset(dataset, data_dir, cache=data_cache.value)
    with trusting(arch, trust_model_code):
        rep = run_sweep(checkpoint, out, targets, ds, prune_cfg, refine if refine_epochs else None, bench,
                        baseline, force, resume, shlex.join(["slimexport", *sys.argv[1:]]))  # fmt: skip
    b = rep["baseline"]
    say(f"sweep of {len(rep['rows'])} targets: unpruned {b['median_ms']:.3f} ms {100 * b['accuracy']:.2f}%; "
        + ", ".join(f"{r['target']} ×{r['speedup']:.2f} {100 * r['accuracy']:.2f}%" for r in rep["rows"])
        + f"; chart: {out / 'sweep.png'}")  # fmt: skip

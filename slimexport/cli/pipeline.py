"""``slimexport pipeline``: every setting of a run as an option (built from :class:`PipelineConfig` and its
sections), or from a settings file (``--config``) that the command line overrides."""

from __future__ import annotations

import dataclasses
import functools
import shlex
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from slimexport.cli.app import app, handle_errors, say, trusting
from slimexport.cli.deploying import bench_config
from slimexport.cli.options import (
    AccuracyOpt,
    AllocateOpt,
    ArchOpt,
    BatchesOpt,
    BatchOpt,
    BenchDeviceOpt,
    CalibImagesOpt,
    CalibrateOpt,
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
    Int8KeepOpt,
    Int8MaxDropOpt,
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
    QuantTypesOpt,
    RegularizerOpt,
    RoundOpt,
    RuntimeOpt,
    SecondsOpt,
    SeedOpt,
    SelectionOpt,
    StreamOpt,
    SyncBnOpt,
    TargetSpeedupOpt,
    ThreadsOpt,
    TrustOpt,
    WeightsOpt,
    fill,
    option,
    plain,
)
from slimexport.config import (
    SECTIONS,
    ExportConfig,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    parse_sparsity,
    settings_of,
)
from slimexport.detect.data import is_detector_run
from slimexport.errors import ConfigError
from slimexport.records import undone_line
from slimexport.settings_file import pipeline_settings, read_settings

OutOpt = option("out", Path)
EpochsOpt = option("epochs", int, min=1)
RefineEpochsOpt = option("refine_epochs", int, min=1)
SparsityOpt = option("sparsity", str)  # text, so that it takes "auto" (its default as text: options.OWN)
SPARSITY_DEFAULT = str(PipelineConfig.sparsity)
DistillOpt = option("distill", bool)
TeacherOpt = option("teacher")
PruneStepsOpt = option("prune_steps", int, min=1)
BaselineOpt = option("baseline", Path | None)
BaselineEpochsOpt = option("baseline_epochs", int | None, min=0)
SparseOpt = option("sparse", Path | None)
RefineLrOpt = option("refine_lr", float | None)
Int8Opt = option("int8", bool)
OrtOpt = option("ort", bool)
NcnnOpt = option("ncnn", bool)
RunResumeOpt = option("resume", bool)
TrainArgsOpt = option("train_args", str | None)
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Take any of these options from a settings file: TOML, YAML or JSON, keyed by option name (e.g. "
        "refine-epochs = 20, prune-steps = 3) or by field, or a run's own config.json to repeat that run. Options "
        "given on the command line override the file; --force and --resume are said on the command line only.",
    ),
]


@app.command(
    epilog="Ultralytics YOLO detectors (the yolo extra): --arch ultralytics:best.pt (or a model .yaml) "
    "--dataset ultralytics:data.yaml; Ultralytics' trainer trains, mAP is measured in onnxruntime."
)
@handle_errors
def pipeline(
    ctx: typer.Context,
    out: OutOpt = D.out,
    config: ConfigOpt = None,
    arch: ArchOpt = D.arch,
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    epochs: EpochsOpt = D.epochs,
    refine_epochs: RefineEpochsOpt = D.refine_epochs,
    sparsity: SparsityOpt = SPARSITY_DEFAULT,
    regularizer: RegularizerOpt = D.regularizer,
    polar_t: PolarTOpt = D.polar_t,
    distill: DistillOpt = D.distill,
    distill_weight: DistillWeightOpt = D.distill_weight,
    distill_temperature: DistillTempOpt = D.distill_temperature,
    teacher: TeacherOpt = D.teacher,
    prune_steps: PruneStepsOpt = D.prune_steps,
    percent: PercentOpt = None,
    max_macs: MaxMacsOpt = D.max_macs,
    target_speedup: TargetSpeedupOpt = D.target_speedup, max_latency: MaxLatencyOpt = D.max_latency,
    runtime: RuntimeOpt = D.runtime, latency_batch: LatencyBatchOpt = D.latency_batch,
    latency_threads: LatencyThreadsOpt = D.latency_threads, allocate: AllocateOpt = D.allocate,
    min_channels: MinChOpt = D.min_channels,
    min_keep: MinKeepOpt = D.min_keep,
    normalize: NormalizeOpt = D.normalize,
    round_to: RoundOpt = D.round_to,
    prune_stream: StreamOpt = D.prune_stream,
    fold: FoldOpt = D.fold,
    baseline: BaselineOpt = D.baseline,
    baseline_epochs: BaselineEpochsOpt = D.baseline_epochs,
    weights: WeightsOpt = D.weights,
    image_size: ImageSizeOpt = D.image_size,
    data_cache: DataCacheOpt = D.data_cache,
    precision: PrecisionOpt = D.precision,
    sparse: SparseOpt = D.sparse,
    preset: PresetOpt = D.preset,
    lr: LrOpt = D.lr,
    refine_lr: RefineLrOpt = D.refine_lr,
    batch_size: BatchOpt = D.batch_size,
    seed: SeedOpt = D.seed,
    device: DeviceOpt = D.device,
    selection: SelectionOpt = D.selection,
    sync_bn: SyncBnOpt = D.sync_bn,
    compile: CompileOpt = D.compile,
    eval_every: EvalEveryOpt = D.eval_every,
    batch: BatchesOpt = D.batch,
    threads: ThreadsOpt = None,
    bench_device: BenchDeviceOpt = D.bench_device,
    seconds: SecondsOpt = D.seconds,
    accuracy: AccuracyOpt = D.accuracy,
    int8: Int8Opt = D.int8,
    ort: OrtOpt = D.ort,
    ncnn: NcnnOpt = D.ncnn,
    calib_images: CalibImagesOpt = D.calib_images,
    calibrate: CalibrateOpt = D.calibrate,
    types: QuantTypesOpt = D.types, int8_keep: Int8KeepOpt = D.int8_keep,
    int8_max_drop: Int8MaxDropOpt = D.int8_max_drop,
    resume: RunResumeOpt = D.resume,
    train_args: TrainArgsOpt = D.train_args,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = D.force,
):  # fmt: skip
    """Baseline → sparse training → prune → refine → ONNX export of both [→ INT8, .ort] → onnxruntime bench → report."""
    options = {k: v for k, v in locals().items() if k != "ctx"}
    from slimexport.pipeline import run_pipeline

    if is_detector_run(cfg := run_settings(options, ctx, config)):
        return _detector(cfg)
    with trusting(None, trust_model_code):
        r = run_pipeline(cfg, command=shlex.join(["slimexport", *sys.argv[1:]]))
    if not r:  # a rank other than 0 under torchrun: rank 0 wrote the run and reports it
        return
    _summary(cfg, r)


def _summary(cfg, r: dict[str, Any]) -> None:
    """The classifier run's one summary line (and its variants')."""
    b, p, q = r["baseline"], r["pruned"], r["ratios"]
    sp = next(
        (s for s in q["speedup"] if s["batch"] == 1 and s["threads"] == 1), q["speedup"][0] if q["speedup"] else None
    )
    say(
        f"{cfg.arch}: params {b['params']:,} -> {p['params']:,} (×{q['params']:.2f}), MACs ×{q['macs']:.2f}, "
        f"onnxruntime accuracy {b['accuracy']:.4f} -> {p['accuracy']:.4f}"
        + (f", speed-up ×{sp['speedup']:.2f} (batch {sp['batch']}, {sp['threads']} thread)" if sp else "")
        + f"; report: {Path(cfg.out) / 'report.md'}"
        + (f"; NOTE: {undone_line(r['prune']['undone'])}" if r["prune"].get("undone") else "")
    )
    if len(r.get("variants", [])) > 2:
        say(_variants_line(r["variants"]))


def _detector(cfg) -> None:
    """An Ultralytics detector's run (--arch ultralytics:FILE --dataset ultralytics:DATA.yaml) and its summary."""
    from slimexport.detect.pipeline import run_detector_pipeline

    r = run_detector_pipeline(cfg, command=shlex.join(["slimexport", *sys.argv[1:]]))
    b, p, q = r["baseline"], r["pruned"], r["ratios"]
    sp = next((s for s in q["speedup"] if s["batch"] == 1 and s["threads"] == 1), None)
    say(
        f"{cfg.arch}: params {b['params']:,} -> {p['params']:,} (×{q['params']:.2f}), MACs ×{q['macs']:.2f}, "
        f"mAP50-95 in onnxruntime {b['map']['map50_95']:.4f} -> {p['map']['map50_95']:.4f}"
        + (f", speed-up ×{sp['speedup']:.2f} at {sp['image_size']} (batch 1, 1 thread)" if sp else "")
        + f"; report: {Path(cfg.out) / 'report.md'}"
        + (f"; NOTE: {undone_line(r['prune']['undone'])}" if r["prune"].get("undone") else "")
    )


def run_settings(options: dict[str, Any], ctx: typer.Context | None = None, config: Path | None = None):
    """The run's :class:`PipelineConfig` from the command's options, under those of a settings file where one is
    given: an option given on the command line wins over the file, the file over the defaults."""
    extra: dict[str, dict[str, Any]] = {}
    if config is not None:
        options, extra = _with_file(dict(options), ctx, config)
    cfg = fill(
        PipelineConfig,
        options | {"sparsity": parse_sparsity(plain(options["sparsity"]))},
        prune=PruneConfig.from_options(**{k: plain(v) for k, v in options.items()}),
        bench=bench_config(
            options["batch"], options["threads"], options["bench_device"], options["seconds"], options["accuracy"]
        ),  # fmt: skip
        export=fill(ExportConfig, options),
        quantize=fill(QuantizeConfig, options),
    )
    for section, fields in extra.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **fields))
    return cfg


def _with_file(options: dict[str, Any], ctx: typer.Context | None, path: Path):
    values, extra = pipeline_settings(read_settings(path), str(path))
    for name, value in values.items():
        if name not in options:  # a section's setting that this command has no option for (export's --opset)
            section, f = next((s, c) for s, c in ((s, settings_of(c)) for s, c in SECTIONS.items()) if name in c)
            extra.setdefault(section, {})[f[name].name] = value
            continue
        source = ctx.get_parameter_source(name) if ctx is not None else None
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            continue  # the command line overrides the file
        options[name] = _as_option(name, value, path)
    return options, extra


def _as_option(name: str, value: Any, path: Path) -> Any:
    """A file's value as the option ``name`` would have parsed it, or a one-line error naming it."""
    if value is None:
        return None
    kinds = [t for t in typing.get_args(_option_types()[name]) if t is not type(None)] or [_option_types()[name]]
    kind = kinds[0]
    if isinstance(value, list) and kind is str:
        value = ",".join(str(v) for v in value)
    try:
        if isinstance(kind, type) and issubclass(kind, Enum):
            return kind(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError("true or false")
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"a number ({kind.__name__})")
            return kind(value)
        if kind in (str, Path):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("text")
            return kind(str(value))
    except ValueError as e:
        choices = (
            f"one of {', '.join(m.value for m in kind)}" if isinstance(kind, type) and issubclass(kind, Enum) else e
        )
        raise ConfigError(f"--config {path}: {name} = {value!r}: expected {choices}") from None
    return value


@functools.cache
def _option_types() -> dict[str, Any]:
    """Each option's type as the pipeline command declares it (``float | None``, an enum, ``Path``)."""
    hints = typing.get_type_hints(pipeline, include_extras=True)
    return {k: typing.get_args(v)[0] if typing.get_origin(v) is Annotated else v for k, v in hints.items()}


def _variants_line(rows: list[dict]) -> str:
    """One line per run: each deployment variant's accuracy and batch-1 single-thread speed-up over baseline FP32."""

    def b1(row):
        x = next((y for y in row["latency"] if y["batch"] == 1 and y["threads"] == 1), row["latency"][0])
        return x["median_ms"]

    base = b1(rows[0])
    return "variants: " + ", ".join(
        f"{r['name']} {100 * r['accuracy']:.2f}% ×{base / b1(r):.2f} ({r['bytes'] / 1024:,.0f} KB)" for r in rows[1:]
    )

"""The slimexport command line. Each command translates its options and calls one library function."""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from slimexport.console import console
from slimexport.errors import ConfigError, SlimExportError, user_message

app = typer.Typer(
    name="slimexport",
    help="Network Slimming for deployment: sparse-train, prune, refine, export to ONNX, verify and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class BenchDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Selection(str, Enum):
    gather = "gather"
    dense = "dense"
    auto = "auto"


class Preset(str, Enum):
    fast = "fast"
    paper = "paper"


class Normalize(str, Enum):
    none = "none"
    max = "max"
    mean = "mean"


class Regularizer(str, Enum):
    l1 = "l1"
    polar = "polar"


class Teacher(str, Enum):
    baseline = "baseline"
    sparse = "sparse"


# Shared options, defined once.
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        "-a",
        help="Architecture: vgg11/13/16/19 (vgg11_w25: 25% width), preresnet{9n+2} (preresnet164), densenet{3n+4} "
        "(densenet40); or any CNN, pruned by the graph engine: torchvision:NAME (resnet50, mobilenet_v2, ...), "
        "timm:NAME (with timm installed), path/to/file.py:factory or package.module:factory (factory gets "
        "num_classes=K if it takes it). See `slimexport models`.",
    ),
]
DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="embedded (Fashion-MNIST subset shipped with the "
        "package), fashion-mnist, cifar10, cifar100, imagefolder:PATH (PATH/train/<class>/*, PATH/val/<class>/*), "
        "or a path to an .npz with uint8 x_train, y_train, x_test, y_test.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="SLIMEXPORT_DATA",
        help="Where named data "
        "sets live (idx .gz files, cifar10.npz, or torchvision's layout) (default: "
        "~/.cache/slimexport/data).",
    ),
]


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


PrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="Training arithmetic: fp32, bf16 (autocast), or auto: bf16 on CUDA; on a CPU, bf16 only where it has "
        "native bf16 instructions (AMX, AVX512-BF16) and a short timed probe shows it faster for this model. The "
        "choice and why go into the checkpoint [default: auto, or $SLIMEXPORT_PRECISION].",
        show_default=False,
    ),
]


class DataCache(str, Enum):
    auto = "auto"
    ram = "ram"
    off = "off"


DataCacheOpt = Annotated[
    DataCache,
    typer.Option(
        "--data-cache",
        help="imagefolder data: ram (decode every image once, keep it in memory: fast for small data), off (decode "
        "each batch from the files in DataLoader workers: memory bounded by batch and workers, any data size), or "
        "auto (ram where the decoded images fit in a quarter of the memory available).",
    ),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", min=1, help="Training epochs.")]
SparsityOpt = Annotated[
    float,
    typer.Option(
        "--sparsity",
        "-s",
        help="L1 strength s on every BN γ (subgradient "
        "s·sign(γ)); 0 trains a plain baseline. Reference: 1e-4 VGG, 1e-5 ResNet/DenseNet.",
    ),
]
PercentOpt = Annotated[
    float,
    typer.Option(
        "--percent",
        "-p",
        help="Fraction of all prunable BN channels to remove with one global |γ| threshold, in [0, 1).",
    ),
]
MinChOpt = Annotated[
    int,
    typer.Option(
        "--min-channels",
        help="Every pruned layer keeps at least this many channels (its largest |γ|), so no layer is ever emptied.",
    ),
]
MinKeepOpt = Annotated[
    float,
    typer.Option(
        "--min-keep",
        help="Every pruned layer keeps at least this fraction of its channels (its largest |γ|), e.g. 0.25: the "
        "global threshold alone can leave a layer a few channels wide, a bottleneck refine does not recover from. "
        "0: --min-channels alone (the paper's).",
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", help="Peak (fast) or initial (paper) learning rate (default: the preset's, 0.1)."),
]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, help="Training batch size (default: the preset's: fast 128, paper 64)."),
]
PresetOpt = Annotated[
    Preset,
    typer.Option(
        "--preset", help="Schedule: fast (one-cycle) or paper (lr ×0.1 at 50% and 75%, batch 64, weight decay 1e-4)."
    ),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to train: auto (CUDA if available), cpu, cuda.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Start from this state_dict (e.g. pretrained weights you saved), loaded with weights_only=True; or "
        "torchvision:IMAGENET1K_V1 (any of the builder's weights) for --arch torchvision:NAME, read from the torch "
        "hub cache (nothing is downloaded). A classifier for another number of classes starts afresh.",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Resize the data's images to this height = width (imagefolder: default 224; else the data's own).",
    ),
]
StreamOpt = Annotated[
    bool,
    typer.Option(
        "--prune-stream",
        help="Also remove channels a conv reads before any BatchNorm (a pre-activation ResNet's stream, read by "
        "its downsampling convs) where a BatchNorm reading the same tensor drops them; the conv gets that BN's "
        "running mean of the channel as a constant. Beyond the paper's rules; more MACs saved at the same "
        "threshold, not exact.",
    ),
]
RegularizerOpt = Annotated[
    Regularizer,
    typer.Option(
        "--regularizer",
        help="Sparsity term on every BN γ: l1, s·|γ| (the paper's); polar, the polarization regularizer "
        "s·(t·|γ| − |γ − mean γ|) (Zhuang et al., NeurIPS 2020): γ below the mean are pulled t+1 times as hard as "
        "those above, so |γ| splits into a group at 0 and one that stays, and the threshold falls in the gap.",
    ),
]
PolarTOpt = Annotated[
    float, typer.Option("--polar-t", help="polar's t (> 1: every γ is still pulled down, the low ones hardest).")
]
DistillWeightOpt = Annotated[
    float,
    typer.Option(
        "--distill-weight", min=0.0, max=1.0, help="Weight of the teacher's KL term; the label loss gets 1 − it."
    ),
]
DistillTempOpt = Annotated[
    float, typer.Option("--distill-temperature", help="Temperature T softening both models' logits (KL × T²).")
]
FoldOpt = Annotated[
    bool,
    typer.Option(
        "--fold/--no-fold",
        help="Fold what a removed channel still sends on (act(β) of its BN) into the bias or BN running mean of "
        "the layers that read it. --no-fold only to measure what folding buys.",
    ),
]
NormalizeOpt = Annotated[
    Normalize,
    typer.Option(
        "--normalize",
        help="How |γ| are compared across layers: none, as they are (the paper's); max or mean: each layer's |γ| "
        "divided by its largest or mean |γ|. A BN followed by ReLU and a conv can scale all its γ at no cost, so "
        "raw |γ| may empty a layer whose channels are all small; max/mean make the threshold blind to that scale.",
    ),
]
RoundOpt = Annotated[
    str,
    typer.Option(
        "--round-to",
        help="Keep a multiple of this many channels per layer. auto: the channel block of onnxruntime's CPU "
        "convolutions on this machine (16 with AVX-512, 8 with AVX2), the fast choice for deployment; "
        "1: exactly the threshold's choice (the paper's).",
    ),
]
SelectionOpt = Annotated[
    Selection,
    typer.Option(
        "--selection",
        help="How channel selections export: gather (one Gather/Slice each, fewest MACs), dense (absorbed into zero "
        "weights of the next layer: no index op, keeps onnxruntime's blocked CPU layout), or auto (export gather, "
        "dense and a per-selection mix, time each in onnxruntime on this CPU at batch 1, keep the fastest; pairs well "
        "with prune --round-to 16).",
    ),
]
SyncBnOpt = Annotated[
    bool,
    typer.Option("--sync-bn", help="Under torchrun on CUDA: SyncBatchNorm, BN statistics over the global batch."),
]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile the training forward (pays on a GPU for small networks).")
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option("--eval-every", min=1, help="Measure test accuracy every N epochs (always after the last)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
TrustArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        "-a",
        help="Only for a checkpoint of your own model code: the FILE.py:FACTORY or MODULE:FACTORY it was built "
        "from. Loading it imports and calls that code, so it runs only when you name it here (see --trust-model-code).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-model-code",
        help="Let checkpoints run the model code (file or module factory) they name, whatever it is. Off by default: "
        "a checkpoint is data, and slimexport imports no code that a file names and you did not.",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue from OUT.resume, the state saved after each epoch of an interrupted run with the same options.",
    ),
]
BatchesOpt = Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes to time.")]
ThreadsOpt = Annotated[
    str | None,
    typer.Option(
        "--threads", help="Comma-separated onnxruntime intra-op thread counts (CPU) (default: 1 and all cores)."
    ),
]
BenchDeviceOpt = Annotated[
    BenchDevice,
    typer.Option(
        "--bench-device",
        help="onnxruntime execution provider for latency: cpu, or cuda (needs onnxruntime-gpu; uses IOBinding).",
    ),
]
SecondsOpt = Annotated[float, typer.Option("--seconds", help="Timing budget per model and setting, after 20 runs.")]


def _say(text: str) -> None:
    """A command's summary line on stdout (under torchrun from rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(text)


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')}/{world}: " if world > 1 else ""


def _handle_errors(fn):
    """One line on stderr and a non-zero exit for every user-facing error; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException:
            if "slimexport.distributed" in sys.modules:  # under torchrun: leave without waiting for the others
                sys.modules["slimexport.distributed"].abandon()
            raise

    return _report_errors(wrapper)


def _report_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _error(f"[bold red]interrupted[/]: {_rank_prefix()}files being written were discarded; finished ones kept")
            raise typer.Exit(130) from None
        except Exception as e:  # the user's or the system's error: one line, exit 2; a bug of ours: exit 3
            message = user_message(e)
            if message is not None:
                _error(f"[bold red]error:[/] {escape(_rank_prefix() + ' '.join(message.split()))}")
                raise typer.Exit(2) from None
            if os.environ.get("SLIMEXPORT_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _error(
                f"[bold red]internal error:[/] {escape(f'{_rank_prefix()}{type(e).__name__}: {first}')}"
                " (set SLIMEXPORT_DEBUG=1 for the traceback)"
            )
            raise typer.Exit(3) from None

    return wrapper


def _error(text: str) -> None:
    """One line on stderr, from every rank (the shared console is quiet on ranks other than 0)."""
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise SlimExportError(f"{what} must be comma-separated positive integers, got {text!r}")
    return vals


def _bench_config(batch: str, threads: str | None, device: BenchDevice, seconds: float):
    from slimexport.bench import BenchConfig

    cfg = BenchConfig(batches=_ints(batch, "--batch"), device=device.value, seconds=seconds)
    if threads:
        cfg.threads = _ints(threads, "--threads")
    return cfg


def _train_config(
    preset: Preset,
    epochs: int,
    sparsity: float,
    lr: float | None,
    batch_size: int | None,
    seed: int,
    device: Device,
    eval_every: int | None = None,
    compile: bool = False,
    refine: bool = False,
    sync_bn: bool = False,
    precision: Precision | None = None,
):
    import dataclasses

    from slimexport.train import preset_config

    cfg = preset_config(
        preset.value, epochs, sparsity, lr, batch_size, seed, device.value, eval_every, compile, refine=refine
    )
    return dataclasses.replace(cfg, sync_bn=sync_bn, precision=precision.value if precision else cfg.precision)


def _fill(cls, options: dict, **nested):
    """A config dataclass from a command's options: every field named like an option takes its value (an enum's
    value, a path as text); ``nested`` gives the fields built otherwise. One place instead of a field-by-field
    copy per command, so a new config field is one new option."""
    import dataclasses

    def plain(v):
        return v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: plain(v) for k, v in options.items() if k in names and k not in nested}, **nested)


def _check_out(out: Path, force: bool, resume: bool = False, kind: str = "file", ours=None) -> None:
    """Refuse, before any work, an ``out`` that exists (without --force) or cannot be written; --resume may continue
    an unfinished run's ``out.resume``."""
    from slimexport.fileio import check_output

    out = out if out.name else out.resolve()  # "." and ".." have no name to put a ".resume" beside
    pending = out.with_name(out.name + ".resume")
    if resume and not pending.exists():
        raise ConfigError(f"nothing to resume: {pending} does not exist")
    check_output(out, force or (resume and pending.exists()), kind, ours)


def _trusting(arch: str | None, trust_model_code: bool):
    """The model code the user named on this command line, which loading a checkpoint may then run."""
    from slimexport.models.external import trusted_code

    return trusted_code(arch, everything=trust_model_code)


@app.command()
@_handle_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")] = Path("baseline.pt"),
    arch: ArchOpt = None,
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = 10,
    sparsity: SparsityOpt = 0.0,
    regularizer: RegularizerOpt = Regularizer.l1,
    polar_t: PolarTOpt = 1.2,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    preset: PresetOpt = Preset.fast,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    eval_every: EvalEveryOpt = None,
    compile: CompileOpt = False,
    weights: WeightsOpt = None,
    image_size: ImageSizeOpt = None,
    data_cache: DataCacheOpt = DataCache.auto,
    precision: PrecisionOpt = None,
    sync_bn: SyncBnOpt = False,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
):
    """Train a model from scratch: a plain baseline, or with --sparsity the network-slimming sparse training."""
    from slimexport.data import load_dataset
    from slimexport.pipeline import DEFAULT_ARCH
    from slimexport.train import train as train_fn

    _check_out(out, force, resume)
    cfg = _train_config(
        preset,
        epochs,
        sparsity,
        lr,
        batch_size,
        seed,
        device,
        eval_every,
        compile,
        sync_bn=sync_bn,
        precision=precision,
    )
    cfg = dataclasses.replace(cfg, regularizer=regularizer.value, polar_t=polar_t)
    cfg.validate()
    if arch:
        from slimexport.models import default_config

        default_config(arch)  # an unknown or unbuildable architecture fails before the data loads
    ds = load_dataset(dataset, data_dir, image_size, data_cache.value)
    meta = train_fn(out, ds, cfg, arch=arch or DEFAULT_ARCH, resume=resume, weights=weights)
    _say(
        f"{meta['stage']} {arch or DEFAULT_ARCH}: accuracy {meta['accuracy']:.4f} after {epochs} epochs "
        f"({meta['train_seconds']:.0f} s, {meta['images_per_s']:.0f} img/s) -> {out}"
    )


@app.command()
@_handle_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="A (sparse-trained) checkpoint.")],
    percent: Annotated[
        float | None,
        typer.Option(
            "--percent",
            "-p",
            help="Fraction of all prunable BN channels to remove with one global |γ| threshold, in [0, 1) "
            "[default: 0.6 unless --max-macs is given].",
            show_default=False,
        ),
    ] = None,
    max_macs: Annotated[
        float | None,
        typer.Option(
            "--max-macs",
            help="Instead of --percent: the compute budget, as the fraction of the unpruned MACs to keep, in (0, 1]; "
            "the lowest global threshold that fits it is used.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Pruned checkpoint to write.")] = Path("pruned.pt"),
    min_channels: MinChOpt = 1,
    min_keep: MinKeepOpt = 0.0,
    normalize: NormalizeOpt = Normalize.none,
    round_to: RoundOpt = "auto",
    prune_stream: StreamOpt = False,
    fold: FoldOpt = True,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="Also measure the pruned model's accuracy (before refine) on this data set."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = False,
):
    """Prune with one global threshold on BN |γ| and write a physically smaller model."""
    from slimexport.data import load_dataset
    from slimexport.prune import PruneConfig
    from slimexport.prune import prune as prune_fn

    if percent is None and max_macs is None:
        percent = 0.6
    cfg = _fill(PruneConfig, locals()).validate()
    _check_out(out, force)
    ds = load_dataset(dataset, data_dir) if dataset else None
    with _trusting(arch, trust_model_code):
        meta = prune_fn(checkpoint, out, cfg, ds=ds, device="cpu")
    r = meta["prune"]
    acc = f", accuracy before refine {meta['accuracy']:.4f}" if "accuracy" in meta else ""
    budget = f" (--max-macs {max_macs:g}: global percent {r['percent']:.4f})" if max_macs is not None else ""
    stream = " (--prune-stream)" if r.get("prune_stream") else ""
    folded = f", β folded into {len(r['folded'])} layers" if r.get("folded") else ""
    rounded = f", round-to {r['round_to']} ({r['round_to_reason']})" if r["round_to"] > 1 else ""
    scale = f" (|γ| ÷ each layer's {normalize.value})" if normalize is not Normalize.none else ""
    _say(
        f"pruned {r['channels_before'] - r['channels_after']}/{r['channels_before']} channels{budget}{rounded} at "
        f"threshold {r['threshold']}{scale}: params {r['params_before']:,} -> {r['params_after']:,} "
        f"(×{r['params_before'] / r['params_after']:.2f}), MACs ×{r['macs_before'] / r['macs_after']:.2f}"
        f"{stream}{folded}{acc} -> {out}"
    )


@app.command()
@_handle_errors
def refine(
    checkpoint: Annotated[Path, typer.Argument(help="A pruned checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Refined checkpoint to write.")] = Path("refined.pt"),
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = 5,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate of the fine-tuning (default: the preset's lr × 0.2, 0.02)."),
    ] = None,
    batch_size: BatchOpt = None,
    preset: PresetOpt = Preset.fast,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    eval_every: EvalEveryOpt = None,
    compile: CompileOpt = False,
    sync_bn: SyncBnOpt = False,
    data_cache: DataCacheOpt = DataCache.auto,
    precision: PrecisionOpt = None,
    resume: ResumeOpt = False,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="Distil from this checkpoint (the unpruned model, baseline or sparse): the loss adds the KL to its "
            "softened logits; one more forward per batch.",
        ),
    ] = None,
    distill_weight: DistillWeightOpt = 0.5,
    distill_temperature: DistillTempOpt = 4.0,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = False,
):
    """Fine-tune a pruned checkpoint (the model is rebuilt from the checkpoint alone)."""
    from slimexport.data import load_dataset
    from slimexport.train import train as train_fn

    _check_out(out, force, resume)
    cfg = _train_config(
        preset,
        epochs,
        0.0,
        lr,
        batch_size,
        seed,
        device,
        eval_every,
        compile,
        refine=True,
        sync_bn=sync_bn,
        precision=precision,
    )
    if teacher is not None:
        cfg = dataclasses.replace(cfg, distill=distill_weight, temperature=distill_temperature)
    cfg.validate()
    ds = load_dataset(dataset, data_dir, cache=data_cache.value)
    with _trusting(arch, trust_model_code):
        meta = train_fn(out, ds, cfg, init=checkpoint, stage="refined", resume=resume, teacher=teacher)
    _say(f"refined: accuracy {meta['accuracy']:.4f} after {epochs} epochs ({meta['train_seconds']:.0f} s) -> {out}")


@app.command("export")
@_handle_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 20,
    atol: Annotated[
        float,
        typer.Option(
            "--atol",
            help="Largest allowed |ONNX − PyTorch| over the logits of the parity images; beyond it export fails.",
        ),
    ] = 1e-3,
    parity_images: Annotated[int, typer.Option("--parity-images", min=1, help="Real test images compared.")] = 512,
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Simplify with onnxsim.")] = True,
    selection: SelectionOpt = Selection.gather,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = False,
):
    """Export to ONNX (dynamic batch), check, simplify, and verify against PyTorch on real test images."""
    from slimexport.data import load_dataset
    from slimexport.export import ExportConfig, export

    _check_out(out, force)
    ds = load_dataset(dataset, data_dir)
    with _trusting(arch, trust_model_code):
        r = export(
            checkpoint,
            out,
            ds,
            ExportConfig(
                opset=opset, simplify=simplify, atol=atol, parity_images=parity_images, selection=selection.value
            ),
        )
    p = r["parity"]
    _say(
        f"exported {out} ({r['onnx_bytes']:,} bytes, {sum(r['op_counts'].values())} nodes): max |Δ| "
        f"{p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} on {p['images']} images"
    )
    if r.get("selection", {}).get("candidates"):
        times = ", ".join(f"{n} {c['median_ms']:.3f} ms" for n, c in r["selection"]["candidates"].items())
        _say(f"selection: {r['selection']['chosen']} (onnxruntime CPU, batch 1, 1 thread: {times})")


@app.command("bench")
@_handle_errors
def bench_cmd(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="ONNX or .ort models; the first is the reference for ratios (e.g. baseline.onnx pruned.onnx)."
        ),
    ],
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    batch: BatchesOpt = "1,32",
    threads: ThreadsOpt = None,
    device: Annotated[
        BenchDevice,
        typer.Option(
            "--device", help="onnxruntime execution provider: cpu, or cuda (needs onnxruntime-gpu; IOBinding)."
        ),
    ] = BenchDevice.cpu,
    seconds: SecondsOpt = 1.0,
    accuracy: Annotated[
        bool, typer.Option("--accuracy/--no-accuracy", help="Measure test accuracy in onnxruntime.")
    ] = True,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON here.")] = None,
    force: ForceOpt = False,
):
    """Time onnxruntime inference (median, p90) side by side, and measure accuracy with onnxruntime itself."""
    from slimexport.bench import bench, latency_table, model_names
    from slimexport.data import load_dataset
    from slimexport.fileio import write_json

    if out is not None:
        _check_out(out, force)
    names = model_names(models)
    ds = load_dataset(dataset, data_dir)
    cfg = _bench_config(batch, threads, device, seconds)
    cfg.accuracy = accuracy
    res = bench(dict(zip(names, models)), ds, cfg)
    console.print(latency_table(res, names[0], title=f"onnxruntime {cfg.device}"))
    if out is not None:
        write_json(out, res)
    accs = ", ".join(f"{n} {m['accuracy']:.4f}" for n, m in res["models"].items() if "accuracy" in m)
    _say(
        f"benchmarked {len(models)} model(s) in {len(res['latency']) // len(models)} setting(s)"
        + (f"; onnxruntime accuracy: {accs}" if accs else "")
        + (f" -> {out}" if out else "")
    )


class Calibrate(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class QuantTypes(str, Enum):
    auto = "auto"
    s8s8 = "s8s8"
    u8s8 = "u8s8"


class OptStyle(str, Enum):
    fixed = "fixed"
    runtime = "runtime"


class Platform(str, Enum):
    amd64 = "amd64"
    arm = "arm"


CalibImagesOpt = Annotated[
    int, typer.Option("--calib-images", help="Training images the INT8 activation ranges are calibrated on.")
]
CalibrateOpt = Annotated[
    Calibrate, typer.Option("--calibrate", help="How activation ranges are calibrated: minmax, entropy, percentile.")
]
QuantTypesOpt = Annotated[
    QuantTypes,
    typer.Option(
        "--types",
        help="INT8 activation/weight types: auto (S8S8 on a CPU with VNNI, else U8S8 with reduce_range), s8s8, u8s8.",
    ),
]
OptStyleOpt = Annotated[
    OptStyle,
    typer.Option(
        "--optimization-style",
        help="fixed: optimisations for this CPU are baked into the .ort file; runtime: applied when loaded.",
    ),
]
PlatformOpt = Annotated[Platform, typer.Option("--target-platform", help="The CPU the .ort file is for: amd64 or arm.")]


@app.command()
@_handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="An FP32 ONNX model (e.g. pruned.onnx).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="INT8 model to write (default: MODEL.int8.onnx).")
    ] = None,
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    calib_images: CalibImagesOpt = 512,
    calibrate: CalibrateOpt = Calibrate.minmax,
    types: QuantTypesOpt = QuantTypes.auto,
    force: ForceOpt = False,
):
    """INT8 static quantization (onnxruntime QDQ, per-channel weights), measured against the FP32 model."""
    from slimexport.data import load_dataset
    from slimexport.deploy import QuantizeConfig
    from slimexport.deploy import quantize as quantize_fn

    out = out or model.with_name(model.stem + ".int8.onnx")
    _check_out(out, force)
    cfg = QuantizeConfig(calib_images=calib_images, calibrate=calibrate.value, types=types.value)
    cfg.validate()
    ds = load_dataset(dataset, data_dir)
    r = quantize_fn(model, out, ds, cfg)
    _say(
        f"quantized {model} -> {out}: {r['activation_type']}/{r['weight_type']}"
        f"{' reduce_range' if r['reduce_range'] else ''} ({r['types_why']}); {r['fp32_bytes']:,} -> {r['bytes']:,} "
        f"bytes (×{1 / r['bytes_ratio']:.2f}); onnxruntime accuracy {r['fp32_accuracy']:.4f} -> {r['accuracy']:.4f}, "
        f"top-1 agreement {r['top1_agreement']:.4f}, max |Δ logits| {r['max_abs_diff']:.3g} on {r['images']} images"
    )


def _converted(folder: Path) -> bool:
    """A directory ``convert`` wrote: an .ort model or an ncnn model in it."""
    return any(f.suffix == ".ort" or f.name.endswith(".ncnn.param") for f in folder.iterdir())


@app.command()
@_handle_errors
def convert(
    model: Annotated[Path, typer.Argument(help="An ONNX model (FP32 or INT8).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the .ort model and its operator config to.")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="ort (the onnxruntime mobile format) or ncnn (a phone runtime; FP32 models; the ncnn extra: "
            "pip install -e '.\\[ncnn]').",
        ),
    ] = "ort",
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    optimization_style: OptStyleOpt = OptStyle.fixed,
    target_platform: PlatformOpt = Platform.amd64,
    force: ForceOpt = False,
):
    """Convert to the onnxruntime mobile format (.ort) and check it against the ONNX model on real test images."""
    from slimexport.data import load_dataset
    from slimexport.deploy import convert as convert_fn

    if to not in ("ort", "ncnn"):
        raise ConfigError(f"--to {to!r} is not supported: ort or ncnn")
    _check_out(out, force, kind="dir", ours=_converted)
    if to == "ncnn":
        from slimexport.deploy import convert_ncnn, ncnn_available
        from slimexport.runtime import NCNN_HINT

        if not ncnn_available():
            raise ConfigError(NCNN_HINT)
        r = convert_ncnn(model, out, load_dataset(dataset, data_dir))
        p = r["parity"]
        _say(
            f"converted {model} -> {r['path']} ({r['bytes']:,} bytes, {r['runtime']}): max |Δ| {p['max_abs_diff']:.2e} "
            f"against onnxruntime, top-1 agreement {p['top1_agreement']:.4f} on {p['images']} images"
        )
        return
    ds = load_dataset(dataset, data_dir)
    r = convert_fn(model, out, ds, optimization_style.value, target_platform.value)
    p = r["parity"]
    _say(
        f"converted {model} -> {r['path']} ({r['bytes']:,} bytes, {r['optimization_style']} optimisations for "
        f"{r['target_platform']}): max |Δ| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} on "
        f"{p['images']} images"
    )


@app.command()
@_handle_errors
def pipeline(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory (created; replaced only with --force).")
    ] = Path("runs/slim"),
    arch: ArchOpt = None,
    dataset: DatasetOpt = "embedded",
    data_dir: DataDirOpt = None,
    epochs: Annotated[
        int, typer.Option("--epochs", "-e", min=1, help="Epochs of baseline and of sparse training.")
    ] = 10,
    refine_epochs: Annotated[int, typer.Option("--refine-epochs", min=1, help="Epochs of refine.")] = 10,
    sparsity: Annotated[
        str,
        typer.Option(
            "--sparsity",
            "-s",
            help="Strength s of the sparsity term on every BN γ, or auto: chosen by a short probe from the "
            "baseline, the smallest s predicted to send --percent of the γ to zero without collapsing the rest.",
        ),
    ] = "3e-3",
    regularizer: RegularizerOpt = Regularizer.l1,
    polar_t: PolarTOpt = 1.2,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill/--no-distill",
            help="Refine learns from the unpruned model's logits too (knowledge distillation: KL on softened logits "
            "plus the label loss); one more forward per batch.",
        ),
    ] = False,
    distill_weight: DistillWeightOpt = 0.5,
    distill_temperature: DistillTempOpt = 4.0,
    teacher: Annotated[
        Teacher, typer.Option("--teacher", help="The unpruned model that teaches with --distill.")
    ] = Teacher.baseline,
    prune_steps: Annotated[
        int,
        typer.Option(
            "--prune-steps",
            min=1,
            help="Reach --percent in N steps, each a global threshold over what is left followed by a short refine "
            "(the --refine-epochs split among them), as the paper's iterative variant; 1: one shot.",
        ),
    ] = 1,
    percent: PercentOpt = 0.6,
    max_macs: Annotated[
        float | None,
        typer.Option(
            "--max-macs",
            help="Instead of --percent: the fraction of the unpruned (sparse) model's MACs to keep, in (0, 1]; the "
            "lowest global threshold that fits it (with --prune-steps, each step's share of the way).",
        ),
    ] = None,
    min_channels: MinChOpt = 1,
    min_keep: MinKeepOpt = 0.0,
    normalize: NormalizeOpt = Normalize.none,
    round_to: RoundOpt = "auto",
    prune_stream: StreamOpt = False,
    fold: FoldOpt = True,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Reuse this trained baseline checkpoint instead of training one.")
    ] = None,
    baseline_epochs: Annotated[
        int | None,
        typer.Option(
            "--baseline-epochs",
            min=0,
            help="Epochs of baseline training (default: --epochs). 0: the model given by --weights (a file, or "
            "torchvision:IMAGENET1K_V1 from the torch hub cache) or --baseline IS the baseline: measured, exported "
            "and benchmarked as it is, and sparse training fine-tunes it (at refine's lr unless --lr is given).",
        ),
    ] = None,
    weights: WeightsOpt = None,
    image_size: ImageSizeOpt = None,
    data_cache: DataCacheOpt = DataCache.auto,
    precision: PrecisionOpt = None,
    sparse: Annotated[
        Path | None,
        typer.Option(
            "--sparse", help="Reuse this sparse-trained checkpoint instead of training one (to sweep --percent)."
        ),
    ] = None,
    preset: PresetOpt = Preset.fast,
    lr: LrOpt = None,
    refine_lr: Annotated[float | None, typer.Option("--refine-lr", help="Peak lr of refine (default: lr / 5).")] = None,
    batch_size: BatchOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    selection: SelectionOpt = Selection.gather,
    sync_bn: SyncBnOpt = False,
    compile: CompileOpt = False,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every",
            min=1,
            help="Measure test accuracy every N epochs (default: only after each stage's last epoch).",
        ),
    ] = None,
    batch: BatchesOpt = "1,32",
    threads: ThreadsOpt = None,
    bench_device: BenchDeviceOpt = BenchDevice.cpu,
    seconds: SecondsOpt = 1.0,
    int8: Annotated[
        bool,
        typer.Option("--int8", help="Also quantize baseline and pruned to INT8 (onnxruntime QDQ) and bench all four."),
    ] = False,
    ort: Annotated[
        bool, typer.Option("--ort", help="Also convert the pruned model(s) to the onnxruntime mobile format (.ort).")
    ] = False,
    ncnn: Annotated[
        bool,
        typer.Option(
            "--ncnn",
            help="Also run the pruned model in ncnn, a phone runtime (converted with pnnx, checked against "
            "onnxruntime, benchmarked beside it). The ncnn extra: pip install -e '.\\[ncnn]'.",
        ),
    ] = False,
    calib_images: CalibImagesOpt = 512,
    calibrate: CalibrateOpt = Calibrate.minmax,
    types: QuantTypesOpt = QuantTypes.auto,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run (kept in .OUT.partial beside OUT) with the same options: finished "
            "stages are skipped, an interrupted training stage continues from its last epoch.",
        ),
    ] = False,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = False,
):
    """Baseline → sparse training → prune → refine → ONNX export of both [→ INT8, .ort] → onnxruntime bench → report."""
    from slimexport.deploy import QuantizeConfig
    from slimexport.export import ExportConfig
    from slimexport.pipeline import PipelineConfig, run_pipeline
    from slimexport.prune import PruneConfig

    sparsity = _sparsity_value(sparsity)
    if max_macs is not None:
        percent = None  # the budget decides the threshold
    cfg = _fill(
        PipelineConfig,
        locals(),
        quantize=QuantizeConfig(calib_images=calib_images, calibrate=calibrate.value, types=types.value),
        export=ExportConfig(selection=selection.value),
        bench=_bench_config(batch, threads, bench_device, seconds),
        prune=_fill(PruneConfig, locals()),
    )
    with _trusting(None, trust_model_code):
        r = run_pipeline(cfg, command=shlex.join(["slimexport", *sys.argv[1:]]))
    if not r:  # a rank other than 0 under torchrun: rank 0 wrote the run and reports it
        return
    b, p, q = r["baseline"], r["pruned"], r["ratios"]
    sp = next(
        (s for s in q["speedup"] if s["batch"] == 1 and s["threads"] == 1), q["speedup"][0] if q["speedup"] else None
    )
    _say(
        f"{cfg.arch}: params {b['params']:,} -> {p['params']:,} (×{q['params']:.2f}), MACs ×{q['macs']:.2f}, "
        f"onnxruntime accuracy {b['accuracy']:.4f} -> {p['accuracy']:.4f}"
        + (f", speed-up ×{sp['speedup']:.2f} (batch {sp['batch']}, {sp['threads']} thread)" if sp else "")
        + f"; report: {out / 'report.md'}"
    )
    if len(r.get("variants", [])) > 2:
        _say(_variants_line(r["variants"]))


def _sparsity_value(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--sparsity must be a positive number or auto, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--sparsity must be a positive number or auto, got {text!r}")
    return value


def _variants_line(rows: list[dict]) -> str:
    """One line per run: each deployment variant's accuracy and batch-1 single-thread speed-up over baseline FP32."""

    def b1(row):
        x = next((y for y in row["latency"] if y["batch"] == 1 and y["threads"] == 1), row["latency"][0])
        return x["median_ms"]

    base = b1(rows[0])
    return "variants: " + ", ".join(
        f"{r['name']} {100 * r['accuracy']:.2f}% ×{base / b1(r):.2f} ({r['bytes'] / 1024:,.0f} KB)" for r in rows[1:]
    )


@app.command()
@_handle_errors
def models(
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Output classes.")] = 10,
    in_channels: Annotated[int, typer.Option("--in-channels", min=1, help="Input channels.")] = 3,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Input height = width, for MACs.")] = 32,
    torchvision_models: Annotated[
        bool,
        typer.Option(
            "--torchvision",
            help="List torchvision's classification models instead: params, MACs, and whether they have BatchNorm "
            "(what network slimming scores; those without are refused).",
        ),
    ] = False,
):
    """List the architectures with their parameter counts and MACs."""
    from rich.table import Table

    from slimexport.models import create_model, list_models
    from slimexport.stats import count_macs, count_params

    Console = type(console)
    if torchvision_models:
        from slimexport.models.external import torchvision_table

        table = Table(
            title=f"torchvision, {num_classes} classes, 3×{image_size}×{image_size} input (--arch torchvision:NAME)"
        )
        for col in ("--arch", "params", "MACs", "BatchNorm"):
            table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for r in torchvision_table(num_classes, image_size):
            table.add_row(
                f"torchvision:{r['name']}",
                f"{r['params']:,}" if r["params"] is not None else "–",
                f"{r['macs']:,}" if r["macs"] is not None else "–",
                "yes" if r["bn"] else "no: refused",
            )
        Console(width=160).print(table)
        return
    table = Table(title=f"{num_classes} classes, {in_channels}×{image_size}×{image_size} input")
    for col in ("arch", "params", "MACs", "family"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for name, desc in list_models():
        m = create_model(name, num_classes, in_channels)
        table.add_row(name, f"{count_params(m):,}", f"{count_macs(m, in_channels, (image_size, image_size)):,}", desc)
    Console(width=160).print(table)
    console.print(
        "Any other CNN: --arch torchvision:NAME (slimexport models --torchvision), timm:NAME, FILE.py:FACTORY"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()

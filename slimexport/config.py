"""Every setting's one home: the ``*Config`` dataclasses of the stages and the pipeline, with each user-facing
field's default, flag and help (:func:`setting`), the choices of each enumerated option, and validation. The CLI
builds its options from these fields (``tests/test_cli_options.py`` fails where one disagrees); a settings file
(:mod:`slimexport.settings_file`) reads into them. No torch and no other stage is imported here, so that
``slimexport --help`` stays fast and every layer may use it."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from slimexport.errors import ConfigError
from slimexport.fields import (  # noqa: F401 - the choices and helpers are imported from here by every layer
    ALLOCATE,
    BENCH_DEVICES,
    CACHES,
    CALIBRATE,
    DEVICES,
    INT8_KEEP,
    NORMALIZE,
    OPT_STYLES,
    PLATFORMS,
    PRECISIONS,
    PRESET_NAMES,
    PRESETS,
    PROVIDERS,
    QUANT_TYPES,
    REGULARIZERS,
    RUNTIMES,
    SCHEDULES,
    SELECTION_MODES,
    TEACHERS,
    check_normalize,
    default_of,
    option_name,
    setting,
    settings_of,
)
from slimexport.fields import fraction as _fraction
from slimexport.fields import one_of as _one_of


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class PruneConfig:
    """What a prune is asked to do, checked once (:meth:`validate`), nested in the pipeline's config.

    ``percent``: the fraction of the prunable BN channel classes removed by one global |γ| threshold (the paper's
    ``--percent``), or ``max_macs``: the fraction of the unpruned MACs to keep (the threshold is then found by
    bisection); exactly one of them. Each producing layer keeps at least ``min_channels`` and, with ``round_to``,
    a multiple of it (``"auto"`` is resolved by the stage, from the CPU). ``normalize`` compares |γ| as they are or
    per layer ÷ its max or mean. ``fold`` carries a removed channel's constant output act(β) into what reads it;
    ``prune_stream`` also prunes channels a conv reads before any BatchNorm (a pre-activation ResNet's stream),
    carrying their running mean on as a constant.
    """

    percent: float | None = setting(0.6, flag="--percent", short="-p", help=(
        "Fraction of all prunable BN channels to remove with one global |γ| threshold, in [0, 1) [default: 0.6 "
        "unless --max-macs is given]."))  # fmt: skip
    max_macs: float | None = setting(None, flag="--max-macs", help=(
        "Instead of --percent: the fraction of the unpruned MACs to keep, in (0, 1]; the lowest global threshold "
        "that fits it (with --prune-steps, each step's share of the way)."))  # fmt: skip
    target_speedup: float | None = setting(None, flag="--target-speedup", help=(
        "Instead of --percent: prune until the model runs this many times faster than the unpruned one on the "
        "target runtime (--runtime, --latency-batch, --latency-threads), measured: the lowest global threshold whose "
        "exported model, timed side by side with the unpruned one, is that fast (e.g. 2: twice as fast)."))  # fmt: skip
    max_latency: float | None = setting(None, flag="--max-latency", help=(
        "Instead of --percent: the latency in ms the pruned model may take at most on the target runtime, measured "
        "as for --target-speedup."))  # fmt: skip
    runtime: str = setting("onnxruntime", flag="--runtime", choices=RUNTIMES, help=(
        "Where --target-speedup and --max-latency are measured: onnxruntime (CPU), onnxruntime-cuda (a GPU), "
        "ncnn (the ncnn extra)."))  # fmt: skip
    allocate: str = setting("gamma", flag="--allocate", choices=ALLOCATE, help=(
        "With a latency target: gamma, one global |γ| threshold (the paper's); latency, each channel's |γ| divided "
        "by what it costs on the runtime (each layer's channels half pruned from the whole model and timed there), "
        "so the threshold keeps the most importance per ms."))  # fmt: skip
    latency_batch: int = setting(1, flag="--latency-batch", help="Batch size of the latency target's measurements.")
    latency_threads: int = setting(1, flag="--latency-threads", help="Threads of the latency target's measurements.")
    min_channels: int = setting(
        1,
        flag="--min-channels",
        help=("Every pruned layer keeps at least this many channels (its largest |γ|), so no layer is ever emptied."),
    )
    min_keep: float = setting(0.0, flag="--min-keep", help=(
        "Every pruned layer keeps at least this fraction of its channels (its largest |γ|), e.g. 0.25: the global "
        "threshold alone can leave a layer a few channels wide, a bottleneck refine does not recover from. 0: "
        "--min-channels alone (the paper's)."))  # fmt: skip
    # The Python API's default is exact counts (the paper's); the commands prune for the runtime on this machine.
    round_to: int | str = setting(1, cli_default="auto", flag="--round-to", help=(
        "Keep a multiple of this many channels per layer. auto: the channel block in whose multiples the "
        "--runtime's convolutions step, measured there once (a few seconds, cached: 16 on onnxruntime with AVX-512, "
        "8 with AVX2), the fast choice for deployment; 1: exactly the threshold's choice (the paper's)."))  # fmt: skip
    normalize: str = setting("none", flag="--normalize", choices=NORMALIZE, help=(
        "How |γ| are compared across layers: none, as they are (the paper's); max or mean: each layer's |γ| "
        "divided by its largest or mean |γ|. A BN followed by ReLU and a conv can scale all its γ at no cost, so "
        "raw |γ| may empty a layer whose channels are all small; max/mean make the threshold blind to that "
        "scale."))  # fmt: skip
    fold: bool = setting(True, flag="--fold/--no-fold", help=(
        "Fold what a removed channel still sends on (act(β) of its BN) into the bias or BN running mean of the "
        "layers that read it. --no-fold only to measure what folding buys."))  # fmt: skip
    prune_stream: bool = setting(False, flag="--prune-stream", help=(
        "Also remove channels a conv reads before any BatchNorm (a pre-activation ResNet's stream, read by its "
        "downsampling convs) where a BatchNorm reading the same tensor drops them; the conv gets that BN's running "
        "mean of the channel as a constant. Beyond the paper's rules; more MACs saved at the same threshold, not "
        "exact."))  # fmt: skip

    # the channels --min-keep is a fraction of, per layer (--prune-steps: the sparse model's); None: each layer's own
    widths: dict[str, int] | None = None

    def validate(self) -> PruneConfig:
        asked = [n for n in ("percent", "max_macs", "target_speedup", "max_latency") if getattr(self, n) is not None]
        if len(asked) != 1:
            raise ConfigError("give one of --percent, --max-macs, --target-speedup or --max-latency")
        if self.target_speedup is not None and not (_number(self.target_speedup) and self.target_speedup > 1):
            raise ConfigError(f"--target-speedup must be above 1 (×2: twice as fast), got {self.target_speedup}")
        if self.max_latency is not None and not (_number(self.max_latency) and self.max_latency > 0):
            raise ConfigError(f"--max-latency must be a positive number of ms, got {self.max_latency}")
        _one_of(self.runtime, RUNTIMES, "--runtime")
        _one_of(self.allocate, ALLOCATE, "--allocate")
        if self.allocate == "latency" and self.target_speedup is None and self.max_latency is None:
            raise ConfigError("--allocate latency weighs channels by their measured latency: give --target-speedup "
                              "or --max-latency")  # fmt: skip
        for flag, v in (("--latency-batch", self.latency_batch), ("--latency-threads", self.latency_threads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {v!r}")
        if self.percent is not None:
            self.percent = _fraction(self.percent, "--percent", False, True, "the fraction of BN channels to prune")
        if self.max_macs is not None:
            self.max_macs = _fraction(self.max_macs, "--max-macs", True, False,
                                      "the fraction of the unpruned MACs to keep")  # fmt: skip
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ConfigError(f"--min-channels must be at least 1, got {self.min_channels}")
        self.min_keep = _fraction(
            self.min_keep, "--min-keep", False, True, "the fraction of each layer's channels kept"
        )
        r = self.round_to
        if isinstance(r, str) and r.strip().lower() == "auto":
            self.round_to = "auto"  # measured on the runtime by the prune stage
        elif isinstance(r, bool) or not isinstance(r, (int, str)) or not str(r).strip().isdigit() or int(r) < 1:
            raise ConfigError(f"--round-to must be a positive integer or auto, got {r!r}")
        else:
            self.round_to = int(r)
        check_normalize(self.normalize)
        return self

    @classmethod
    def from_options(cls, **options: Any) -> PruneConfig:
        """A prune as the commands take it: ``--percent`` defaults to the field's default unless ``--max-macs``
        is given (the one place that rule lives)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in options.items() if k in names}
        if kw.get("percent") is None:
            other = any(kw.get(k) is not None for k in ("max_macs", "target_speedup", "max_latency"))
            kw["percent"] = None if other else cls.percent
        return cls(**kw)


ROUND_TO_CLI = PruneConfig.__dataclass_fields__["round_to"].metadata["cli_default"]


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.1  # peak (onecycle) or initial (multistep, constant) learning rate
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "onecycle"  # onecycle | multistep (×0.1 at 50% and 75%) | constant
    sparsity: float = 0.0  # s in s·sign(γ); 0 = plain training
    seed: int = 0
    augment: bool = True
    device: str = "auto"
    eval_batch_size: int = 512
    eval_every: int = 1  # evaluate on the test split every N epochs (the last epoch always)
    compile: bool = False  # torch.compile the training forward (pays on GPUs for small, launch-bound networks)
    sync_bn: bool = False  # under torchrun on CUDA: SyncBatchNorm (global batch statistics)
    # fp32, bf16 (autocast), or auto: bf16 on CUDA, on a CPU where it is measured faster. $SLIMEXPORT_PRECISION sets
    # the default (the test suite pins fp32, so that its figures do not depend on a probe's timing)
    precision: str = field(default_factory=lambda: os.environ.get("SLIMEXPORT_PRECISION", "auto"))
    regularizer: str = "l1"  # l1: s·|γ| (the paper); polar: s·(t·|γ| − |γ − mean γ|) (Zhuang et al. 2020)
    polar_t: float = 1.2  # polar's t: > 1 still pulls every γ down, those below the mean t+1 times as hard
    distill: float = 0.0  # weight of the teacher's KL term in refine (0: labels alone); needs a teacher
    temperature: float = 4.0  # softens both models' logits for the KL term (scaled back by T²)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.sparsity < 0 or not math.isfinite(self.sparsity):
            raise ConfigError(f"--sparsity must be >= 0, got {self.sparsity}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.sync_bn and not self.device.startswith("cuda") and not (self.device == "auto" and _cuda()):
            raise ConfigError("--sync-bn needs CUDA (NCCL); on the CPU each rank keeps its own BatchNorm statistics")
        _one_of(self.precision, PRECISIONS, "--precision")
        _one_of(self.schedule, SCHEDULES, "schedule")
        _one_of(self.regularizer, REGULARIZERS, "--regularizer")
        if not (self.polar_t > 0 and math.isfinite(self.polar_t)):
            raise ConfigError(f"--polar-t must be positive, got {self.polar_t}")
        if not 0 <= self.distill <= 1:
            raise ConfigError(f"--distill-weight must be in [0, 1], got {self.distill}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--distill-temperature must be positive, got {self.temperature}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def preset_config(
    preset: str,
    epochs: int,
    sparsity: float = 0.0,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    eval_every: int | None = None,
    compile: bool = False,
    refine: bool = False,
) -> TrainConfig:
    """A :class:`TrainConfig` from a preset: every default not given comes from :data:`PRESETS`. With ``refine``,
    ``lr`` is refine's own lr (default: the preset's lr × its ``refine_lr_factor``). ``eval_every`` None measures
    test accuracy after the last epoch only."""
    p = PRESETS.get(preset)
    if p is None:
        raise ConfigError(f"unknown --preset {preset!r}: {', '.join(PRESETS)}")
    if lr is None:
        lr = p["lr"] * (p["refine_lr_factor"] if refine else 1.0)
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size or p["batch_size"],
                       weight_decay=p["weight_decay"], schedule=p["schedule"], sparsity=sparsity, seed=seed,
                       device=device, eval_every=eval_every or epochs, compile=compile)  # fmt: skip


def parse_device(device: str) -> tuple[str, int]:
    """``cpu``, ``cuda`` or ``cuda:N`` → (onnxruntime provider, device id)."""
    name, _, index = device.partition(":")
    if name not in PROVIDERS or (index and (name != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown onnxruntime device {device!r}: cpu, cuda or cuda:N")
    return PROVIDERS[name], int(index or 0)


@dataclass
class BenchConfig:
    batches: list[int] = setting(flag="--batch", factory=lambda: [1, 32], help="Comma-separated batch sizes to time.")
    threads: list[int] = setting(flag="--threads", factory=lambda: [1, os.cpu_count() or 1], help=(
        "Comma-separated onnxruntime intra-op thread counts (CPU) (default: 1 and all cores)."))  # fmt: skip
    device: str = setting(
        "cpu",
        flag="--bench-device",
        choices=BENCH_DEVICES,
        help=("onnxruntime execution provider for latency: cpu, or cuda (needs onnxruntime-gpu; uses IOBinding)."),
    )
    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 2000
    seconds: float = setting(1.0, flag="--seconds", help="Timing budget per model and setting, after 20 runs.")
    accuracy: bool = setting(True, flag="--accuracy/--no-accuracy", help="Measure test accuracy in onnxruntime.")
    profile: bool = True  # per-op-type time shares at batch 1, one thread

    def validate(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batch sizes must be positive integers, got {self.batches}")
        if not self.threads or min(self.threads) < 1:
            raise ConfigError(f"--threads must be positive integers, got {self.threads}")
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ConfigError("--runs must be at least 1")
        if not (self.seconds >= 0 and math.isfinite(self.seconds)):  # False for nan too
            raise ConfigError(f"--seconds must be a finite number of seconds >= 0, got {self.seconds}")
        parse_device(self.device)


@dataclass
class ExportConfig:
    opset: int = setting(20, flag="--opset", help="ONNX opset.")
    simplify: bool = setting(True, flag="--simplify/--no-simplify", help="Simplify with onnxsim.")
    atol: float = setting(
        1e-3,
        flag="--atol",
        help=("Largest allowed |ONNX − PyTorch| over the logits of the parity images; beyond it export fails."),
    )
    parity_images: int = setting(512, flag="--parity-images", help="Real test images compared.")
    parity_batch: int = 128
    # How channel selections appear in the graph: "gather" (one Gather or Slice each, the fewest MACs) or "dense"
    # (absorbed into zero weights of the next layer), or "auto" (the candidates of
    # :func:`slimexport.selection.candidates`, each whole model timed in onnxruntime on this CPU at batch
    # ``tune_batch`` with ``tune_threads`` threads, the fastest kept).
    selection: str = setting("gather", flag="--selection", choices=SELECTION_MODES, help=(
        "How channel selections export: gather (one Gather/Slice each, fewest MACs), dense (absorbed into zero "
        "weights of the next layer: no index op, keeps onnxruntime's blocked CPU layout), or auto (export gather, "
        "dense and a per-selection mix, time each in onnxruntime on this CPU at batch 1, keep the fastest; pairs "
        "well with prune --round-to 16)."))  # fmt: skip
    tune_batch: int = 1
    tune_threads: int = 1
    tune_seconds: float = 1.0
    tune_device: str = "cpu"  # where `auto` times its candidates: the bench's device (cpu, cuda, cuda:N)
    # Apply the exact export rewrites (:func:`slimexport.rewrite.for_export`: a conv1×1 → avg-pool 2, as in
    # DenseNet's transitions, as one 2×2 stride-2 conv). Off only to measure what they gain.
    rewrite: bool = True

    def validate(self) -> ExportConfig:
        _one_of(self.selection, SELECTION_MODES, "--selection")
        if self.parity_images < 1:
            raise ConfigError(f"--parity-images must be at least 1, got {self.parity_images}")
        return self


@dataclass
class QuantizeConfig:
    calib_images: int = setting(
        512, flag="--calib-images", help=("Training images the INT8 activation ranges are calibrated on.")
    )
    calibrate: str = setting(
        "minmax",
        flag="--calibrate",
        choices=CALIBRATE,
        help=("How activation ranges are calibrated: minmax, entropy, percentile."),
    )
    types: str = setting(
        "auto",
        flag="--types",
        choices=QUANT_TYPES,
        help=("INT8 activation/weight types: auto (S8S8 on a CPU with VNNI, else U8S8 with reduce_range), s8s8, u8s8."),
    )
    keep: str = setting("always", flag="--int8-keep", choices=INT8_KEEP, help=(
        "always: the INT8 model as quantized; auto: INT8 only where it is faster than FP32 here (batch 1, one "
        "thread) and loses at most --int8-max-drop, the convs whose weights quantize worst put back to FP32 "
        "(1, 2, 4, ...) until it does; else FP32. The record says which and why."))  # fmt: skip
    max_drop: float = setting(0.01, flag="--int8-max-drop", help=(
        "--int8-keep auto: the accuracy INT8 may lose against FP32 (0.01: one point)."))  # fmt: skip
    per_channel: bool = True
    calib_batch: int = 64
    seed: int = 0  # which training images calibrate

    def validate(self) -> None:
        _one_of(self.keep, INT8_KEEP, "--int8-keep")
        _fraction(self.max_drop, "--int8-max-drop", False, True, "the accuracy INT8 may lose")
        if self.calib_images < 1:
            raise ConfigError(f"--calib-images must be at least 1, got {self.calib_images}")
        _one_of(self.calibrate, CALIBRATE, "--calibrate")
        _one_of(self.types, QUANT_TYPES, "--types")


@dataclass
class PipelineConfig:
    out: str = setting(
        "runs/slim", flag="--out", short="-o", help=("Run directory (created; replaced only with --force).")
    )
    arch: str | None = setting(None, flag="--arch", short="-a", help=(  # None: vgg11_w25, or the --baseline's
        "Architecture: vgg11/13/16/19 (vgg11_w25: 25% width), preresnet{9n+2} (preresnet164), densenet{3n+4} "
        "(densenet40); or any CNN, pruned by the graph engine: torchvision:NAME (resnet50, mobilenet_v2, ...), "
        "timm:NAME (with timm installed), path/to/file.py:factory or package.module:factory (factory gets "
        "num_classes=K if it takes it). See `slimexport models`."))  # fmt: skip
    dataset: str = setting("embedded", flag="--dataset", short="-d", help=(
        "embedded (Fashion-MNIST subset shipped with the package), fashion-mnist, cifar10, cifar100, "
        "imagefolder:PATH (PATH/train/<class>/*, PATH/val/<class>/*), or a path to an .npz with uint8 x_train, "
        "y_train, x_test, y_test."))  # fmt: skip
    data_dir: str | None = setting(None, flag="--data-dir", help=(
        "Where named data sets live (idx .gz files, cifar10.npz, or torchvision's layout) (default: "
        "~/.cache/slimexport/data)."))  # fmt: skip
    epochs: int = setting(10, flag="--epochs", short="-e", help="Epochs of baseline and of sparse training.")
    refine_epochs: int = setting(10, flag="--refine-epochs", help="Epochs of refine.")
    sparsity: float | str = setting(3e-3, flag="--sparsity", short="-s", help=(
        "Strength s of the sparsity term on every BN γ, or auto: chosen by a short probe from the baseline, the "
        "smallest s predicted to send --percent of the γ to zero without collapsing the rest."))  # fmt: skip
    regularizer: str = setting("l1", flag="--regularizer", choices=REGULARIZERS, help=(
        "Sparsity term on every BN γ: l1, s·|γ| (the paper's); polar, the polarization regularizer "
        "s·(t·|γ| − |γ − mean γ|) (Zhuang et al., NeurIPS 2020): γ below the mean are pulled t+1 times as hard as "
        "those above, so |γ| splits into a group at 0 and one that stays, and the threshold falls in the gap."
    ))  # fmt: skip
    polar_t: float = setting(
        1.2, flag="--polar-t", help=("polar's t (> 1: every γ is still pulled down, the low ones hardest).")
    )
    distill: bool = setting(False, flag="--distill/--no-distill", help=(
        "Refine learns from the unpruned model's logits too (knowledge distillation: KL on softened logits plus "
        "the label loss); one more forward per batch."))  # fmt: skip
    distill_weight: float = setting(
        0.5, flag="--distill-weight", help=("Weight of the teacher's KL term; the label loss gets 1 − it.")
    )
    distill_temperature: float = setting(
        4.0, flag="--distill-temperature", help=("Temperature T softening both models' logits (KL × T²).")
    )
    teacher: str = setting(
        "baseline", flag="--teacher", choices=TEACHERS, help=("The unpruned model that teaches with --distill.")
    )
    prune_steps: int = setting(1, flag="--prune-steps", help=(
        "Reach --percent in N steps, each a global threshold over what is left followed by a short refine (the "
        "--refine-epochs split among them), as the paper's iterative variant; 1: one shot."))  # fmt: skip
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(round_to=ROUND_TO_CLI))
    eval_every: int | None = setting(
        None,
        flag="--eval-every",
        help=("Measure test accuracy every N epochs (default: only after each stage's last epoch)."),
    )
    compile: bool = setting(
        False, flag="--compile", help=("torch.compile the training forward (pays on a GPU for small networks).")
    )
    sync_bn: bool = setting(
        False, flag="--sync-bn", help=("Under torchrun on CUDA: SyncBatchNorm, BN statistics over the global batch.")
    )
    baseline: str | None = setting(
        None, flag="--baseline", help=("Reuse this trained baseline checkpoint instead of training one.")
    )
    sparse: str | None = setting(
        None,
        flag="--sparse",
        help=("Reuse this sparse-trained checkpoint instead of training one (to sweep --percent)."),
    )
    weights: str | None = setting(
        None,
        flag="--weights",
        help=(
            "Start from this state_dict (e.g. pretrained weights you saved), loaded with weights_only=True; or "
            "torchvision:IMAGENET1K_V1 (any of the builder's weights) for --arch torchvision:NAME, read from the torch "
            "hub cache (nothing is downloaded). A classifier for another number of classes starts afresh."
        ),
    )
    baseline_epochs: int | None = setting(
        None,
        flag="--baseline-epochs",
        help=(
            "Epochs of baseline training (default: --epochs). 0: the model given by --weights (a file, or "
            "torchvision:IMAGENET1K_V1 from the torch hub cache) or --baseline IS the baseline: measured, exported and "
            "benchmarked as it is, and sparse training fine-tunes it (at refine's lr unless --lr is given)."
        ),
    )
    image_size: int | None = setting(
        None,
        flag="--image-size",
        help=("Resize the data's images to this height = width (imagefolder: default 224; else the data's own)."),
    )
    data_cache: str = setting(
        "auto",
        flag="--data-cache",
        choices=CACHES,
        help=(
            "imagefolder data: ram (decode every image once, keep it in memory: fast for small data), off (decode "
            "each batch from the files in DataLoader workers: memory bounded by batch and workers, any data size), or "
            "auto (ram where the decoded images fit in a quarter of the memory available)."
        ),
    )
    precision: str | None = setting(
        None,
        flag="--precision",
        choices=PRECISIONS,
        help=(
            "Training arithmetic: fp32, bf16 (autocast), or auto: bf16 on CUDA; on a CPU, bf16 only where it has "
            "native bf16 instructions (AMX, AVX512-BF16) and a short timed probe shows it faster for this model. The "
            "choice and why go into the checkpoint [default: auto, or $SLIMEXPORT_PRECISION]."
        ),
    )
    preset: str = setting(
        "fast",
        flag="--preset",
        choices=PRESET_NAMES,
        help=("Schedule: fast (one-cycle) or paper (lr ×0.1 at 50% and 75%, batch 64, weight decay 1e-4)."),
    )
    lr: float | None = setting(
        None, flag="--lr", help=("Peak (fast) or initial (paper) learning rate (default: the preset's, 0.1).")
    )
    refine_lr: float | None = setting(None, flag="--refine-lr", help="Peak lr of refine (default: lr / 5).")
    batch_size: int | None = setting(
        None, flag="--batch-size", short="-b", help=("Training batch size (default: the preset's: fast 128, paper 64).")
    )
    seed: int = setting(0, flag="--seed", help="Random seed.")
    device: str = setting(
        "auto", flag="--device", choices=DEVICES, help=("Where to train: auto (CUDA if available), cpu, cuda.")
    )
    force: bool = setting(False, flag="--force", short="-f", help="Overwrite an existing output.")
    resume: bool = setting(False, flag="--resume", help=(
        "Continue an interrupted run (kept in .OUT.partial beside OUT) with the same options: finished stages are "
        "skipped, an interrupted training stage continues from its last epoch (a detector's starts again)."
    ))  # fmt: skip
    train_args: str | None = setting(None, flag="--train-args", help=(
        "Detectors (--arch ultralytics:FILE): Ultralytics' own training arguments for every training stage, "
        "KEY=VALUE[,KEY=VALUE] (e.g. nbs=16,close_mosaic=0,optimizer=SGD,lr0=0.01)."))  # fmt: skip
    int8: bool = setting(
        False, flag="--int8", help=("Also quantize baseline and pruned to INT8 (onnxruntime QDQ) and bench all four.")
    )
    ort: bool = setting(
        False, flag="--ort", help=("Also convert the pruned model(s) to the onnxruntime mobile format (.ort).")
    )
    ncnn: bool = setting(
        False,
        flag="--ncnn",
        help=(
            "Also run the pruned model in ncnn, a phone runtime (converted with pnnx, checked against onnxruntime, "
            "benchmarked beside it). The ncnn extra: pip install -e '.\\[ncnn]'."
        ),
    )
    bench: BenchConfig = field(default_factory=BenchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)

    def validate(self) -> None:
        """Checks of the settings alone; what depends on the machine (ncnn installed) the pipeline checks."""
        self.prune.validate()
        _one_of(self.preset, PRESET_NAMES, "--preset")
        if self.epochs < 1 or self.refine_epochs < 1:
            raise ConfigError("--epochs and --refine-epochs must be at least 1")
        if self.baseline_epochs is not None and self.baseline_epochs < 0:
            raise ConfigError(f"--baseline-epochs must be 0 or more, got {self.baseline_epochs}")
        trained_detector = str(self.arch or "").startswith("ultralytics:")  # the .pt it names is the baseline
        if self.baseline_epochs == 0 and self.weights is None and self.baseline is None and not trained_detector:
            raise ConfigError(
                "--baseline-epochs 0 takes a trained model as the baseline: give it with --weights FILE, "
                "--weights torchvision:IMAGENET1K_V1 or --baseline CHECKPOINT"
            )
        self.sparsity = parse_sparsity(self.sparsity)
        _one_of(self.teacher, TEACHERS, "--teacher")
        _one_of(self.data_cache, CACHES, "--data-cache")
        if self.prune_steps > 1 and (self.prune.target_speedup is not None or self.prune.max_latency is not None):
            raise ConfigError("--prune-steps above 1 with a latency target: give the target in one step")
        if self.prune_steps < 1 or self.prune_steps > self.refine_epochs:
            raise ConfigError(
                f"--prune-steps {self.prune_steps}: between 1 and --refine-epochs ({self.refine_epochs}); each step "
                "refines at least one epoch"
            )
        self.train_config("refine").validate()  # distillation's weight and temperature
        self.train_config("sparse").validate()  # the regularizer and its t
        self.bench.validate()
        self.export.validate()
        self.quantize.validate()

    @property
    def from_trained(self) -> bool:
        """The baseline is a trained model taken as it is; sparse training fine-tunes it."""
        return self.baseline_epochs == 0

    def train_config(self, stage: str, sparsity: float | None = None, epochs: int | None = None) -> TrainConfig:
        """The training options of ``stage`` (baseline, sparse or refine), from the preset where not given;
        ``sparsity`` is the resolved s (``--sparsity auto``), ``epochs`` a refine step's share (``--prune-steps``).
        The one mapping from these settings to a :class:`TrainConfig`: the train and refine commands use it too."""
        common = dict(batch_size=self.batch_size, seed=self.seed, device=self.device, compile=self.compile)
        s = sparsity if sparsity is not None else (0.0 if isinstance(self.sparsity, str) else float(self.sparsity))
        extra: dict[str, Any] = {}
        if stage == "refine":
            cfg = preset_config(self.preset, epochs or self.refine_epochs, 0.0, self.refine_lr,
                                eval_every=self.eval_every, refine=True, **common)  # fmt: skip
            if self.distill:
                extra = {"distill": self.distill_weight, "temperature": self.distill_temperature}
        elif stage == "sparse" and self.from_trained:  # fine-tuning a trained model: refine's gentler lr
            cfg = preset_config(self.preset, self.epochs, s, self.lr, eval_every=self.eval_every, refine=True, **common)
        elif stage == "baseline" and self.baseline_epochs:
            cfg = preset_config(self.preset, self.baseline_epochs, 0.0, self.lr, eval_every=self.eval_every, **common)
        else:
            cfg = preset_config(self.preset, self.epochs, s if stage == "sparse" else 0.0, self.lr,
                                eval_every=self.eval_every, **common)  # fmt: skip
        if stage == "sparse":
            extra = {"regularizer": self.regularizer, "polar_t": self.polar_t}
        return dataclasses.replace(cfg, sync_bn=self.sync_bn, precision=self.precision or cfg.precision, **extra)

    def channels_to_remove(self) -> float:
        """The fraction of BN channels the prune is to remove: --percent, or for --max-macs F about 1 − √F (keeping
        a fraction k of every layer's channels keeps about k² of the MACs)."""
        p = self.prune
        return p.percent if p.percent is not None else 1 - p.max_macs**0.5

    def refine_epochs_per_step(self) -> list[int]:
        """Refine's epochs split among the --prune-steps steps (the last takes the remainder)."""
        each = self.refine_epochs // self.prune_steps
        return [each] * (self.prune_steps - 1) + [self.refine_epochs - each * (self.prune_steps - 1)]


def parse_sparsity(value: Any) -> float | str:
    """``--sparsity``: a positive number, or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        s = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        s = math.nan
    if not (s > 0 and math.isfinite(s)):
        raise ConfigError(f"--sparsity must be a positive number or auto, got {value!r}")
    return s


# The sections of PipelineConfig that are configs of their own (a run's config.json nests them by these names).
SECTIONS = {"prune": PruneConfig, "bench": BenchConfig, "export": ExportConfig, "quantize": QuantizeConfig}

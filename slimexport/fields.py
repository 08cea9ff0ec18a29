"""The parts every setting is made of: the choices of each enumerated option, the named schedules, and
:func:`setting`, a dataclass field that is also a command-line option (its flag, help and choices). The ``*Config``
classes of :mod:`slimexport.config` are built from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from slimexport.errors import ConfigError

# The choices of every enumerated setting (the CLI's enums are made from these tuples).
DEVICES = ("auto", "cpu", "cuda")  # where to train
BENCH_DEVICES = ("cpu", "cuda")  # the onnxruntime execution provider the CLI offers (the library takes cuda:N too)
PRESET_NAMES = ("fast", "paper")
NORMALIZE = ("none", "max", "mean")
REGULARIZERS = ("l1", "polar")
TEACHERS = ("baseline", "sparse")
PRECISIONS = ("fp32", "bf16", "auto")
CACHES = ("auto", "ram", "off")
SELECTION_MODES = ("gather", "dense", "auto")
CALIBRATE = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("auto", "s8s8", "u8s8")
OPT_STYLES = ("fixed", "runtime")
PLATFORMS = ("amd64", "arm")
SCHEDULES = ("onecycle", "multistep", "constant")
INT8_KEEP = ("always", "auto")  # which INT8 model the deploy keeps: as quantized, or only where it pays
ALLOCATE = ("gamma", "latency")  # how channels are chosen: one |γ| threshold, or importance per unit of latency
RUNTIMES = ("onnxruntime", "onnxruntime-cuda", "ncnn")  # where a latency target is measured
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# Named schedules, the one home of their defaults. `fast` is a short one-cycle schedule; `paper` is the reference
# recipe (Liu et al. 2017). Refine's learning rate is `refine_lr_factor` × the training lr unless given.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"schedule": "onecycle", "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "refine_lr_factor": 0.2},
    "paper": {"schedule": "multistep", "lr": 0.1, "batch_size": 64, "weight_decay": 1e-4, "refine_lr_factor": 0.2},
}


def setting(default: Any = dataclasses.MISSING, *, flag: str, help: str, short: str | None = None,
            choices: tuple[str, ...] | None = None, factory: Any = dataclasses.MISSING,
            cli_default: Any = dataclasses.MISSING) -> Any:  # fmt: skip
    """A config field that is also a command-line option: ``flag`` (``--name``, or ``--name/--no-name`` for a
    switch), its ``help`` and, for an enumerated setting, its ``choices``. ``cli_default``: where the commands
    default to something else than the Python API (``round_to``: auto on the command line, exact in the API)."""
    meta = {"flag": flag, "help": help, "short": short, "choices": choices}
    if cli_default is not dataclasses.MISSING:
        meta["cli_default"] = cli_default
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_name(flag: str) -> str:
    """``--refine-epochs`` → ``refine_epochs``: the CLI parameter (and settings-file key) of a flag."""
    return flag.split("/")[0].lstrip("-").replace("-", "_")


def settings_of(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a config class that are command-line options, by option name."""
    return {option_name(f.metadata["flag"]): f for f in dataclasses.fields(cls) if "flag" in f.metadata}


def default_of(f: dataclasses.Field, cli: bool = False) -> Any:
    """A field's default (``cli``: as the commands take it, see :func:`setting`)."""
    if cli and "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def fraction(value: Any, flag: str, lo_open: bool, hi_open: bool, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (0 < value if lo_open else 0 <= value) and (value < 1 if hi_open else value <= 1)
    if not ok:
        lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{flag} must be in {lo}0, 1{hi} ({what}), got {value}")
    return float(value)


def one_of(value: Any, choices: tuple[str, ...], flag: str) -> str:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_normalize(normalize: str) -> str:
    return one_of(normalize, NORMALIZE, "--normalize")

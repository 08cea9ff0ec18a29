"""The commands' options, built from the config fields that own them (:mod:`slimexport.config`): each option's
flag, help text, choices and default are read from its field, so they are written once. An option that means
something else in one command (``refine --lr``, ``train --out``) is that command's own and is declared there, named
in :data:`OWN`; ``tests/test_cli_options.py`` checks every other option against its field."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from slimexport import config as C
from slimexport.fields import option_name

# Every setting a command can take, by option name (PipelineConfig's own and its sections').
SETTINGS: dict[str, dataclasses.Field] = {}
for _cls in (C.PipelineConfig, *C.SECTIONS.values()):
    for _name, _field in C.settings_of(_cls).items():
        assert _name not in SETTINGS, f"two settings are the option --{_name}"
        SETTINGS[_name] = _field

# The options a command declares itself, because there they mean something else than the setting of that name.
OWN: dict[str, set[str]] = {
    "train": {"out", "epochs", "sparsity", "resume"},
    "refine": {"out", "epochs", "lr", "teacher", "arch", "resume"},
    "prune": {"out", "dataset", "arch"},
    "export": {"out", "arch"},
    "bench": {"device", "out"},
    "quantize": {"out"},
    "convert": {"out"},
    "pipeline": {"sparsity"},  # text, so that it takes "auto"
    "models": {"image_size"},
    "detection-data": {"out", "image_size", "seed", "force"},
    "sweep": {"out", "refine_epochs", "baseline", "batch", "threads", "resume", "arch"},  # a sweep's own
}


def _enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    return Enum(name, [(v, v) for v in values], type=str)


# The CLI's enums, from the library's own tuples.
ENUMS: dict[tuple[str, ...], type[Enum]] = {
    values: _enum(name, values)
    for name, values in {
        "Device": C.DEVICES, "BenchDevice": C.BENCH_DEVICES, "Preset": C.PRESET_NAMES, "Normalize": C.NORMALIZE,
        "Regularizer": C.REGULARIZERS, "Teacher": C.TEACHERS, "Precision": C.PRECISIONS, "DataCache": C.CACHES,
        "Selection": C.SELECTION_MODES, "Calibrate": C.CALIBRATE, "QuantTypes": C.QUANT_TYPES,
        "OptStyle": C.OPT_STYLES, "Platform": C.PLATFORMS, "Runtime": C.RUNTIMES,
        "Allocate": C.ALLOCATE, "Int8Keep": C.INT8_KEEP,
    }.items()
}  # fmt: skip


def enum_of(values: tuple[str, ...]) -> type[Enum]:
    """The CLI's enum of a tuple of choices in :mod:`slimexport.config`."""
    return ENUMS[values]


def option(name: str, annotation: Any = None, **kw: Any) -> Any:
    """``Annotated[type, typer.Option(...)]`` of the setting ``name``: its flags and help (``kw`` adds to them,
    e.g. ``min=1``). ``annotation`` is the parameter's type; an enumerated setting's is its enum."""
    f = SETTINGS[name]
    m = f.metadata
    flags = [m["flag"], *([m["short"]] if m["short"] else [])]
    if m["choices"]:
        annotation = ENUMS[m["choices"]] | None if default(name) is None else ENUMS[m["choices"]]
    return Annotated[annotation, typer.Option(*flags, help=m["help"], **kw)]


def default(name: str) -> Any:
    """The setting's default, as its option takes it (an enum member; a list as comma-separated text)."""
    f = SETTINGS[name]
    value = C.default_of(f, cli=True)
    if f.metadata["choices"] and value is not None:
        return ENUMS[f.metadata["choices"]](value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


# Every setting's default as its option takes it, for the commands' signatures: ``dataset: DatasetOpt = D.dataset``.
D = SimpleNamespace(**{name: default(name) for name in SETTINGS})


def plain(value: Any) -> Any:
    """An option's value as the config fields hold it: an enum's value, a path as text."""
    return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value


def fill(cls, options: dict[str, Any], **nested: Any):
    """A config dataclass from a command's options: every field takes the value of its option, named by its flag
    (``--int8-keep`` fills ``keep``) or, for a field without one, by the field; ``nested`` gives the fields built
    otherwise. (Matching field names alone dropped ``--int8-keep`` and ``--int8-max-drop`` without a word.)"""
    by_option = {option_name(f.metadata["flag"]) if "flag" in f.metadata else f.name: f.name
                 for f in dataclasses.fields(cls)}  # fmt: skip
    given = {name: plain(options[opt]) for opt, name in by_option.items() if opt in options and name not in nested}
    return cls(**given, **nested)


# Options several commands share, each built from its setting.
ArchOpt = option("arch", str | None)
DatasetOpt = option("dataset", str)
DataDirOpt = option("data_dir", Path | None, envvar="SLIMEXPORT_DATA")
PrecisionOpt = option("precision", show_default=False)
DataCacheOpt = option("data_cache")
RegularizerOpt = option("regularizer")
PolarTOpt = option("polar_t", float)
DistillWeightOpt = option("distill_weight", float, min=0.0, max=1.0)
DistillTempOpt = option("distill_temperature", float)
LrOpt = option("lr", float | None)
BatchOpt = option("batch_size", int | None, min=1)
PresetOpt = option("preset")
DeviceOpt = option("device")
SeedOpt = option("seed", int)
EvalEveryOpt = option("eval_every", int | None, min=1)
CompileOpt = option("compile", bool)
SyncBnOpt = option("sync_bn", bool)
WeightsOpt = option("weights", str | None)
ImageSizeOpt = option("image_size", int | None)
ForceOpt = option("force", bool)
PercentOpt = option("percent", float | None, show_default=False)
MaxMacsOpt = option("max_macs", float | None)
TargetSpeedupOpt = option("target_speedup", float | None)
MaxLatencyOpt = option("max_latency", float | None)
RuntimeOpt = option("runtime")
AllocateOpt = option("allocate")
Int8KeepOpt = option("int8_keep")
Int8MaxDropOpt = option("int8_max_drop", float)
LatencyBatchOpt = option("latency_batch", int, min=1)
LatencyThreadsOpt = option("latency_threads", int, min=1)
MinChOpt = option("min_channels", int)
MinKeepOpt = option("min_keep", float)
NormalizeOpt = option("normalize")
RoundOpt = option("round_to", str)
StreamOpt = option("prune_stream", bool)
FoldOpt = option("fold", bool)
SelectionOpt = option("selection")
BatchesOpt = option("batch", str)
ThreadsOpt = option("threads", str | None)
BenchDeviceOpt = option("bench_device")
SecondsOpt = option("seconds", float)
AccuracyOpt = option("accuracy", bool)
CalibImagesOpt = option("calib_images", int)
CalibrateOpt = option("calibrate")
QuantTypesOpt = option("types")

# Options of the commands that read a checkpoint (not settings of a run).
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

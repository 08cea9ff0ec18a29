"""A run directory: built in a hidden sibling (``.NAME.partial``) and renamed into place when the run completes;
what may differ between an interrupted run and its ``--resume``, and the check that nothing else does."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimexport.config import PipelineConfig
from slimexport.errors import ConfigError
from slimexport.fileio import read_json
from slimexport.settings_file import RECORDED

# Options that only say where or whether to write, or how often to measure: they may differ between an interrupted
# run and its resume (training's own resume check ignores eval_every too: evaluating does not change the weights).
RESUME_FREE = ("out", "force", "resume", "eval_every", "data_cache", "data_cache_resolved")


def partial_dir(out: Path) -> Path:
    """Where a run is built, and where an interrupted one stays."""
    return out.parent / f".{out.name}.partial"


# config.json of version 0.1 had the prune options at the top level
_FLAT_PRUNE = ("percent", "min_channels", "normalize", "round_to", "prune_stream")


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The options that decide what a run computes, flat (``prune.percent``), for comparing two runs' configs."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k in RESUME_FREE:
            continue
        if isinstance(v, dict) and k in ("prune", "bench", "export", "quantize"):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        else:
            out[f"prune.{k}" if k in _FLAT_PRUNE else k] = v
    return out


def check_resumable(work: Path, config: dict[str, Any]) -> None:
    try:
        old = read_json(work / "config.json")
    except (OSError, ValueError):
        raise ConfigError(
            f"cannot resume: {work}/config.json is missing or unreadable; start over with --force"
        ) from None
    # an option the interrupted run's version did not have yet counts as its default (it had that behaviour)
    a, b = _recipe(asdict(PipelineConfig())) | _recipe(old), _recipe(config)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k} ({a.get(k)!r} then, {b.get(k)!r} now)" for k in diff[:3])
        raise ConfigError(f"cannot resume {work}: options differ from the interrupted run's: {shown}")


def is_run_dir(folder: Path) -> bool:
    """A run directory the pipeline wrote (one --force may replace)."""
    return (folder / "report.json").is_file() or (folder / "config.json").is_file()


def run_config(cfg: PipelineConfig, device: Any, ds: Any) -> dict[str, Any]:
    """What a run writes as its config.json: its settings, and what it resolved on this machine (the keys of
    :data:`~slimexport.settings_file.RECORDED`, which ``--config`` reads past)."""
    from slimexport.prune import resolve_round_to

    rounded, why = resolve_round_to(cfg.prune.round_to)
    cache = {"cache": ds.cache, "reason": ds.cache_reason}
    resolved = {"resolved_device": str(device), "data": ds.summary(), "round_to_resolved": rounded,
                "round_to_reason": why, "data_cache_resolved": cache}  # fmt: skip
    assert set(resolved) == set(RECORDED), "settings_file.RECORDED names what a run records"
    return asdict(cfg) | resolved

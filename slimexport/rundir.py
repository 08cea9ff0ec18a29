"""A run directory: built in a hidden sibling (``.NAME.partial``) and renamed into place when the run completes;
what may differ between an interrupted run and its ``--resume``, and the check that nothing else does."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from slimexport import distributed
from slimexport.config import PipelineConfig
from slimexport.console import console
from slimexport.errors import ConfigError, OutputExistsError
from slimexport.fileio import read_json, write_json
from slimexport.settings_file import RECORDED

# Options that only say where or whether to write, or how often to measure: they may differ between an interrupted
# run and its resume (training's own resume check ignores eval_every too: evaluating does not change the weights).
RESUME_FREE = ("out", "force", "resume", "eval_every", "data_cache", "data_cache_resolved")


@dataclass
class Stage:
    """One step of the pipeline: ``run`` writes ``outputs`` (file names in the run directory) and returns the
    stage's record."""

    name: str
    outputs: tuple[str, ...]
    run: Callable[[Any], dict[str, Any]]


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

    rounded, why = resolve_round_to(cfg.prune.round_to, cfg.prune)
    cache = {"cache": ds.cache, "reason": ds.cache_reason}
    resolved = {"resolved_device": str(device), "data": ds.summary(), "round_to_resolved": rounded,
                "round_to_reason": why, "data_cache_resolved": cache}  # fmt: skip
    assert set(resolved) == set(RECORDED), "settings_file.RECORDED names what a run records"
    return asdict(cfg) | resolved


def check_start(out: Path, work: Path, resume: bool, force: bool) -> None:
    """Refuse to start over what exists (without ``force``) and to resume what is not there."""
    if resume and not work.is_dir():
        state = "is complete" if (out / "report.json").is_file() else "has no interrupted run"
        raise ConfigError(f"nothing to resume: {out} {state} ({work} does not exist)")
    if not resume:
        if work.exists() and not force:
            raise OutputExistsError(
                f"an interrupted run of {out} is kept in {work}: continue it with --resume, or start over with --force"
            )
        if out.exists() and not force:
            raise OutputExistsError(f"run directory {out} already exists; pass --force to replace it")


def start(work: Path, config: dict[str, Any], resume: bool, main: bool) -> dict[str, Any]:
    """Open the partial run directory: the interrupted run's stage records when resuming (after checking that its
    options were the same), else a fresh empty directory; writes ``config.json``. Returns the records."""
    if resume:
        check_resumable(work, config)
        records = read_json(work / "stages.json") if (work / "stages.json").is_file() else {}
    else:
        records = {}
        if main:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
    if main:
        write_json(work / "config.json", config)
    distributed.barrier()
    return records


def execute(stages: list, run: Any, work: Path, out: Path, records: dict[str, Any], main: bool,
            every_rank: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Run the stages in the partial directory ``work``: a stage whose record and outputs an interrupted run left
    is kept (until one reruns: every later stage reads what it writes); each record goes to ``stages.json`` as it
    finishes. Once all have run, ``work`` replaces ``out``; on an error or Ctrl-C it stays for ``--resume``.
    Stages in ``every_rank`` run on every torchrun rank, the others on rank 0 alone. Returns ``report.json``."""
    finished: list[str] = []
    try:
        rerun = False
        for st in stages:
            if not rerun and st.name in records and all((work / o).is_file() for o in st.outputs):
                console.print(f"[dim]{st.name}: kept from the interrupted run[/]")
                finished.append(st.name)
                continue
            rerun = True
            if main or st.name in every_rank:
                t0 = time.perf_counter()
                rec = st.run(run)
                records[st.name] = {"seconds": time.perf_counter() - t0} | rec
                if main:
                    write_json(work / "stages.json", records)
            distributed.barrier()  # the next stage reads this one's files
            finished.append(st.name)
    except BaseException:
        epochs = sorted(p.name.removesuffix(".pt.resume") for p in work.glob("*.pt.resume"))
        if main and (finished or epochs):
            kept = [*finished, *(f"{name}'s finished epochs" for name in epochs)]
            console.print(
                f"[bold]{escape(', '.join(kept))} kept in {escape(str(work))}[/]; "
                "continue with the same command and --resume"
            )
        elif main:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not main:
        return {}
    report = read_json(work / "report.json")
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)
    return report

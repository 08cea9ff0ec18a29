"""The Typer app and what every command shares: one-line errors and exit codes, the summary line, output checks
and the model code the user names."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape

from slimexport.errors import ConfigError, SlimExportError, user_message

app = typer.Typer(
    name="slimexport",
    help="Network Slimming for deployment: sparse-train, prune, refine, export to ONNX, verify and benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def say(text: str) -> None:
    """A command's summary line on stdout (under torchrun from rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(text)


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')}/{world}: " if world > 1 else ""


def handle_errors(fn):
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


def ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise SlimExportError(f"{what} must be comma-separated positive integers, got {text!r}")
    return vals


def check_out(out: Path, force: bool, resume: bool = False, kind: str = "file", ours=None) -> None:
    """Refuse, before any work, an ``out`` that exists (without --force) or cannot be written; --resume may continue
    an unfinished run's ``out.resume``."""
    from slimexport.fileio import check_output

    out = out if out.name else out.resolve()  # "." and ".." have no name to put a ".resume" beside
    pending = out.with_name(out.name + ".resume")
    if resume and not pending.exists():
        raise ConfigError(f"nothing to resume: {pending} does not exist")
    check_output(out, force or (resume and pending.exists()), kind, ours)


def trusting(arch: str | None, trust_model_code: bool):
    """The model code the user named on this command line, which loading a checkpoint may then run."""
    from slimexport.models.external import trusted_code

    return trusted_code(arch, everything=trust_model_code)

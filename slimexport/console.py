"""One rich console (stderr) for progress bars and messages; stdout stays for the one-line summaries."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Under torchrun only rank 0 shows progress and messages (errors are printed by every rank that has one).
console = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) > 0)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

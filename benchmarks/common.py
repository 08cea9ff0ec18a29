"""What every benchmark shares: the machine tag results are filed under, and how a suite entry's run is named."""

from __future__ import annotations

import re

from slimexport.report import machine


def machine_tag() -> str:
    m = machine()
    name = m["gpu"] or m["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return f"{slug[:40]}-{m['cores']}c"


def run_name(suite: str, arch: str, dataset: str, percent: float, round_to: int = 1, normalize: str = "none") -> str:
    """A suite entry's run name: its directory under benchmarks/work and its result's file name."""
    name = f"{suite}-{arch.replace(':', '-')}-{dataset}-p{int(round(100 * percent))}"
    name += f"-r{round_to}" if round_to > 1 else ""
    return name + (f"-n{normalize}" if normalize != "none" else "")

"""What every benchmark shares: the machine tag results are filed under."""

from __future__ import annotations

import re

from slimexport.report import machine


def machine_tag() -> str:
    m = machine()
    name = m["gpu"] or m["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return f"{slug[:40]}-{m['cores']}c"

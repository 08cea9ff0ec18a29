"""Settings files for ``slimexport pipeline --config FILE``: TOML, YAML or JSON (a run's own ``config.json``),
read into option values by the fields of :mod:`slimexport.config` that own them. Every problem with a file (missing,
unreadable, malformed, an unknown key) is a one-line :class:`ConfigError` naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from slimexport.config import SECTIONS, PipelineConfig, option_name, settings_of
from slimexport.errors import ConfigError

# The settings a file may not give (whether to overwrite or resume is said on the command line; a run's
# config.json records both), and the records a run adds to its config.json.
COMMAND_LINE_ONLY = ("force", "resume")
RECORDED = ("resolved_device", "data", "data_cache_resolved", "round_to_resolved", "round_to_reason")


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """A settings file (``.toml``, ``.yaml``/``.yml`` or ``.json``, e.g. a run's ``config.json``) as
    ``{key: value}``: top-level keys as written (option names or fields), sections flattened to ``section.field``.
    One-line errors for a missing, unreadable or malformed file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: cannot read it ({e})") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
                import tomli as tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {p}: a .toml, .yaml, .yml or .json file, got {p.suffix or 'no suffix'!r}")
    except ConfigError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config {p}: not valid {suffix[1:].upper()}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: the top level must be a table of settings, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def pipeline_settings(flat: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``read_settings``' keys sorted into (values of ``slimexport pipeline``'s options by option name, fields of
    the sections that have no option, by section). An unknown key is a one-line error naming it and ``source``."""
    options = {option_name(f.metadata["flag"]): f.name for f in dataclasses.fields(PipelineConfig)
               if "flag" in f.metadata}  # fmt: skip
    by_field = {name: opt for opt, name in options.items()}
    values: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in RECORDED:
            continue
        section, _, name = key.rpartition(".")
        if section:
            cls = SECTIONS.get(section)
            fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            if name not in fields:
                raise ConfigError(f"--config {source}: unknown setting {key!r}")
            if "flag" in fields[name].metadata:
                values[option_name(fields[name].metadata["flag"])] = value
            else:
                extra.setdefault(section, {})[name] = value
            continue
        opt = option_name(key) if option_name(key) in options else by_field.get(key)
        if opt is None:
            opt = next((o for s in SECTIONS.values() for o in settings_of(s) if o == option_name(key)), None)
        if opt is None:
            raise ConfigError(f"--config {source}: unknown setting {key!r} (see slimexport pipeline --help)")
        if opt not in COMMAND_LINE_ONLY:  # a run's config.json records them; only the command line says them
            values[opt] = value
    return values, extra

"""Each setting is defined once: the commands' options agree with the config fields that own them, and a run's
settings can come from a file (TOML, YAML, JSON, or a run's own config.json) that the command line overrides."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from slimexport.cli import app
from slimexport.cli.options import OWN, SETTINGS, default, plain
from slimexport.config import PipelineConfig, PruneConfig

runner = CliRunner()


def disagreements(typer_app: typer.Typer, own: dict[str, set[str]]) -> list[str]:
    """Every option of every command that shares its name with a setting but not its flag, help or default."""
    group = typer.main.get_command(typer_app)
    commands = getattr(group, "commands", None) or {group.name: group}
    found = []
    for cmd_name, cmd in commands.items():
        for p in cmd.params:
            if (
                getattr(p, "param_type_name", "") != "option"
                or p.name not in SETTINGS
                or p.name in own.get(cmd_name, set())
            ):
                continue
            meta = SETTINGS[p.name].metadata
            if p.help != meta["help"]:
                found.append(f"{cmd_name} --{p.name}: help differs from its setting's")
            if meta["flag"].split("/")[0] not in p.opts:
                found.append(f"{cmd_name} --{p.name}: flag {p.opts} is not {meta['flag']}")
            if p.default is not None and plain(p.default) != plain(default(p.name)):
                found.append(f"{cmd_name} --{p.name}: default {p.default!r} is not {default(p.name)!r}")
    return found


def test_every_option_agrees_with_the_setting_that_owns_it():
    assert disagreements(app, OWN) == []
    group = typer.main.get_command(app)
    for cmd_name, names in OWN.items():  # no stale exemption: each names an option the command has
        assert names <= {p.name for p in group.commands[cmd_name].params}, cmd_name


def test_a_hand_written_option_that_disagrees_is_caught():
    """The check above can fail: a command that types its own --percent default and help is reported."""
    other = typer.Typer()

    @other.command()
    def prune(percent: Annotated[float, typer.Option("--percent", help="Fraction to prune.")] = 0.5):
        pass

    @other.command()
    def noop():
        pass

    found = disagreements(other, {})
    assert any("help differs" in f for f in found) and any("default 0.5" in f for f in found)


def test_percent_has_one_default():
    assert PruneConfig().percent == PipelineConfig().prune.percent == PruneConfig.from_options().percent == 0.6
    assert PruneConfig.from_options(max_macs=0.3).percent is None


@pytest.fixture
def captured(monkeypatch):
    """`slimexport pipeline` up to the run: the PipelineConfig it would run (run_pipeline is replaced)."""
    seen: list[PipelineConfig] = []

    def fake_run(cfg, command=""):
        cfg.validate()
        seen.append(cfg)
        return {}

    monkeypatch.setattr("slimexport.pipeline.run_pipeline", fake_run)
    return seen


def _run(args, captured):
    res = runner.invoke(app, ["pipeline", *args])
    assert res.exit_code == 0, res.output
    return captured[-1]


@pytest.mark.parametrize(
    "name,text",
    [
        ("s.toml", 'refine-epochs = 3\nprune_steps = 3\nnormalize = "max"\nbatch = [1, 8]\n[export]\nopset = 18\n'),
        ("s.yaml", "refine-epochs: 3\nprune_steps: 3\nnormalize: max\nbatch: [1, 8]\nexport:\n  opset: 18\n"),
        ("s.json", '{"refine_epochs": 3, "prune-steps": 3, "normalize": "max", "batch": "1,8", "opset": 18}'),
    ],
)
def test_a_settings_file_sets_options_and_the_command_line_overrides_it(tmp_path, captured, name, text):
    path = tmp_path / name
    path.write_text(text)
    cfg = _run(["--config", str(path)], captured)
    assert (cfg.refine_epochs, cfg.prune_steps, cfg.prune.normalize) == (3, 3, "max")
    assert cfg.bench.batches == [1, 8] and cfg.export.opset == 18
    assert cfg.epochs == PipelineConfig.epochs  # not in the file: the default
    cfg = _run(["--config", str(path), "--refine-epochs", "6", "--normalize", "mean"], captured)
    assert (cfg.refine_epochs, cfg.prune_steps, cfg.prune.normalize) == (6, 3, "mean")


def test_a_runs_own_config_json_repeats_it(tmp_path, captured):
    """What the pipeline writes as config.json (asdict of its settings and what it recorded) read back gives the
    same settings, including fields that have no option (export's opset, the bench's runs)."""
    bench = dataclasses.replace(PipelineConfig().bench, batches=[1], threads=[1], min_runs=7)
    asked = PipelineConfig(
        out=str(tmp_path / "run"), arch="vgg11_w12", epochs=3, refine_epochs=4, sparsity="auto", regularizer="polar",
        prune_steps=2, prune=PruneConfig(percent=None, max_macs=0.3, round_to=8, normalize="mean"), seed=5,
        int8=True, bench=bench, export=dataclasses.replace(PipelineConfig().export, selection="dense", opset=18),
        quantize=dataclasses.replace(PipelineConfig().quantize, calibrate="entropy", calib_batch=32), force=True,
    )  # fmt: skip
    from slimexport.data import load_dataset
    from slimexport.rundir import run_config

    record = run_config(asked, "cpu", load_dataset("embedded"))  # what the pipeline writes, and records beside
    (tmp_path / "config.json").write_text(json.dumps(record))
    cfg = _run(["--config", str(tmp_path / "config.json")], captured)
    assert cfg.force is False  # overwriting is said on the command line only
    assert dataclasses.asdict(cfg) == dataclasses.asdict(dataclasses.replace(asked, force=False))


@pytest.mark.parametrize(
    "text,match",
    [
        ("refine_epoch = 3\n", "unknown setting 'refine_epoch'"),
        ('epochs = "ten"\n', "epochs = 'ten'"),
        ('normalize = "median"\n', "normalize = 'median'"),
        ("[prune]\nthreshold = 0.1\n", "unknown setting 'prune.threshold'"),
        ("epochs = [\n", "not valid TOML"),
        ("percent = 1.5\n", "--percent must be in [0, 1)"),
    ],
)
def test_a_bad_settings_file_is_one_line_naming_it(tmp_path, captured, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    res = runner.invoke(app, ["pipeline", "--config", str(path)])
    assert res.exit_code == 2, res.output
    err = " ".join(res.stderr.split())
    assert match in err and "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    assert not captured


def test_a_missing_or_unknown_kind_of_settings_file(tmp_path, captured):
    for path, match in ((tmp_path / "none.toml", "file not found"), (tmp_path / "s.ini", "a .toml, .yaml")):
        if path.suffix == ".ini":
            path.write_text("[x]\n")
        res = runner.invoke(app, ["pipeline", "--config", str(path)])
        assert res.exit_code == 2 and match in " ".join(res.stderr.split()), res.output


def test_the_cli_enums_are_the_librarys_tuples():
    from slimexport import config as C
    from slimexport.cli.options import ENUMS

    assert set(ENUMS) >= {C.NORMALIZE, C.SELECTION_MODES, C.CALIBRATE, C.PRECISIONS, C.CACHES, C.REGULARIZERS}
    for values, enum in ENUMS.items():
        assert issubclass(enum, Enum) and tuple(e.value for e in enum) == values


def test_the_config_option_is_documented():
    assert "--config" in (Path(__file__).parents[1] / "docs" / "reference.md").read_text()


def test_options_whose_flag_differs_from_the_field_reach_the_config(captured):
    """--int8-keep and --int8-max-drop fill QuantizeConfig.keep and .max_drop (matched by field name they were
    dropped without a word, and `quantize --int8-keep auto` quantized as always)."""
    cfg = _run(["--int8", "--int8-keep", "auto", "--int8-max-drop", "0.05"], captured)
    assert (cfg.quantize.keep, cfg.quantize.max_drop) == ("auto", 0.05)

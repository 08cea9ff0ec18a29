"""An interrupted pipeline keeps its finished stages where the user can see them, and --resume continues it."""

import json

import pytest
from typer.testing import CliRunner

import slimexport.pipeline
from slimexport.cli import app
from tests.helpers import TINY_VGG

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models

ARGS = [
    "pipeline",
    "--arch",
    TINY_VGG,
    "--epochs",
    "1",
    "--refine-epochs",
    "1",
    "--sparsity",
    "0.02",
    "--percent",
    "0.5",
    "--batch",
    "1",
    "--threads",
    "1",
    "--seconds",
    "0.02",
    "--device",
    "cpu",
]


def test_interrupted_pipeline_keeps_finished_stages_and_resumes(tmp_path, small_npz, monkeypatch):
    out = tmp_path / "run"
    args = [*ARGS, "--dataset", small_npz, "--out", str(out)]
    real_bench = slimexport.pipeline.bench

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(slimexport.pipeline, "bench", ctrl_c)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    partial = tmp_path / ".run.partial"
    assert not out.exists()
    for f in ("baseline.pt", "sparse.pt", "pruned.pt", "refined.pt", "baseline.onnx", "pruned.onnx", "stages.json"):
        assert (partial / f).is_file(), f
    assert str(partial) in res.stderr.replace("\n", "") and "--resume" in res.stderr
    mtimes = {f.name: f.stat().st_mtime_ns for f in partial.iterdir()}

    # a plain rerun neither overwrites the kept stages nor starts silently over them
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.stderr
    # resuming with other options is refused, naming the option
    res = CliRunner().invoke(app, [*args, "--percent", "0.4", "--resume"])
    assert res.exit_code == 2 and "percent" in res.stderr, res.output

    monkeypatch.setattr(slimexport.pipeline, "bench", real_bench)
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert not partial.exists() and (out / "report.json").is_file()
    for f in ("baseline.pt", "sparse.pt", "pruned.pt", "refined.pt", "baseline.onnx", "pruned.onnx"):
        assert (out / f).stat().st_mtime_ns == mtimes[f], f"{f} was redone on resume"
    assert res.stderr.count("kept from the interrupted run") == 6
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["latency"] and r["stages"]["bench"]["seconds"] > 0

    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.stderr and "complete" in res.stderr


def test_resume_redoes_a_stage_whose_output_is_gone_and_every_later_one(tmp_path, small_npz, monkeypatch):
    out = tmp_path / "run"
    args = [*ARGS, "--dataset", small_npz, "--out", str(out)]

    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(slimexport.pipeline, "bench", boom)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3 and "disk on fire" in res.stderr
    partial = tmp_path / ".run.partial"
    (partial / "pruned.pt").unlink()
    kept = (partial / "sparse.pt").stat().st_mtime_ns
    before = (partial / "refined.pt").stat().st_mtime_ns
    monkeypatch.undo()
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert (out / "sparse.pt").stat().st_mtime_ns == kept
    assert (out / "refined.pt").stat().st_mtime_ns != before  # refine read the new pruned.pt, so it ran again


def test_a_failure_before_any_stage_leaves_nothing(tmp_path, small_npz, monkeypatch):
    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(slimexport.pipeline, "train", boom)
    res = CliRunner().invoke(app, [*ARGS, "--dataset", small_npz, "--out", str(tmp_path / "run")])
    assert res.exit_code == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--resume"])
def test_resume_without_an_interrupted_run(tmp_path, small_npz, flag):
    res = CliRunner().invoke(app, [*ARGS, "--dataset", small_npz, "--out", str(tmp_path / "run"), flag])
    assert res.exit_code == 2 and "nothing to resume" in res.stderr


def test_a_run_interrupted_before_an_option_existed_resumes_as_its_default(tmp_path):
    """config.json written by a version without, say, --normalize: the option counts as its default (none), so the
    run resumes with the default and refuses another value."""
    from dataclasses import asdict

    from slimexport.config import PipelineConfig
    from slimexport.errors import ConfigError
    from slimexport.fileio import write_json
    from slimexport.rundir import check_resumable as _check_resumable

    now = asdict(PipelineConfig(arch="vgg11_w25"))
    write_json(tmp_path / "config.json", now | {"prune": {k: v for k, v in now["prune"].items() if k != "normalize"}})
    _check_resumable(tmp_path, now)
    with pytest.raises(ConfigError, match=r"prune.normalize \('none' then, 'max' now\)"):
        _check_resumable(tmp_path, now | {"prune": now["prune"] | {"normalize": "max"}})
    # version 0.1 wrote the prune options at the top level
    flat = {k: v for k, v in now.items() if k != "prune"} | {"percent": 0.6, "round_to": "auto", "normalize": "none"}
    write_json(tmp_path / "config.json", flat)
    _check_resumable(tmp_path, now)
    with pytest.raises(ConfigError, match=r"prune.percent \(0.6 then, 0.5 now\)"):
        _check_resumable(tmp_path, now | {"prune": now["prune"] | {"percent": 0.5}})

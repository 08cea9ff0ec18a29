"""One end-to-end pipeline run on a tiny VGG and real (embedded) Fashion-MNIST images."""

import json

import pytest
from typer.testing import CliRunner

from slimexport.cli import app
from tests.helpers import TINY_VGG

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("pipe") / "run"
    res = CliRunner().invoke(
        app,
        [
            "pipeline",
            "--arch",
            TINY_VGG,
            "--dataset",
            small_npz,
            "--out",
            str(out),
            "--epochs",
            "2",
            "--refine-epochs",
            "1",
            "--sparsity",
            "0.02",
            "--percent",
            "0.5",
            "--batch",
            "1,8",
            "--threads",
            "1",
            "--seconds",
            "0.05",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "report:" in res.stdout
    return out


def test_run_directory_holds_every_artifact(run_dir):
    for f in (
        "config.json",
        "baseline.pt",
        "sparse.pt",
        "pruned.pt",
        "refined.pt",
        "baseline.onnx",
        "pruned.onnx",
        "report.json",
        "report.md",
        "gamma_hist.png",
        "channels.png",
        "latency.png",
    ):
        assert (run_dir / f).is_file(), f
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no partial directory left


def test_report_figures_are_consistent(run_dir):
    r = json.loads((run_dir / "report.json").read_text())
    b, p, q = r["baseline"], r["pruned"], r["ratios"]
    assert r["schema"] == "slimexport.report/1"
    assert p["params"] < b["params"] and p["macs"] < b["macs"] and p["onnx_bytes"] < b["onnx_bytes"]
    for k in ("params", "macs", "onnx_bytes"):
        assert q[k] == pytest.approx(b[k] / p[k])
    assert b["onnx_bytes"] == (run_dir / "baseline.onnx").stat().st_size
    lat_b = {(x["batch"], x["threads"]): x["median_ms"] for x in b["latency"]}
    assert len(q["speedup"]) == len(p["latency"]) == 2
    for s in q["speedup"]:
        m = next(x for x in p["latency"] if (x["batch"], x["threads"]) == (s["batch"], s["threads"]))
        assert s["speedup"] == pytest.approx(lat_b[(s["batch"], s["threads"])] / m["median_ms"])
        assert m["p90_ms"] >= m["median_ms"] > 0
    for m in (b, p):
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["torch_accuracy"] <= 1.0
        # onnxruntime and PyTorch agree on the whole test split to within one image in 200
        assert abs(m["accuracy"] - m["torch_accuracy"]) <= 1 / 200 + 1e-9
    assert r["parity"]["max_abs_diff"] <= 1e-3 and r["parity"]["top1_agreement"] >= 0.99
    assert set(r["stages"]) >= {"baseline", "sparse", "prune", "refine", "export_baseline", "export_pruned", "bench"}
    assert all(s["seconds"] > 0 for s in r["stages"].values())
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(r["versions"])
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert r["config"]["prune"]["percent"] == 0.5 and r["prune"]["channels_after"] < r["prune"]["channels_before"]
    md = (run_dir / "report.md").read_text()
    assert f"{b['params']:,}" in md and "gamma_hist.png" in md


def test_report_json_has_exactly_the_typed_schema(run_dir):
    """report.json's keys are the ones slimexport/records.py declares (and the README documents)."""
    from typing import get_type_hints

    from slimexport.records import ModelReport, PruneRecord, Report, StageRecord, VariantRow

    r = json.loads((run_dir / "report.json").read_text())
    assert set(r) == set(get_type_hints(Report))
    for name in ("baseline", "pruned"):
        assert set(r[name]) <= set(get_type_hints(ModelReport)), set(r[name]) - set(get_type_hints(ModelReport))
    assert set(r["prune"]) <= set(get_type_hints(PruneRecord)), set(r["prune"]) - set(get_type_hints(PruneRecord))
    for st in r["stages"].values():
        assert set(st) <= set(get_type_hints(StageRecord)), st
    for v in r["variants"]:
        assert set(v) <= set(get_type_hints(VariantRow)), v


def test_rerun_without_force_leaves_the_run_untouched(run_dir, small_npz):
    before = (run_dir / "report.json").read_bytes()
    res = CliRunner().invoke(app, ["pipeline", "--dataset", small_npz, "--out", str(run_dir)])
    assert res.exit_code == 2 and "already exists" in res.output
    assert (run_dir / "report.json").read_bytes() == before


def test_refine_and_bench_from_the_run(run_dir, small_npz, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "refine",
            str(run_dir / "pruned.pt"),
            "--dataset",
            small_npz,
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "r.pt"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "refined: accuracy" in res.stdout
    bench_json = tmp_path / "bench.json"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            str(run_dir / "baseline.onnx"),
            str(run_dir / "pruned.onnx"),
            "--dataset",
            small_npz,
            "--batch",
            "1",
            "--threads",
            "1",
            "--seconds",
            "0.05",
            "--out",
            str(bench_json),
        ],
    )
    assert res.exit_code == 0, res.output
    b = json.loads(bench_json.read_text())
    report = json.loads((run_dir / "report.json").read_text())
    # bench alone measures the same onnxruntime accuracy as the pipeline's bench stage
    for name in ("baseline", "pruned"):
        assert b["models"][name]["accuracy"] == report[name]["accuracy"]
    assert {r["model"] for r in b["latency"]} == {"baseline", "pruned"}


def test_sweep_percent_from_the_same_sparse_model(run_dir, small_npz, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(
        app,
        [
            "pipeline",
            "--baseline",
            str(run_dir / "baseline.pt"),
            "--sparse",
            str(run_dir / "sparse.pt"),
            "--dataset",
            small_npz,
            "--out",
            str(out),
            "--percent",
            "0.3",
            "--refine-epochs",
            "1",
            "--batch",
            "1",
            "--threads",
            "1",
            "--seconds",
            "0.05",
            "--device",
            "cpu",
            "--selection",
            "dense",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    first = json.loads((run_dir / "report.json").read_text())
    assert r["stages"]["sparse"]["accuracy"] == first["stages"]["sparse"]["accuracy"]  # the same sparse model
    assert r["prune"]["percent"] == 0.3 and r["pruned"]["params"] > first["pruned"]["params"]
    assert r["config"]["export"]["selection"] == "dense"

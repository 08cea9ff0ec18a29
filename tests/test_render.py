"""The benchmark renderer: RESULTS.md sections from result files (the figures users read must come out right)."""

import json

from benchmarks import sections
from benchmarks.run import render_results


def _lat(ms1, ms32=None, threads=(1, 2)):
    rows = [{"batch": 1, "threads": t, "median_ms": ms1 / t, "p90_ms": ms1} for t in threads]
    if ms32:
        rows += [{"batch": 32, "threads": t, "median_ms": ms32 / t, "p90_ms": ms32} for t in threads]
    return rows


def test_deploy_section_shows_speed_ups_against_baseline_fp32():
    run = {"arch": "vgg19", "dataset": "embedded: 5000 train", "percent": 0.7, "command": "slimexport pipeline --int8",
           "variants": [
               {"name": "baseline", "bytes": 1000, "accuracy": 0.9, "latency": _lat(10.0, 100.0),
                "parity": {"reference": "PyTorch", "top1_agreement": 1.0}},
               {"name": "pruned", "bytes": 100, "accuracy": 0.91, "latency": _lat(2.0, 20.0),
                "parity": {"reference": "PyTorch", "top1_agreement": 1.0}},
               {"name": "pruned-int8", "bytes": 30, "accuracy": 0.905, "latency": _lat(1.0, 8.0),
                "parity": {"reference": "pruned.onnx", "top1_agreement": 0.99}},
           ]}  # fmt: skip
    text = "\n".join(sections.deploy([{"kind": "deploy", "command": "c", "machine_tag": "m", "date": "2026-11-29",
                                        "runs": [run]}]))  # fmt: skip
    assert "| pruned-int8 | 30 | 90.50% | 0.9900 (pruned.onnx) | 1.000 (×10.00) |" in text
    assert "8.000 (×12.50)" in text  # batch 32, one thread: 100 / 8


def test_coverage_section_counts_and_flags(tmp_path):
    res = {"kind": "graph_coverage", "command": "python -m benchmarks.graph_coverage", "machine_tag": "m",
           "date": "2026-11-29", "versions": {"torch_pruning": "1.6.1"},
           "summary": {"models": 3, "with_bn": 2, "pruned_exactly": 1, "refused": 0, "crashed": 1,
                       "torch_pruning_pruned": 1},
           "engine_speed": {"model": "resnet50", "input": [1, 3, 224, 224], "slimexport_s": 1.0,
                            "torch_pruning_s": 2.0, "runs": 3},
           "models": [
               {"model": "a", "input": 64, "has_bn": True, "slimexport": {"status": "pruned", "groups": 5,
                "unprunable_groups": 1, "macs_ratio": 3.0, "exact": True, "exact_rel_error": 1e-7,
                "onnx": {"ok": True}, "unprunable_reasons": ["x: grouped conv"]},
                "torch_pruning": {"status": "pruned", "macs_ratio": 2.0, "onnx": {"ok": True}}},
               {"model": "b", "input": 64, "has_bn": True, "slimexport": {"status": "crashed", "error": "boom"},
                "torch_pruning": {"status": "crashed", "error": "ZeroDivisionError"}},
               {"model": "c", "has_bn": False, "slimexport": {"status": "refused", "error": "no BatchNorm"}},
           ]}  # fmt: skip
    d = tmp_path / "results" / "m"
    d.mkdir(parents=True)
    (d / "graph-coverage.json").write_text(json.dumps(res))
    text = render_results(tmp_path / "results")
    assert "**1 of 2 models with BatchNorm prune exactly** (50%)" in text
    assert "slimexport 1.00 s**, Torch-Pruning 2.00 s" in text
    assert "| a | 64 | pruned | 5 | 1 | ×3.00 | yes (1.0e-07) | yes | pruned | ×2.00 | yes | x: grouped conv |" in text
    assert "| b | 64 | crashed: boom |" in text and "| c |" not in text
    assert "Pipeline checks (one epoch per stage): not accuracy" in text

"""The benchmark renderer: RESULTS.md sections from result files (the figures users read must come out right)."""

import json

from benchmarks import sections
from benchmarks.render import render_results


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
                "unprunable_groups": 1, "macs_ratio": 3.0, "bn_removed": 0.5, "exact": True, "exact_rel_error": 1e-7,
                "onnx": {"ok": True}, "unprunable_reasons": ["x: grouped conv"]},
                "torch_pruning": {"status": "pruned", "macs_ratio": 2.0, "bn_removed": 0.25, "onnx": {"ok": True}}},
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
    assert (
        "| a | 64 | pruned | 5 | 1 | ×3.00 | 50% | yes (1.0e-07) | – | yes | pruned | ×2.00 | 25% | yes "
        "| x: grouped conv |" in text
    )
    assert "| b | 64 | crashed: boom |" in text and "| c |" not in text
    assert "Pipeline checks (one epoch per stage): not accuracy" in text


def test_converged_section_leads_and_joins_the_seed_spread(tmp_path):
    lat = [{"batch": b, "threads": 1, "median_ms": ms, "p90_ms": ms, "speedup": sp}
           for b, ms, sp in ((1, 0.5, 4.0), (32, 5.0, 3.0))]  # fmt: skip
    run = {"suite": "converged", "arch": "vgg11_w25", "dataset": "cifar10", "percent": 0.7, "sparsity": 8e-4,
           "epochs": 30, "refine_epochs": 20, "preset": "fast", "machine_tag": "m", "date": "2026-11-29",
           "command": "python -m benchmarks.run --suite converged",
           "baseline": {"params": 1000, "macs": 8000, "accuracy": 0.9, "latency": lat},
           "slimexport": {"params": 100, "macs": 2000, "accuracy": 0.898, "sparse_accuracy": 0.89,
                          "accuracy_before_refine": 0.85, "latency": lat},
           "stages": {"baseline": {"seconds": 600}, "sparse": {"seconds": 1200}},
           "curves": {"baseline": [{"epoch": e, "loss": 1.0, "accuracy": 0.88 + e / 1000} for e in range(1, 30, 2)]},
           "gamma": {"channels": 500, "quantiles": {"10%": 1e-4, "50%": 0.2}, "fraction_small": 0.6,
                     "l1_reach": 0.5}}  # fmt: skip
    seeds = {"kind": "peer_seeds", "run": "converged-vgg11_w25-cifar10-p70", "runs": [{"seed": 0}, {"seed": 1}],
             "slimexport": {"mean": 0.9, "stdev": 0.001}, "torch_pruning": {"mean": 0.89, "stdev": 0.002},
             "difference": {"mean": 0.01, "stdev": 0.001, "wins": 2}, "macs": {"slimexport": 1, "torch_pruning": 1},
             "machine_tag": "m", "date": "2026-11-29", "command": "c"}  # fmt: skip
    d = tmp_path / "results" / "m"
    d.mkdir(parents=True)
    (d / "converged-vgg11.json").write_text(json.dumps(run))
    (d / "seeds.json").write_text(json.dumps(seeds))
    # the same run pruned with --normalize max: its own row, labelled, joined to its own seeds file only
    nmax = run | {"normalize": "max", "slimexport": run["slimexport"] | {"accuracy": 0.901}}
    (d / "converged-vgg11-nmax.json").write_text(json.dumps(nmax))
    text = render_results(tmp_path / "results")
    vgg = [ln for ln in text.splitlines() if ln.startswith("| vgg11_w25 | 70%")]
    assert len(vgg) == 2 and vgg[0].startswith("| vgg11_w25 | 70% | ")  # the paper's raw |γ| first
    assert (
        vgg[1].startswith("| vgg11_w25 | 70%, --normalize max | 100 (×10.00) |") and "85.00 / 90.10 | +0.10 |" in vgg[1]
    )
    assert "2 seeds" not in vgg[1]  # the seeds file above belongs to the raw-|γ| run
    # a row refined longer is named in the model's paragraph
    (d / "converged-vgg11-p55.json").write_text(json.dumps(run | {"percent": 0.55, "refine_epochs": 40}))
    text = render_results(tmp_path / "results")
    assert "20 refine (40 for 55%); fast preset" in text
    assert text.index("## Converged runs") < text.index("Pipeline checks")  # it leads
    row = "| vgg11_w25 | 70% | 100 (×10.00) | 2,000 (×4.00) | 90.00 / 89.00 / 85.00 / 89.80 | -0.20 |"
    assert row in text
    assert "90.00 ± 0.10 / 89.00 ± 0.20 (2 seeds; difference +1.00 ± 0.10 pt)" in text
    assert (
        "baseline test accuracy by epoch (last evaluations): 21: 90.10, 23: 90.30, 25: 90.50, 27: 90.70, 29: 90.90"
        in text
    )
    assert "60.0% below 1e-2" in text
    assert "### vgg11_w25 on cifar10" not in text  # not repeated among the one-epoch pipeline checks


def test_imagefolder_section_shows_memory_speed_and_precision():
    row = {"main_peak_mib": 1758.3, "workers_peak_mib": 687.1, "wall_s": 451.0, "images_per_s": 46.0}
    res = {"kind": "imagefolder_scale", "machine_tag": "m", "machine": {"cpu": "EPYC", "avx512f": False, "bf16": False},
           "runs": {
               "memory-vgg11_w12-224": {"arch": "vgg11_w12", "size": 224, "batch": 64, "decoded_mib": 3014.6,
                                        "images": {"train": 20000, "val": 1000}, "command": "c1", "date": "2026-12-01",
                                        "rows": {"off": row, "ram": row | {"main_peak_mib": 4200.0}}},
               "throughput-r18-224": {"arch": "r18", "size": 224, "batch": 32, "images": {"train": 1500, "val": 300},
                                      "command": "c2", "date": "2026-12-01", "off_over_ram": 0.9,
                                      "rows": {"ram": row | {"images_per_s": 8.1}, "off": row | {"images_per_s": 7.3}}},
               "precision-224": {"size": 224, "batch": 8, "steps": 1, "command": "c3", "date": "2026-12-01",
                                 "rows": {"r18": {"fp32_ms": 900.0, "bf16_ms": 3000.0, "speedup": 0.3, "auto": "fp32",
                                                  "auto_reason": "auto: no bf16"}}},
           }}  # fmt: skip
    text = "\n".join(sections.imagefolder([res]))
    assert "AVX2 only, native bf16: no" in text
    assert "| off | 1,758 MiB | 687 MiB | 46.0 | 451 |" in text and "| ram | 4,200 MiB |" in text
    assert "take 3,015 MiB as uint8" in text and "Streamed ÷ in-memory images/s: **0.90**" in text
    assert "| r18 | 900 | 3000 | ×0.30 | fp32 (auto: no bf16) |" in text


def test_keep_accuracy_section_leads_with_paired_differences(tmp_path):
    def row(job, acc, macs_ratio=5.0, **kw):
        return {"job": job, "accuracy": acc, "baseline_accuracy": 0.87, "sparse_accuracy": 0.85,
                "macs_ratio": macs_ratio, "params_ratio": 12.0, "refine_seconds": 400.0} | kw  # fmt: skip

    summary = {
        "vgg:plain": {"seeds": 3, "accuracy_mean": 0.86, "accuracy_sd": 0.002, "drop_mean": -0.01, "drop_sd": 0.002,
                      "macs_ratio": 5.32, "params_ratio": 12.76, "refine_seconds_median": 420.0},
        "tp:plain": {"seeds": 3, "accuracy_mean": 0.84, "accuracy_sd": 0.003, "macs_ratio": 5.4, "params_ratio": 9.0,
                     "refine_seconds_median": 400.0},
        "vgg:steps": {"seeds": 1, "accuracy_mean": 0.855, "accuracy_sd": None, "drop_mean": -0.015, "drop_sd": None,
                      "macs_ratio": 5.3, "params_ratio": 12.0, "refine_seconds_median": 500.0},
        "vgg+keep25:plain": {"seeds": 3, "accuracy_mean": 0.865, "accuracy_sd": 0.001, "drop_mean": -0.005,
                             "drop_sd": 0.001, "macs_ratio": 5.39, "params_ratio": 10.05,
                             "refine_seconds_median": 430.0},
    }  # fmt: skip
    res = {"kind": "keep_accuracy", "command": "python -m benchmarks.keep_accuracy render", "machine_tag": "m",
           "date": "2026-12-01T12:00:00", "rows": [row("vgg:plain:0", 0.86)], "summary": summary,
           "paired": {"plain": {"seeds": 3, "difference_mean": 0.02, "difference_sd": 0.001, "wins": 3},
                      "keep25:plain": {"seeds": 3, "difference_mean": 0.025, "difference_sd": 0.002, "wins": 3}},
           "vgg": {"arch": "vgg11_w25", "percent": 0.7, "sparsity": 8e-4, "epochs": 30, "refine_epochs": 20,
                   "normalize": "max"},
           "train_seconds": {"vgg/baseline": 3127.0}, "suite_seconds": 7200.0}  # fmt: skip
    d = tmp_path / "results" / "m"
    d.mkdir(parents=True)
    (d / "keep-accuracy.json").write_text(json.dumps(res))
    text = "\n".join(sections.keep_accuracy([res]))
    none = "| none | 3 | 86.00 ± 0.20 | -1.00 ± 0.20 | ×12.76 | ×5.32 | 84.00 ± 0.30 (×5.40 MACs) |"
    assert none + " +2.00 ± 0.10 (3/3 won) | 420 |" in text
    assert "| --prune-steps 3 | 1 | 85.50 | -1.50 | ×12.00 | ×5.30 | – | – | 500 |" in text
    keep = "| --min-keep 0.25 (at the MACs of none) | 3 | 86.50 ± 0.10 | -0.50 ± 0.10 | ×10.05 | ×5.39 |"
    assert keep + " 84.00 ± 0.30 (×5.40 MACs) | +2.50 ± 0.20 (3/3 won) | 430 |" in text  # paired as its own
    assert "`--normalize max`" in text and "baseline (87.00%)" in text and "vgg/baseline 52 min" in text
    assert "--distill |" not in text  # no row without its figures
    whole = render_results(tmp_path / "results")
    assert whole.index("## ") == whole.index("## Keeping accuracy at the same speed")  # RESULTS.md leads with it

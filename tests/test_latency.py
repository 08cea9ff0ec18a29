"""Latency as the pruning target (--target-speedup, --max-latency): the engine's search over thresholds with a
measured predicate, the probe that times candidates in onnxruntime and caches what it timed, and the contract of
the new options. How close the re-timed speed-up lands to the target is measured by `python -m
benchmarks.latency_target` (a benchmark: timings do not belong in unit tests)."""

import dataclasses
import json

import pytest
import torch

from slimexport import latency as lat
from slimexport.config import PruneConfig
from slimexport.graph_prune import UNREACHABLE, prune_graph
from slimexport.models import create_model
from slimexport.stats import count_params
from tests.helpers import TINY_VGG, fails_cleanly, randomize_bns, runner


@pytest.fixture
def timed(tmp_path, monkeypatch) -> list:
    """A fresh latency cache, and a list that grows by one each time the runtime is asked to time something."""
    monkeypatch.setenv("SLIMEXPORT_LATENCY_CACHE", str(tmp_path / "cache"))
    calls: list = []
    real = lat.latency
    monkeypatch.setattr(lat, "latency", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


class _ParamsProbe:
    """A deterministic stand-in for the runtime: a candidate "fits" when it has at most ``budget`` parameters."""

    def __init__(self, budget: int):
        self.budget, self.asked = budget, []

    def fits(self, model) -> bool:
        self.asked.append(count_params(model))
        return self.asked[-1] <= self.budget

    def retime(self, model):
        self.chosen = count_params(model)

    def record(self):
        return {"asked": list(self.asked)}


def _model():
    return randomize_bns(create_model(TINY_VGG, 10, 3)).eval()


def test_the_search_finds_the_least_pruning_that_fits_and_asks_few_candidates():
    m, x = _model(), torch.randn(1, 3, 32, 32)
    full = count_params(m)
    cfg = PruneConfig(percent=None, target_speedup=2.0)
    probe = _ParamsProbe(full // 2)
    pruned, rec = prune_graph(m, x, cfg, probe=probe)
    assert count_params(pruned) <= full // 2 and probe.chosen == count_params(pruned)
    assert "unreachable" not in rec["latency_target"]
    less = prune_graph(m, x, PruneConfig(percent=max(rec["percent"] - 0.05, 0.0)))[0]
    assert count_params(less) > full // 2  # a lower threshold would not fit: the least pruning that does
    assert len(probe.asked) <= 2 + rec["classes"]["prunable"].bit_length()  # a bisection, not a scan


def test_an_unreachable_target_gives_the_nearest_feasible_model_and_says_so():
    m, x = _model(), torch.randn(1, 3, 32, 32)
    probe = _ParamsProbe(1)  # nothing this small exists
    pruned, rec = prune_graph(m, x, PruneConfig(percent=None, target_speedup=50.0), probe=probe)
    assert rec["latency_target"]["unreachable"] == UNREACHABLE and len(probe.asked) == 1
    assert count_params(pruned) == probe.asked[0] < count_params(m)  # the most the floors allow


def test_the_probe_times_in_onnxruntime_and_caches_what_it_timed(timed):
    calls = timed
    m, x = _model(), torch.randn(1, 3, 32, 32)
    cfg = PruneConfig(percent=None, target_speedup=1.5).validate()
    candidate = prune_graph(m, x, PruneConfig(percent=0.5))[0]
    probe = lat.LatencyProbe(m, x, cfg)
    ms, speedup = probe(candidate)
    assert ms > 0 and speedup > 0 and calls == [1] and probe.probes[-1]["cached"] is False
    again = lat.LatencyProbe(m, x, cfg)  # a new search on the same model and settings: read from the cache
    assert again(candidate) == (ms, speedup) and calls == [1] and again.probes[-1]["cached"] is True
    other = lat.LatencyProbe(m, x, PruneConfig(percent=None, target_speedup=1.5, latency_threads=2).validate())
    other(candidate)
    assert calls == [1, 1]  # other settings, another measurement


@pytest.mark.slow
def test_prune_to_a_target_speedup_from_the_cli(tmp_path, monkeypatch):
    from slimexport.cli import app

    monkeypatch.setenv("SLIMEXPORT_LATENCY_CACHE", str(tmp_path / "cache"))
    sparse = tmp_path / "sparse.pt"
    res = runner.invoke(app, ["train", "--arch", "vgg11_w25", "--epochs", "1", "--sparsity", "1e-3", "--out",
                              str(sparse), "-d", "embedded"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prune", str(sparse), "--target-speedup", "1.5", "--out", str(tmp_path / "p.pt")])
    assert res.exit_code == 0, res.output
    assert "latency target ×1.5 on onnxruntime, batch 1, 1 thread(s): re-timed ×" in res.stdout
    ck = torch.load(tmp_path / "p.pt", weights_only=True)
    t = ck["meta"]["prune"]["latency_target"]
    assert t["retimed"]["speedup"] > 1.0 and t["probes"] and t["search_seconds"] > 0


def test_latency_target_options_fail_cleanly(tmp_path):
    from slimexport.cli import app

    ck = tmp_path / "none.pt"
    fails_cleanly(["prune", str(ck), "--target-speedup", "2", "--percent", "0.5"], "give one of --percent")
    fails_cleanly(["prune", str(ck), "--target-speedup", "0.9"], "--target-speedup must be above 1")
    fails_cleanly(["prune", str(ck), "--max-latency", "-1"], "--max-latency must be a positive number")
    res = runner.invoke(app, ["prune", str(ck), "--max-latency", "1", "--runtime", "tflite"])
    assert res.exit_code == 2 and "'tflite' is not one of" in res.output  # the option's own choices
    fails_cleanly(["pipeline", "--out", str(tmp_path / "r"), "--target-speedup", "2", "--prune-steps", "2"],
                  "--prune-steps above 1 with a latency target")  # fmt: skip
    if not torch.cuda.is_available():
        m, x = _model(), torch.randn(1, 3, 32, 32)
        with pytest.raises(Exception, match="(?i)cuda"):
            lat.LatencyProbe(m, x, PruneConfig(percent=None, max_latency=1.0, runtime="onnxruntime-cuda").validate())


@pytest.mark.slow
def test_a_sweep_prunes_refines_times_and_charts_each_target_and_resumes(tmp_path, monkeypatch):
    import json
    import shutil

    from slimexport.cli import app

    monkeypatch.setenv("SLIMEXPORT_LATENCY_CACHE", str(tmp_path / "cache"))
    sparse = tmp_path / "sparse.pt"
    res = runner.invoke(app, ["train", "--arch", TINY_VGG, "--epochs", "1", "--sparsity", "1e-3", "--out", str(sparse),
                              "-d", "embedded"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "sweep"
    args = ["sweep", str(sparse), "--targets", "speedup:1.3,percent:0.3", "--refine-epochs", "1", "--out", str(out),
            "-d", "embedded", "--seconds", "0.2"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "sweep.json").read_text())
    assert [r["target"] for r in rep["rows"]] == ["speedup-1.3", "percent-0.3"]
    assert all(r["speedup"] > 0 and 0 <= r["accuracy"] <= 1 for r in rep["rows"])
    assert rep["rows"][0]["latency_target"]["retimed"]["speedup"] > 1.0
    assert (out / "sweep.png").stat().st_size > 10_000 and "| speedup-1.3 |" in (out / "report.md").read_text()
    fails_cleanly(args, "exists: --resume continues")  # never over a finished sweep without --force or --resume
    shutil.rmtree(out / "percent-0.3")  # an interrupted sweep: one target left to do
    (out / "sweep.json").unlink()
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "speedup-1.3: kept from the interrupted sweep" in res.output and (out / "percent-0.3" / "row.json").is_file()
    fails_cleanly([*args[:3], "speedup:2,percent:0.3", *args[4:], "--resume"], "its settings differ")


def test_sweep_targets_are_checked_before_anything_runs(tmp_path):
    from slimexport.sweep import parse_targets

    assert parse_targets("speedup:2,latency:5,percent:0.5,macs:0.4")[1] == (
        "latency-5", {"percent": None, "max_macs": None, "target_speedup": None, "max_latency": 5.0})  # fmt: skip
    for bad, match in (("fast:2", "KIND:VALUE"), ("speedup:x", "not a number"), ("speedup:0.5", "above 1"),
                       ("percent:2", "--percent"), ("speedup:2,speedup:2", "twice"), ("", "at least one")):  # fmt: skip
        with pytest.raises(Exception, match=match):
            parse_targets(bad)


def test_latency_allocation_prunes_the_channels_that_cost_most_per_importance():
    """With one conv made expensive in the latency table, --allocate latency takes its channels first: at the same
    budget it removes more of them than the global |γ| threshold does."""
    from slimexport.graph import BN_TYPES

    m, x = _model(), torch.randn(1, 3, 32, 32)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    costly = convs[1]
    layers = {n: {"ms": 1.0, "out": 1.0 if n == costly else 0.01, "in": 0.0} for n in convs}
    budget = int(0.7 * count_params(m))

    def width(model):
        return dict(model.named_modules())[costly].out_channels

    probe = _ParamsProbe(budget)
    probe.group_costs = lambda groups: {name: layers[name]["out"] for name, *_ in groups}
    gamma, _ = prune_graph(m, x, PruneConfig(percent=None, target_speedup=2.0), probe=_ParamsProbe(budget))
    lat, rec = prune_graph(m, x, PruneConfig(percent=None, target_speedup=2.0, allocate="latency"), probe=probe)
    assert width(lat) < width(gamma) and count_params(lat) <= budget
    assert any(isinstance(mod, BN_TYPES) for mod in lat.modules())


def test_allocate_latency_needs_a_latency_target(tmp_path):
    fails_cleanly(["prune", str(tmp_path / "x.pt"), "--percent", "0.5", "--allocate", "latency"],
                  "--allocate latency weighs channels by their measured latency")  # fmt: skip


def test_the_latency_table_times_each_layers_channels_in_the_whole_model_and_is_cached(timed):
    """--allocate latency's table: per producing layer, about half its channels (a multiple of --round-to) pruned
    from the whole model and timed against it; every class of a measured layer gets that layer's ms per channel,
    and a second table on the same model times nothing again."""
    from slimexport.graph import trace_channels
    from slimexport.graph_prune import _latency_costs
    from slimexport.importance import importance

    m, x = _model(), torch.randn(1, 3, 32, 32)
    cfg = PruneConfig(percent=None, target_speedup=2.0, allocate="latency").validate()
    g = trace_channels(m, x)
    imp = importance(m, g)
    probe = lat.LatencyProbe(m, x, cfg)
    costs = _latency_costs(m, g, imp, 4, probe)
    rows = probe.layer_table["groups"]
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [r["layer"] for r in rows] == convs and timed  # TINY_VGG: every conv's channels are a group of their own
    assert all(r["removed"] % 4 == 0 and 0 < r["removed"] < r["channels"] and r["ms_per_channel"] >= 0 for r in rows)
    assert set(costs) == {c for c in imp.prunable} and all(v >= 0 for v in costs.values())
    n = len(timed)
    again = _latency_costs(m, g, imp, 4, lat.LatencyProbe(m, x, cfg))
    assert again == costs and len(timed) == n  # read back from the cache, nothing timed


@pytest.mark.slow
def test_a_latency_target_measured_in_ncnn(tmp_path, monkeypatch):
    from slimexport.deploy import ncnn_available

    if not ncnn_available():
        pytest.skip("the ncnn extra is not installed")
    monkeypatch.setenv("SLIMEXPORT_LATENCY_CACHE", str(tmp_path / "cache"))
    m, x = _model(), torch.randn(1, 3, 32, 32)
    cfg = PruneConfig(percent=None, target_speedup=1.5, runtime="ncnn").validate()
    probe = lat.LatencyProbe(m, x, cfg)
    ms, speedup = probe(prune_graph(m, x, PruneConfig(percent=0.6))[0])
    assert ms > 0 and speedup > 1.0  # 60% of the channels gone: faster in ncnn too
    # --allocate latency's table is measured in ncnn as well: each layer's channels half pruned, converted, timed
    from slimexport.graph import trace_channels
    from slimexport.graph_prune import _latency_costs
    from slimexport.importance import importance

    g = trace_channels(m, x)
    imp = importance(m, g)
    probe = lat.LatencyProbe(m, x, dataclasses.replace(cfg, allocate="latency").validate())
    costs = _latency_costs(m, g, imp, 4, probe)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [r["layer"] for r in probe.layer_table["groups"]] == convs and set(costs) == set(imp.prunable)
    assert sum(r["ms_per_channel"] for r in probe.layer_table["groups"]) > 0


def _staircase(block: int, slow_off: int = 1, overhead: float = 0.2) -> dict[int, float]:
    """Times of a runtime that computes in blocks of ``block`` channels, and (``slow_off`` > 1) takes a slower
    path, proportional to the channels, at widths that are not multiples of ``slow_off``."""
    widths = lat.STEP_WIDTHS
    return {c: overhead + (-(-c // block) * block if c % slow_off == 0 else 1.4 * c) / 64 for c in widths}


@pytest.mark.parametrize("block", [32, 16, 8, 4])
def test_the_block_is_read_off_a_staircase(block):
    assert lat.step_from(_staircase(block))[0] == block
    if block < 32:  # onnxruntime's CPU convolutions: a slow path off multiples of 4, blocks of 16 on it
        assert lat.step_from(_staircase(block, slow_off=4))[0] == block


def test_time_proportional_to_the_channels_means_exact_counts():
    block, costs = lat.step_from({c: 0.01 + c / 64 for c in lat.STEP_WIDTHS})
    assert block == 1 and all(v["share"] > 0.5 for v in costs.values())


def test_round_to_auto_is_measured_on_the_runtime_once_then_cached(timed):
    from slimexport.prune import resolve_round_to

    block, why = resolve_round_to("auto")
    assert block in (1, 2, 4, 8, 16, 32) and why.startswith("auto: measured on onnxruntime CPU")
    n = len(timed)
    assert n >= 1 and resolve_round_to("auto") == (block, why) and len(timed) == n  # the second time from the cache
    assert resolve_round_to(8) == (8, "given: multiples of 8")


@pytest.mark.parametrize("avx512, avx2, expected", [(True, True, 16), (False, True, 8), (False, False, 4)])
def test_round_to_auto_for_ncnn_follows_its_packing(monkeypatch, avx512, avx2, expected):
    import slimexport.runtime
    from slimexport.prune import resolve_round_to

    facts = {"cpu": "test", "avx2": avx2, "avx512f": avx512, "vnni": False, "flags_known": True}
    monkeypatch.setattr(slimexport.runtime, "machine_facts", lambda: facts)
    monkeypatch.setattr(lat, "kernel_step", lambda *a: pytest.fail("ncnn's block is not measured in onnxruntime"))
    block, why = resolve_round_to("auto", PruneConfig(runtime="ncnn"))
    assert block == expected and "ncnn packs" in why


def test_a_foreign_step_cache_is_measured_again_not_trusted(timed):
    from slimexport.prune import resolve_round_to

    resolve_round_to("auto")
    cache = lat.cache_dir() / "steps.json"
    data = lat.read_cache(cache)
    data = {k: {"33": "junk"} for k in data}
    cache.write_text(json.dumps(data))
    n = len(timed)
    assert resolve_round_to("auto")[0] in (1, 2, 4, 8, 16, 32) and len(timed) > n
    cache.write_text("not json")
    assert resolve_round_to("auto")[0] in (1, 2, 4, 8, 16, 32) and len(timed) > n + 1  # an unreadable file too


# A measurement on the two-core Intel Xeon (onnxruntime 1.32, ms per width 33-64): blocks of 16 on the multiples of 4,
# with enough noise inside a block that no candidate was under the 15% share (16: 0.16) and `auto` said exact counts,
# which lands on the slow widths. The cheapest block is the answer then.
NOISY_XEON = [1.479, 1.442, 1.433, 1.26, 1.444, 1.474, 1.495, 1.317, 1.503, 1.525, 1.512, 1.28, 1.497, 1.552, 1.564,
              1.327, 1.766, 1.797, 1.745, 1.604, 1.751, 1.736, 1.832, 1.564, 1.846, 1.885, 1.864, 1.585, 1.896, 1.894,
              1.895, 1.619]  # fmt: skip


def test_a_noisy_staircase_still_gives_its_block_not_exact_counts():
    block, costs = lat.step_from(dict(zip(lat.STEP_WIDTHS, NOISY_XEON)))
    assert block == 16 and costs[16]["share"] > lat.STEP_SHARE

import copy
import math

import pytest
import torch
from torch import nn

from slimexport.channels import ChannelSelection
from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import PruneConfig
from slimexport.errors import ConfigError
from slimexport.graph_prune import prune_graph
from slimexport.models import count_params
from slimexport.prune import bn_gammas, prune, prune_model
from tests.helpers import TINY_DENSENET, TINY_RESNET, TINY_VGG


def _two_layers(ga: list[float], gb: list[float]) -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(1, len(ga), 3, padding=1, bias=False), nn.BatchNorm2d(len(ga)), nn.ReLU(),
        nn.Conv2d(len(ga), len(gb), 3, padding=1, bias=False), nn.BatchNorm2d(len(gb)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(len(gb), 3),
    ).eval()  # fmt: skip
    m[1].weight.data, m[4].weight.data = torch.tensor(ga), torch.tensor(gb)
    return m


X = torch.randn(2, 1, 8, 8)


def test_global_threshold_is_the_reference_index():
    m = _two_layers([0.1, 0.5, 0.9], [0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 1.0])
    # ten values sorted: 0.1..1.0; index floor(10 * 0.35) = 3 -> 0.4; channels strictly above survive
    _, rec = prune_graph(m, X, percent=0.35)
    assert rec["threshold"] == pytest.approx(0.4) and rec["floored_layers"] == []
    assert [la["kept"] for la in rec["layers"]] == [[1, 2], [3, 4, 5, 6]]
    _, rec0 = prune_graph(m, X, percent=0.0)
    assert rec0["threshold"] is None and rec0["channels_after"] == rec0["channels_before"]


@pytest.mark.parametrize("percent", [-0.1, 1.0, 1.5, float("nan"), True])
def test_percent_outside_unit_interval_is_rejected_in_one_place(percent):
    with pytest.raises(ConfigError, match="--percent must be in"):
        PruneConfig(percent=percent).validate()
    with pytest.raises(ConfigError, match="--percent must be in"):
        prune_graph(_two_layers([0.1, 0.5], [0.2, 0.3]), X, percent=percent)


@pytest.mark.parametrize("arch", [TINY_VGG, TINY_RESNET, TINY_DENSENET])
def test_a_layer_below_the_threshold_keeps_its_floor_instead_of_crashing(arch, make_model):
    m = make_model(arch)
    name = list(bn_gammas(m))[1]
    dict(m.named_modules())[name].weight.data.fill_(1e-6)  # every γ of this layer is below any sensible threshold
    p, rec = prune_model(m, 0.9, min_channels=2)
    assert rec["floored_layers"] and all(n.startswith("net.") for n in rec["floored_layers"])  # the producers
    layer = next(x for x in rec["layers"] if x["name"] == name)
    assert layer["after"] == 2
    assert all(x["after"] >= 2 for x in rec["layers"])
    with torch.no_grad():
        assert p.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("arch", [TINY_VGG, TINY_RESNET, TINY_DENSENET])
def test_prune_shrinks_and_records(arch, make_model):
    m = make_model(arch)
    p, rec = prune_model(m, 0.5)
    assert count_params(p) < count_params(m)
    assert rec["channels_after"] == sum(x["after"] for x in rec["layers"])
    assert abs(rec["pruned_fraction"] - 0.5) < 0.1
    # the kept channels are exactly those above the threshold
    for name, g in bn_gammas(m).items():
        after = next(x["after"] for x in rec["layers"] if x["name"] == name)
        assert after == max(1, int((g > rec["threshold"]).sum()))


def test_prune_checkpoint_rebuilds_from_the_checkpoint_alone(tmp_path, make_model, small_ds):
    m = make_model(TINY_RESNET)
    src = tmp_path / "sparse.pt"
    save_checkpoint(make_checkpoint(m, {"image_size": [28, 28]}, {"stage": "sparse", "accuracy": 0.5}), src)
    meta = prune(src, tmp_path / "pruned.pt", PruneConfig(percent=0.5, round_to=1), ds=small_ds)
    assert 0.0 <= meta["accuracy"] <= 1.0 and meta["prune"]["params_after"] < meta["prune"]["params_before"]
    q, ck = load_checkpoint(tmp_path / "pruned.pt")
    assert ck["meta"]["stage"] == "pruned" and any(q.get("select") for q in ck["config"]["plan"].values())
    assert count_params(q) == meta["prune"]["params_after"]
    p, _ = prune_model(m, 0.5, example_input=m.example_input((28, 28)))  # traced at the data's size, as the stage
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(p.eval()(x), q.eval()(x))
    assert any(s.mode != "identity" for s in q.modules() if isinstance(s, ChannelSelection))


def test_min_keep_floors_every_layer_at_its_fraction_with_its_largest_gammas():
    ga, gb = [0.9, 0.1, 0.8, 0.2], [0.01, 0.05, 0.02, 0.03, 0.04, 0.015, 0.025, 0.035]
    m = _two_layers(ga, gb)
    _, plain = prune_graph(m, X, percent=0.67)  # twelve values sorted: index 8 -> 0.1
    assert [la["after"] for la in plain["layers"]] == [3, 1]  # b, all small, is cut to its floor of one channel
    _, kept = prune_graph(m, X, percent=0.67, min_keep=0.3)  # ceil(0.3 · 8) = 3 of b, its three largest |γ|
    assert [la["kept"] for la in kept["layers"]] == [[0, 2, 3], [1, 4, 7]] and kept["min_keep"] == 0.3
    assert plain["floored_layers"] and not kept["floored_layers"] and kept["threshold"] == plain["threshold"]
    _, half = prune_graph(m, X, percent=0.67, min_keep=0.5)  # a: ceil(0.5 · 4) = 2, less than the threshold kept
    assert [la["after"] for la in half["layers"]] == [3, 4]
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="--min-keep must be in"):
            PruneConfig(min_keep=bad).validate()


def test_min_keep_holds_under_a_macs_budget(make_model):
    from slimexport.stats import count_macs

    m = make_model(TINY_VGG)
    p, rec = prune_model(m, max_macs=0.3, min_keep=0.4)
    assert all(la["after"] >= math.ceil(0.4 * la["before"]) for la in rec["layers"])
    assert count_macs(p, 1, (28, 28)) <= 0.3 * count_macs(m, 1, (28, 28))
    with pytest.raises(ConfigError, match="the floors keep more MACs"):  # 0.5 of every layer costs about 1/4
        prune_model(m, max_macs=0.05, min_keep=0.5)


def test_pruning_a_pruned_model_composes_selections(make_model):
    m = make_model(TINY_DENSENET)
    p1, _ = prune_model(m, 0.3)
    p2, _ = prune_model(p1, 0.3)
    # every BN of the twice-pruned model keeps a subset of the once-pruned one's channels (γ are distinct values;
    # selection indices are not compared: a DenseNet compacts its maps, so their coordinates change)
    bns = [[b for b in p.modules() if isinstance(b, nn.BatchNorm2d)] for p in (p1, p2)]
    for b1, b2 in zip(*bns):
        assert set(b2.weight.tolist()) <= set(b1.weight.tolist()) and b2.num_features <= b1.num_features
    x = torch.randn(2, 1, 28, 28)
    assert p2.eval()(x).shape == (2, 10)


def test_round_to_keeps_multiples_and_only_adds_the_next_largest_gammas():
    ga, gb = [0.9, 0.1, 0.8, 0.2, 0.7, 0.05, 0.6, 0.3, 0.01, 0.02], [0.5, 0.4]
    m = _two_layers(ga, gb)
    pct = 7.5 / 12  # twelve values sorted: index floor(12 · pct) = 7 -> 0.5
    _, exact = prune_graph(m, X, percent=pct)
    assert exact["threshold"] == pytest.approx(0.5)
    assert [la["kept"] for la in exact["layers"]] == [[0, 2, 4, 6], [0]]  # b floored to its largest γ
    _, rounded = prune_graph(m, X, percent=pct, round_to=8)
    a = rounded["layers"][0]["kept"]
    assert a == sorted(torch.topk(torch.tensor(ga), 8).indices.tolist()) and set(exact["layers"][0]["kept"]) <= set(a)
    assert rounded["layers"][1]["kept"] == [0, 1]  # floored to one, rounded up to the layer's width (2 < 8)
    with pytest.raises(ConfigError, match="round-to"):
        prune_graph(m, X, percent=0.5, round_to=0)


@pytest.mark.parametrize("arch", [TINY_VGG, TINY_RESNET])
def test_prune_to_a_macs_budget_finds_the_lowest_threshold_that_fits(arch, make_model):
    from slimexport.stats import count_macs

    m = make_model(arch)
    full = count_macs(m, 1, (32, 32))
    p, rec = prune_model(m, max_macs=0.5)
    assert count_macs(p, 1, (32, 32)) <= 0.5 * full and rec["max_macs"] == 0.5
    # one class fewer removed (the next lower threshold) would not fit: the search found the boundary
    n, removed = rec["classes"]["prunable"], round(rec["percent"] * rec["classes"]["prunable"])
    fewer, _ = prune_model(m, (removed - 2 + 0.5) / n)
    assert count_macs(fewer, 1, (32, 32)) > 0.5 * full
    assert prune_model(m, max_macs=1.0)[1]["channels_after"] == rec["channels_before"]  # the whole budget: nothing


def test_an_unreachable_macs_budget_is_a_clear_error(make_model):
    with pytest.raises(ConfigError, match="cannot be reached"):
        prune_model(make_model(TINY_VGG), max_macs=1e-6)
    with pytest.raises(ConfigError, match="max-macs"):
        prune_model(make_model(TINY_VGG), max_macs=0.0)


def _scaled_layer_copy(m, index: int, c: float):
    """A copy of ``m`` whose ``index``-th prunable BN has γ and β times ``c``: the same function, as long as that
    BN reaches the next BN only through ReLU, pooling and a conv (checked in the test with batch statistics)."""
    s = copy.deepcopy(m)
    name = list(bn_gammas(s))[index]
    bn = dict(s.named_modules())[name]
    with torch.no_grad():
        bn.weight.mul_(c)
        bn.bias.mul_(c)
    return s, name


@pytest.mark.parametrize("normalize", ["max", "mean"])
def test_normalize_makes_the_global_threshold_blind_to_a_layers_free_scale(make_model, normalize):
    m = make_model(TINY_VGG)
    s, name = _scaled_layer_copy(m, 2, 0.01)
    x = torch.randn(16, 1, 28, 28)

    def batch_stats(net):  # batch statistics and no ε, so that the next BN divides the 0.01 out exactly
        net = copy.deepcopy(net).train()
        for b in net.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eps = 1e-20
        return net

    with torch.no_grad():  # the same network
        a, b = batch_stats(m).double()(x.double()), batch_stats(s).double()(x.double())
    assert torch.allclose(a, b, atol=1e-9 * float(a.abs().max())), float((a - b).abs().max())
    _, raw_m = prune_model(m, 0.5)
    _, raw_s = prune_model(s, 0.5)
    after = {x["name"]: x["after"] for x in raw_s["layers"]}
    assert after[name] == 1 and raw_s["floored_layers"]  # raw |γ| empties the rescaled layer (floored producer)
    assert raw_m["layers"] != raw_s["layers"]
    _, norm_m = prune_model(m, 0.5, normalize=normalize)
    _, norm_s = prune_model(s, 0.5, normalize=normalize)
    assert norm_m["normalize"] == normalize and not norm_s["floored_layers"]
    assert [x["kept"] for x in norm_m["layers"]] == [x["kept"] for x in norm_s["layers"]]
    # the MACs budget searches over the same normalised scores
    _, bud_m = prune_model(m, max_macs=0.5, example_input=x[:1], normalize=normalize)
    _, bud_s = prune_model(s, max_macs=0.5, example_input=x[:1], normalize=normalize)
    assert [x["kept"] for x in bud_m["layers"]] == [x["kept"] for x in bud_s["layers"]]


def test_normalize_scores_of_an_all_zero_layer_stay_finite():
    from slimexport.importance import normalize_scores

    for how in ("max", "mean"):
        assert normalize_scores(torch.zeros(4), how).tolist() == [0.0] * 4
    assert normalize_scores(torch.tensor([0.5, 2.0]), "max").tolist() == [0.25, 1.0]
    assert normalize_scores(torch.tensor([0.5, 1.5]), "mean").tolist() == [0.5, 1.5]
    with pytest.raises(ConfigError, match="--normalize must be one of none, max, mean"):
        normalize_scores(torch.ones(2), "median")


def test_floors_in_steps_are_fractions_of_the_sparse_models_layers(make_model):
    """--prune-steps with --min-keep: each step's floor is a fraction of the sparse model's layer (widths), so three
    steps keep what one would; as a fraction of each step's own input the floor shrank step by step (a converged
    vgg11_w25 kept 2 channels of a layer and lost 19.8 pt)."""
    from slimexport.graph_prune import layer_widths

    sparse = make_model(TINY_VGG)
    widths = layer_widths(sparse.net)
    convs = {n: w for n, w in widths.items() if isinstance(dict(sparse.net.named_modules())[n], nn.Conv2d)}

    def three_steps(relative: bool) -> dict[str, int]:
        m = sparse
        for _ in range(3):
            m, _ = prune_model(m, 0.6, min_keep=0.3, widths=widths if relative else None)
        mods = dict(m.net.named_modules())
        return {n: mods[n].out_channels for n in convs}

    kept = three_steps(relative=True)
    assert all(kept[n] >= math.ceil(0.3 * w) for n, w in convs.items()), (kept, convs)
    shrunk = three_steps(relative=False)  # the old meaning: a fraction of what the last step left
    assert any(shrunk[n] < math.ceil(0.3 * w) for n, w in convs.items()), (shrunk, convs)


def test_every_name_in_the_record_is_a_module_of_the_model_handed_in(make_model):
    """One naming in the record: the model's own module names (net.X for slimexport's models), the plan alone
    relative to the network it rebuilds."""
    m = make_model(TINY_RESNET)
    _, rec = prune_model(m, 0.5)
    names = set(dict(m.named_modules()))
    used = [x["name"] for x in rec["layers"]] + rec["floored_layers"] + list(rec["folded"])
    used += [n for g in rec["groups"] + rec["unprunable"] for n in g["layers"]]
    assert used and set(used) <= names, sorted(set(used) - names)[:5]
    assert set(rec["plan"]) <= set(dict(m.net.named_modules()))


def _narrow_net() -> nn.Module:
    def cbr(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    torch.manual_seed(0)
    from tests.helpers import randomize_bns

    return randomize_bns(nn.Sequential(cbr(3, 8), cbr(8, 16), cbr(16, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(8, 4)))  # fmt: skip


def test_a_prune_that_rounding_or_floors_undid_says_so_why_and_what_to_change():
    """--percent 0.3 on layers of 8 and 16 channels at --round-to 16 removed nothing and said nothing (×1.00)."""
    m, x = _narrow_net(), torch.randn(2, 3, 8, 8)
    _, exact = prune_graph(m, x, percent=0.3, round_to=1)
    assert "undone" not in exact and exact["pruned_fraction"] > 0.25
    _, rounded = prune_graph(m, x, percent=0.3, round_to=16)
    u = rounded["undone"]
    assert rounded["pruned_fraction"] == u["removed"] == 0.0 and u["threshold_alone"] == exact["pruned_fraction"]
    assert u["by"] == "--round-to 16" and "--round-to 1" in u["advice"]
    _, floored = prune_graph(m, x, percent=0.3, min_keep=0.9)
    assert floored["undone"]["by"].startswith("the floors") and "--min-keep" in floored["undone"]["advice"]


def test_the_prune_command_says_when_the_asked_for_prune_did_not_happen(tmp_path, make_model, small_ds):
    from typer.testing import CliRunner

    from slimexport.cli import app
    from slimexport.train import data_meta

    src = tmp_path / "sparse.pt"
    save_checkpoint(make_checkpoint(make_model(TINY_VGG), data_meta(small_ds), {"stage": "sparse"}), src)
    res = CliRunner().invoke(app, ["prune", str(src), "-p", "0.3", "--round-to", "32", "--out", str(tmp_path / "p.pt")])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "NOTE: the threshold alone removes" in text and "--round-to 32 put most back" in text
    assert load_checkpoint(tmp_path / "p.pt")[1]["meta"]["prune"]["undone"]["by"] == "--round-to 32"

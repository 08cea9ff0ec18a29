"""The built-in architectures (plain modules now) and the engine's passes on them: β folding, --prune-stream, the
export rewrite of DenseNet's transitions, and rebuilding a pruned model from its config alone."""

import copy

import pytest
import torch
from torch import nn

from slimexport.channels import ChannelSelection
from slimexport.errors import ConfigError
from slimexport.graph_prune import exactness, prune_graph
from slimexport.models import count_params, create_model, default_config
from slimexport.prune import prune_model
from slimexport.rewrite import for_export
from slimexport.stats import count_macs
from tests.helpers import TINY_DENSENET


@pytest.mark.parametrize(
    "arch, classes, expected",
    [
        ("vgg19", 10, 20_035_018),
        ("vgg19", 100, 20_081_188),
        ("preresnet164", 10, 1_703_258),
        ("densenet40", 10, 1_059_298),
    ],
)
def test_reference_parameter_counts(arch, classes, expected):
    assert count_params(create_model(arch, classes, 3)) == expected


@pytest.mark.parametrize("arch", ["vgg12", "preresnet21", "densenet41", "resnet50", "vgg11_w0", "preresnet15"])
def test_unknown_or_invalid_architectures_are_one_line_config_errors(arch):
    with pytest.raises(ConfigError) as e:
        create_model(arch, 10, 3)
    assert arch in str(e.value) and "\n" not in str(e.value)


def test_reference_initialisation():
    m = create_model("preresnet20", 10, 3)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and all(torch.all(b.weight == 0.5) and torch.all(b.bias == 0) for b in bns)


def test_selection_modes_and_no_parameters():
    x = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).view(2, 6, 2, 2)
    ident = ChannelSelection(6)
    assert ident.mode == "identity" and ident(x) is x and not list(ident.parameters()) and not list(ident.buffers())
    assert ChannelSelection(6, range(6)).mode == "identity"
    sl = ChannelSelection(6, [2, 3, 4])
    assert sl.mode == "slice" and torch.equal(sl(x), x[:, 2:5])
    ga = ChannelSelection(6, [0, 2, 5])
    assert ga.mode == "gather" and torch.equal(ga(x), x[:, [0, 2, 5]]) and not list(ga.parameters())
    assert "index" in dict(ga.named_buffers())
    for bad in ([], [6], [1, 1]):
        with pytest.raises(ValueError):
            ChannelSelection(6, bad)


def test_the_built_in_architectures_are_plain_modules_with_no_pruning_code():
    for arch in ("vgg11", "preresnet20", "densenet16"):
        net = create_model(arch, 10, 3).net
        assert not any(isinstance(s, ChannelSelection) for s in net.modules())
        assert not any(hasattr(net, a) for a in ("pruned", "prunable_bns", "selection_units", "stream_widths"))


def test_configs_are_plain_data():
    for arch in ("vgg16", "preresnet29", "densenet22"):
        cfg = default_config(arch)
        assert cfg["source"] == arch and cfg["plan"] == {} and cfg["image_size"] == [32, 32]


def test_pruned_model_rebuilds_from_config_alone(make_model):
    m = make_model("preresnet20")
    p, _ = prune_model(m, 0.5)
    q = create_model(p.arch, p.num_classes, p.in_channels, p.config)
    q.load_state_dict(p.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(p.eval()(x), q.eval()(x))
    assert any(s.mode == "gather" for s in q.modules() if isinstance(s, ChannelSelection))


def _one_by_one_net() -> nn.Module:
    """Residual blocks of 1×1 convs, a concatenation and a linear head: everywhere a removed channel's constant
    goes, folding it is exact."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.bn1, self.c1 = nn.BatchNorm2d(c), nn.Conv2d(c, 8, 1, bias=False)
            self.bn2, self.c2 = nn.BatchNorm2d(8), nn.Conv2d(8, c, 1, bias=False)

        def forward(self, x):
            return x + self.c2(torch.relu(self.bn2(self.c1(torch.relu(self.bn1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b1, self.b2 = nn.Conv2d(3, 16, 3, padding=1, bias=False), Block(16), Block(16)
            self.side, self.bn_side = nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6)
            self.bn, self.fc = nn.BatchNorm2d(22), nn.Linear(22, 10)

        def forward(self, x):
            x = self.b2(self.b1(self.stem(x)))
            x = torch.cat([x, torch.relu(self.bn_side(self.side(x)))], 1)
            return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(x)), 1).flatten(1))

    torch.manual_seed(0)
    m = Net().eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data = torch.rand(mod.num_features, generator=g)
            mod.bias.data = torch.randn(mod.num_features, generator=g) * 0.5
            mod.running_mean.data = torch.randn(mod.num_features, generator=g) * 0.1
    return m


def test_beta_folding_is_exact_where_the_constants_meet_1x1_convs_adds_and_linear_layers():
    """Zero only γ of the removed channels (they then emit the constant β): the pruned model with folding
    computes what that original does, through residual adds, a concatenation and global pooling; without
    folding it is far off. No parameter is added: the constants land in BN running means and the linear bias."""
    m = _one_by_one_net()
    res = exactness(m, torch.randn(2, 3, 16, 16), 0.4)
    assert res["same_channels"] and res["relative_error"] < 1e-5
    assert res["folded_error"] < 1e-5 < 0.05 < res["unfolded_error"], res
    p_fold, rec = prune_graph(m, torch.randn(2, 3, 16, 16), percent=0.4)
    p_lost, _ = prune_graph(m, torch.randn(2, 3, 16, 16), percent=0.4, fold=False)
    assert rec["folded"] and count_params(p_fold) == count_params(p_lost)
    assert not any(q.get("bias") for q in rec["plan"].values())


@pytest.mark.parametrize("arch", ["vgg11_w25", "preresnet20", "densenet16"])
def test_beta_folding_removes_most_of_the_error_where_kxk_convs_read_the_constants(arch, make_model):
    """A zero-padded 3×3 conv reading a constant differs only at the border: folding still removes most of what
    pruning without it loses (the figures per model are in benchmarks/fold_accuracy.py)."""
    m = make_model(arch, in_channels=3)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.bias.data = bn.bias.data.abs() + 0.2  # removed channels still send relu(β) > 0 on
    res = exactness(m.net, torch.randn(2, 3, 32, 32), 0.5)
    assert res["same_channels"] and res["relative_error"] < 1e-4
    assert res["folded_error"] < 0.5 * res["unfolded_error"], res


def test_a_constant_that_reaches_a_nonlinearity_gives_its_conv_a_bias_and_stays_exact():
    """conv (no bias) → ReLU: the constant cannot be moved past the ReLU, so the conv gets a bias (recorded in
    the plan, so the checkpoint rebuilds it)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
    ).eval()  # fmt: skip
    for bn in (m[1], m[6]):
        bn.weight.data = torch.rand(8)
        bn.bias.data = torch.rand(8) + 0.1
    res = exactness(m, torch.randn(2, 3, 4, 4), 0.5)
    assert res["folded_error"] < 1e-5 < res["unfolded_error"], res
    _, rec = prune_graph(m, torch.randn(2, 3, 4, 4), percent=0.5)
    assert rec["plan"]["3"].get("bias") and "3" in rec["folded"]


def test_prune_stream_removes_stream_channels_and_carries_their_mean(make_model):
    """--prune-stream: a channel of a pre-activation ResNet's stream that every selecting BN drops goes, though
    the next stage's downsampling conv reads it raw; that conv gets the channel's running mean (from the BN that
    reads the same tensor). With the true means the pruned net is much closer to the γ-zeroed original than with
    the means of a BN that knows nothing (zeros)."""
    m = make_model("preresnet20")
    x = torch.randn(16, 1, 28, 28)
    # give each BN the true mean of its input, as training would
    seen = {}
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].mean((0, 2, 3)))) for b in bns]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for b in bns:
        b.running_mean.copy_(seen[b])
    plain, rec_plain = prune_model(m, 0.5)
    p, rec = prune_model(m, 0.5, prune_stream=True)
    assert rec["prune_stream"] and count_macs(p, 1, (28, 28)) < count_macs(plain, 1, (28, 28))
    assert p.net.conv1.out_channels < 16  # the stem's output, read raw by layer1's downsampling conv
    q = create_model(p.arch, p.num_classes, p.in_channels, p.config)
    q.load_state_dict(p.state_dict())
    with torch.no_grad():
        assert torch.equal(q.eval()(x), p.eval()(x))
    zeroed = copy.deepcopy(m)
    mods = dict(zeroed.named_modules())
    for la in rec["layers"]:
        mods[la["name"]].weight.data[sorted(set(range(la["before"])) - set(la["kept"]))] = 0
    blind = copy.deepcopy(m)
    for b in blind.modules():
        if isinstance(b, nn.BatchNorm2d) and b.weight.shape[0] > 16:  # the stream's readers: no mean known
            b.running_mean.zero_()
    with torch.no_grad():
        ref = zeroed(x)
        err = (p(x) - ref).abs().mean()
        err_blind = (prune_model(blind, 0.5, prune_stream=True)[0].eval()(x) - ref).abs().mean()
    assert err < 0.75 * err_blind, (err, err_blind)


def test_densenet_computes_no_map_channel_that_nothing_reads(make_model):
    """A map channel every later BN drops is not computed: its producer loses that output."""
    m = make_model("densenet16")
    p, _ = prune_model(m, 0.6)
    growth = [mod.out_channels for n, mod in p.net.named_modules() if n.endswith("conv1") and "dense" in n]
    assert min(growth) < 12


@pytest.mark.parametrize("size", [28, 9])  # an odd size: both the pool and the stride-2 conv drop the last row
def test_folded_transition_pools_compute_the_same_function_with_the_same_macs(size, make_model):
    for m in (make_model(TINY_DENSENET), prune_model(make_model(TINY_DENSENET), 0.5)[0]):
        folded = for_export(m)
        assert folded is not m and m.net.trans1.conv1.kernel_size == (1, 1)  # the original is untouched
        convs = [c for c in folded.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (2, 2)]
        assert len(convs) == 2 and all(c.stride == (2, 2) for c in convs)
        x = torch.randn(3, 1, size, size)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)
        before, after = count_macs(m, 1, (size, size)), count_macs(folded, 1, (size, size))
        # equal on even maps; on odd ones the folded conv skips the row and column the pool would drop
        assert after == before if size % 2 == 0 else after < before


def test_for_export_leaves_a_model_without_the_pattern_alone(make_model):
    m = make_model("vgg11_w12")
    assert for_export(m) is m


def test_a_version_1_checkpoint_converts_or_says_how_to_redo_it(tmp_path, make_model):
    """Checkpoints from before the one engine: an unpruned built-in model (its hand-written config, keys without
    `net.`) loads as the same function; one pruned by the retired rules is a one-line error naming what to redo."""
    from slimexport.checkpoint import load_checkpoint
    from slimexport.errors import CheckpointError

    m = make_model("vgg11_w12")
    v1 = {
        "format": "slimexport", "version": 1, "arch": "vgg11_w12", "num_classes": 10, "in_channels": 1,
        "config": {"cfg": [8, "M", 15, "M", 31, 31, "M", 61, 61, "M", 61, 61]},
        "state_dict": {k.removeprefix("net."): v for k, v in m.state_dict().items()},
        "data": {"image_size": [28, 28]}, "meta": {"stage": "sparse"},
    }  # fmt: skip
    torch.save(v1, tmp_path / "old.pt")
    back, ck = load_checkpoint(tmp_path / "old.pt")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), m(x))
    assert ck["version"] == 2 and ck["config"]["source"] == "vgg11_w12"
    torch.save(v1 | {"meta": {"stage": "pruned", "prune": {"source": "runs/slim/sparse.pt"}}}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match=r"retired hand-written rules .* prune runs/slim/sparse.pt again"):
        load_checkpoint(tmp_path / "p.pt")


def test_the_folding_check_catches_a_broken_fold(monkeypatch):
    """Break the pass (a shift carried to no BatchNorm): the γ-only zeroing check must see the difference."""
    import slimexport.fold as fold

    m = _one_by_one_net()
    assert exactness(m, torch.randn(2, 3, 16, 16), 0.4)["folded_error"] < 1e-5
    monkeypatch.setattr(fold, "_carry_shift", lambda *a: [])
    assert exactness(m, torch.randn(2, 3, 16, 16), 0.4)["folded_error"] > 1e-3

"""The graph engine: any CNN in, a physically smaller one out, exactly where it claims to be.

The exactness test needs no knowledge of the groups (docs: graph-pruning.md): zero γ and β of the channels the
engine removes, prune that zeroed model again at the same percent, and its output must equal the zeroed
original's. A wrong grouping shows up as a difference or a shape error.
"""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from slimexport import prune_model, regularize
from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import ExportConfig
from slimexport.data import from_arrays
from slimexport.errors import ConfigError
from slimexport.export import export_model
from slimexport.graph_prune import exactness
from slimexport.models import create_model
from slimexport.stats import count_macs, count_macs_on, count_params
from tests.helpers import randomize_bns as randomize  # random γ, β and BN statistics, as trained BNs have

FORBIDDEN_OPS = {"NonZero", "GatherND", "Where", "ScatterND"}


def check_exact(model: nn.Module, x: torch.Tensor, percent: float = 0.5, **kw) -> tuple[nn.Module, dict]:
    res = exactness(model, x, percent, **kw)
    assert res["same_channels"] and res["relative_error"] <= 1e-4, res["relative_error"]
    rec = res["record"]
    assert rec["channels_after"] < rec["channels_before"]
    pruned, _ = prune_model(model, percent, example_input=x, **kw)
    return pruned, rec


def _fake_data(size: int, channels: int = 3):
    rng = np.random.default_rng(0)
    return from_arrays(
        "random",
        rng.integers(0, 255, (20, size, size, channels), dtype=np.uint8) if channels == 3
        else rng.integers(0, 255, (20, size, size), dtype=np.uint8),
        np.arange(20) % 10,
        rng.integers(0, 255, (40, size, size, channels), dtype=np.uint8) if channels == 3
        else rng.integers(0, 255, (40, size, size), dtype=np.uint8),
        np.arange(40) % 10,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121"])
@pytest.mark.slow
def test_torchvision_models_prune_exactly_export_and_rebuild(name, tmp_path):
    torch.manual_seed(0)
    gm = create_model(f"torchvision:{name}", 10, 3, {"source": f"torchvision:{name}", "image_size": [64, 64]})
    randomize(gm)
    x = torch.randn(2, 3, 64, 64)
    check_exact(gm.net, x)
    pruned, rec = prune_model(gm, 0.5)
    assert count_macs_on(pruned, x[:1]) < 0.8 * count_macs_on(gm, x[:1])
    assert all("kept" in la and la["after"] == len(la["kept"]) for la in rec["layers"])
    # a checkpoint holds the source and the plan, and rebuilds the same pruned model
    save_checkpoint(make_checkpoint(pruned, {"image_size": [64, 64]}, {"stage": "pruned"}), tmp_path / "p.pt")
    rebuilt, ck = load_checkpoint(tmp_path / "p.pt")
    assert ck["config"]["plan"] and ck["config"]["source"] == f"torchvision:{name}"
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))
    # exports with the default exporter, no data-dependent ops, and onnxruntime agrees with torch
    res = export_model(pruned, tmp_path / "p.onnx", _fake_data(64), ExportConfig(parity_images=8, atol=1e-3))
    assert not FORBIDDEN_OPS & set(res["op_counts"]) and res["parity"]["max_abs_diff"] <= 1e-3


@pytest.mark.parametrize(
    "name", ["resnet50", "mobilenet_v3_small", "regnet_x_400mf", "mnasnet0_5", "resnext50_32x4d", "vgg11_bn"]
)
@pytest.mark.slow
def test_more_torchvision_models_prune_exactly(name):
    torch.manual_seed(0)
    m = randomize(torchvision.models.get_model(name, weights=None, num_classes=10))
    check_exact(m, torch.randn(2, 3, 64, 64))


def test_a_model_without_batchnorm_is_a_one_line_error():
    m = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10)
    with pytest.raises(ConfigError, match="no BatchNorm") as e:
        prune_model(m, 0.5, example_input=torch.randn(1, 3, 64, 64))
    assert "\n" not in str(e.value)


def test_channel_shuffle_prunes_the_rest_and_names_what_it_left():
    torch.manual_seed(0)
    m = randomize(torchvision.models.get_model("shufflenet_v2_x0_5", weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    pruned, rec = check_exact(m, x)
    reasons = {r for u in rec["unprunable"] for r in u["reasons"]}
    assert any("view/reshape across the channel axis" in r for r in reasons), reasons
    assert count_macs_on(pruned, x[:1]) < count_macs_on(m, x[:1])


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 4), 1), nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Odd(nn.Module):
    """Patterns users' models have: a shared conv called twice, SE gating, split/cat on channels, a grouped conv,
    a hard-coded view, pixel shuffle, flatten of C×H×W into a Linear, BatchNorm1d after a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.se = SE(16)
        self.left = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(20, 20, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(20))
        self.fixed = nn.Sequential(nn.Conv2d(20, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.ps = nn.Sequential(nn.Conv2d(20, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(32, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24 * 4 * 4, 32)
        self.bn1d = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        a = torch.relu(self.bn_a(self.shared(x)))
        b = torch.relu(self.bn_b(self.shared(a)))  # the same conv again
        y = self.se(a + b)
        p, q = torch.split(y, 8, dim=1)
        z = torch.cat([self.left(p), q], dim=1)  # 12 + 8
        z = self.grouped(z)
        f = self.fixed(z)
        f = f.view(f.size(0), 8, 8, 8)  # sizes written into forward
        s = nn.functional.pixel_shuffle(self.ps(z), 2)[:, :, ::2, ::2]  # 16 -> 4 channels
        h = self.head(torch.cat([f + f, s.repeat(1, 6, 1, 1)], dim=1)[:, :32])
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.out(torch.relu(self.bn1d(self.fc(h))))


def test_a_user_model_with_odd_patterns_prunes_exactly_and_says_what_it_left():
    torch.manual_seed(0)
    m = randomize(Odd())
    x = torch.randn(4, 3, 8, 8)
    pruned, rec = check_exact(m, x, 0.4)
    kept = {la["name"]: la for la in rec["layers"]}
    assert kept["head.1"]["after"] < 24 and kept["bn1d"]["after"] < 32  # flatten→Linear and BN1d prune
    assert pruned.fc.in_features == kept["head.1"]["after"] * 16  # each channel's 4×4 columns went
    assert pruned.out.out_features == 10  # classes are never pruned
    assert kept["bn_a"]["kept"] == kept["bn_b"]["kept"]  # the shared conv's calls agree
    reasons = " | ".join(r for u in rec["unprunable"] for r in u["reasons"])
    assert "grouped conv" not in reasons  # pruned by whole groups now
    # split(y, 8, dim=1): the size is written into forward, so the pruned network is the traced graph with each
    # piece's new size (the pieces lost channels, and the pruned model above ran them exactly)
    (sizes,) = [p["sizes"] for n, p in rec["plan"].items() if n.startswith("split:")]
    assert len(sizes) == 2 and sum(sizes) < 16 and all(s >= 1 for s in sizes)
    for why in (
        "view/reshape across the channel axis",
        "pixel_shuffle mixes channels",
        "model input",
        "model output",
    ):
        assert why in reasons, why


def test_max_macs_budget_and_round_to():
    torch.manual_seed(0)
    m = randomize(torchvision.models.get_model("resnet18", weights=None, num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    full = count_macs_on(m, x)
    p, rec = prune_model(m, max_macs=0.4, example_input=x)
    assert count_macs_on(p, x) <= 0.4 * full and rec["max_macs"] == 0.4
    p16, rec16 = prune_model(m, 0.5, example_input=x, round_to=16)
    widths = [mod.out_channels for mod in p16.modules() if isinstance(mod, nn.Conv2d)]
    assert all(w % 16 == 0 for w in widths), widths


def test_regularize_reaches_every_kind_of_batchnorm():
    m = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    m(torch.randn(2, 1, 1, 1, 1)).sum().backward()
    before = [bn.weight.grad.clone() for bn in (m[1], m[4])]
    regularize(m, 0.5)
    for bn, g in zip((m[1], m[4]), before):
        assert torch.allclose(bn.weight.grad - g, 0.5 * torch.sign(bn.weight))


# What the retired hand-written rules (commit 40e8dc1: VGG.pruned, PreResNet.pruned, DenseNet.pruned) kept, measured
# with `_paper_model` below: (params, MACs at 32×32) at 40% and 60%, exact and --round-to 16. The one engine must
# keep the same.
HAND_WRITTEN = {
    ("vgg19", 0.4, 1): (7188428, 144790014), ("vgg19", 0.6, 1): (3202535, 66007278),
    ("preresnet164", 0.4, 1): (743472, 107801814), ("preresnet164", 0.6, 1): (405797, 56716230),
    ("densenet40", 0.4, 1): (612741, 165815338), ("densenet40", 0.6, 1): (370632, 100484950),
    ("vgg19", 0.4, 16): (7711194, 165116896), ("vgg19", 0.6, 16): (3444970, 77259648),
    ("preresnet164", 0.4, 16): (1131130, 198854048), ("preresnet164", 0.6, 16): (612378, 128369760),
    ("densenet40", 0.4, 16): (638914, 179275264), ("densenet40", 0.6, 16): (400866, 112056032),
}  # fmt: skip


def _paper_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(arch, 10, 3)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data = torch.rand(mod.num_features, generator=g)
            mod.bias.data = torch.randn(mod.num_features, generator=g) * 0.1
            mod.running_mean.data = torch.randn(mod.num_features, generator=g) * 0.1
            mod.running_var.data = torch.rand(mod.num_features, generator=g) + 0.5
    return m


@pytest.mark.parametrize("arch", ["vgg19", "preresnet164", "densenet40"])
@pytest.mark.slow
def test_the_paper_architectures_prune_to_what_the_hand_written_rules_kept(arch):
    """VGG, PreResNet and DenseNet are plain modules now, pruned by the engine like any other; at the same
    threshold the pruned models have the parameters and MACs the hand-written rules gave, and the channels frozen
    are exactly the image input and, in PreResNet, the stem's output and the first two stages' streams (read before
    any BN by the next stage's downsampling conv, as the paper keeps them)."""
    m = _paper_model(arch)
    for pct, round_to in ((0.4, 1), (0.6, 1), (0.4, 16), (0.6, 16)):
        p, _ = prune_model(m, pct, round_to=round_to, fold=False)
        assert (count_params(p), count_macs(p, 3, (32, 32))) == HAND_WRITTEN[arch, pct, round_to], (arch, pct)
    p, rec = prune_model(m, 0.6)
    assert count_params(p) == HAND_WRITTEN[arch, 0.6, 1][0]  # β folding adds no parameter
    selecting = [n for n, q in rec["plan"].items() if q.get("select")]
    assert len(selecting) >= {"vgg19": 0, "preresnet164": 54, "densenet40": 36}[arch]
    frozen = sorted(r for u in rec["unprunable"] for r in u["reasons"] if "model" not in r)
    raw = "reads these channels before any BatchNorm normalises them"
    ds = [f"layer{i}.0.downsample.0: {raw}" for i in (1, 2, 3)] if arch == "preresnet164" else []
    assert frozen == [f"{'features.0' if arch == 'vgg19' else 'conv1'}: {raw}"] + ds, frozen  # the image's channels


@pytest.mark.parametrize("arch", ["vgg11_w25", "preresnet20", "densenet16"])
def test_the_paper_architectures_prune_exactly(arch):
    check_exact(_paper_model(arch).net, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("normalize", ["max", "mean"])
def test_normalize_makes_the_threshold_blind_to_a_layers_free_scale(normalize):
    """--normalize divides each BN's |γ| by its max or mean before the one global threshold: with a middle
    layer's (γ, β) shrunk a hundredfold (the same function), the engine keeps the same channels as before, while
    raw |γ| empties that layer."""
    from slimexport.graph_prune import prune_graph

    m = _paper_model("vgg19").net
    x = torch.randn(1, 3, 32, 32)
    _, before = prune_graph(m, x, percent=0.6, normalize=normalize)
    assert before["normalize"] == normalize
    name, bn = [(n, b) for n, b in m.named_modules() if isinstance(b, nn.BatchNorm2d)][5]
    with torch.no_grad():
        bn.weight.mul_(0.01)
        bn.bias.mul_(0.01)
    _, raw = prune_graph(m, x, percent=0.6)
    assert next(la["after"] for la in raw["layers"] if la["name"] == name) == 1
    _, scaled = prune_graph(m, x, percent=0.6, normalize=normalize)
    assert {la["name"]: la["kept"] for la in scaled["layers"]} == {la["name"]: la["kept"] for la in before["layers"]}


@pytest.mark.slow
def test_selecting_bns_compose_when_a_pruned_model_is_pruned_again(tmp_path):
    """A pruned DenseNet (selections everywhere) pruned again: the composed plan, applied to the original,
    rebuilds the twice-pruned model exactly, the checkpoint round-trips, and ONNX has one Gather or Slice per
    selection and nothing data-dependent."""
    torch.manual_seed(0)
    cfg = {"source": "torchvision:densenet121", "image_size": [32, 32]}
    gm = create_model("torchvision:densenet121", 10, 3, cfg)
    randomize(gm)
    once, _ = prune_model(gm, 0.3)
    randomize(once)  # new γ, as refine would give
    twice, rec = prune_model(once, 0.3)
    assert any(p.get("select") for p in twice.config["plan"].values())
    x = torch.randn(2, 3, 32, 32)
    rebuilt = create_model(twice.arch, 10, 3, twice.config)
    rebuilt.load_state_dict(twice.state_dict())
    twice.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), twice(x))
    save_checkpoint(make_checkpoint(twice, {"image_size": [32, 32]}, {"stage": "pruned"}), tmp_path / "p.pt")
    back = load_checkpoint(tmp_path / "p.pt")[0].eval()
    torch.testing.assert_close(back(x), twice(x))
    res = export_model(twice, tmp_path / "p.onnx", _fake_data(32), ExportConfig(parity_images=8, atol=1e-3))
    ops = res["op_counts"]
    assert not FORBIDDEN_OPS & set(ops) and ops.get("Gather", 0) + ops.get("Slice", 0) > 0, ops
    assert res["parity"]["max_abs_diff"] <= 1e-3


def test_sync_batchnorm_conversion_keeps_the_selections():
    """--sync-bn rebuilds every BN as a SyncBatchNorm; a selecting BN must stay selecting."""
    from slimexport.channels import restore_bn_selections
    from slimexport.graph_prune import prune_graph
    from slimexport.loop import _revert_sync_bn

    torch.manual_seed(0)
    m = create_model("preresnet20", 10, 3)
    randomize(m)
    pruned, _ = prune_graph(m.net, torch.randn(1, 3, 32, 32), percent=0.5)
    x = torch.randn(2, 3, 32, 32)
    ref = pruned.eval()(x)
    kinds = {n: type(mm) for n, mm in pruned.named_modules() if isinstance(mm, nn.modules.batchnorm._BatchNorm)}
    synced = restore_bn_selections(nn.SyncBatchNorm.convert_sync_batchnorm(pruned)).eval()
    assert any(isinstance(mm, nn.SyncBatchNorm) for mm in synced.modules())
    torch.testing.assert_close(synced(x), ref)  # SyncBatchNorm in eval mode normalises as BatchNorm does
    back = restore_bn_selections(_revert_sync_bn(synced, kinds)).eval()  # what training hands back
    assert not any(isinstance(mm, nn.SyncBatchNorm) for mm in back.modules())
    torch.testing.assert_close(back(x), ref)


def test_sync_batchnorm_reverts_to_the_batchnorm_it_was():
    """A BatchNorm1d after a Linear comes back as a BatchNorm1d, not a BatchNorm2d that rejects 2-D input."""
    from slimexport.loop import _revert_sync_bn

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))
    kinds = {n: type(mm) for n, mm in m.named_modules() if isinstance(mm, nn.modules.batchnorm._BatchNorm)}
    back = _revert_sync_bn(nn.SyncBatchNorm.convert_sync_batchnorm(m), kinds).eval()
    assert type(back[1]) is nn.BatchNorm2d and type(back[4]) is nn.BatchNorm1d
    assert back(torch.randn(2, 3, 4, 4)).shape == (2, 5)  # 4×4 → 2×2 map of 4 channels → 16 features


def test_the_exactness_check_catches_a_wrong_grouping(monkeypatch):
    """Break one rule (residual adds no longer join their inputs' channels): the engine's own check, run on every
    prune, refuses to hand back the wrong model, and the exactness check sees it too."""
    import slimexport.graph as graph

    def no_join(self, node):
        for a in node.args:
            if isinstance(a, torch.fx.Node) and isinstance(self.vec.get(a), np.ndarray):
                return self.vec[a]
        return self.fresh(node)

    monkeypatch.setattr(graph._Builder, "binary", no_join)
    torch.manual_seed(0)
    m = randomize(torchvision.models.get_model("resnet18", weights=None, num_classes=10))
    with pytest.raises(RuntimeError, match="own check failed"):
        prune_model(m, 0.5, example_input=torch.randn(2, 3, 64, 64))
    import slimexport.graph_prune as gp

    monkeypatch.setattr(gp, "check_pruned", lambda *a: 0.0)  # without it, exactness sees the wrong grouping
    try:
        res = exactness(m, torch.randn(2, 3, 64, 64), 0.5)
    except RuntimeError:  # a shape error is the other way a wrong grouping shows
        return
    assert res["relative_error"] > 1e-4


class RawRead(nn.Module):
    """A conv without BN whose output one branch normalises and another reads raw (MaxViT's stem and shortcut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.shortcut = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        s = self.stem(x)
        y = self.body(torch.relu(self.bn(s))) + self.shortcut(s)
        return self.head(y.mean((2, 3)))


def test_a_channel_read_before_its_batchnorm_is_never_removed():
    torch.manual_seed(0)
    m = randomize(RawRead())
    x = torch.randn(2, 3, 16, 16)
    pruned, rec = check_exact(m, x, 0.5)
    kept = {la["name"]: la for la in rec["layers"]}
    assert pruned.stem.out_channels == 8  # the stem's channels: the shortcut reads them raw
    # `bn` shares its input with the shortcut, so it selects its own channels (and may drop some); the rest prunes
    assert rec["plan"].get("bn", {}).get("select") and kept["body.1"]["after"] < 8
    reasons = " | ".join(r for u in rec["unprunable"] for r in u["reasons"])
    assert "shortcut.0: reads these channels before any BatchNorm" in reasons


class DepthwiseFirstResidual(nn.Module):
    """EfficientNet's and MobileNetV3's blocks without expansion: the input feeds a depthwise conv and the residual
    add, so the BN after the depthwise conv selects its own channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        s = self.stem(x)
        y = s + self.pw(torch.relu(self.bn(self.dw(s))))
        return self.head(y.mean((2, 3)))


def test_a_batchnorm_after_a_depthwise_conv_of_a_shared_input_selects_exactly():
    torch.manual_seed(0)
    m = randomize(DepthwiseFirstResidual())
    pruned, rec = check_exact(m, torch.randn(2, 3, 16, 16), 0.5)
    assert rec["plan"]["bn"]["select"]
    kept = {la["name"]: la["after"] for la in rec["layers"]}
    assert kept["bn"] < 8 and pruned.bn.num_features == kept["bn"]


class _Gain(nn.Module):
    """A learnable per-channel gain: a module the engine has no rule for."""

    def __init__(self, c: int):
        super().__init__()
        self.g = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.g.view(1, -1, 1, 1)


def _gain_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), _Gain(16),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    return randomize(m).eval()


def test_a_users_rule_for_their_own_module_prunes_it_exactly(monkeypatch):
    """Without a rule, a module of the user's own freezes the channels it touches and says how to teach it; with
    `register_module_rule` (slicing its per-channel parameter) those channels prune exactly, and the plan
    rebuilds the model only while the rule is registered."""
    import slimexport
    from slimexport import oprules
    from slimexport.graph_prune import apply_plan

    monkeypatch.setattr(oprules, "MODULE_RULES", dict(oprules.MODULE_RULES))
    x = torch.randn(2, 3, 8, 8)
    _, rec = prune_model(_gain_net(), 0.5, example_input=x)
    assert any(
        "parameter or constant" in r and "register_module_rule" in r for u in rec["unprunable"] for r in u["reasons"]
    )
    assert rec["layers"][0]["after"] == 16

    def prune_gain(m, keep):
        m.g = nn.Parameter(m.g.detach()[keep].clone())

    slimexport.register_module_rule(_Gain, keeps_zero=True, prune=prune_gain)
    net = _gain_net()
    pruned, rec = check_exact(net, x)
    assert rec["layers"][0]["after"] < 16 and rec["plan"]["3"]["kind"] == "channelwise"
    rebuilt = apply_plan(_gain_net(), rec["plan"])
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x))
    del oprules.MODULE_RULES[_Gain]
    with pytest.raises(ConfigError, match="register"):
        apply_plan(_gain_net(), rec["plan"])
    with pytest.raises(TypeError):
        slimexport.register_module_rule(len)


def test_a_channel_a_batchnorm_without_gamma_drives_is_kept():
    """A residual add of a normal BN's output and a BatchNorm2d(affine=False)'s: no γ scores the second, which still
    drives the shared channels, so they stay (pruning them by the first BN alone changed the output by 0.37)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            x = torch.relu(self.bn1(self.c1(x)) + self.bn2(self.c2(x)))
            return self.fc(x.mean((2, 3)))

    m = randomize(Block())
    pruned, rec = check_exact(m, torch.randn(2, 3, 8, 8))
    assert pruned.c1.out_channels == pruned.c2.out_channels == 8
    assert any("affine=False" in r for u in rec["unprunable"] for r in u["reasons"])


class _GainConv(nn.Conv2d):
    """A Conv2d subclass with one more per-output-channel parameter (a learnable gain)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.rand(self.out_channels) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.gain.view(1, -1, 1, 1)


def _weight_normed(conv: nn.Module, kind: str) -> nn.Module:
    if kind == "parametrized":
        return nn.utils.parametrizations.weight_norm(conv)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.utils.weight_norm(conv)  # the older API: weight_g, weight_v and a forward pre-hook


@pytest.mark.parametrize("kind", ["parametrized", "weight_norm"])
def test_weight_normed_convs_and_linears_prune_exactly_through_g_and_v(kind):
    """w = g·v/‖v‖ per output channel: outputs cut g and v; inputs cut v and scale g by ‖v kept‖/‖v‖, so every kept
    weight stays what it was. The pruned model equals the original with the removed channels zeroed, and a fresh
    model with the plan applied takes its state dict (the checkpoint's rebuild path). Both weight_norm APIs."""
    from slimexport.plan import apply_plan

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            _weight_normed(nn.Conv2d(3, 16, 3, padding=1), kind), nn.BatchNorm2d(16), nn.ReLU(),
            _weight_normed(nn.Conv2d(16, 32, 3, padding=1), kind), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), _weight_normed(nn.Linear(32, 4), kind),
        )  # fmt: skip

    m, x = randomize(build()), torch.randn(2, 3, 8, 8)
    pruned, rec = check_exact(m, x)
    assert pruned[0].weight.shape[0] < 16 and pruned[3].weight.shape[1] == pruned[0].weight.shape[0]  # both sides
    assert pruned[8].weight.shape[1] == pruned[3].weight.shape[0] < 32
    assert not any("weight" in r for u in rec["unprunable"] for r in u["reasons"])
    fresh = apply_plan(build(), rec["plan"])
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["grouped_weight_norm", "gain"])
def test_layers_with_state_the_engine_does_not_slice_are_kept_never_crash(kind):
    """A conv subclass with a per-channel gain, and weight norm on a grouped conv (not sliced through g and v):
    the engine keeps those layers' channels, says why, and prunes the rest exactly."""
    torch.manual_seed(0)
    if kind == "gain":
        conv = _GainConv(8, 8, 3, padding=1, bias=False)
    else:
        conv = _weight_normed(nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=2), "parametrized")
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), conv, nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    m = randomize(m)
    pruned, rec = check_exact(m, torch.randn(2, 3, 8, 8))
    assert pruned[3].weight.shape[0] == 8  # kept whole
    assert any("besides its weight and bias" in r for u in rec["unprunable"] for r in u["reasons"])
    assert rec["layers"][-1]["after"] < 16  # the rest is pruned


def test_percent_counts_bn_channels_as_the_paper_does():
    """resnet50's residual streams are channel classes spanning up to 16 BNs; --percent 0.5 removes half of the BN
    channels (γ values), not half of the classes (which removed 29% of the BN channels)."""
    from slimexport.graph_prune import prune_graph

    torch.manual_seed(0)
    m = randomize(torchvision.models.get_model("resnet50", weights=None, num_classes=10))
    _, rec = prune_graph(m, torch.randn(1, 3, 64, 64), percent=0.5, fold=False)
    assert abs(rec["pruned_fraction"] - 0.5) < 0.01, rec["pruned_fraction"]
    assert rec["classes"]["removed"] / rec["classes"]["prunable"] > 0.6  # a stream class counts as its 16 BNs


class _TwoInOut(nn.Module):
    """Two images in (an RGB and a depth map, say), a shared trunk, two heads out as a dict (class and box)."""

    def __init__(self):
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.trunk = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.cls = nn.Conv2d(32, 5, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, image, depth):
        x = self.trunk(torch.cat([self.rgb(image), self.depth(depth)], 1))
        return {"cls": self.cls(x), "box": self.box(x)}


@pytest.mark.parametrize("as_dict", [False, True])
def test_models_with_several_inputs_and_outputs_prune_exactly(as_dict):
    """A tuple (or dict) of example inputs and a dict of outputs: every head keeps its output channels, the rest
    prunes, and the check on every prune compares every output."""
    m = randomize(_TwoInOut())
    x = (torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16))
    inputs = {"image": x[0], "depth": x[1]} if as_dict else x
    res = exactness(m, inputs, 0.5)
    assert res["same_channels"] and res["relative_error"] < 1e-5
    pruned, rec = prune_model(m, 0.5, example_input=inputs)
    out = pruned.eval()(*x)
    assert out["cls"].shape == (2, 5, 16, 16) and out["box"].shape == (2, 4, 16, 16)
    assert pruned.trunk[0].out_channels < 32 and pruned.rgb[0].out_channels < 16
    _, budget = prune_model(m, max_macs=0.5, example_input=inputs)
    assert budget["max_macs"] == 0.5


@pytest.mark.parametrize("groups, mult", [(4, 1), (8, 2)])  # ResNeXt-like groups; a depthwise conv with multiplier 2
def test_grouped_convs_prune_whole_groups_exactly(groups, mult):
    """A grouped conv's output group g reads input group g alone: whole groups go, the group width stays, and the
    pruned conv has fewer groups (they used to be frozen: resnext50 kept 0.53 of its MACs at 50%)."""
    torch.manual_seed(0)
    c = 8 if mult == 2 else 16
    m = randomize(nn.Sequential(
        nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c * mult, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c * mult), nn.ReLU(),
        nn.Conv2d(c * mult, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ))  # fmt: skip
    pruned, rec = check_exact(m, torch.randn(2, 3, 8, 8))
    conv = pruned[3]
    assert conv.groups < groups and conv.in_channels // conv.groups == c // groups  # the group width stays
    assert conv.out_channels // conv.groups == c * mult // groups
    assert not any("grouped conv" in r for u in rec["unprunable"] for r in u["reasons"])


class _ConvBnAct(nn.Sequential):
    def __init__(self, cin, cout, k=1):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _C2f(nn.Module):
    """Ultralytics' C2f block as its forward is written: list(chunk), then appending to the list."""

    def __init__(self, c1, c2, n=2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _ConvBnAct(c1, 2 * self.c)
        self.cv2 = _ConvBnAct((2 + n) * self.c, c2)
        self.m = nn.ModuleList(nn.Sequential(_ConvBnAct(self.c, self.c, 3), _ConvBnAct(self.c, self.c, 3))
                               for _ in range(n))  # fmt: skip

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_yolos_c2f_block_traces_and_prunes_its_chunked_channels():
    """torch.fx cannot iterate a proxy, so `list(x.chunk(2, 1))` used to refuse the model; and a chunk into equal
    pieces stays exact when channel k goes from every piece at once."""
    torch.manual_seed(0)
    m = randomize(nn.Sequential(_ConvBnAct(3, 32, 3), _C2f(32, 32), _C2f(32, 64), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten(), nn.Linear(64, 5)))  # fmt: skip
    pruned, rec = check_exact(m, torch.randn(2, 3, 16, 16))
    cv1 = pruned[1].cv1[0]
    assert cv1.out_channels < 32 and cv1.out_channels % 2 == 0  # both halves lose the same channels
    assert not any("split" in r for u in rec["unprunable"] for r in u["reasons"])


class _Ghost(nn.Module):
    """GhostNet's module: half the channels from a conv, half from a cheap depthwise conv of those, then
    ``out[:, :self.out_chs]`` with a bound written into forward that covers every channel."""

    def __init__(self, cin, cout):
        super().__init__()
        self.out_chs = cout
        self.primary = _ConvBnAct(cin, cout // 2)
        self.cheap = nn.Sequential(nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2, bias=False),
                                   nn.BatchNorm2d(cout // 2), nn.ReLU())  # fmt: skip

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)[:, : self.out_chs, :, :]


class _Shapey(nn.Module):
    """A block whose forward branches on its input's size (MobileViT's `if new_h != H: interpolate`): torch.fx
    cannot trace it."""

    def __init__(self, c):
        super().__init__()
        self.body = _ConvBnAct(c, c, 3)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.body(x)


def test_a_slice_over_every_channel_is_not_a_cut_and_ghost_modules_prune():
    torch.manual_seed(0)
    m = randomize(nn.Sequential(_ConvBnAct(3, 16, 3), _Ghost(16, 32), _Ghost(32, 32), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten(), nn.Linear(32, 5)))  # fmt: skip
    pruned, rec = check_exact(m, torch.randn(2, 3, 12, 12))
    assert pruned[1].primary[0].out_channels < 16 and pruned[2].primary[0].out_channels < 16
    assert not any("slice" in r for u in rec["unprunable"] for r in u["reasons"])


def test_a_block_torch_fx_cannot_trace_is_kept_whole_and_the_rest_prunes():
    torch.manual_seed(0)
    m = randomize(nn.Sequential(_ConvBnAct(3, 16, 3), _ConvBnAct(16, 32, 3), _Shapey(32), _ConvBnAct(32, 32, 3),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)))  # fmt: skip
    pruned, rec = check_exact(m, torch.randn(2, 3, 12, 12))
    assert pruned[2].body[0].weight.shape[:2] == (32, 32)  # kept whole, and so are the channels around it
    assert pruned[0][0].out_channels < 16
    assert any("2: _Shapey's forward cannot be traced" in r for u in rec["unprunable"] for r in u["reasons"])


def _cbr(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class _CatAlongWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right, self.head = _cbr(3, 16), _cbr(3, 16), _cbr(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.head(torch.cat([self.left(x), self.right(x)], 3))  # side by side: the same 16 channels
        a, b = y.split(y.shape[3] // 2, 3)
        return self.fc((a + b).mean((2, 3)))


def test_cat_and_split_along_another_axis_keep_their_channels_prunable():
    """A cat or split along width joins or passes the channels; the channels a conv reads after them are still
    normalised by the BNs before (the raw-read analysis froze them: nothing of this model could be pruned)."""
    m = randomize(_CatAlongWidth())
    pruned, rec = check_exact(m, torch.randn(2, 3, 8, 8))
    assert pruned.head[0].in_channels < 16 and rec["pruned_fraction"] > 0.2
    assert not any("head.0: reads these channels" in r for u in rec["unprunable"] for r in u["reasons"])


class _SplitInThree(nn.Module):
    """A literal split into three pieces, each to its own branch (sizes written into forward)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.c = _cbr(3, 48), _cbr(16, 16), _cbr(16, 16), _cbr(16, 16)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        a, b, c = self.stem(x).split([16, 16, 16], 1)
        return self.fc(torch.cat([self.a(a), self.b(b), self.c(c)], 1).mean((2, 3)))


def test_a_split_with_sizes_written_into_forward_prunes_and_rebuilds_with_new_sizes():
    """Its channels were frozen (nothing of this model could be pruned); now the pruned network is the model's
    traced forward with each piece's new size: exact, rebuilt from the plan on a fresh model, pruned again."""
    from slimexport.plan import apply_plan

    torch.manual_seed(0)
    m, x = randomize(_SplitInThree()), torch.randn(2, 3, 8, 8)
    pruned, rec = check_exact(m, x, 0.4)
    (sizes,) = [p["sizes"] for n, p in rec["plan"].items() if n.startswith("split:")]
    conv = pruned.get_submodule  # a graph module: its modules by name
    assert sum(sizes) == conv("stem.0").out_channels < 48 and all(s >= 1 for s in sizes)
    assert [conv("a.0").in_channels, conv("b.0").in_channels, conv("c.0").in_channels] == sizes
    torch.manual_seed(0)
    fresh = apply_plan(_SplitInThree(), rec["plan"])
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x), rtol=0, atol=0)
    again, rec2 = check_exact(randomize(pruned, seed=1), x, 0.3)  # a pruned (graph) model prunes again
    assert again.get_submodule("stem.0").out_channels < conv("stem.0").out_channels

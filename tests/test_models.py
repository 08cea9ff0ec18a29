import copy

import pytest
import torch

from slimexport.models import ChannelSelection, count_params, create_model, default_config
from slimexport.models import common as C
from tests.conftest import TINY_DENSENET, TINY_RESNET, TINY_VGG


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


@pytest.mark.parametrize("arch", ["vgg12", "preresnet21", "densenet41", "resnet50", "vgg11_w0"])
def test_unknown_or_invalid_architectures_raise(arch):
    with pytest.raises(ValueError):
        create_model(arch, 10, 3)


def test_reference_initialisation():
    m = create_model("preresnet20", 10, 3)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 0.5) and torch.all(b.bias == 0) for b in bns)


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


def test_unpruned_networks_have_identity_selections_only():
    for arch in ("preresnet164", "densenet40"):
        m = create_model(arch, 10, 3)
        sels = [s for s in m.modules() if isinstance(s, ChannelSelection)]
        assert sels and all(s.mode == "identity" for s in sels)
        assert not any("select" in n for n, _ in m.named_parameters())


def _drop_keep(model, frac=0.5, seed=1, beta_negative=True):
    """Random keep sets; dropped channels get γ = 0 (and β < 0, so relu kills them exactly)."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, bn in model.prunable_bns():
        n = bn.num_features
        k = torch.randperm(n, generator=g)[: max(1, int(n * frac))].sort().values
        drop = torch.ones(n, dtype=torch.bool)
        drop[k] = False
        bn.weight.data[drop] = 0.0
        if beta_negative:
            bn.bias.data[drop] = -1.0
        keep[name] = k
    return keep


@pytest.mark.parametrize("arch", [TINY_VGG, TINY_RESNET, TINY_DENSENET, "preresnet20", "densenet16"])
def test_pruned_model_computes_what_the_full_one_did(arch, make_model):
    m = make_model(arch)
    keep = _drop_keep(m)
    p = m.pruned(keep).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-4)
    assert count_params(p) < count_params(m)


@pytest.mark.parametrize("arch", [TINY_VGG, "preresnet20", "densenet16"])
def test_dropped_bias_is_folded_onward_not_lost(arch, make_model, monkeypatch):
    """Dropped channels with β > 0 still emit relu(β); folding it into the next BN keeps the output far closer."""
    m = make_model(arch)
    keep = _drop_keep(m, beta_negative=False)
    for _, bn in m.prunable_bns():
        bn.bias.data = bn.bias.data.abs() + 0.2
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = m(x)
        err_folded = (m.pruned(keep).eval()(x) - ref).abs().max()
        family = __import__(f"slimexport.models.{m.__class__.__module__.split('.')[-1]}", fromlist=["x"])
        monkeypatch.setattr(family, "dropped_constant", lambda bn, k: torch.zeros(bn.num_features))
        err_lost = (m.pruned(keep).eval()(x) - ref).abs().max()
    assert err_folded < 0.5 * err_lost


def test_pruned_model_rebuilds_from_config_alone(make_model):
    m = make_model("preresnet20")
    p = m.pruned(_drop_keep(m)).eval()
    q = create_model(p.arch, p.num_classes, p.in_channels, p.config)
    q.load_state_dict(p.state_dict())
    q.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(p(x), q(x))
    assert any(s.mode == "gather" for s in q.modules() if isinstance(s, ChannelSelection))


def test_configs_are_plain_data():
    for arch in ("vgg16", "preresnet29", "densenet22"):
        cfg = default_config(arch)
        assert set(type(v).__name__ for v in cfg.values()) <= {"int", "list", "NoneType"}


def test_conv_shift_is_exact_for_1x1():
    conv = torch.nn.Conv2d(3, 4, 1, bias=False)
    const = torch.tensor([0.5, 0.0, 2.0])
    x = const.view(1, 3, 1, 1).expand(1, 3, 5, 5)
    torch.testing.assert_close(conv(x)[0, :, 2, 2], C.conv_shift(conv, const))


@pytest.mark.parametrize("size", [28, 9])  # an odd size: both the pool and the stride-2 conv drop the last row
def test_folded_transition_pools_compute_the_same_function_with_the_same_macs(size, make_model):
    from slimexport.models.densenet import fold_transition_pools
    from slimexport.prune import prune_model
    from slimexport.stats import count_macs

    for m in (make_model(TINY_DENSENET), prune_model(make_model(TINY_DENSENET), 0.5)[0]):
        folded = fold_transition_pools(m)
        assert not m.trans1.pool_folded and m.trans1.conv1.kernel_size == (1, 1)  # the original is untouched
        for t in (folded.trans1, folded.trans2):
            assert t.pool_folded and t.conv1.kernel_size == (2, 2) and t.conv1.stride == (2, 2)
        x = torch.randn(3, 1, size, size)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)
        before, after = count_macs(m, 1, (size, size)), count_macs(folded, 1, (size, size))
        # equal on even maps; on odd ones the folded conv skips the row and column the pool would drop
        assert after == before if size % 2 == 0 else after < before
        assert count_params(folded) > count_params(m)  # 4 taps of the same weight: for export, never saved


def _map_reads(model):
    """Per block of a DenseNet: the producers' output widths and the set of map channels some selection reads."""
    n = (model.config["depth"] - 4) // 3
    units, prods = model.units(), model.producers()
    out = []
    for b in range(3):
        readers = [u.select for u in units[b * (n + 1) : b * (n + 1) + n + 1]]
        readers += [model.select] if b == 2 else []
        first = 0 if b == 0 else b * (n + 1)
        widths = [p.out_channels for p in prods[first : first + n + 1]]
        out.append((widths, set().union(*[set(s.indices()) for s in readers])))
    return out


def test_densenet_computes_no_map_channel_that_nothing_reads(make_model):
    m = make_model("densenet16")
    keep = _drop_keep(m, frac=0.3)
    p = m.pruned(keep).eval()
    before = sum(c.out_channels for c in m.producers())
    assert sum(c.out_channels for c in p.producers()) < before  # some channels were read by no one, and are gone
    for widths, read in _map_reads(p):
        offset = 0
        for w in widths:
            unread = set(range(offset, offset + w)) - read
            assert not unread or w == 1, (widths, unread)  # only a producer's one floor channel may go unread
            offset += w
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-4)
        # the config alone rebuilds it, and pruning the pruned model again keeps the function
        q = create_model(p.arch, p.num_classes, p.in_channels, p.config)
        q.load_state_dict(p.state_dict())
        assert torch.equal(q.eval()(x), p(x))
        keep2 = {name: torch.arange(bn.num_features) for name, bn in p.prunable_bns()}
        torch.testing.assert_close(p.pruned(keep2).eval()(x), p(x), atol=1e-5, rtol=1e-4)
        keep3 = _drop_keep(p, frac=0.5, seed=2)  # and pruning it further stays exact
        p3 = p.pruned(keep3).eval()
        torch.testing.assert_close(p3(x), p(x), atol=1e-5, rtol=1e-4)
    assert [len(o) for o in p3.config["outputs"]] == [c.out_channels for c in p3.producers()]


def _stream_reads(model):
    """Per stream segment of a PreResNet, the set of channels some selection reads."""
    reads = [set() for _ in model.stream_widths()]
    for blk, g in zip(model.blocks(), model.block_segments()):
        reads[g] |= set(blk.select.indices())
    reads[-1] |= set(model.select.indices())
    return reads


@pytest.mark.parametrize("round_to", [1, 16])
def test_preresnet_last_stage_computes_no_stream_channel_that_nothing_reads(round_to, make_model):
    m = make_model("preresnet20")
    keep = _drop_keep(m, frac=0.3)
    p = m.pruned(keep, round_to=round_to).eval()
    widths = p.stream_widths()
    assert widths[:3] == [16, 64, 128]  # a downsampling conv reads these: the paper's rule keeps them whole
    assert widths[3] < 256 and widths[3] % round_to == 0
    if round_to == 1:
        assert _stream_reads(p)[3] == set(range(widths[3]))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-4)
        q = create_model(p.arch, p.num_classes, p.in_channels, p.config)  # the config alone rebuilds it
        q.load_state_dict(p.state_dict())
        assert torch.equal(q.eval()(x), p(x))
        p3 = p.pruned(_drop_keep(p, frac=0.5, seed=2)).eval()  # and pruning it further stays exact
        torch.testing.assert_close(p3(x), p(x), atol=1e-5, rtol=1e-4)
    if round_to > 1:  # the top-up channels are the unread ones whose readers' largest |γ| is largest
        readers = (m.layer3[1].bn1, m.bn)  # every selection of the unpruned m is the identity
        for i, bn in enumerate(readers):  # distinct small |γ| for the dropped channels (so no ties)
            dropped = bn.weight == 0
            bn.weight.data[dropped] = torch.linspace(1e-3, 1e-2, 256)[torch.randperm(256)][dropped] * (i + 1)
        score = torch.maximum(*(bn.weight.abs() for bn in readers))
        read = set(keep["layer3.1.bn1"].tolist()) | set(keep["bn"].tolist())
        unread = sorted(set(range(256)) - read, key=lambda c: -score[c])
        expect = sorted(read | set(unread[: widths[3] - len(read)]))
        rows = m.layer3[0].downsample[0].weight.flatten(1)  # which of m's channels the pruned one kept
        p = m.pruned(keep, round_to=round_to)
        kept = [int((rows == r).all(1).nonzero()) for r in p.layer3[0].downsample[0].weight.flatten(1)]
        assert kept == expect


def test_prune_stream_removes_every_unread_stream_channel_and_carries_its_mean(make_model):
    m = make_model("preresnet20")
    keep = _drop_keep(m, frac=0.3)
    x = torch.randn(16, 1, 28, 28)
    # Give each downsampling block's first BN the true mean of its input, as training would. Its dropped channels
    # output relu(-1) = 0 whatever their mean, so for those this changes nothing in m itself.
    downs = [b for b in m.blocks() if b.downsample is not None]
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].mean((0, 2, 3)))) for b in downs]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for b in downs:
        b.bn1.running_mean.copy_(seen[b])
    blind = copy.deepcopy(m)  # the same function, but knowing no mean for a channel its first BN drops
    for b, name in ((b, n) for n, b in blind.named_modules() if getattr(b, "downsample", None) is not None):
        dropped = torch.ones(b.bn1.num_features, dtype=torch.bool)
        dropped[keep[f"{name}.bn1"]] = False
        b.bn1.running_mean[dropped] = 0.0
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(blind(x), ref)
        p = m.pruned(keep, prune_stream=True).eval()
        widths = p.stream_widths()
        assert all(w < full for w, full in zip(widths, [16, 64, 128, 256]))
        assert [len(r) for r in _stream_reads(p)] == widths  # every channel left is read by some selection
        q = create_model(p.arch, p.num_classes, p.in_channels, p.config)
        q.load_state_dict(p.state_dict())
        assert torch.equal(q.eval()(x), p(x))
        err = (p(x) - ref).abs().mean()
        err_blind = (blind.pruned(keep, prune_stream=True).eval()(x) - ref).abs().mean()
    assert err < 0.75 * err_blind, (err, err_blind)  # carrying the mean on (measured: 0.59x the error) helps


def test_prune_stream_changes_nothing_when_every_stream_channel_is_read(make_model):
    m = make_model(TINY_RESNET)
    keep = {name: torch.arange(bn.num_features) for name, bn in m.prunable_bns()}
    p = m.pruned(keep, prune_stream=True)
    assert p.stream_widths() == [16, 64, 128, 256] and "stream" not in p.config
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(p.eval()(x), m(x))


def test_a_sole_reader_of_the_last_stage_needs_no_index_op(make_model):
    m = make_model(TINY_RESNET)  # one block per stage: the classifier's selection alone reads the last stage
    p = m.pruned(_drop_keep(m, frac=0.3)).eval()
    assert p.select.mode == "identity" and p.stream_widths()[3] == p.bn.num_features < 256
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), atol=1e-5, rtol=1e-4)

import numpy as np
import pytest
import torch

from slimexport.channels import ChannelSelection
from slimexport.checkpoint import make_checkpoint, save_checkpoint
from slimexport.config import ExportConfig
from slimexport.export import INPUT_NAME, export, ort_session
from slimexport.prune import prune_model
from slimexport.rewrite import absorb_selections, selection_units
from slimexport.selection import _unit_graph, candidates, mix, time_unit, unit_shapes
from slimexport.train import data_meta
from tests.helpers import TINY_DENSENET, TINY_RESNET, TINY_VGG


def _modes(model):
    return [m.mode for m in model.modules() if isinstance(m, ChannelSelection)]


@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_DENSENET])
def test_absorbing_some_selections_is_exact_and_leaves_the_others(arch, make_model):
    p, _ = prune_model(make_model(arch), 0.5)
    p.eval()
    active = [i for i, (s, _, _) in enumerate(selection_units(p)) if s.mode != "identity"]
    assert len(active) >= 2
    absorb = [i in active[::2] for i in range(len(selection_units(p)))]  # every other active unit
    mixed = absorb_selections(p, absorb).eval()
    modes = [s.mode for s, _, _ in selection_units(mixed)]
    for i, (s, _, _) in enumerate(selection_units(p)):
        assert modes[i] == ("identity" if absorb[i] else s.mode)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(mixed(x), p(x), atol=1e-5)
    with pytest.raises(ValueError, match="absorb flags"):
        absorb_selections(p, absorb[:-1])


def test_unit_shapes_follow_the_forward_pass(make_model):
    # preresnet20: two readers of the last stage's stream, so its selections stay Gathers after the stream is
    # compacted (in preresnet11 the classifier's selection is its only reader and becomes the identity)
    p, _ = prune_model(make_model("preresnet20"), 0.5)
    shapes = unit_shapes(p, (1, 28, 28))
    units = selection_units(p)
    assert len(shapes) == len(units)
    for (sel, _, consumer), sh in zip(units, shapes):
        if sel.mode == "identity":
            assert sh is None
            continue
        assert sh.channels == sel.num_channels and list(sh.kept) == sel.indices()
        assert sh.consumer == ("conv" if isinstance(consumer, torch.nn.Conv2d) else "linear")
    # the first block sees the stem's 28×28 map; the last stage's selections its 7×7
    first = next(s for s in shapes if s is not None)
    assert (first.height, first.width) == (28, 28)
    assert shapes[-1] is not None and (shapes[-1].height, shapes[-1].width) == (7, 7)
    assert shapes[-1].consumer == "linear"


def test_unit_graphs_run_and_differ_only_in_the_index_op(make_model):
    p, _ = prune_model(make_model(TINY_RESNET), 0.5)
    shape = next(s for s in unit_shapes(p, (1, 28, 28)) if s is not None and s.consumer == "conv")
    x = np.random.default_rng(0).standard_normal((2, shape.channels, shape.height, shape.width)).astype(np.float32)
    outs = {}
    for dense in (False, True):
        sess = ort_session(_unit_graph(shape, dense, batch=2))
        ops = {n.op_type for n in __import__("onnx").load_from_string(_unit_graph(shape, dense, 2)).graph.node}
        assert ("Gather" in ops or "Slice" in ops) != dense
        outs[dense] = sess.run(None, {INPUT_NAME: x})[0]
    assert outs[False].shape == outs[True].shape == (2, shape.out_channels, shape.height, shape.width)
    t = time_unit(shape, seconds=0.01)
    assert set(t) == {"gather", "dense"} and min(t.values()) > 0


def test_candidates_of_a_model_without_selections_is_the_model(make_model):
    vgg = make_model(TINY_VGG)
    c, units = candidates(vgg, (1, 28, 28))
    assert list(c) == ["gather"] and c["gather"][0] is vgg and units == []
    unpruned = make_model(TINY_RESNET)
    assert list(candidates(unpruned, (1, 28, 28))[0]) == ["gather"]


@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_DENSENET])
@pytest.mark.slow
def test_auto_selection_keeps_the_fastest_measured_candidate(arch, tmp_path, make_model, small_ds):
    p, _ = prune_model(make_model(arch), 0.5)
    ckpt = tmp_path / "p.pt"
    save_checkpoint(make_checkpoint(p, data_meta(small_ds), {"stage": "test"}), ckpt)
    out = tmp_path / "auto.onnx"
    r = export(ckpt, out, small_ds, ExportConfig(parity_images=64, selection="auto", tune_seconds=0.05))
    sel = r["selection"]
    assert {"gather", "dense"} <= set(sel["candidates"])
    times = {n: c["median_ms"] for n, c in sel["candidates"].items()}
    assert sel["chosen"] == min(times, key=times.get)
    assert r["op_counts"] == sel["candidates"][sel["chosen"]]["op_counts"]
    assert "Gather" not in sel["candidates"]["dense"]["op_counts"]
    assert r["parity"]["max_abs_diff"] <= 1e-3
    assert sorted(x.name for x in tmp_path.iterdir()) == ["auto.onnx", "p.pt"]  # no candidate left behind
    meta = {m.key: m.value for m in __import__("onnx").load(str(out)).metadata_props}
    assert meta["selection"] == sel["chosen"]
    assert len(sel["units"]) == sum(m != "identity" for m in _modes(p))


def test_mixes_absorb_the_units_whose_dense_variant_is_within_tolerance():
    costs = [
        None,
        {"gather_ms": 1.0, "dense_ms": 0.9},
        {"gather_ms": 1.0, "dense_ms": 1.0},  # a tie stays a gather
        {"gather_ms": 1.0, "dense_ms": 1.08},
        {"gather_ms": 1.0, "dense_ms": 1.2},
    ]
    assert mix(costs) == [False, True, False, False, False]
    assert mix(costs, 0.1) == [False, True, True, True, False]
    assert mix(costs, 0.25) == [False, True, True, True, True]


def test_candidates_are_distinct_and_their_flags_describe_them(make_model):
    p, _ = prune_model(make_model(TINY_DENSENET), 0.5)
    c, units = candidates(p, (1, 28, 28))
    active = [s.mode != "identity" for s, _, _ in selection_units(p)]
    assert len(units) == sum(active)
    keys = {tuple(f for f, on in zip(flags, active) if on) for _, flags in c.values()}
    assert len(keys) == len(c)  # no two candidates are the same graph
    for model, flags in c.values():
        modes = [s.mode for s, _, _ in selection_units(model)]
        for f, on, m in zip(flags, active, modes):
            assert (m == "identity") == (f or not on)

import onnx
import pytest
import torch

from slimexport.channels import ChannelSelection
from slimexport.checkpoint import make_checkpoint, save_checkpoint
from slimexport.config import ExportConfig
from slimexport.errors import ConfigError, ParityError
from slimexport.export import export
from slimexport.prune import prune_model
from slimexport.train import data_meta
from tests.helpers import TINY_DENSENET, TINY_RESNET, TINY_VGG

FORBIDDEN = {"NonZero", "GatherND", "Where", "ScatterND", "Transpose"}
FAST = ExportConfig(parity_images=64)


def _ckpt(tmp_path, model, ds, name="m.pt"):
    path = tmp_path / name
    save_checkpoint(make_checkpoint(model, data_meta(ds), {"stage": "test"}), path)
    return path


def _nontrivial_selections(model):
    return [s for s in model.modules() if isinstance(s, ChannelSelection) and s.mode != "identity"]


@pytest.mark.parametrize(
    "arch, stream", [(TINY_VGG, False), (TINY_RESNET, False), (TINY_RESNET, True), (TINY_DENSENET, False)]
)
def test_pruned_export_matches_pytorch_and_uses_only_static_index_ops(arch, stream, tmp_path, make_model, small_ds):
    p, _ = prune_model(make_model(arch), 0.5, prune_stream=stream)
    assert not stream or p.net.conv1.out_channels < 16
    r = export(_ckpt(tmp_path, p, small_ds), tmp_path / "p.onnx", small_ds, FAST)
    assert r["parity"]["max_abs_diff"] <= 1e-3 and r["parity"]["top1_agreement"] == 1.0
    proto = onnx.load(str(tmp_path / "p.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert not FORBIDDEN & set(ops), ops
    # each selection is at most one Gather or one Slice
    assert ops.count("Gather") + ops.count("Slice") <= len(_nontrivial_selections(p))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert r["simplified"] and r["onnx_bytes"] == (tmp_path / "p.onnx").stat().st_size
    meta = {m.key: m.value for m in proto.metadata_props}
    assert meta["arch"] == arch and "mean" in meta


@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_DENSENET])
def test_identity_selection_leaves_no_node(arch, tmp_path, make_model, small_ds):
    m = make_model(arch)
    r = export(_ckpt(tmp_path, m, small_ds), tmp_path / "u.onnx", small_ds, FAST)
    assert "Gather" not in r["op_counts"] and "Slice" not in r["op_counts"]


def test_contiguous_selection_exports_as_one_slice(tmp_path, make_model, small_ds):
    m = make_model(TINY_RESNET)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for b in bns:
        b.weight.data = 1 + torch.rand(b.num_features)
    bns[0].weight.data[[0, 1, *range(10, 16)]] = 1e-3  # the first block's input BN keeps 2..9, a contiguous range
    p, rec = prune_model(m, 7.5 / sum(b.num_features for b in bns), round_to=1)
    assert rec["layers"][0]["kept"] == list(range(2, 10))
    assert [s.mode for s in _nontrivial_selections(p)] == ["slice"]
    r = export(_ckpt(tmp_path, p, small_ds), tmp_path / "s.onnx", small_ds, FAST)
    assert r["op_counts"].get("Slice") == 1 and "Gather" not in r["op_counts"]
    assert r["parity"]["max_abs_diff"] <= 1e-3


def test_parity_failure_is_an_error_and_writes_nothing(tmp_path, make_model, small_ds, monkeypatch):
    import slimexport.export as E

    monkeypatch.setattr(E, "parity", lambda *a, **k: {"max_abs_diff": 0.5, "top1_agreement": 0.9, "images": 8})
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export(_ckpt(tmp_path, make_model(TINY_VGG), small_ds), out, small_ds, FAST)
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx*"))


def test_export_rejects_data_of_another_shape(tmp_path, make_model, small_ds):
    with pytest.raises(ConfigError, match="input"):
        export(_ckpt(tmp_path, make_model(TINY_VGG, in_channels=3), small_ds), tmp_path / "x.onnx", small_ds, FAST)


@pytest.mark.parametrize("arch", [TINY_RESNET, TINY_DENSENET])
def test_dense_selection_exports_without_index_ops_and_matches(arch, tmp_path, make_model, small_ds):
    p, _ = prune_model(make_model(arch), 0.5)
    assert _nontrivial_selections(p)
    r = export(
        _ckpt(tmp_path, p, small_ds), tmp_path / "d.onnx", small_ds, ExportConfig(parity_images=64, selection="dense")
    )
    assert "Gather" not in r["op_counts"] and "Slice" not in r["op_counts"]
    # parity is measured against the pruned (gather) model itself, so the absorption is exact
    assert r["parity"]["max_abs_diff"] <= 1e-4 and r["parity"]["top1_agreement"] == 1.0


def test_densenet_exports_its_transition_pools_folded_into_strided_convs(tmp_path, make_model, small_ds):
    p, _ = prune_model(make_model(TINY_DENSENET), 0.5)
    r = export(_ckpt(tmp_path, p, small_ds), tmp_path / "f.onnx", small_ds, FAST)
    assert "AveragePool" not in r["op_counts"]
    strided = [
        n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node
        if n.op_type == "Conv" and [list(a.ints) for a in n.attribute if a.name == "strides"] == [[2, 2]]
    ]  # fmt: skip
    assert len(strided) == 2  # one per transition
    assert r["parity"]["max_abs_diff"] <= 1e-4  # measured against the unfolded model


def test_unknown_selection_mode(tmp_path, make_model, small_ds):
    with pytest.raises(ConfigError, match="selection"):
        export(
            _ckpt(tmp_path, make_model(TINY_VGG), small_ds),
            tmp_path / "x.onnx",
            small_ds,
            ExportConfig(selection="scatter"),
        )


def test_exported_files_get_the_usual_permissions(tmp_path, make_model, small_ds):
    import os
    import stat

    old = os.umask(0o022)
    try:
        export(_ckpt(tmp_path, make_model(TINY_VGG), small_ds), tmp_path / "v.onnx", small_ds, FAST)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.onnx").stat().st_mode) == 0o644  # not the 0600 of a private temp file

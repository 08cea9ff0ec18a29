import pytest

from slimexport.bench import bench, op_time_shares
from slimexport.checkpoint import make_checkpoint, save_checkpoint
from slimexport.config import BenchConfig, ExportConfig
from slimexport.errors import ConfigError, DeviceError
from slimexport.export import export
from slimexport.loop import evaluate
from slimexport.prune import prune_model
from slimexport.train import data_meta
from tests.helpers import TINY_RESNET


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory, small_ds):
    import torch

    from slimexport.models import create_model
    from tests.helpers import randomize_bns

    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    m = create_model(TINY_RESNET, 10, 1)
    randomize_bns(m)
    p, _ = prune_model(m, 0.5)
    out = {}
    for name, model in (("base", m), ("pruned", p)):
        save_checkpoint(make_checkpoint(model, data_meta(small_ds), {"stage": name}), tmp / f"{name}.pt")
        export(tmp / f"{name}.pt", tmp / f"{name}.onnx", small_ds, ExportConfig(parity_images=32))
        out[name] = (tmp / f"{name}.onnx", model)
    return out


def test_bench_rows_accuracy_and_profile(onnx_pair, small_ds):
    cfg = BenchConfig(batches=[1, 4], threads=[1], seconds=0.05, min_runs=5)
    r = bench({k: v[0] for k, v in onnx_pair.items()}, small_ds, cfg)
    assert len(r["latency"]) == 4
    for row in r["latency"]:
        assert 0 < row["median_ms"] <= row["p90_ms"] and row["runs"] >= 5
    for name, (_, model) in onnx_pair.items():
        # onnxruntime's accuracy on the whole test split equals PyTorch's for the same weights
        assert r["models"][name]["accuracy"] == pytest.approx(evaluate(model, small_ds), abs=1 / len(small_ds.y_test))
        shares = r["models"][name]["op_time"]["shares"]
        assert sum(shares.values()) == pytest.approx(1.0)
    assert r["models"]["pruned"]["op_time"]["gather_slice_share"] > 0
    assert r["models"]["base"]["op_time"]["gather_slice_share"] == 0


def test_cuda_provider_missing_is_one_clear_error(onnx_pair, small_ds):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        bench({"base": onnx_pair["base"][0]}, small_ds, BenchConfig(device="cuda"))


def test_bad_bench_options():
    for bad in (dict(batches=[0]), dict(threads=[]), dict(device="tpu")):
        with pytest.raises(ConfigError):
            BenchConfig(**bad).validate()


def test_op_time_shares_names_real_ops(onnx_pair):
    s = op_time_shares(onnx_pair["pruned"][0], (1, 28, 28), runs=5)
    assert "Gather" in s["shares"] and 0 < s["gather_slice_share"] < 1


def test_doubled_index_ops_add_one_reversed_gather_each_and_still_run(onnx_pair):
    import numpy as np
    import onnx

    from slimexport.bench import index_op_cost, with_index_ops_doubled
    from slimexport.export import INPUT_NAME, OUTPUT_NAME, ort_session

    proto = onnx.load(str(onnx_pair["pruned"][0]))
    ops = [n.op_type for n in proto.graph.node]
    n_index = ops.count("Gather") + ops.count("Slice")
    assert n_index > 0
    doubled, n = with_index_ops_doubled(proto)
    assert n == n_index
    assert [x.op_type for x in doubled.graph.node].count("Gather") == ops.count("Gather") + n
    assert [n.op_type for n in proto.graph.node] == ops  # the original is untouched
    onnx.checker.check_model(doubled, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    outs = [ort_session(p.SerializeToString()).run([OUTPUT_NAME], {INPUT_NAME: x})[0] for p in (proto, doubled)]
    assert outs[0].shape == outs[1].shape and not np.allclose(outs[0], outs[1])  # the reversal really runs
    cost = index_op_cost(onnx_pair["pruned"][0], (1, 28, 28), seconds=0.05)
    assert cost["index_ops"] == n_index and cost["median_ms"] > 0 and cost["doubled_median_ms"] > 0
    assert index_op_cost(onnx_pair["base"][0], (1, 28, 28))["index_ops"] == 0  # unpruned: nothing to measure

"""Every record a stage returns is declared by its type in slimexport.records (the README's report table is generated
from the same types): a field added in code but not in its type fails here."""

import torch

from slimexport import prune_model
from slimexport.bench import bench
from slimexport.config import BenchConfig, ExportConfig
from slimexport.data import from_arrays
from slimexport.export import export_model
from slimexport.models import create_model
from slimexport.records import BenchResult, ExportResult, PruneRecord, undeclared


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    return from_arrays("random", x[:20], np.arange(20) % 10, x[20:], np.arange(20) % 10)


def test_undeclared_finds_a_field_its_type_does_not_name():
    rec = {"percent": 0.5, "layers": [{"name": "bn", "before": 4, "after": 2, "kept": [0, 1], "extra": 1}], "new": 2}
    assert undeclared(rec, PruneRecord) == ["new", "layers[0].extra"]


def test_prune_export_and_bench_return_what_their_types_declare(tmp_path):
    torch.manual_seed(0)
    ds = _data()
    hand, rec_hand = prune_model(create_model("preresnet20", 10, 3), 0.5)
    net = create_model("torchvision:resnet18", 10, 3, {"source": "torchvision:resnet18", "image_size": [16, 16]})
    _, rec_graph = prune_model(net, 0.5)
    assert undeclared(rec_hand, PruneRecord) == [] and undeclared(rec_graph, PruneRecord) == []
    res = export_model(hand, tmp_path / "m.onnx", ds, ExportConfig(parity_images=8, atol=1e-3))
    assert undeclared(res, ExportResult) == []
    b = bench({"m": tmp_path / "m.onnx"}, ds, BenchConfig(batches=[1], threads=[1], seconds=0.05))
    assert b["latency"] and undeclared(b, BenchResult) == []

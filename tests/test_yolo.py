"""Ultralytics YOLO detectors through the Python API (the `yolo` extra; skipped without it): built from their yaml,
no weights needed, they prune exactly with the Detect head's output channels kept and export to ONNX with parity.
Their speed-up in onnxruntime at 640×640 is measured by `python -m benchmarks.yolo`."""

import pytest
import torch

from slimexport import export_onnx, prune_model
from slimexport.graph_prune import exactness
from tests.helpers import randomize_bns as randomize

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models

ultralytics = pytest.importorskip("ultralytics")


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_prunes_exactly_keeps_its_head_and_exports_with_parity(cfg, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = randomize(DetectionModel(cfg, nc=80, verbose=False))
    x = torch.randn(1, 3, 320, 320)
    res = exactness(m, x, 0.5)
    assert res["same_channels"] and res["relative_error"] < 1e-4, res["relative_error"]
    pruned, rec = prune_model(m, 0.5, example_input=x)
    assert rec["pruned_fraction"] > 0.3  # C2f's chunked channels, the backbone and the neck all prune
    head, new_head = m.model[-1], pruned.model[-1]
    for i in range(head.nl):  # the Detect head's outputs (box distribution and class scores) keep their channels
        assert new_head.cv2[i][-1].out_channels == head.cv2[i][-1].out_channels
        assert new_head.cv3[i][-1].out_channels == head.cv3[i][-1].out_channels == 80
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in m.parameters())
    r = export_onnx(pruned, x, tmp_path / "yolo.onnx", atol=1e-2)
    assert r["parity"]["max_abs_diff"] <= 1e-2  # box coordinates in pixels: 1e-2 is 3e-5 of the image

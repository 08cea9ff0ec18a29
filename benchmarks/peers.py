"""The peer slimexport is compared with: Torch-Pruning's BN-scale pruner (global, on the same sparse checkpoint),
refined with the same schedule and exported through the same exporter."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import torch

from slimexport.checkpoint import load_checkpoint
from slimexport.config import ExportConfig, TrainConfig
from slimexport.export import export_model
from slimexport.loop import evaluate, fit
from slimexport.stats import count_macs, count_params


def torch_pruning_model(sparse: Path, ds, percent: float):
    """The sparse checkpoint pruned by Torch-Pruning's BN-scale pruner, global, at ``percent`` (the peer's setting)."""
    import torch_pruning as tp

    model, _ = load_checkpoint(sparse)
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier
    tp.pruner.BNScalePruner(
        model,
        ds.normalize(ds.x_test[:1]),
        importance=tp.importance.BNScaleImportance(),
        global_pruning=True,
        pruning_ratio=percent,
        ignored_layers=[head],
    ).step()
    return model


def torch_pruning_peer(run_dir: Path, ds, percent: float, refine_cfg: TrainConfig, out_onnx: Path) -> dict:
    """Prune the same sparse checkpoint with Torch-Pruning's BN-scale pruner, refine, export."""
    t0 = time.perf_counter()
    model = torch_pruning_model(run_dir / "sparse.pt", ds, percent)
    prune_s = time.perf_counter() - t0
    before = evaluate(model, ds)
    res = fit(model, ds, refine_cfg, description="torch-pruning refine")
    # the installed distribution's version: the 1.6.1 wheel's torch_pruning.__version__ still says 1.6.0
    library = f"torch-pruning {importlib.metadata.version('torch-pruning')}"
    ex = export_model(model, out_onnx, ds, ExportConfig(), {"producer_peer": library})
    size = ds.image_size
    return {
        "library": library,
        "params": count_params(model),
        "macs": count_macs(model, ds.in_channels, size),
        "accuracy_before_refine": before,
        "torch_accuracy": res["final_accuracy"],
        "onnx_bytes": ex["onnx_bytes"],
        "parity": ex["parity"],
        "op_counts": ex["op_counts"],
        "stages": {
            "prune": {"seconds": prune_s},
            "refine": {"seconds": res["train_seconds"], "images_per_s": res["images_per_s"]},
        },
    }

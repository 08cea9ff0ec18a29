"""The CUDA path end to end. Marked ``cuda``: skipped without a GPU; ``make test-gpu`` runs them. The resume test
also runs on the CPU, where it always runs."""

import json

import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

import slimexport.loop as train_mod
from slimexport.cli import app
from slimexport.config import TrainConfig
from slimexport.loop import fit
from slimexport.models import create_model
from tests.helpers import TINY_VGG

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (make test-gpu on a machine with one)")
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, needs_cuda])]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_equals_an_uninterrupted_run(small_ds, tmp_path, monkeypatch, device):
    """Two epochs straight, against one epoch, an interruption, and --resume: the same weights (augmentation draws
    from the run's own generator, saved in the resume state, on CPU and CUDA alike)."""
    cfg = TrainConfig(epochs=2, batch_size=100, device=device)

    def run(resume_path, interrupt):
        torch.manual_seed(1)
        m = create_model(TINY_VGG, 10, 1)
        if interrupt:
            real = train_mod.save_checkpoint

            def save_then_stop(*a, **kw):
                real(*a, **kw)
                raise KeyboardInterrupt

            monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
            with pytest.raises(KeyboardInterrupt):
                fit(m, small_ds, cfg, resume_path=resume_path)
            monkeypatch.setattr(train_mod, "save_checkpoint", real)
            torch.manual_seed(1)
            m = create_model(TINY_VGG, 10, 1)
            fit(m, small_ds, cfg, resume_path=resume_path, resume=True)
        else:
            fit(m, small_ds, cfg, resume_path=resume_path)
        return m.state_dict()

    straight = run(tmp_path / "a.resume", interrupt=False)
    resumed = run(tmp_path / "b.resume", interrupt=True)
    tol = 0 if device == "cpu" else 1e-4  # cuDNN's chosen algorithms may differ in the last bits
    for k, v in straight.items():
        assert torch.allclose(v.float(), resumed[k].float(), atol=tol, rtol=0), k
    assert small_ds.x_train.device.type == "cpu"  # the caller's data set was not moved


@cuda
@needs_cuda
def test_pipeline_on_cuda_with_compile(tmp_path, small_npz):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        ["pipeline", "--arch", TINY_VGG, "--dataset", small_npz, "--out", str(out), "--epochs", "2",
         "--refine-epochs", "1", "--sparsity", "0.02", "--percent", "0.5", "--batch", "1", "--threads", "1",
         "--seconds", "0.05", "--device", "cuda", "--compile"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["config"]["resolved_device"].startswith("cuda")
    for stage in ("baseline", "sparse"):
        st = r["stages"][stage]
        assert st["compile_seconds"] > 0 and st["images_per_s"] > 0
    # evaluation in fp32 on the GPU agrees with onnxruntime's on the CPU to within a few images
    for name in ("baseline", "pruned"):
        assert abs(r[name]["accuracy"] - r[name]["torch_accuracy"]) <= 3 / 200


@cuda
@needs_cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(), reason="no onnxruntime-gpu")
def test_onnxruntime_cuda_bench_really_runs_on_cuda(tmp_path, small_npz):
    from slimexport.checkpoint import make_checkpoint, save_checkpoint
    from slimexport.data import load_dataset
    from slimexport.export import export
    from slimexport.train import data_meta

    ds = load_dataset(small_npz)
    save_checkpoint(make_checkpoint(create_model(TINY_VGG, 10, 1), data_meta(ds), {"stage": "x"}), tmp_path / "m.pt")
    export(tmp_path / "m.pt", tmp_path / "m.onnx", ds)
    res = CliRunner().invoke(
        app, ["bench", str(tmp_path / "m.onnx"), "--dataset", small_npz, "--device", "cuda", "--batch", "1,8",
              "--seconds", "0.1", "--out", str(tmp_path / "b.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert {r["provider"] for r in b["latency"]} == {"CUDAExecutionProvider"}
    assert b["models"]["m"]["op_time"]["provider"] == "CUDAExecutionProvider"

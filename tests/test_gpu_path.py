"""The CUDA path's defects that a CPU can exercise (the real GPU runs are in test_gpu.py, marked ``cuda``)."""

import types

import onnxruntime
import pytest
import torch

import slimexport.loop as loop
import slimexport.precision as precision
import slimexport.runtime as runtime
from slimexport.config import TrainConfig
from slimexport.errors import ConfigError, DeviceError
from slimexport.loop import evaluate, fit
from slimexport.models import create_model
from tests.helpers import TINY_VGG


@pytest.fixture(autouse=True)
def _fresh_provider_cache():
    runtime.provider_for.cache_clear()
    yield
    runtime.provider_for.cache_clear()


class _FakeSession:
    """onnxruntime-gpu whose CUDA libraries did not load: the session silently runs on the CPU."""

    def __init__(self, *a, providers=None, **kw):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_listed_but_unusable_cuda_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    with pytest.raises(DeviceError, match="fell back to the CPU") as e:
        runtime.provider_for("cuda")
    assert "\n" not in str(e.value) and "pip uninstall" in str(e.value)


def test_cuda_whose_session_cannot_be_created_is_refused(monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("libcudnn.so.9: cannot open shared object file\nmore")

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", boom)
    with pytest.raises(DeviceError, match="libcudnn"):
        runtime.provider_for("cuda")


def test_a_session_that_did_not_get_its_provider_is_an_error(monkeypatch, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(runtime._probe_model())
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    with pytest.raises(DeviceError, match="runs on CPUExecutionProvider, not CUDAExecutionProvider"):
        runtime.ort_session(path, provider="CUDAExecutionProvider")


def test_cuda_missing_from_onnxruntime():
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="has no CUDAExecutionProvider"):
        runtime.provider_for("cuda")


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cpu", ("CPUExecutionProvider", 0)),
        ("cuda", ("CUDAExecutionProvider", 0)),
        ("cuda:1", ("CUDAExecutionProvider", 1)),
    ],
)
def test_device_ids(device, expected):
    assert runtime.parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1"])
def test_bad_device_names(device):
    with pytest.raises(ConfigError):
        runtime.parse_device(device)


def test_dataset_to_leaves_the_callers_dataset_where_it_was(small_ds):
    x = small_ds.x_train
    moved = small_ds.to("meta")
    assert moved is not small_ds and moved.x_train.device.type == "meta"
    assert small_ds.x_train is x and small_ds.x_train.device.type == "cpu"


def test_evaluation_is_fp32_everywhere(small_ds, monkeypatch):
    torch.manual_seed(0)
    m = create_model(TINY_VGG, 10, 1).eval()
    want = evaluate(m, small_ds)
    monkeypatch.setattr(loop, "autocast", lambda *a: (_ for _ in ()).throw(AssertionError("autocast")))
    assert evaluate(m, small_ds) == want
    with torch.no_grad():
        logits = m(small_ds.normalize(small_ds.x_test))
    assert want == int((logits.argmax(1) == small_ds.y_test).sum()) / len(small_ds.y_test)


def test_compile_time_is_not_training_time_and_shapes_stay_static(small_ds, monkeypatch):
    """A stand-in for torch.compile whose first call "takes" 1000 s on train's clock, and that records every batch
    size it sees: the 1000 s must land in compile_seconds, not in the epochs' time or images/s."""
    import time as real_time

    seen = []
    clock = types.SimpleNamespace(offset=0.0)
    fake = types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + clock.offset)
    monkeypatch.setattr(loop, "time", fake)  # the epochs' clock
    monkeypatch.setattr(precision, "time", fake)  # the warm-up's

    def fake_compile(model):
        def run(x):
            if not seen:
                clock.offset += 1000.0
            seen.append(len(x))
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    m = create_model(TINY_VGG, 10, 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=128, device="cpu", compile=True, lr=1e-9, weight_decay=0.0)
    r = fit(m, small_ds, cfg)
    assert r["compile_seconds"] >= 1000
    assert r["train_seconds"] < 1000 and r["history"][0]["seconds"] < 1000
    assert r["images_per_s"] == pytest.approx(512 / r["train_seconds"])
    assert set(seen) == {128}  # 600 images: the last 88 are dropped, never a second shape
    assert len(seen) == 1 + 600 // 128  # the warm-up, then the full batches
    # the warm-up left no trace: BN statistics moved only by the real steps (lr ~ 0 keeps weights put)
    torch.manual_seed(0)
    m2 = create_model(TINY_VGG, 10, 1)
    monkeypatch.setattr(torch, "compile", lambda model: model)
    fit(m2, small_ds, TrainConfig(epochs=1, batch_size=128, device="cpu", compile=True, lr=1e-9,
                                  weight_decay=0.0))  # fmt: skip
    for k, v in m.state_dict().items():
        assert torch.allclose(v.float(), m2.state_dict()[k].float(), atol=1e-6), k
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items() if "running_mean" in k)

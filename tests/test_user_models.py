"""Users' own models through the whole CLI: torchvision, a model file, timm, image folders, weights."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from slimexport.checkpoint import load_checkpoint
from slimexport.cli import app
from tests.helpers import fails_cleanly as _fails_cleanly

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models

runner = CliRunner()
FORBIDDEN = {"NonZero", "GatherND", "Where", "ScatterND"}
FAST = ["--epochs", "1", "--refine-epochs", "1", "--sparsity", "0.01", "--percent", "0.5", "--batch", "1",
        "--threads", "1", "--seconds", "0.02", "--device", "cpu", "--batch-size", "100"]  # fmt: skip


def _check_run(out):
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["macs"] < r["baseline"]["macs"] and r["prune"]["plan"]
    assert r["parity"]["max_abs_diff"] <= 1e-3
    for name in ("baseline.onnx", "pruned.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert not ops & FORBIDDEN, ops
    model, ck = load_checkpoint(out / "refined.pt", trust=True)  # rebuilt from the checkpoint alone (our own code)
    assert ck["config"]["plan"]
    return r


@pytest.mark.parametrize(
    "arch, extra",
    [("torchvision:mobilenet_v2", []), ("tests/user_model.py:build", ["--round-to", "1"])],  # 16 wide: exact counts
)
def test_pipeline_on_a_users_model(arch, extra, tmp_path, small_npz):
    out = tmp_path / "run"
    res = runner.invoke(app, ["pipeline", "--arch", arch, "--dataset", small_npz, "--out", str(out), *FAST, *extra])
    assert res.exit_code == 0, res.output
    r = _check_run(out)
    assert r["config"]["arch"] == arch
    if arch.endswith(".py:build"):  # stored by absolute path, so the checkpoint works from anywhere
        ck = torch.load(out / "refined.pt", weights_only=True)
        assert ck["config"]["source"].startswith("/") and ck["config"]["source"].endswith("user_model.py:build")


def test_a_moved_model_file_is_a_clear_error(tmp_path, small_npz):
    import shutil

    src = tmp_path / "mine.py"
    shutil.copy("tests/user_model.py", src)
    ck = tmp_path / "m.pt"
    res = runner.invoke(app, ["train", "--arch", f"{src}:build", "--dataset", small_npz, "--epochs", "1",
                              "--device", "cpu", "--out", str(ck)])  # fmt: skip
    assert res.exit_code == 0, res.output
    src.unlink()
    _fails_cleanly(["export", str(ck), "--dataset", small_npz, "--out", str(tmp_path / "m.onnx"), "--arch",
                    f"{src}:build"], "not found", tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    "arch, match",
    [("torchvision:resnet9000", "unknown torchvision"), ("tests/nope.py:build", "not found"),
     ("tests/user_model.py:nothing", "no callable"), ("no_such_pkg.mod:build", "cannot import")],
)  # fmt: skip
def test_bad_model_sources(arch, match, tmp_path, small_npz):
    _fails_cleanly(["train", "--arch", arch, "--dataset", small_npz, "--out", str(tmp_path / "t.pt")], match, tmp_path)


def test_weights_that_do_not_fit_name_the_first_mismatched_key(tmp_path, small_npz):
    from tests.user_model import Net

    torch.save(Net(10, width=8).state_dict(), tmp_path / "w.pt")
    _fails_cleanly(["train", "--arch", "tests/user_model.py:build", "--weights", str(tmp_path / "w.pt"),
                    "--dataset", small_npz, "--out", str(tmp_path / "t.pt")], "'stem.0.weight' has shape",
                   tmp_path)  # fmt: skip
    torch.save({"other": torch.zeros(2)}, tmp_path / "x.pt")
    _fails_cleanly(["train", "--arch", "tests/user_model.py:build", "--weights", str(tmp_path / "x.pt"),
                    "--dataset", small_npz, "--out", str(tmp_path / "t.pt")], "is missing", tmp_path)  # fmt: skip


def test_weights_that_fit_are_the_starting_point(tmp_path, small_npz):
    from tests.user_model import Net

    torch.manual_seed(5)
    w = Net(10).state_dict()
    torch.save(w, tmp_path / "w.pt")
    out = tmp_path / "t.pt"
    res = runner.invoke(app, ["train", "--arch", "tests/user_model.py:build", "--weights", str(tmp_path / "w.pt"),
                              "--dataset", small_npz, "--out", str(out), "--epochs", "1", "--lr", "1e-9",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    model, _ = load_checkpoint(out, trust=("tests/user_model.py:build",))
    got = model.net.state_dict()
    assert torch.allclose(got["stem.0.weight"], w["stem.0.weight"], atol=1e-6)  # lr ~ 0: still the given weights


def _write_folder(root, classes=("cat", "dog"), n=4, size=20, val_classes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode = "L" if i % 2 else "RGB"
                arr = rng.integers(0, 255, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
                Image.fromarray(arr, mode).save(d / f"{i}.png")


def test_imagefolder_data(tmp_path):
    from slimexport.data import load_dataset

    _write_folder(tmp_path / "pics")
    ds = load_dataset(f"imagefolder:{tmp_path / 'pics'}", image_size=16)
    assert ds.x_train.shape == (8, 3, 16, 16) and ds.x_test.shape == (8, 3, 16, 16)
    assert ds.num_classes == 2 and ds.label_names == ["cat", "dog"] and ds.x_train.dtype == torch.uint8
    res = runner.invoke(app, ["train", "--arch", "tests/user_model.py:build", "--dataset",
                              f"imagefolder:{tmp_path / 'pics'}", "--image-size", "16", "--epochs", "1",
                              "--device", "cpu", "--out", str(tmp_path / "t.pt")])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_bad_image_folders(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    _fails_cleanly(["train", "--dataset", f"imagefolder:{tmp_path / 'empty'}", "--out", str(tmp_path / "t.pt")],
                   "empty", tmp_path / "empty")  # fmt: skip
    _write_folder(tmp_path / "mixed", val_classes=("cat", "bird"))
    _fails_cleanly(["train", "--dataset", f"imagefolder:{tmp_path / 'mixed'}", "--out", str(tmp_path / "t.pt")],
                   "different classes", tmp_path / "mixed")  # fmt: skip
    _fails_cleanly(["train", "--dataset", f"imagefolder:{tmp_path / 'none'}", "--out", str(tmp_path / "t.pt")],
                   "not found", tmp_path)  # fmt: skip


def test_one_timm_model(tmp_path, small_npz):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    res = runner.invoke(app, ["pipeline", "--arch", "timm:resnet10t", "--dataset", small_npz, "--out", str(out),
                              *FAST, "--round-to", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    _check_run(out)


def test_models_lists_torchvision():
    res = runner.invoke(app, ["models", "--torchvision"])
    assert res.exit_code == 0, res.output
    assert "torchvision:resnet50" in res.output and "23,528,522" in res.output  # resnet50 with 10 classes
    assert "no: refused" in res.output  # ViTs have no BatchNorm

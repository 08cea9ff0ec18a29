"""A user's real workflow (issue 25): image folders streamed from disk, a trained model as the baseline, torchvision
weights by name from the torch hub cache."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slimexport.checkpoint import make_checkpoint, read_checkpoint, save_checkpoint
from slimexport.cli import app
from slimexport.data import load_dataset
from slimexport.loop import evaluate
from slimexport.models import create_model
from slimexport.stream import FolderImages, choose_cache, train_loader
from slimexport.train import data_meta
from tests.helpers import fails_cleanly as _fails_cleanly

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models

runner = CliRunner()
FAST = ["--epochs", "1", "--refine-epochs", "1", "--batch", "1", "--threads", "1", "--seconds", "0.02",
        "--device", "cpu", "--batch-size", "16", "--percent", "0.3"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of JPEGs of two sizes and both modes, 12 train and 4 val images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for k, c in enumerate(("cat", "dog", "fox")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (40, 56) if i % 2 else (64, 48)
                base = np.full((h, w, 3), 60 * k, np.uint8) + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(base)
                (img.convert("L") if i % 3 == 0 else img).save(root / split / c / f"{i}.jpg")
    return root


def test_streamed_and_in_memory_folders_give_the_same_test_images(folder):
    ram = load_dataset(f"imagefolder:{folder}", image_size=24, cache="ram")
    off = load_dataset(f"imagefolder:{folder}", image_size=24, cache="off")
    assert isinstance(off.x_train, FolderImages) and isinstance(ram.x_train, torch.Tensor)
    assert off.x_test.shape == ram.x_test.shape == (12, 3, 24, 24)
    assert torch.equal(off.x_test[:12], ram.x_test) and torch.equal(off.x_train[[3, 0, 7]], ram.x_train[[3, 0, 7]])
    assert off.mean == pytest.approx(ram.mean, abs=1e-6) and off.y_test.tolist() == ram.y_test.tolist()
    torch.manual_seed(0)
    model = create_model("vgg11_w12", 3, 3).eval()
    assert evaluate(model, off) == evaluate(model, ram)  # the same images through the DataLoader path
    assert off.resized(16).x_test[:2].shape == (2, 3, 16, 16)


def test_streamed_training_batches_are_seeded_per_epoch_and_shard_by_rank(folder):
    ds = load_dataset(f"imagefolder:{folder}", image_size=16, cache="off")
    labels = [y.tolist() for _, y in train_loader(ds.x_train, ds.y_train, 8, seed=1, epoch=0, drop_last=False)]
    again = [y.tolist() for _, y in train_loader(ds.x_train, ds.y_train, 8, seed=1, epoch=0, drop_last=False)]
    other = [y.tolist() for _, y in train_loader(ds.x_train, ds.y_train, 8, seed=1, epoch=1, drop_last=False)]
    assert labels == again and labels != other and sum(map(len, labels)) == 36
    xb, _ = next(iter(train_loader(ds.x_train, ds.y_train, 8, seed=1, epoch=0, drop_last=True)))
    assert xb.shape == (8, 3, 16, 16) and xb.dtype == torch.uint8
    shards = [
        sum(len(y) for _, y in train_loader(ds.x_train, ds.y_train, 4, 1, 0, drop_last=True, world=2, rank=r))
        for r in (0, 1)
    ]
    assert shards == [16, 16]  # 36 images, 18 a rank, whole batches of 4


def test_the_cache_choice_follows_the_memory_available(monkeypatch):
    monkeypatch.setattr("slimexport.stream.available_memory", lambda: 8 << 30)
    assert choose_cache("auto", 10_000, 224).cache == "ram"  # 1.4 GiB of 8
    assert choose_cache("auto", 20_000, 224).cache == "off"  # 2.8 GiB: more than a quarter
    assert choose_cache("ram", 10**7, 224).cache == "ram" and "GiB" in choose_cache("off", 10, 8).reason


def test_training_streamed_from_a_folder_and_a_corrupt_file_named(folder, tmp_path):
    out = tmp_path / "t.pt"
    res = runner.invoke(app, ["train", "--arch", "torchvision:resnet18", "--dataset", f"imagefolder:{folder}",
                              "--image-size", "24", "--data-cache", "off", "--epochs", "1", "--batch-size", "12",
                              "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "data cache off" in res.stderr and read_checkpoint(out)["meta"]["history"][0]["images_per_s"] > 0
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    bad = broken / "train" / "dog" / "5.jpg"
    bad.write_bytes(b"not a jpeg")
    _fails_cleanly(["train", "--arch", "vgg11_w12", "--dataset", f"imagefolder:{broken}", "--image-size", "16",
                    "--data-cache", "off", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "b.pt")],
                   f"cannot read image {bad}")  # fmt: skip
    res = runner.invoke(app, ["train", "--dataset", f"imagefolder:{folder}", "--data-cache", "disk", "--out",
                              str(tmp_path / "c.pt")])  # fmt: skip
    assert res.exit_code == 2 and "'disk' is not one of" in res.output  # typer's usage error, before anything runs


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A torch hub cache holding (random) resnet18 ImageNet weights under torchvision's file name."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, path)
    return sd


def test_torchvision_weights_by_name_from_the_hub_cache(hub, folder, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["pipeline", "--arch", "torchvision:resnet18", "--weights", "torchvision:IMAGENET1K_V1",
                              "--baseline-epochs", "0", "--dataset", f"imagefolder:{folder}", "--image-size", "24",
                              "--out", str(out), *FAST])  # fmt: skip
    assert res.exit_code == 0, res.output
    base = read_checkpoint(out / "baseline.pt")
    assert base["meta"]["epochs"] == 0 and base["meta"]["reinitialised"] == ["fc.weight", "fc.bias"]
    assert torch.equal(base["state_dict"]["net.conv1.weight"], hub["conv1.weight"])  # taken as it is, not trained
    sparse = read_checkpoint(out / "sparse.pt")
    assert sparse["meta"]["parent"] == "baseline" and sparse["meta"]["train_config"]["lr"] == pytest.approx(0.02)
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["accuracy"] == pytest.approx(base["meta"]["accuracy"], abs=1 / 12)
    # the enum's own name works too; a name the builder does not have, and a missing file, are one line each
    _fails_cleanly(["train", "--arch", "torchvision:resnet18", "--weights", "torchvision:IMAGENET1K_V9", "--dataset",
                    f"imagefolder:{folder}", "--out", str(tmp_path / "t.pt")], "IMAGENET1K_V1")  # fmt: skip
    (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").unlink()
    _fails_cleanly(["pipeline", "--arch", "torchvision:resnet18", "--weights", "ResNet18_Weights.IMAGENET1K_V1",
                    "--baseline-epochs", "0", "--dataset", f"imagefolder:{folder}", "--out", str(tmp_path / "r2"),
                    *FAST], "not found")  # fmt: skip
    err = _fails_cleanly(["pipeline", "--arch", "torchvision:resnet18", "--weights",
                          "torchvision:ResNet18_Weights.IMAGENET1K_V1", "--baseline-epochs", "0", "--dataset",
                          f"imagefolder:{folder}", "--out", str(tmp_path / "r2"), *FAST],
                         "torch hub cache")  # fmt: skip
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err


def test_a_trained_checkpoint_is_the_baseline_as_it_is(tmp_path, small_npz, small_ds):
    torch.manual_seed(0)
    model = create_model("vgg11_w12", 10, 1)
    ck = tmp_path / "trained.pt"
    save_checkpoint(make_checkpoint(model, data_meta(small_ds), {"stage": "baseline", "accuracy": 0.0}), ck)
    out = tmp_path / "run"
    res = runner.invoke(app, ["pipeline", "--baseline", str(ck), "--baseline-epochs", "0", "--dataset", small_npz,
                              "--out", str(out), *FAST])  # fmt: skip
    assert res.exit_code == 0, res.output
    base = read_checkpoint(out / "baseline.pt")
    assert all(torch.equal(base["state_dict"][k], v) for k, v in model.state_dict().items())
    assert read_checkpoint(out / "sparse.pt")["meta"]["parent"] == "baseline"  # fine-tuned from it
    _fails_cleanly(["pipeline", "--baseline-epochs", "0", "--dataset", small_npz, "--out", str(tmp_path / "r2")],
                   "--weights")  # fmt: skip


def test_precision_auto_measures_before_it_chooses_bf16(monkeypatch, small_ds):
    import slimexport.precision as train_mod  # where the precision is chosen
    import slimexport.runtime as runtime

    facts = runtime.machine_facts()
    model = create_model("vgg11_w12", 10, 1)
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "machine_facts", lambda: facts | {"bf16": False})
    assert train_mod.choose_precision("auto", model, small_ds, cpu, 64) == (
        "fp32", "auto: this CPU has no native bf16 instructions (AMX, AVX512-BF16)")  # fmt: skip
    monkeypatch.setattr(runtime, "machine_facts", lambda: facts | {"bf16": True})
    for bf16, chosen in ((0.07, "bf16"), (0.095, "fp32"), (0.14, "fp32")):  # fp32 takes 0.1 s a step
        monkeypatch.setattr(train_mod, "_probe_step_times", lambda *a, t=bf16: {"fp32": [0.1] * 3, "bf16": [t] * 3})
        got, why = train_mod.choose_precision("auto", model, small_ds, cpu, 64)
        assert got == chosen and f"{bf16 * 1e3:.0f} ms in bf16" in why
    assert train_mod.choose_precision("fp32", model, small_ds, cpu, 64)[0] == "fp32"
    assert train_mod.choose_precision("auto", model, small_ds, torch.device("cuda"), 64)[0] == "bf16"


def test_the_precision_probe_leaves_the_model_as_it_was(small_ds):
    from slimexport.precision import _probe_step_times

    torch.manual_seed(0)
    model = create_model("vgg11_w12", 10, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = _probe_step_times(model, small_ds, torch.device("cpu"), 16, 2)
    assert len(times["fp32"]) == len(times["bf16"]) == 2 and min(times["bf16"]) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bf16_training_is_recorded(tmp_path, small_npz):
    out = tmp_path / "b.pt"
    res = runner.invoke(app, ["train", "--arch", "vgg11_w12", "--dataset", small_npz, "--epochs", "1", "--device",
                              "cpu", "--precision", "bf16", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(out)["meta"]
    assert meta["precision"] == "bf16" and meta["precision_reason"] == "--precision bf16"
    assert 0 < meta["history"][0]["loss"] < 10 and meta["accuracy"] > 0  # trained, not NaN


def test_a_streamed_folder_trains_under_torchrun_each_rank_its_shard(folder, tmp_path):
    from tests.helpers import torchrun

    out = tmp_path / "ddp.pt"
    res = torchrun("-m", "slimexport", "train", "--arch", "vgg11_w12", "--dataset", f"imagefolder:{folder}",
                   "--image-size", "16", "--data-cache", "off", "--epochs", "2", "--batch-size", "8", "--device",
                   "cpu", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = read_checkpoint(out)["meta"]
    assert meta["world_size"] == 2 and len(meta["history"]) == 2  # the ranks' parameters ended identical
    assert 0 < meta["history"][-1]["loss"] < 10 and meta["accuracy"] > 0

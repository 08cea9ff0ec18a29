"""The user contract under faults (issue 22): a checkpoint never runs code the user did not name; every mistake of
the user's and every refusal of the system is one line and exit 2, checked before long work where it can be;
finished work survives Ctrl-C; two processes never write one output."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.cli import app
from slimexport.errors import UntrustedCodeError
from slimexport.fileio import output_lock
from slimexport.train import data_meta
from tests.helpers import TINY_VGG
from tests.helpers import fails_cleanly as _fails_cleanly

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "1", "--refine-epochs", "1", "--batch", "1", "--threads", "1", "--seconds", "0.02",
        "--device", "cpu", "--batch-size", "100"]  # fmt: skip


@pytest.fixture
def ckpt(tmp_path, make_model, small_ds):
    path = tmp_path / "vgg.pt"
    save_checkpoint(make_checkpoint(make_model(TINY_VGG), data_meta(small_ds), {"stage": "sparse", "accuracy": 0.5}),
                    path)  # fmt: skip
    return path


# ---- a checkpoint is data ------------------------------------------------------------------------------------------


def _crafted(path: Path, source: str, kwargs: dict, small_ds) -> Path:
    """A checkpoint whose model source is ``source`` called with ``kwargs``, as an attacker would write it."""
    from slimexport.models import create_model

    honest = make_checkpoint(create_model("torchvision:resnet18", 10, 1), data_meta(small_ds), {"stage": "sparse"})
    honest["arch"] = source
    honest["config"] = honest["config"] | {"source": source, "kwargs": kwargs}
    torch.save(honest, path)
    return path


@pytest.mark.parametrize(
    "source, kwargs",
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:call", {"args": "touch {marker}", "shell": True}),
        ("{evil}:build", {}),  # a model file that does harm when imported
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}),  # a registry builder told to fetch a file
        ("timm:resnet18", {"checkpoint_path": "{marker}"}),  # timm would unpickle whatever is there
    ],
)
def test_a_crafted_checkpoint_runs_no_code(tmp_path, small_ds, small_npz, source, kwargs):
    marker = tmp_path / "owned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('owned')\ndef build(num_classes=10):\n    raise SystemExit\n")
    source = source.format(evil=evil)
    kwargs = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in kwargs.items()}
    bad = _crafted(tmp_path / "bad.pt", source, kwargs, small_ds)
    runs = [
        ["export", str(bad), "--dataset", small_npz, "--out", str(tmp_path / "x.onnx")],
        ["prune", str(bad), "--out", str(tmp_path / "p.pt")],
        ["refine", str(bad), "--dataset", small_npz, "--out", str(tmp_path / "r.pt"), "--device", "cpu"],
        ["pipeline", "--baseline", str(bad), "--dataset", small_npz, "--out", str(tmp_path / "run"), *FAST],
    ]
    for args in runs:
        err = _fails_cleanly(args, "--trust-model-code")
        assert not marker.exists(), f"{args[0]} ran the checkpoint's code"
        assert "bad.pt" in err
    with pytest.raises(UntrustedCodeError):  # the Python API too
        load_checkpoint(bad)
    assert not marker.exists()


def test_a_checkpoint_that_names_a_built_in_arch_but_a_model_file_as_its_source_runs_no_code(tmp_path, small_ds):
    """Every model is a source plus a plan now: what builds it is the config's source, so a file that says
    arch "vgg11_w12" but names a model file as its source is refused like any other, before any import."""
    marker = tmp_path / "owned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('owned')\ndef build(num_classes=10):\n    raise SystemExit\n")
    bad = _crafted(tmp_path / "bad.pt", f"{evil}:build", {}, small_ds)
    d = torch.load(bad, weights_only=True)
    d["arch"] = "vgg11_w12"
    torch.save(d, bad)
    with pytest.raises(UntrustedCodeError, match="--trust-model-code"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_a_checkpoint_of_the_users_own_model_loads_when_they_name_its_code(tmp_path, small_npz):
    shutil.copy(ROOT / "tests" / "user_model.py", tmp_path / "mine.py")
    ck = tmp_path / "m.pt"
    res = runner.invoke(app, ["train", "--arch", f"{tmp_path / 'mine.py'}:build", "--dataset", small_npz,
                              "--epochs", "1", "--device", "cpu", "--out", str(ck)])  # fmt: skip
    assert res.exit_code == 0, res.output
    onnx = tmp_path / "m.onnx"
    _fails_cleanly(["export", str(ck), "--dataset", small_npz, "--out", str(onnx)], "--arch")
    assert not onnx.exists()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # named relative to where the user stands: the same file
    try:
        res = runner.invoke(app, ["export", str(ck), "--dataset", small_npz, "--out", str(onnx), "--arch",
                                  "mine.py:build", "--parity-images", "16"])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    _fails_cleanly(
        [
            "export",
            str(ck),
            "--dataset",
            small_npz,
            "--out",
            str(tmp_path / "n.onnx"),
            "--arch",
            "tests/user_model.py:build",
        ],
        "--trust-model-code",
    )  # another file of the same name is not it
    # auto is 16 on AVX-512: as wide as its layers, nothing pruned
    res = runner.invoke(app, ["prune", str(ck), "--out", str(tmp_path / "p.pt"), "--trust-model-code", "--round-to",
                              "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    model, _ = load_checkpoint(tmp_path / "p.pt", trust=(f"{tmp_path / 'mine.py'}:build",))
    assert model.config["plan"]


# ---- outputs the system refuses, and outputs that must not be replaced ----------------------------------------------


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write: read-only by permission for a user, a read-only mount for root
    (whom permissions do not stop)."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _mount_tmpfs(d, "ro,size=1m"):
        pytest.skip("root without the right to mount a read-only file system: no directory root cannot write")
    yield d
    subprocess.run(["umount", "--lazy", str(d)], check=False)  # lazy: a file still open there


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system, too small for a checkpoint: writes fail with 'no space left' for real."""
    d = tmp_path / "full"
    if os.geteuid() != 0 or not _mount_tmpfs(d, "size=64k"):
        pytest.skip("needs root's right to mount a small tmpfs")
    yield d
    subprocess.run(["umount", "--lazy", str(d)], check=False)  # lazy: a file still open there


def test_outputs_in_a_directory_that_cannot_be_written(tmp_path, readonly_dir, ckpt, small_npz):
    ro = readonly_dir
    for args in (
        ["train", "--dataset", small_npz, "--epochs", "1", "--out", str(ro / "t.pt")],
        ["pipeline", "--dataset", small_npz, "--out", str(ro / "run"), *FAST],
        ["prune", str(ckpt), "--out", str(ro / "sub" / "p.pt")],
    ):
        _fails_cleanly(args, str(ro), tmp_path)
    onnx = tmp_path / "m.onnx"
    assert runner.invoke(app, ["export", str(ckpt), "--dataset", small_npz, "--out", str(onnx),
                               "--parity-images", "16"]).exit_code == 0  # fmt: skip
    _fails_cleanly(["quantize", str(onnx), "--dataset", small_npz, "--out", str(ro / "q.onnx")], str(ro), tmp_path)
    _fails_cleanly(["convert", str(onnx), "--dataset", small_npz, "--out", str(ro / "ort")], str(ro), tmp_path)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint(full_disk, ckpt):
    err = _fails_cleanly(["prune", str(ckpt), "--out", str(full_disk / "p.pt")], "cannot write checkpoint")
    assert str(full_disk / "p.pt") in err and "bytes free" in err
    assert not [p for p in full_disk.iterdir()]  # the temporary file is gone too


def test_outputs_that_are_the_wrong_kind_of_path(tmp_path, ckpt, small_npz):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    # a checkpoint into an existing directory, or below a file: refused before any training
    _fails_cleanly(["train", "--dataset", small_npz, "--out", str(tmp_path / "d"), "--force"], "is a directory",
                   tmp_path)  # fmt: skip
    _fails_cleanly(["train", "--dataset", small_npz, "--out", str(ckpt / "child.pt")], "is a file", tmp_path)
    onnx = tmp_path / "m.onnx"
    assert runner.invoke(app, ["export", str(ckpt), "--dataset", small_npz, "--out", str(onnx),
                               "--parity-images", "16"]).exit_code == 0  # fmt: skip
    _fails_cleanly(["quantize", str(onnx), "--dataset", small_npz, "--out", str(tmp_path / "d"), "--force"],
                   "is a directory", tmp_path)  # fmt: skip
    _fails_cleanly(["convert", str(onnx), "--dataset", small_npz, "--out", str(ckpt), "--force"], "is a file",
                   tmp_path)  # fmt: skip
    # --force replaces only slimexport's own outputs: never the current directory, never a folder of the user's
    cwd = os.getcwd()
    os.chdir(tmp_path / "d")
    try:
        _fails_cleanly(["convert", str(onnx), "--dataset", small_npz, "--out", ".", "--force"],
                       "current directory", tmp_path)  # fmt: skip
    finally:
        os.chdir(cwd)
    _fails_cleanly(["convert", str(onnx), "--dataset", small_npz, "--out", str(tmp_path / "d"), "--force"],
                   "did not write", tmp_path)  # fmt: skip
    _fails_cleanly(["pipeline", "--dataset", small_npz, "--out", str(tmp_path / "d"), "--force", *FAST],
                   "did not write", tmp_path)  # fmt: skip
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


# ---- the user's model code ----------------------------------------------------------------------------------------

USER_MODELS = """
import torch
from torch import nn

def net(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))

def raises(num_classes=10):
    raise RuntimeError("no GPU here, says the factory")

def needs_width(width, num_classes=10):
    return net(num_classes)

def ignores_classes(num_classes=10):
    return net(2)

class Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net(10)
    def forward(self, x):
        return {"logits": self.body(x)}

class Pair(Dict):
    def forward(self, x):
        return self.body(x), x.mean()

class Broken(Dict):
    def forward(self, x):
        return self.body(x.view(-1))

def returns_dict(num_classes=10):
    return Dict()

def returns_tuple(num_classes=10):
    return Pair()

def forward_raises(num_classes=10):
    return Broken()

def no_batchnorm(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
"""


@pytest.mark.parametrize(
    "factory, match",
    [
        ("raises", "raised RuntimeError when called with num_classes=10: no GPU here"),
        ("needs_width", "missing 1 required positional argument: 'width'"),
        ("ignores_classes", "outputs of shape (2, 2)"),
        ("returns_dict", "returns a dict (keys logits)"),
        ("returns_tuple", "returns a tuple"),
        ("forward_raises", "forward raised RuntimeError"),
    ],
)
def test_the_users_model_code_failing_is_one_line_before_training(tmp_path, small_npz, monkeypatch, factory, match):
    (tmp_path / "models.py").write_text(USER_MODELS)
    monkeypatch.setattr("slimexport.train.fit", lambda *a, **k: pytest.fail("training started"))
    arch = f"{tmp_path / 'models.py'}:{factory}"
    err = _fails_cleanly(["train", "--arch", arch, "--dataset", small_npz, "--out", str(tmp_path / "t.pt")], match,
                         tmp_path)  # fmt: skip
    assert factory in err or "model" in err
    _fails_cleanly(["pipeline", "--arch", arch, "--dataset", small_npz, "--out", str(tmp_path / "run"), *FAST], match,
                   tmp_path)  # fmt: skip


def test_a_model_without_batchnorm_is_refused_before_training(tmp_path, small_npz, monkeypatch):
    (tmp_path / "models.py").write_text(USER_MODELS)
    monkeypatch.setattr("slimexport.train.fit", lambda *a, **k: pytest.fail("training started"))
    _fails_cleanly(["pipeline", "--arch", f"{tmp_path / 'models.py'}:no_batchnorm", "--dataset", small_npz, "--out",
                    str(tmp_path / "run"), *FAST], "no BatchNorm", tmp_path)  # fmt: skip


@pytest.mark.parametrize("arch", ["vgg12", "preresnet15", "densenet11", "vgg11_w0"])
def test_a_registry_name_its_family_refuses(tmp_path, small_npz, arch):
    _fails_cleanly(["train", "--arch", arch, "--dataset", small_npz, "--out", str(tmp_path / "t.pt")], arch, tmp_path)
    _fails_cleanly(["pipeline", "--arch", arch, "--dataset", small_npz, "--out", str(tmp_path / "r")], arch, tmp_path)


# ---- data ---------------------------------------------------------------------------------------------------------


def _folder(root: Path, size: int = 12) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")


def test_an_unreadable_image_is_named(tmp_path):
    _folder(tmp_path / "pics")
    bad = tmp_path / "pics" / "val" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    _fails_cleanly(["train", "--dataset", f"imagefolder:{tmp_path / 'pics'}", "--image-size", "8", "--out",
                    str(tmp_path / "t.pt")], f"cannot read image {bad}", tmp_path)  # fmt: skip


def test_an_image_above_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    from PIL import Image

    _folder(tmp_path / "pics", size=16)
    big = tmp_path / "pics" / "train" / "a" / "2.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 = 4096 > 2 × 1000: PIL refuses it (workers fork)
    _fails_cleanly(["train", "--dataset", f"imagefolder:{tmp_path / 'pics'}", "--image-size", "8", "--out",
                    str(tmp_path / "t.pt")], f"cannot read image {big}: DecompressionBombError", tmp_path)  # fmt: skip


# ---- onnx files ---------------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_at_two_sizes(tmp_path, make_model, small_ds):
    from slimexport.config import ExportConfig
    from slimexport.export import export

    paths = []
    for size in (28, 16):
        ds = small_ds.resized(size)
        ck = tmp_path / f"m{size}.pt"
        save_checkpoint(make_checkpoint(make_model(TINY_VGG), data_meta(ds), {"stage": "x"}), ck)
        export(ck, tmp_path / f"m{size}.onnx", ds, ExportConfig(parity_images=8))
        paths.append(tmp_path / f"m{size}.onnx")
    return paths


def test_bench_refuses_models_of_two_input_sizes_and_bad_budgets(onnx_at_two_sizes, small_npz, tmp_path):
    a, b = onnx_at_two_sizes
    _fails_cleanly(["bench", str(a), str(b), "--dataset", small_npz, "--seconds", "0.01"], "different sizes", tmp_path)
    for seconds in ("-1", "nan", "inf"):
        _fails_cleanly(["bench", str(a), "--dataset", small_npz, "--seconds", seconds], "--seconds", tmp_path)


def test_quantizing_a_quantized_model_names_the_users_file(onnx_at_two_sizes, small_npz, tmp_path):
    a = onnx_at_two_sizes[0]
    q = tmp_path / "q.onnx"
    res = runner.invoke(app, ["quantize", str(a), "--dataset", small_npz, "--out", str(q), "--calib-images", "32"])
    assert res.exit_code == 0, res.output
    err = _fails_cleanly(["quantize", str(q), "--dataset", small_npz, "--out", str(tmp_path / "qq.onnx")],
                         "already quantized", tmp_path)  # fmt: skip
    assert str(q) in err and ".work-" not in err


# ---- torchrun -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_more_ranks_than_a_split_has_images(tmp_path):
    from tests.helpers import torchrun

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "two.npz", x_train=rng.integers(0, 255, (2, 12, 12), np.uint8), y_train=np.array([0, 1]),
             x_test=rng.integers(0, 255, (4, 12, 12), np.uint8), y_test=np.array([0, 1, 0, 1]))  # fmt: skip
    res = torchrun("-m", "slimexport", "train", "--arch", TINY_VGG, "--dataset", str(tmp_path / "two.npz"),
                   "--batch-size", "4", "--epochs", "1", "--device", "cpu",
                   "--out", str(tmp_path / "t.pt"))  # fmt: skip
    assert res.returncode != 0 and "every rank needs images" in res.stderr, res.stderr[-2000:]
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "internal error"))]
    assert len(ours) == 2 and all(ln.startswith("error: rank") for ln in ours), ours  # one line a rank
    assert "exitcode  : 2" in res.stderr  # torchrun's own report (and traceback) of its children's exit codes
    assert not (tmp_path / "t.pt").exists()


# ---- Ctrl-C and two processes -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_the_first_stage_keeps_its_finished_epochs(tmp_path, small_npz, monkeypatch):
    import slimexport.loop as train_mod  # the loop saves the state after each epoch

    real, saves = train_mod.save_checkpoint, []

    def interrupted_after_one_epoch(ckpt, path):
        saves.append(Path(path).name)
        if len(saves) == 2:  # the state after epoch 2 of the baseline: Ctrl-C
            raise KeyboardInterrupt
        real(ckpt, path)

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupted_after_one_epoch)
    out = tmp_path / "run"
    args = ["pipeline", "--dataset", small_npz, "--out", str(out), *FAST, "--epochs", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    partial = tmp_path / ".run.partial"
    assert (partial / "baseline.pt.resume").is_file(), list(tmp_path.rglob("*"))
    assert "baseline's finished epochs kept" in res.stderr
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming baseline from epoch 1" in res.stderr
    assert (out / "report.json").is_file() and not partial.exists()


def _slimexport(*args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "slimexport", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.slow
def test_two_runs_into_one_directory(tmp_path, small_npz):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    first = _slimexport("pipeline", "--dataset", small_npz, "--out", str(out), *FAST, "--epochs", "50")
    try:  # no clock: wait for the event (config.json written, the lock held) or for the first run to end
        while not (tmp_path / ".run.partial" / "config.json").exists():  # the first run holds the lock by then
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        assert lock.read_text().strip() == str(first.pid)
        # the second, as the first's partial directory invites: refused, naming the first
        err = _fails_cleanly(["pipeline", "--dataset", small_npz, "--out", str(out), *FAST, "--epochs", "50",
                              "--resume"], f"pid {first.pid}")  # fmt: skip
        assert "another slimexport process" in err
        _fails_cleanly(["pipeline", "--dataset", small_npz, "--out", str(out), *FAST, "--force"], f"pid {first.pid}")
    finally:  # stopped once the check is made; waited for without a clock (its 50 epochs bound the wait)
        first.send_signal(signal.SIGINT)
        first.communicate()
    assert not lock.exists()  # released on the way out


def test_a_stale_lock_from_a_killed_process_is_cleared(tmp_path, small_npz):
    out = tmp_path / "t.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder.kill()
    holder.wait()
    (tmp_path / ".t.pt.lock").write_text(f"{holder.pid}\n")  # what a killed holder leaves: the file, no lock
    res = runner.invoke(app, ["train", "--arch", TINY_VGG, "--dataset", small_npz, "--epochs", "1", "--device", "cpu",
                              "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "stale lock" in res.stderr and str(holder.pid) in res.stderr
    assert out.is_file() and not (tmp_path / ".t.pt.lock").exists()


def test_the_lock_is_held_across_processes(tmp_path):
    code = (
        "import sys, time\nfrom slimexport.fileio import output_lock\n"
        f"with output_lock({str(tmp_path / 'x.pt')!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        from slimexport.errors import LockedError

        with pytest.raises(LockedError, match=f"pid {other.pid}"):
            with output_lock(tmp_path / "x.pt"):
                pass
    finally:
        other.kill()
        other.wait()
    with output_lock(tmp_path / "x.pt"):  # the kernel released it with the process
        assert (tmp_path / ".x.pt.lock").read_text().strip() == str(os.getpid())

"""torchrun with DistributedDataParallel: two CPU processes (gloo), started through torch's own launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimexport.checkpoint import read_checkpoint
from tests.helpers import torchrun

pytestmark = pytest.mark.slow  # end to end: pipelines, subprocesses, torchrun or full-size models

ROOT = Path(__file__).resolve().parent.parent


def test_gradient_averaging_gives_the_single_process_weights(tmp_path, small_npz):
    from slimexport.loop import fit
    from tests.ddp_worker import step_config, subset, tiny_net

    res = torchrun("tests/ddp_worker.py", "step", small_npz, str(tmp_path / "ddp.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = tiny_net()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    fit(single, subset(small_npz), step_config())
    moved = 0
    for k, v in single.state_dict().items():
        assert torch.allclose(ddp[k], v, atol=1e-5, rtol=0), k
        moved += int(not torch.allclose(before[k], v, atol=1e-4))
    assert moved > 0  # the step did change the weights, so agreeing means something


def test_training_with_batchnorm_under_torchrun(tmp_path, small_npz):
    args = ["train", "--arch", "vgg11_w12", "--dataset", small_npz, "--epochs", "2", "--batch-size", "100",
            "--sparsity", "1e-3", "--device", "cpu", "--seed", "1"]  # fmt: skip
    res = torchrun("-m", "slimexport", *args, "--out", str(tmp_path / "ddp.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("-> ") == 1  # one summary line: rank 0's
    ck = read_checkpoint(tmp_path / "ddp.pt")
    assert ck["meta"]["world_size"] == 2  # every rank's parameters were checked identical at the end (else an error)
    assert [p.name for p in tmp_path.iterdir()] == ["ddp.pt"]  # written once, no leftovers
    # the timeout is a hang guard (a deadlock), not a speed check
    single = subprocess.run([sys.executable, "-m", "slimexport", *args, "--out", str(tmp_path / "one.pt")],
                            capture_output=True, text=True, cwd=ROOT, timeout=1800)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    one = read_checkpoint(tmp_path / "one.pt")
    # The same inputs and updates; per-rank BatchNorm statistics are the one expected difference. Compared by the
    # training loss per epoch: after two epochs on 600 images the test accuracy is near chance (10–13%), where a
    # change of float path (channels-last) flips a few of the 200 test images either way.
    for a, b in zip(ck["meta"]["history"], one["meta"]["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 0.01, (a["loss"], b["loss"])
    assert ck["meta"]["history"][0]["images_per_s"] > 0


def test_a_failing_rank_ends_the_run_with_one_line_and_no_file(tmp_path, small_npz):
    out = tmp_path / "t.pt"
    out.write_bytes(b"precious")
    res = torchrun("tests/ddp_worker.py", "fail", "train", "--arch", "vgg11_w12", "--dataset", small_npz,
                   "--epochs", "1", "--batch-size", "100", "--sparsity", "1e-3", "--device", "cpu",
                   "--out", str(out), "--force")  # fmt: skip
    assert res.returncode != 0
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "rank 1 lost its disk" in ln and "rank 1/2" in ln]
    assert len(ours) == 1, res.stderr[-3000:]
    assert out.read_bytes() == b"precious"
    # torchrun may kill rank 0 before it removes its lock file; such a file is stale by design (fileio.output_lock:
    # a flock the kernel released with the process), never held: the next run takes it over
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".t.pt.lock") == ["t.pt"]
    lock = tmp_path / ".t.pt.lock"
    if lock.exists():
        import fcntl

        with lock.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still held it


def test_sync_bn_needs_cuda(tmp_path, small_npz):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from typer.testing import CliRunner

    from slimexport.cli import app

    res = CliRunner().invoke(app, ["train", "--sync-bn", "--device", "cpu", "--dataset", small_npz, "--out",
                                   str(tmp_path / "t.pt")])  # fmt: skip
    assert res.exit_code == 2 and "--sync-bn needs CUDA" in res.stderr and not (tmp_path / "t.pt").exists()


def test_pipeline_under_torchrun(tmp_path, small_npz):
    out = tmp_path / "run"
    # the timeout is a hang guard (a deadlock), not a speed check
    res = torchrun("-m", "slimexport", "pipeline", "--arch", "vgg11_w12", "--dataset", small_npz, "--out", str(out),
                   "--epochs", "1", "--refine-epochs", "1", "--sparsity", "0.01", "--percent", "0.5",
                   "--batch-size", "100", "--batch", "1", "--threads", "1", "--seconds", "0.02", "--device", "cpu",
                   "--round-to", "1", timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["params"] < r["baseline"]["params"] and r["parity"]["max_abs_diff"] <= 1e-3
    assert res.stdout.count("report:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

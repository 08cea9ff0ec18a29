"""The Python API for users' own loops: the example CI runs, and the checkpoint it writes is the CLI's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimexport
from slimexport.cli import app
from slimexport.errors import ConfigError, UntrustedCodeError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.mark.slow
def test_the_example_runs(tmp_path):
    # the timeout is a hang guard (a deadlock), not a speed check
    res = subprocess.run([sys.executable, "examples/own_loop.py", "--steps", "30", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max |ONNX - PyTorch|" in res.stdout and "int8:" in res.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"pruned.pt", "pruned.onnx", "pruned.int8.onnx"}


def test_a_plain_module_pruned_in_python_round_trips_and_the_cli_takes_it(tmp_path, small_ds, small_npz):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.05, 1.0)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, record = slimexport.prune_model(net, 0.4, example_input=x)
    with pytest.raises(ConfigError, match="source="):
        slimexport.save_pruned(pruned, record, tmp_path / "p.pt")
    path = slimexport.save_pruned(pruned, record, tmp_path / "p.pt", source="torchvision:resnet18", example_input=x)
    again = slimexport.load_pruned(path)
    assert torch.allclose(again(x), pruned(x), atol=1e-5)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in pruned.parameters())
    # the wrong source for these weights is a clear error, not a half-loaded model
    with pytest.raises(ConfigError, match="does not fit torchvision:resnet34"):
        slimexport.save_pruned(pruned, record, tmp_path / "q.pt", source="torchvision:resnet34", example_input=x)
    onnx = tmp_path / "p.onnx"
    r = slimexport.export_onnx(again, x, onnx)
    assert r["parity"]["max_abs_diff"] <= 1e-3 and r["parity"]["images"] == 2
    # the CLI reads the same checkpoint (grayscale data is repeated to the model's three channels)
    res = runner.invoke(app, ["prune", str(path), "--percent", "0.2", "--out", str(tmp_path / "p2.pt")])
    assert res.exit_code == 0, res.output


def test_a_checkpoint_of_the_callers_own_code_needs_their_word(tmp_path):
    from tests.user_model import build

    torch.manual_seed(0)
    net = build(10).eval()
    x = torch.randn(2, 3, 16, 16)
    pruned, record = slimexport.prune_model(net, 0.3, example_input=x)
    source = "tests/user_model.py:build"
    path = slimexport.save_pruned(pruned, record, tmp_path / "mine.pt", source=source, example_input=x)
    with pytest.raises(UntrustedCodeError, match="--trust-model-code"):
        slimexport.load_pruned(path)
    assert torch.allclose(slimexport.load_pruned(path, trust=(source,)).net(x), pruned(x), atol=1e-5)


def test_the_lightning_callback_says_what_it_needs():
    try:
        import lightning  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install lightning"):
            slimexport.sparsity_callback(1e-4)
        return
    cb = slimexport.sparsity_callback(1e-4)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    before = net[1].weight.grad.clone()
    cb.on_before_optimizer_step(None, net, None)
    assert torch.allclose(net[1].weight.grad - before, 1e-4 * torch.sign(net[1].weight))

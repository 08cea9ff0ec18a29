"""The Python API for users' own loops: the example CI runs, and the checkpoint it writes is the CLI's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
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
    with pytest.raises(ConfigError, match="example_input="):
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


class _Notebook(nn.Module):
    """A model defined where no source can name it (a notebook cell): no FILE.py:FACTORY rebuilds it."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())  # fmt: skip
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.f(x).mean((2, 3)))


def _saved_notebook_model(tmp_path):
    import slimexport
    from tests.helpers import randomize_bns

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    pruned, rec = slimexport.prune_model(randomize_bns(_Notebook()), 0.5, example_input=x)
    return pruned.eval(), slimexport.save_pruned(pruned, rec, tmp_path / "nb.slim", example_input=x), x


def test_a_model_with_no_source_is_saved_as_programs_that_run_fine_tune_and_export(tmp_path):
    import slimexport
    from slimexport.models.program import ProgramModel

    pruned, path, x = _saved_notebook_model(tmp_path)
    back = slimexport.load_pruned(path)
    assert isinstance(back, ProgramModel) and not back.training
    torch.testing.assert_close(back(x), pruned(x), rtol=0, atol=0)
    assert back(torch.randn(7, 3, 16, 16)).shape == (7, 5)  # a dynamic batch axis
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in pruned.parameters())
    stats = {n: b.clone() for n, b in back.named_buffers()}
    opt = torch.optim.SGD(back.parameters(), lr=0.05)
    back.train()
    for _ in range(3):  # the training program: batch statistics, running updates, gradients into the shared weights
        loss = torch.nn.functional.cross_entropy(back(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    back.eval()
    assert any(not torch.equal(b, stats[n]) for n, b in back.named_buffers() if "running" in n)
    assert not torch.allclose(back(x), pruned(x))  # the eval program sees what the training one changed
    r = slimexport.export_onnx(back, x, tmp_path / "nb.onnx")
    assert r["parity"]["max_abs_diff"] < 1e-4 and (tmp_path / "nb.onnx").is_file()
    # the commands read checkpoints: one line that says what this file is and what reads it
    res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "load it with slimexport.load_pruned" in " ".join(res.stderr.split())


@pytest.mark.parametrize("tamper", ["sample_inputs", "use_pickle"])
def test_a_program_file_that_holds_pickles_is_refused(tmp_path, tamper):
    """torch.export would unpickle pickled weights and sample inputs without restriction: such a file is refused
    before torch.export reads it."""
    import argparse
    import io
    import json
    import zipfile

    import slimexport
    from slimexport.errors import CheckpointError

    _, path, _ = _saved_notebook_model(tmp_path)
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    inner = zipfile.ZipFile(io.BytesIO(parts["eval.pt2"]))
    members = {n: inner.read(n) for n in inner.namelist()}
    for n in members:
        if tamper == "sample_inputs" and "/sample_inputs/" in n:
            buf = io.BytesIO()
            torch.save(argparse.Namespace(run="code"), buf)  # an object weights_only refuses
            members[n] = buf.getvalue()
        if tamper == "use_pickle" and n.endswith("model_weights_config.json"):
            cfg = json.loads(members[n])
            next(iter(cfg["config"].values()))["use_pickle"] = True
            members[n] = json.dumps(cfg).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    parts["eval.pt2"] = out.getvalue()
    bad = tmp_path / "bad.slim"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in parts.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match="pickle|not a plain program"):
        slimexport.load_pruned(bad)

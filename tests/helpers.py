"""What several test files share, in one place: the tiny architectures, trained-looking BatchNorms, the CLI runner,
the one-line-error check and torchrun. Test files import from here, never from each other or from benchmarks/."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from slimexport.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY_VGG = "vgg11_w12"  # the VGG-11 layout at 12% width: 8-61 channels, trains in a second
TINY_RESNET = "preresnet11"  # one bottleneck per stage
TINY_DENSENET = "densenet10"  # two dense layers per block

runner = CliRunner()


def randomize_bns(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm with a scale non-trivial γ, β and running statistics, as a trained network would have;
    returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.05
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(args: list[str], match: str, folder: Path | None = None) -> str:
    """Bad input: exit code 2 (not 3, an internal error), no traceback, one error line that says ``match``, and
    ``folder`` byte for byte as it was. Returns stderr."""
    before = digest(folder) if folder else None
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # typer.Exit(2), not an escaped exception
    assert "Traceback" not in res.output, res.output
    err = res.stderr
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and not any(ln.startswith("internal error") for ln in lines), err
    assert match in " ".join(lines), err
    if folder is not None:
        assert digest(folder) == before
    return err


def torchrun(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` from the repository's root. The timeout
    only ends a hung run (a deadlock), far beyond what any load makes of these seconds-long jobs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)

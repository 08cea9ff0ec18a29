"""What keeps accuracy at the same speed: the polarization regularizer, distillation in refine, pruning in steps,
and --sparsity auto; each checked against what it claims, and one pipeline run with all four."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from slimexport.cli import app
from slimexport.config import TrainConfig, preset_config
from slimexport.loop import distill_loss
from slimexport.regularizer import regularize
from slimexport.sparsity import CANDIDATES, COLLAPSE, SMALL, choose_sparsity
from tests.helpers import TINY_VGG


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6))
    for bn in (m[1], m[4]):
        bn.weight.data = torch.rand(bn.num_features) * 2 - 0.5  # some negative γ too
        bn.weight.grad = torch.zeros_like(bn.weight)
    return m


@pytest.mark.parametrize("t", [1.0, 1.2, 1.6])
def test_polar_adds_the_exact_subgradient_of_its_penalty(t):
    """regularize(..., "polar") adds s·∂/∂γ [t·Σ|γ| − Σ|γ − mean γ|] over every BN γ of the model (the mean taken
    over all of them), as autograd finds it."""
    m = _bn_net()
    s = 1e-3
    regularize(m, s, regularizer="polar", t=t)
    got = torch.cat([m[1].weight.grad, m[4].weight.grad])
    g = torch.cat([m[1].weight.detach(), m[4].weight.detach()]).requires_grad_(True)
    (s * (t * g.abs().sum() - (g - g.mean()).abs().sum())).backward()
    assert torch.allclose(got, g.grad, atol=1e-9), (got, g.grad)


def test_polar_pulls_the_low_gammas_harder_so_they_split():
    """With the penalty alone, γ below the mean fall t+1 times as fast as those above it: a gap opens."""
    m = _bn_net()
    ws = [m[1].weight, m[4].weight]
    for w in ws:
        w.data = torch.linspace(0.2, 1.0, w.numel())
    g0 = torch.cat([w.detach().clone() for w in ws])
    for _ in range(20):
        for w in ws:
            w.grad = torch.zeros_like(w)
        regularize(m, 1e-2, regularizer="polar", t=1.2)
        with torch.no_grad():
            for w in ws:
                w -= w.grad
    g1 = torch.cat([w.detach() for w in ws])
    low = g0 < g0.mean()
    drop = g0 - g1
    assert drop[low].min() > 5 * drop[~low].max()  # (t+1)/(t−1) = 11 for the penalty alone
    with pytest.raises(Exception, match="regularizer"):
        regularize(m, 1e-2, regularizer="l2")


def test_distill_loss_is_the_label_loss_at_weight_0_and_pulls_towards_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(16, 10, requires_grad=True)
    teacher = torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    ce = nn.functional.cross_entropy(student, y)
    assert torch.allclose(distill_loss(student, teacher, y, 0.0, 4.0), ce)
    # a student equal to its teacher pays no KL
    assert torch.allclose(distill_loss(teacher, teacher, y, 0.7, 4.0), 0.3 * nn.functional.cross_entropy(teacher, y))
    # weight 1: gradient descent on the loss moves the student's softened distribution towards the teacher's
    loss = distill_loss(student, teacher, y, 1.0, 2.0)
    loss.backward()
    moved = (student - 0.5 * student.grad).detach()

    def kl(s):
        return nn.functional.kl_div(s.log_softmax(1), teacher.log_softmax(1), log_target=True, reduction="sum")

    assert kl(moved / 2) < kl(student.detach() / 2)


def test_distillation_needs_a_teacher_and_a_weight(small_ds, tmp_path):
    from slimexport.errors import ConfigError
    from slimexport.train import train

    cfg = preset_config("fast", 1)
    with pytest.raises(ConfigError, match="teacher"):
        train(tmp_path / "x.pt", small_ds, cfg, arch=TINY_VGG, teacher=tmp_path / "t.pt")
    with pytest.raises(ConfigError, match="--distill-weight"):
        TrainConfig(distill=1.5).validate()


@pytest.mark.parametrize(
    "fractions, target, expected",
    [
        ({1e-4: 0.1, 1e-3: 0.55, 1e-2: 0.9}, 0.5, 1e-3),  # the smallest s at or over the target
        (
            {1e-4: 0.1, 1e-3: 0.99, 1e-2: 1.0},
            0.5,
            3e-4,
        ),  # the first over it collapses: the most below it (3e-4 ties 1e-4)
        ({1e-3: 0.2, 1e-2: 0.2}, 0.5, 0.1),  # none gets there, all equal: the strongest
    ],
)
def test_sparsity_auto_rule(fractions, target, expected, small_ds, monkeypatch):
    import slimexport.sparsity as sp

    def fake(model, ds, cfg, s, steps, device):
        return max([f for k, f in fractions.items() if k <= s], default=0.0)

    monkeypatch.setattr(sp, "probe", fake)
    s, rec = choose_sparsity(nn.Linear(2, 2), small_ds, preset_config("fast", 2, device="cpu"), target, steps=5)
    assert s == expected, rec
    assert rec["table"][0]["sparsity"] == CANDIDATES[0]


def test_the_sparsity_probe_sends_more_gammas_to_zero_as_s_grows(small_ds):
    """The real probe on a tiny VGG: a weak s leaves every γ, the strongest sends most below 1e-2."""
    from slimexport.models import create_model
    from slimexport.sparsity import probe

    torch.manual_seed(0)
    model = create_model(TINY_VGG, small_ds.num_classes, small_ds.in_channels)
    cfg = preset_config("fast", 30, device="cpu")  # a long schedule: a large s·Σlr for the strong candidate
    weak, strong = (probe(model, small_ds, cfg, s, 10, torch.device("cpu")) for s in (1e-5, 1e-1))
    assert weak < 0.05 and strong > 0.5, (weak, strong)
    assert SMALL == 1e-2 and 0.9 < COLLAPSE < 1


@pytest.fixture(scope="module")
def techniques_run(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("tech") / "run"
    # auto is 16 on AVX-512: blocks as wide as this tiny model's layers
    args = ["pipeline", "--arch", TINY_VGG, "--dataset", small_npz, "--out", str(out), "--epochs", "2",
            "--refine-epochs", "3", "--sparsity", "auto", "--regularizer", "polar", "--polar-t", "1.3", "--distill",
            "--distill-weight", "0.6", "--teacher", "sparse", "--prune-steps", "3", "--percent", "0.5", "--batch",
            "1", "--threads", "1", "--seconds", "0.05", "--device", "cpu",
            "--round-to", "8"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_a_run_with_every_technique_records_each(techniques_run):
    out = techniques_run
    stages = json.loads((out / "stages.json").read_text())
    report = json.loads((out / "report.json").read_text())
    # --sparsity auto: the probe's choice is the s sparse training used, and its table is kept
    probe = json.loads((out / "sparsity.json").read_text())
    assert stages["sparse"]["sparsity"] == probe["sparsity"] in CANDIDATES
    sparse_cfg = torch.load(out / "sparse.pt", weights_only=True)["meta"]["train_config"]
    assert sparse_cfg["sparsity"] == probe["sparsity"] and sparse_cfg["regularizer"] == "polar"
    assert sparse_cfg["polar_t"] == 1.3
    # --prune-steps 3: three prunes, each cutting deeper, two short refines between them; 3 refine epochs in all
    steps = report["prune"]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    kept = [s["channels_after"] for s in steps]
    assert kept[0] > kept[1] > kept[2] == report["prune"]["channels_after"]
    assert [s.get("refine_epochs") for s in steps] == [1, 1, None]
    assert report["prune"]["channels_before"] > kept[0]
    assert abs(report["prune"]["pruned_fraction"] - 0.5) < 0.15
    # kept indices into the sparse model's channels, through every step: within what step 1 kept
    step1 = {
        x["name"]: set(x["kept"])
        for x in torch.load(out / "pruned.step1.pt", weights_only=True)["meta"]["prune"]["layers"]
    }
    for x in report["prune"]["layers"]:
        assert (
            len(x["kept"]) == x["after"] and x["kept"] == sorted(set(x["kept"])) and set(x["kept"]) <= step1[x["name"]]
        )
    refined = torch.load(out / "refined.pt", weights_only=True)["meta"]
    assert refined["train_config"]["epochs"] == 1
    # --distill with the sparse model as teacher, in every refine
    assert refined["teacher"].endswith("sparse.pt") and refined["train_config"]["distill"] == 0.6
    step_ck = torch.load(out / "refined.step1.pt", weights_only=True)["meta"]
    assert step_ck["teacher"].endswith("sparse.pt")
    assert stages["refine"]["distill"]["teacher_accuracy"] == stages["sparse"]["accuracy"]
    assert report["config"]["distill"] is True and report["config"]["prune_steps"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "lots"], "--sparsity must be a positive number or auto"),
        (["--sparsity", "-1e-3"], "--sparsity must be a positive number or auto"),
        (["--prune-steps", "4", "--refine-epochs", "3"], "--prune-steps 4"),
        (["--polar-t", "0", "--regularizer", "polar"], "--polar-t"),
        (["--distill", "--distill-temperature", "0"], "--distill-temperature"),
        (["--min-keep", "1"], "--min-keep must be in [0, 1)"),
    ],
)
def test_bad_technique_options_are_one_line_errors(args, message, tmp_path):
    res = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_pipeline_prunes_to_a_macs_budget_in_steps(tmp_path, small_npz):
    """--max-macs in the pipeline (equal-MACs comparisons): with --prune-steps each step goes its share of the way
    to the budget, measured on the sparse model's MACs."""
    out = tmp_path / "run"
    # as above
    args = ["pipeline", "--arch", TINY_VGG, "--dataset", small_npz, "--out", str(out), "--epochs", "1",
            "--refine-epochs", "2", "--sparsity", "0.02", "--max-macs", "0.3", "--prune-steps", "2", "--batch", "1",
            "--threads", "1", "--seconds", "0.05", "--device", "cpu", "--round-to", "8"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    p = json.loads((out / "report.json").read_text())["prune"]
    before = p["macs_before"]
    first, last = (s["macs_after"] / before for s in p["steps"])
    assert 0.3 < first <= 0.65 + 1e-9 and last <= 0.3 and p["macs_fraction"] == last and p["max_macs"] == 0.3
    assert p["macs_after"] == p["steps"][-1]["macs_after"]

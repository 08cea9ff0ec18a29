import pytest
import torch

from slimexport.checkpoint import load_checkpoint
from slimexport.config import TrainConfig
from slimexport.errors import ConfigError, DeviceError
from slimexport.loop import evaluate, resolve_device
from slimexport.models import create_model
from slimexport.prune import bn_gammas
from slimexport.regularizer import regularize
from slimexport.train import train
from tests.helpers import TINY_VGG


def test_regularize_adds_the_l1_subgradient_to_bn_scales_only():
    m = create_model(TINY_VGG, 10, 1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    bn = m.net.features[1]
    bn.weight.data[:2] = torch.tensor([-0.3, 0.0])
    regularize(m, 0.01)
    expected = 0.01 * torch.sign(bn.weight.detach())
    assert torch.equal(bn.weight.grad, expected)
    assert torch.all(bn.bias.grad == 0) and torch.all(m.net.features[0].weight.grad == 0)


def test_sparse_training_shrinks_gammas(tmp_path, small_ds):
    cfg = dict(epochs=2, batch_size=64, device="cpu")
    train(tmp_path / "plain.pt", small_ds, TrainConfig(**cfg), arch=TINY_VGG)
    train(tmp_path / "sparse.pt", small_ds, TrainConfig(sparsity=0.1, **cfg), arch=TINY_VGG)
    med = [
        torch.cat(list(bn_gammas(load_checkpoint(tmp_path / f)[0]).values())).median()
        for f in ("plain.pt", "sparse.pt")
    ]
    assert med[1] < 0.9 * med[0]


def test_training_learns_and_records(tmp_path, small_ds):
    meta = train(tmp_path / "b.pt", small_ds, TrainConfig(epochs=3, batch_size=64, device="cpu"), arch=TINY_VGG)
    assert meta["stage"] == "baseline" and len(meta["history"]) == 3
    assert meta["accuracy"] > 0.3  # ten classes: chance is 0.1
    model, ck = load_checkpoint(tmp_path / "b.pt")
    assert evaluate(model, small_ds) == pytest.approx(meta["accuracy"])
    assert ck["data"]["mean"] == small_ds.mean
    assert not (tmp_path / "b.pt.resume").exists()


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, small_ds, monkeypatch):
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu")
    train(tmp_path / "straight.pt", small_ds, cfg, arch=TINY_VGG)

    import slimexport.loop as T  # the loop evaluates after each epoch

    real_eval, calls = T.evaluate, []

    def eval_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    monkeypatch.setattr(T, "evaluate", eval_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed.pt", small_ds, cfg, arch=TINY_VGG)
    assert (tmp_path / "resumed.pt.resume").exists() and not (tmp_path / "resumed.pt").exists()
    monkeypatch.setattr(T, "evaluate", real_eval)
    meta = train(tmp_path / "resumed.pt", small_ds, cfg, arch=TINY_VGG, resume=True)
    a, _ = load_checkpoint(tmp_path / "straight.pt")
    b, _ = load_checkpoint(tmp_path / "resumed.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)
    assert len(meta["history"]) == 2


def test_bad_training_options(small_ds):
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(sparsity=-1e-4), dict(schedule="cosine")):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_a_few_steps_train_without_a_schedule_error(small_ds):
    """One-cycle over 4 steps leaves its warm-up phase empty (torch divides by zero); such runs use a constant lr."""
    from slimexport.config import TrainConfig
    from slimexport.loop import fit
    from slimexport.models import create_model

    torch.manual_seed(0)
    m = create_model("vgg11_w12", 10, 1)
    r = fit(m, small_ds, TrainConfig(epochs=1, batch_size=150, device="cpu"))  # 600 images: 4 steps
    assert len(r["history"]) == 1 and r["history"][0]["loss"] > 0


def test_channels_last_follows_the_cpu_and_the_checkpoint_stays_contiguous(tmp_path, small_ds, monkeypatch):
    """Channels-last on CPUs with AVX-512 (measured faster there), not on AVX2-only ones; either way the saved
    weights are in the default layout and the run records which it used."""
    import slimexport.runtime as runtime
    from slimexport.checkpoint import read_checkpoint
    from slimexport.precision import use_channels_last

    for avx512, expected in ((True, True), (False, False)):
        monkeypatch.setattr(runtime, "machine_facts", lambda a=avx512: {"avx512f": a})
        assert use_channels_last(torch.device("cpu")) is expected
        cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, eval_every=1)
        meta = train(tmp_path / f"m{avx512}.pt", small_ds, cfg, arch="vgg11_w25")
        assert meta["channels_last"] is expected
        state = read_checkpoint(tmp_path / f"m{avx512}.pt")["state_dict"]  # as saved, strides included
        assert all(t.is_contiguous() for t in state.values())

"""Ultralytics YOLO detectors through the whole workflow (the `yolo` extra; skipped without it): the offline
detection data set, the data checks, the sparsity hook's place in the optimizer step (after AMP's unscale), the
trainer that keeps a pruned model's widths, the plain-data checkpoint, and the pipeline end to end from the CLI
with its artifacts (pruned.pt that YOLO loads, ONNX with mAP in onnxruntime, INT8) and --resume."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from slimexport.cli import app
from tests.helpers import digest, fails_cleanly, runner
from tests.helpers import randomize_bns as randomize

ultralytics = pytest.importorskip("ultralytics")

from slimexport.detect import evaluate as ev  # noqa: E402 - after the skip: it needs Ultralytics
from slimexport.detect.data import check_data, make_dataset  # noqa: E402
from slimexport.detect.train import PrunedDetectionTrainer, sparsity_callback  # noqa: E402
from slimexport.errors import CheckpointError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("det") / "fmnist-det", train=48, val=16, image_size=64, seed=3)


def test_the_detection_data_set_is_deterministic_valid_and_never_overwritten(tmp_path, data):
    a = make_dataset(tmp_path / "a", train=6, val=3, image_size=64, seed=1)
    b = make_dataset(tmp_path / "b", train=6, val=3, image_size=64, seed=1)
    c = make_dataset(tmp_path / "c", train=6, val=3, image_size=64, seed=2)
    assert digest(a.parent) == digest(b.parent) != digest(c.parent)
    info = check_data(data)
    assert info["nc"] == 10 and info["train"] == 48 and info["val"] == 16 and info["names"][0] == "T-shirt/top"
    labels = (data.parent / "labels" / "train").glob("*.txt")
    boxes = [line.split() for f in labels for line in f.read_text().splitlines()]
    assert len(boxes) > 48  # several objects per image on average
    for c_, *xywh in boxes:
        cx, cy, w, h = map(float, xywh)
        assert 0 <= int(c_) < 10 and 0 < w <= 0.34 and 0 < h <= 0.34 and w / 2 <= cx <= 1 - w / 2 + 1e-6
    before = digest(a.parent)
    with pytest.raises(Exception, match="exists"):
        make_dataset(a.parent, train=2, val=2, image_size=64, seed=9)
    assert digest(a.parent) == before


def _copy(data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(data.parent, dst)
    return dst / "data.yaml"


@pytest.mark.parametrize(
    "breaks, match",
    [
        (lambda y: y.unlink(), "not found"),
        (lambda y: y.write_text("train: [unclosed\n"), "not YAML"),
        (lambda y: y.write_text("train: images/train\nnames: [a]\n"), "missing val"),
        (lambda y: y.write_text(y.read_text().replace("val: images/val", "val: images/nowhere")), "images/nowhere"),
        (lambda y: y.write_text(y.read_text().replace("nc: 10", "nc: 11")), "nc is 11"),
        (lambda y: (y.parent / "labels/train/00003.txt").write_text("1 0.5 0.5 0.2\n"), "00003.txt:1"),
        (lambda y: (y.parent / "labels/val/00001.txt").write_text("12 0.5 0.5 0.2 0.2\n"), "class 12"),
        (lambda y: (y.parent / "labels/val/00002.txt").write_text("0 1.5 0.5 0.2 0.2\n"), "not normalised"),
        (lambda y: (y.parent / "images/train/00004.png").write_bytes(b"not a png"), "00004.png"),
    ],
)
def test_a_bad_data_yaml_image_or_label_is_a_one_line_error_naming_it(breaks, match, data, tmp_path):
    y = _copy(data, tmp_path)
    breaks(y)
    with pytest.raises(DataError, match=match):
        check_data(y)


def _tiny_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


class _Trainer:  # what the callback reads of Ultralytics' trainer: the model and the optimizer it built
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer


@pytest.mark.parametrize("scale", [1.0, 2.0**16])
def test_the_sparsity_term_is_added_after_amp_unscales_and_clipping(scale):
    """Ultralytics' optimizer_step: scaler.unscale_ → clip_grad_norm_ → scaler.step → update. The γ step must be
    exactly lr·(unscaled, clipped gradient + s·sign γ): a term added before unscale_ would be divided by the loss
    scale, one added before clipping would be clipped."""
    s, lr = 0.5, 0.1
    model = _tiny_bn_model()
    x = torch.randn(4, 3, 8, 8)
    ref = _tiny_bn_model()
    ref(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=10.0)
    g = ref[1].weight.grad.clone()
    gamma = model[1].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cb = sparsity_callback(s)
    cb(_Trainer(model, opt))
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale != 1.0)
    scaler.scale(model(x).pow(2).sum()).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(model[1].weight.detach(), gamma - lr * (g + s * torch.sign(gamma)))
    assert cb.hook.steps == 1


def test_a_step_the_scaler_skips_adds_no_sparsity_term():
    model = _tiny_bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = sparsity_callback(0.5)
    cb(_Trainer(model, opt))
    gamma = model[1].weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(torch.randn(2, 3, 8, 8)).sum() * float("inf")).backward()
    scaler.unscale_(opt)
    scaler.step(opt)  # inf gradients: the step is skipped, and with it the hook
    assert cb.hook.steps == 0 and torch.equal(model[1].weight.detach(), gamma)


def test_the_pruned_trainer_keeps_the_model_it_is_given(data):
    from slimexport import prune_model

    model = ev.build(ev.read_user_model("yolov8n.yaml").yaml, 10, None, "yolov8n.yaml")
    pruned, _ = prune_model(model, 0.5, example_input=torch.rand(1, 3, 64, 64))
    trainer = PrunedDetectionTrainer(overrides={"model": "yolov8n.yaml", "data": str(data), "plots": False})
    assert trainer.get_model(cfg=model.yaml, weights=pruned) is pruned  # not a new model from the yaml
    eleven = ev.build(model.yaml, 11, None, "x")
    with pytest.raises(Exception, match="11 classes"):
        trainer.get_model(cfg=model.yaml, weights=eleven)


def test_the_plain_checkpoint_rebuilds_the_pruned_model_and_refuses_foreign_modules(tmp_path):
    from slimexport import prune_model

    model = ev.build(ev.read_user_model("yolo11n.yaml").yaml, 10, None, "yolo11n.yaml").eval()
    x = torch.rand(1, 3, 64, 64)
    pruned, rec = prune_model(randomize(model), 0.6, example_input=x, round_to=16)
    from slimexport.channels import SelectingBatchNorm

    # YOLO11's head: BNs that select channels after a depthwise conv; Ultralytics' fusing cannot hold them
    assert any(isinstance(m, SelectingBatchNorm) for m in pruned.modules())
    form = ev.ultralytics_form(pruned).eval()
    assert not any(isinstance(m, SelectingBatchNorm) for m in form.modules())
    torch.testing.assert_close(form(x)[0], pruned.eval()(x)[0])  # the same function
    ev.save_detector(form, tmp_path / "p.ckpt", rec["plan"], {"stage": "pruned"})
    raw = torch.load(tmp_path / "p.ckpt", weights_only=True)  # plain data: no pickled module
    back, _ = ev.load_detector(tmp_path / "p.ckpt")
    torch.testing.assert_close(back(x)[0], pruned(x)[0])
    fused = copy.deepcopy(back).fuse()  # what Ultralytics' val, predict and export do first
    torch.testing.assert_close(fused(x)[0], pruned(x)[0], atol=1e-3, rtol=1e-3)
    raw["yaml"]["head"][0][2] = "torch_safe_load"  # a name Ultralytics would look up and call
    torch.save(raw, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="torch_safe_load"):
        ev.load_detector(tmp_path / "evil.ckpt")


def test_detector_options_that_cannot_work_fail_before_anything_runs(data, tmp_path):
    base = ["pipeline", "--out", str(tmp_path / "run"), "--dataset", f"ultralytics:{data}"]
    fails_cleanly(base, "needs --arch ultralytics:FILE")
    fails_cleanly(["pipeline", "--out", str(tmp_path / "r"), "--arch", "ultralytics:yolov8n.yaml"], "needs --dataset")
    arch = ["--arch", "ultralytics:yolov8n.yaml"]
    fails_cleanly([*base, *arch, "--distill"], "--distill: not for detectors")
    fails_cleanly([*base, *arch, "--baseline-epochs", "0"], "takes a trained .pt as the baseline, not the yaml")
    fails_cleanly([*base, *arch, "--sparsity", "auto"], "--sparsity auto is for classifiers")
    fails_cleanly([*base, *arch, "--train-args", "nbs=16,lr00=1"], "lr00: not an Ultralytics training argument")
    fails_cleanly([*base, *arch, "--train-args", "epochs=3"], "epochs: set by slimexport's own options")
    fails_cleanly([*base, *arch, "--train-args", "nbs"], "expected KEY=VALUE")
    fails_cleanly(["pipeline", "--out", str(tmp_path / "c"), "--train-args", "nbs=16"], "for detectors")
    fails_cleanly([*base, "--arch", f"ultralytics:{tmp_path / 'best.pt'}"], "best.pt not found")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    fails_cleanly([*base, "--arch", f"ultralytics:{tmp_path / 'junk.pt'}"], "not an Ultralytics model")
    fails_cleanly([*base[:4], "ultralytics:/nowhere/data.yaml", *arch], "/nowhere/data.yaml not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_detector_pipeline_end_to_end_then_resume(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cwd = tmp_path / "cwd"  # nothing lands in the working directory (onnxruntime's pre-processing litters it)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["pipeline", "--arch", "ultralytics:yolov8n.yaml", "--dataset", f"ultralytics:{data}", "--out", str(out),
            "--epochs", "1", "--refine-epochs", "1", "--image-size", "64", "--batch-size", "8", "--sparsity", "1e-3",
            "--percent", "0.5", "--int8", "--batch", "1", "--threads", "1", "--seconds", "0.05"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "mAP50-95 in onnxruntime" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    b, p = rep["baseline"], rep["pruned"]
    assert p["params"] < 0.8 * b["params"] and rep["ratios"]["macs"] > 1.2
    assert all(0 <= m[k] <= 1 for m in (b["map"], p["map"], *rep["int8"].values()) for k in ("map50_95", "map50"))
    assert {r["image_size"] for r in rep["latency_rows"]} == {64, 640}
    assert rep["training"]["sparse"]["sparse_steps"] >= 1  # every optimizer step (Ultralytics accumulates to 64)
    for f in ("pruned.pt", "baseline.pt", "pruned.onnx", "pruned.int8.onnx", "gamma_hist.png", "report.md"):
        assert (out / f).is_file(), f
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())
    from ultralytics import YOLO

    yolo = YOLO(str(out / "pruned.pt"))  # Ultralytics loads it with the pruned widths
    assert sum(q.numel() for q in yolo.model.parameters()) == p["params"]
    assert yolo.predict(torch.rand(1, 3, 64, 64), verbose=False)[0].boxes is not None
    assert Path(yolo.export(format="onnx", imgsz=64)).is_file()  # its exporter's forward_split: widths in sync
    # an interrupted run: its bench and report did not finish; --resume runs only those
    partial = tmp_path / ".run.partial"
    shutil.copytree(out, partial)
    stages = json.loads((partial / "stages.json").read_text())
    for k in ("bench", "report"):
        stages.pop(k)
    (partial / "stages.json").write_text(json.dumps(stages))
    (partial / "report.json").unlink()
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert "refine: kept from the interrupted run" in res.output and not partial.exists()
    assert json.loads((out / "report.json").read_text())["pruned"]["params"] == p["params"]


@pytest.mark.slow
def test_the_yolo_example_runs_and_the_pruned_widths_survive_ultralytics_training(tmp_path):
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "examples/yolo_own_script.py", "--epochs", "1", "--image-size", "64",
                          "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    pruned = re.search(r"-> ([\d,]+) parameters", res.stdout).group(1)
    assert f"fine-tuned: {pruned} parameters" in res.stdout  # not rebuilt from the yaml at the unpruned widths
    assert (tmp_path / "refine" / "weights" / "last.onnx").is_file()  # Ultralytics' own exporter takes it

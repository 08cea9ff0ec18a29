"""Network slimming of an Ultralytics YOLO detector from your own Ultralytics script (the `yolo` extra).

    python examples/yolo_own_script.py --out runs/yolo_script                      # ~5 min on two CPU cores
    python examples/yolo_own_script.py --epochs 1 --image-size 64 --out /tmp/ys   # what CI runs

You keep `YOLO(...).train(...)`; slimexport adds three things to it:
- `sparsity_callback(s)`: the L1 term on every BN γ, inside Ultralytics' optimizer step (after AMP's unscale,
  before the step, on every DDP rank), with AMP, clipping and the EMA left on;
- `prune_model`: one global |γ| threshold, a physically smaller model (the Detect head's outputs kept);
- `PrunedDetectionTrainer`: fine-tunes the pruned model as it is (the stock trainer rebuilds it from its yaml at
  the unpruned widths); `save_ultralytics` writes the float32 `pruned.pt` that `YOLO(...)` loads.
The data is slimexport's offline detection set (Fashion-MNIST items on canvases); use your own data yaml instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from ultralytics import YOLO

    from slimexport import prune_model
    from slimexport.detect.data import make_dataset
    from slimexport.detect.evaluate import save_ultralytics
    from slimexport.detect.train import PrunedDetectionTrainer, sparsity_callback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/yolo_script"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--percent", type=float, default=0.5)
    args = parser.parse_args()
    out = args.out.resolve()
    size = args.image_size
    data = make_dataset(out / "data", train=64 if args.epochs == 1 else 600, val=32 if args.epochs == 1 else 120,
                        image_size=size, force=True)  # fmt: skip
    common = {"data": str(data), "imgsz": size, "epochs": args.epochs, "batch": 16, "device": "cpu",
              "plots": False, "project": str(out), "exist_ok": True, "workers": 0}  # fmt: skip

    baseline = YOLO("yolov8n.yaml")  # or YOLO("best.pt"), your trained detector
    baseline.train(name="baseline", **common)

    sparse = YOLO(str(out / "baseline" / "weights" / "last.pt"))
    sparse.add_callback(sparsity_callback.EVENT, sparsity_callback(1e-3))
    sparse.train(name="sparse", **common)

    net = YOLO(str(out / "sparse" / "weights" / "last.pt")).model.float().eval()
    pruned, record = prune_model(net, args.percent, example_input=torch.rand(1, 3, size, size))
    save_ultralytics(pruned, out / "pruned.pt")
    before, after = (sum(p.numel() for p in m.parameters()) for m in (net, pruned))
    print(f"pruned {100 * record['pruned_fraction']:.0f}% of the BN channels: {before:,} -> {after:,} parameters")

    tuned = YOLO(str(out / "pruned.pt"))
    tuned.train(trainer=PrunedDetectionTrainer, name="refine", **common)
    print(f"fine-tuned: {sum(p.numel() for p in tuned.model.parameters()):,} parameters")

    final = YOLO(str(out / "refine" / "weights" / "last.pt"))
    metrics = final.val(data=str(data), imgsz=size, plots=False, verbose=False, workers=0)
    onnx = final.export(format="onnx", imgsz=size)
    print(f"mAP50-95 {metrics.box.map:.4f} (PyTorch); ONNX: {onnx}")


if __name__ == "__main__":
    main()

"""Network slimming inside your own training loop, then slimexport's checkpoint, ONNX, INT8 and benchmark.

    python examples/own_loop.py --out runs/own_loop            # ~1 min on two CPU cores
    python examples/own_loop.py --steps 30 --out /tmp/own      # what CI runs

The model is your own code (`build` below): slimexport adds the L1 term on every BatchNorm γ in your loop
(`regularize`), prunes it by one global |γ| threshold (`prune_model`), saves the smaller model as a plain-data
checkpoint that rebuilds from this file (`save_pruned` / `load_pruned`: it names `examples/own_loop.py:build`,
which runs on loading only because we name it again), exports it with the parity check, quantizes it to INT8 and
times both in onnxruntime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def build(num_classes: int = 10) -> nn.Module:
    """Your model: any CNN with BatchNorm (here a small one for 28×28 grayscale images)."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(1, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2),
        block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip


def main() -> None:
    import slimexport
    from slimexport.data import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/own_loop"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of batch 64")
    parser.add_argument("--sparsity", type=float, default=1e-3)
    parser.add_argument("--percent", type=float, default=0.5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    ds = load_dataset("embedded")  # real Fashion-MNIST images shipped with slimexport; any Dataset works
    model = build(ds.num_classes)
    g = torch.Generator().manual_seed(0)

    def fit(net: nn.Module, steps: int, lr: float, sparsity: float) -> None:
        """Your loop, with one added line: the L1 subgradient on every BN γ, between backward() and step()."""
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        net.train()
        for step in range(steps):
            idx = torch.randint(0, len(ds.y_train), (64,), generator=g)
            loss = F.cross_entropy(net(ds.normalize(ds.x_train[idx])), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            slimexport.regularize(net, sparsity)  # the one line network slimming adds
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                print(f"step {step}: loss {loss.item():.3f}")
        net.eval()

    def accuracy(net: nn.Module) -> float:
        with torch.no_grad():
            return (net(ds.normalize(ds.x_test)).argmax(1) == ds.y_test).float().mean().item()

    # 1. sparse training in your loop
    fit(model, args.steps, 0.05, args.sparsity)

    # 2. prune: one global threshold over |γ|; the graph engine finds which layers' channels go together
    example = ds.normalize(ds.x_test[:8])
    pruned, record = slimexport.prune_model(model, args.percent, example_input=example, normalize="max")
    params = [sum(p.numel() for p in m.parameters()) for m in (model, pruned)]
    print(
        f"pruned {record['channels_before'] - record['channels_after']}/{record['channels_before']} BN channels: "
        f"params {params[0]:,} -> {params[1]:,}; accuracy {accuracy(model):.4f} -> {accuracy(pruned):.4f}"
    )
    fit(pruned, args.steps // 3, 0.01, 0.0)  # refine: the pruned model is an ordinary nn.Module
    print(f"refined: accuracy {accuracy(pruned):.4f}")

    # 3. a plain-data checkpoint, rebuilt from this file's `build` and the pruning plan
    source = f"{Path(__file__).resolve()}:build"
    ckpt = slimexport.save_pruned(pruned, record, args.out / "pruned.pt", source=source, example_input=example,
                                  data=ds)  # fmt: skip
    again = slimexport.load_pruned(ckpt, trust=(source,))
    assert torch.allclose(again(example), pruned(example), atol=1e-5)

    # 4. ONNX with the checker, onnxsim and the parity check; INT8; onnxruntime side by side
    onnx = args.out / "pruned.onnx"
    r = slimexport.export_onnx(again, example, onnx, data=ds, parity_images=256)
    print(f"exported {onnx}: max |ONNX - PyTorch| {r['parity']['max_abs_diff']:.1e} on {r['parity']['images']} images")
    q = slimexport.quantize(onnx, args.out / "pruned.int8.onnx", ds, calib_images=256)
    print(f"INT8: accuracy {q['fp32_accuracy']:.4f} -> {q['accuracy']:.4f}, {q['fp32_bytes']:,} -> {q['bytes']:,} B")
    res = slimexport.benchmark({"fp32": onnx, "int8": args.out / "pruned.int8.onnx"}, ds, batches=[1], threads=[1],
                           seconds=0.2)  # fmt: skip
    for row in res["latency"]:
        acc = res["models"][row["model"]]["accuracy"]
        print(f"{row['model']}: {row['median_ms']:.3f} ms at batch 1, onnxruntime accuracy {acc:.4f}")


if __name__ == "__main__":
    main()

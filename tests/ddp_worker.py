"""Run by the distributed tests under torch's own launcher (python -m torch.distributed.run ...).

Modes:
  step NPZ OUT      one optimizer step of a model without BatchNorm on the whole (global) batch; rank 0 saves
                    the weights to OUT
  fail ARGS...      `slimexport ARGS` in which rank 1 fails at its first sparsity step
"""

import os
import sys

import torch
from torch import nn


def tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def step_config():
    from slimexport.config import TrainConfig

    return TrainConfig(epochs=1, batch_size=64, lr=0.5, schedule="constant", device="cpu", weight_decay=5e-4)


def subset(npz: str):
    from slimexport.data import load_dataset

    ds = load_dataset(npz)
    ds.x_train, ds.y_train = ds.x_train[:64], ds.y_train[:64]
    return ds


def main() -> None:
    mode = sys.argv[1]
    if mode == "step":
        from slimexport.loop import fit

        model = tiny_net()
        fit(model, subset(sys.argv[2]), step_config())
        if int(os.environ["RANK"]) == 0:
            torch.save(model.state_dict(), sys.argv[3])
    elif mode == "fail":
        import slimexport.loop

        if int(os.environ["RANK"]) == 1:

            def boom(*a, **kw):
                raise RuntimeError("rank 1 lost its disk")

            slimexport.loop.regularize = boom
        from slimexport.cli import app

        sys.argv = ["slimexport", *sys.argv[2:]]
        app()


if __name__ == "__main__":
    main()

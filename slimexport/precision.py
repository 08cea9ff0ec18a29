"""Training arithmetic and memory layout: bf16 autocast where it is measured faster (:func:`choose_precision`),
channels-last where it was measured faster (:func:`use_channels_last`), and torch.compile's warm-up outside the
timed epochs."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from slimexport.data import Dataset


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on ``device`` where ``precision`` (resolved: fp32 or bf16) says so; a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def choose_precision(
    precision: str, model: nn.Module, ds: Dataset, device: torch.device, batch: int, probe_steps: int = 3
) -> tuple[str, str]:
    """(fp32 or bf16, why) for training ``model`` on ``device``. ``auto``: bf16 autocast on CUDA; on a CPU, bf16
    only where it has native bf16 instructions (AMX, AVX512-BF16) and a short timed probe (``probe_steps`` training
    steps in each precision, interleaved, at this batch size up to 32; the model is left as it was) shows bf16
    at least 10% faster for this model: on one Xeon with AMX it was ×1.4-1.5 for vgg11_bn and resnet18 but ×0.73
    for mobilenet_v2."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    if device.type == "cuda":
        return "bf16", "auto: bf16 autocast on CUDA"
    from slimexport.runtime import machine_facts

    if not machine_facts()["bf16"]:
        return "fp32", "auto: this CPU has no native bf16 instructions (AMX, AVX512-BF16)"
    times = _probe_step_times(model, ds, device, min(batch, 32), probe_steps)
    fp32, bf16 = (sorted(t)[len(t) // 2] for t in (times["fp32"], times["bf16"]))
    chosen = "bf16" if bf16 < 0.9 * fp32 else "fp32"
    return (
        chosen,
        f"auto: a training step took {bf16 * 1e3:.0f} ms in bf16, {fp32 * 1e3:.0f} ms in fp32 (batch {batch})",
    )


@contextmanager
def _left_as_it_was(model: nn.Module):
    """Run trial forward and backward passes: afterwards the model's weights, BN statistics and gradients are put
    back as they were."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


def _probe_step_times(model: nn.Module, ds: Dataset, device: torch.device, batch: int, steps: int) -> dict:
    """Seconds of ``steps`` forward+backward passes in fp32 and in bf16 autocast, interleaved after one warm-up of
    each; the model is left as it was."""
    x = ds.normalize(ds.x_train[:batch].cpu()).to(device)
    y = ds.y_train[:batch].to(device)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with _left_as_it_was(model):
        model.train()
        for i in range(steps + 1):
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                with autocast(device, precision):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                if i:
                    times[precision].append(time.perf_counter() - t0)
    return times


def use_channels_last(device: torch.device) -> bool:
    """Train in channels-last memory format where it was measured faster: on CUDA, and on CPUs with AVX-512
    (one training step ×1.06–×1.46 faster on this project's AMD EPYC for vgg19, vgg11_w25, preresnet20 and
    resnet18, about ×1.1 for VGG-19 on its Intel Xeon: ``python -m benchmarks.channels_last``). CPUs with AVX2
    only were not measured, so they keep the default layout."""
    if device.type == "cuda":
        return True
    from slimexport.runtime import machine_facts

    return device.type == "cpu" and machine_facts()["avx512f"]


def warm_up(
    model: nn.Module,
    forward,
    ds: Dataset,
    batch: int,
    device: torch.device,
    channels_last: bool = False,
    precision: str = "fp32",
) -> float:
    """Compile ``forward`` (and its backward) outside the timed epochs: one forward and backward on a training-shaped
    batch, after which the model's weights, BN statistics and gradients are put back as they were. Returns seconds."""
    x = ds.normalize(ds.x_train[:batch])  # the shape every training step has (this rank's share under DDP)
    y = ds.y_train[:batch]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _left_as_it_was(model):
        t0 = time.perf_counter()
        model.train()
        with autocast(device, precision):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds

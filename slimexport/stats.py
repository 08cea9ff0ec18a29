"""Model statistics: parameters and multiply-accumulates (MACs) per image, counted by torch's FlopCounterMode."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_macs_on", "count_params"]


def count_params(model: nn.Module) -> int:
    """Trainable parameters (selections hold none)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, in_channels: int, image_size: tuple[int, int]) -> int:
    """MACs of one forward pass on one image (convs and linears; FLOPs / 2)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, *image_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_macs_on(model: nn.Module, example_input) -> int:
    """MACs of one forward pass on ``example_input`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs; convs and linears; FLOPs / 2)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        if isinstance(example_input, dict):
            model(**example_input)
        elif isinstance(example_input, (tuple, list)):
            model(*example_input)
        else:
            model(example_input)
    model.train(was_training)
    return counter.get_total_flops() // 2

"""Pruning: one global threshold on |γ| over all prunable BNs, then a physically smaller model.

Three separate ideas: the architecture says which BNs are prunable and how channels are coupled
(``model.prunable_bns()`` and ``model.pruned(keep)``); the importance of a channel is its |γ|; and this module
decides what to keep. A layer never loses every channel: when the global threshold would leave fewer than
``min_channels`` of a BN's channels, that BN keeps its ``min_channels`` largest |γ| instead (the reference
crashes or builds a zero-width layer there).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.data import Dataset
from slimexport.errors import ConfigError
from slimexport.stats import count_macs, count_params


def check_percent(percent: float) -> float:
    if not (isinstance(percent, (int, float)) and math.isfinite(percent) and 0.0 <= percent < 1.0):
        raise ConfigError(f"--percent must be in [0, 1) (the fraction of BN channels to prune), got {percent}")
    return float(percent)


def bn_gammas(model: nn.Module) -> dict[str, torch.Tensor]:
    """|γ| of every prunable BN, by module name, in forward order."""
    return {name: bn.weight.detach().abs().float().cpu() for name, bn in model.prunable_bns()}


def global_threshold(gammas: dict[str, torch.Tensor], percent: float) -> float:
    """The value at index ⌊total·percent⌋ of all sorted |γ| (channels strictly above it survive); -inf at 0%."""
    check_percent(percent)
    if percent == 0.0:
        return float("-inf")
    allg = torch.cat(list(gammas.values())).sort().values
    return float(allg[int(len(allg) * percent)])


def select_channels(
    gammas: dict[str, torch.Tensor], threshold: float, min_channels: int = 1, round_to: int = 1
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Kept channel indices per BN, and the names of BNs whose floor of ``min_channels`` kicked in.

    With ``round_to`` > 1 each layer keeps a multiple of ``round_to`` channels (its next-largest |γ| fill the
    gap, never beyond the layer's width): runtimes such as onnxruntime's CPU convolutions work on channel blocks
    of 8 or 16, so a layer of 17 channels costs about as much as one of 32.
    """
    if min_channels < 1:
        raise ConfigError(f"--min-channels must be at least 1, got {min_channels}")
    if round_to < 1:
        raise ConfigError(f"--round-to must be at least 1, got {round_to}")
    keep, floored = {}, []
    for name, g in gammas.items():
        idx = torch.nonzero(g > threshold).flatten()
        floor = min(min_channels, len(g))
        if len(idx) < floor:
            floored.append(name)
        target = min(len(g), math.ceil(max(len(idx), floor) / round_to) * round_to)
        if target > len(idx):  # the channels above the threshold are the top ones, so top-k extends them
            idx = torch.topk(g, target).indices.sort().values
        keep[name] = idx
    return keep, floored


def prune_model(
    model: nn.Module, percent: float, min_channels: int = 1, round_to: int = 1
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` (not modified) at the global ``percent``; returns the smaller model and a record."""
    gammas = bn_gammas(model)
    threshold = global_threshold(gammas, percent)
    keep, floored = select_channels(gammas, threshold, min_channels, round_to)
    new = model.pruned(keep)
    total = sum(len(g) for g in gammas.values())
    kept = sum(len(k) for k in keep.values())
    record = {
        "percent": percent,
        "threshold": threshold if math.isfinite(threshold) else None,
        "min_channels": min_channels,
        "round_to": round_to,
        "channels_before": total,
        "channels_after": kept,
        "pruned_fraction": 1 - kept / total,
        "floored_layers": floored,
        "layers": [{"name": n, "before": len(g), "after": len(keep[n])} for n, g in gammas.items()],
    }
    return new, record


def prune(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    percent: float,
    min_channels: int = 1,
    ds: Dataset | None = None,
    device: str = "cpu",
    round_to: int = 1,
) -> dict[str, Any]:
    """Read a (sparse-trained) checkpoint, prune it, write the pruned checkpoint ``out``; returns its meta.

    With ``ds``, the pruned model's test accuracy before refine is measured and recorded.
    """
    check_percent(percent)
    model, ckpt = load_checkpoint(ckpt_path)
    new, record = prune_model(model, percent, min_channels, round_to)
    size = tuple(ckpt["data"].get("image_size") or (32, 32))
    record.update(
        {
            "params_before": count_params(model),
            "params_after": count_params(new),
            "macs_before": count_macs(model, model.in_channels, size),
            "macs_after": count_macs(new, new.in_channels, size),
            "source": str(ckpt_path),
        }
    )
    meta = {
        "stage": "pruned",
        "parent": ckpt["meta"].get("stage"),
        "prune": record,
        "parent_accuracy": ckpt["meta"].get("accuracy"),
    }
    if ds is not None:
        from slimexport.train import evaluate, resolve_device

        meta["accuracy"] = evaluate(new, ds, resolve_device(device))
        new.to("cpu")
    save_checkpoint(make_checkpoint(new, ckpt["data"], meta), out)
    return meta

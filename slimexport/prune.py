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
from slimexport.importance import check_normalize, normalize_scores
from slimexport.models.common import SlimModel
from slimexport.records import PruneRecord
from slimexport.stats import count_macs, count_params


def check_percent(percent: float) -> float:
    if not (isinstance(percent, (int, float)) and math.isfinite(percent) and 0.0 <= percent < 1.0):
        raise ConfigError(f"--percent must be in [0, 1) (the fraction of BN channels to prune), got {percent}")
    return float(percent)


def resolve_round_to(round_to: int | str) -> tuple[int, str]:
    """``--round-to``: an integer ≥ 1, or ``auto``, the channel block of onnxruntime's CPU convolutions here
    (its NCHWc kernels: 16 channels with AVX-512, 8 with AVX2), read from the CPU's flags. Returns (value, why)."""
    if isinstance(round_to, str) and round_to.strip().lower() == "auto":
        from slimexport.runtime import machine_facts

        m = machine_facts()
        if m["avx512f"]:
            return 16, "auto: this CPU has AVX-512, onnxruntime's CPU convolutions work in blocks of 16 channels"
        if m["avx2"]:
            return 8, "auto: this CPU has AVX2 without AVX-512, onnxruntime's CPU convolutions work in blocks of 8"
        why = "no AVX2/AVX-512 found" if m["flags_known"] else "CPU flags unknown"
        return 8, f"auto: {why}; 8, a block size that suits most SIMD widths"
    try:
        value = int(round_to)
    except (TypeError, ValueError):
        raise ConfigError(f"--round-to must be a positive integer or auto, got {round_to!r}") from None
    if value < 1 or str(value) != str(round_to).strip():
        raise ConfigError(f"--round-to must be a positive integer or auto, got {round_to!r}")
    return value, "exact channel counts (the paper's)" if value == 1 else f"given: multiples of {value}"


def bn_gammas(model: nn.Module, normalize: str = "none") -> dict[str, torch.Tensor]:
    """|γ| of every prunable BN, by module name, in forward order; ``normalize``: see :func:`normalize_scores`."""
    return {
        name: normalize_scores(bn.weight.detach().abs().float().cpu(), normalize) for name, bn in model.prunable_bns()
    }


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


def _has_stream(model: nn.Module) -> bool:
    return isinstance(model, SlimModel) and model.stream_widths() is not None


def check_prune_stream(model: nn.Module, prune_stream: bool) -> None:
    if prune_stream and not _has_stream(model):
        raise ConfigError(
            f"--prune-stream applies to residual networks (preresnet); {model.arch} has no residual stream"
        )


def prune_model(
    model: nn.Module,
    percent: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    prune_stream: bool = False,
    example_input: torch.Tensor | None = None,
    max_macs: float | None = None,
    normalize: str = "none",
) -> tuple[nn.Module, PruneRecord]:
    """Prune any CNN by network slimming; ``model`` is not modified. Returns (the smaller model, the record).

    ``percent`` (of the prunable BN channels) or ``max_macs`` (the fraction of the unpruned MACs to keep) sets one
    global |γ| threshold (over |γ| as they are, or each layer's divided by its max or mean: ``normalize``, see
    :func:`normalize_scores`); each layer keeps at least ``min_channels`` and, with ``round_to``, a multiple of it.
    slimexport's own architectures use their hand-written rules; any other ``nn.Module`` goes through the graph
    engine (:mod:`slimexport.graph`), which needs ``example_input`` (one batch of the input it will see).
    """
    from slimexport.models.external import GraphModel

    if (percent is None) == (max_macs is None):
        raise ConfigError("give either percent or max_macs, not both")
    check_normalize(normalize)
    if isinstance(model, GraphModel):
        return model.pruned_by_graph(
            percent=percent, min_channels=min_channels, round_to=round_to, max_macs=max_macs, normalize=normalize
        )
    if not isinstance(model, SlimModel):
        from slimexport.graph_prune import prune_graph

        if example_input is None:
            raise ConfigError(f"pruning a {type(model).__name__} traces it: pass example_input (a batch of inputs)")
        return prune_graph(model, example_input, percent, min_channels, round_to, max_macs, normalize=normalize)
    if max_macs is not None:
        size = tuple(example_input.shape[2:]) if example_input is not None else (32, 32)
        return prune_to_macs(model, max_macs, size, min_channels, round_to, prune_stream, normalize)
    check_percent(percent)
    gammas = bn_gammas(model, normalize)
    threshold = global_threshold(gammas, percent)
    return _prune_at(model, gammas, threshold, percent, min_channels, round_to, prune_stream, normalize)


def check_macs_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ConfigError(f"--max-macs must be in (0, 1] (the fraction of the unpruned MACs to keep), got {fraction}")
    return float(fraction)


def prune_to_macs(
    model: nn.Module,
    max_macs: float,
    image_size: tuple[int, int],
    min_channels: int = 1,
    round_to: int = 1,
    prune_stream: bool = False,
    normalize: str = "none",
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the fewest channels whose global |γ| threshold brings MACs to at most ``max_macs`` × the unpruned MACs.

    A deployment budget instead of a percent: the same single global threshold, found by bisection over the sorted
    |γ| (MACs never grow as the threshold rises). Raises :class:`ConfigError` when even the highest threshold, with
    its per-layer floor of ``min_channels``, stays above the budget.
    """
    check_macs_fraction(max_macs)
    gammas = bn_gammas(model, normalize)
    allg = torch.cat(list(gammas.values())).sort().values
    total = len(allg)
    full = count_macs(model, model.in_channels, image_size)
    budget = max_macs * full

    def at(i: int) -> tuple[nn.Module, dict[str, Any], int]:
        # candidate i prunes the i smallest |γ| (and their ties): threshold -inf for i = 0, else the i-th smallest
        threshold = float("-inf") if i == 0 else float(allg[i - 1])
        new, rec = _prune_at(model, gammas, threshold, i / total, min_channels, round_to, prune_stream, normalize)
        return new, rec, count_macs(new, new.in_channels, image_size)

    lo, hi = 0, total  # find the smallest i whose MACs fit the budget
    best = at(hi)
    if best[2] > budget:
        raise ConfigError(
            f"--max-macs {max_macs:g} cannot be reached: pruning all but the floor of {min_channels} channel(s) per "
            f"layer still leaves {best[2] / full:.3f} of the MACs"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        cand = at(mid)
        if cand[2] <= budget:
            hi, best = mid, cand
        else:
            lo = mid + 1
    new, rec, macs = best  # always the candidate at index hi
    rec.update({"max_macs": max_macs, "macs_fraction": macs / full})
    return new, rec


def _prune_at(
    model: nn.Module,
    gammas: dict[str, torch.Tensor],
    threshold: float,
    percent: float,
    min_channels: int,
    round_to: int,
    prune_stream: bool = False,
    normalize: str = "none",
) -> tuple[nn.Module, dict[str, Any]]:
    keep, floored = select_channels(gammas, threshold, min_channels, round_to)
    check_prune_stream(model, prune_stream)
    # a residual network also compacts its stream, to the same multiple of round_to
    new = model.pruned(keep, round_to=round_to, prune_stream=prune_stream)
    total = sum(len(g) for g in gammas.values())
    kept = sum(len(k) for k in keep.values())
    record = {
        "percent": percent,
        "threshold": threshold if math.isfinite(threshold) else None,
        "min_channels": min_channels,
        "normalize": normalize,
        "round_to": round_to,
        "prune_stream": prune_stream,
        "channels_before": total,
        "channels_after": kept,
        "pruned_fraction": 1 - kept / total,
        "floored_layers": floored,
        "layers": [
            {"name": n, "before": len(g), "after": len(keep[n]), "kept": keep[n].tolist()} for n, g in gammas.items()
        ],
    }
    if _has_stream(model):
        record["stream"] = {"before": model.stream_widths(), "after": new.stream_widths()}
    return new, record


def prune(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    percent: float | None,
    min_channels: int = 1,
    ds: Dataset | None = None,
    device: str = "cpu",
    round_to: int | str = "auto",
    max_macs: float | None = None,
    prune_stream: bool = False,
    normalize: str = "none",
) -> dict[str, Any]:
    """Read a (sparse-trained) checkpoint, prune it, write the pruned checkpoint ``out``; returns its meta.

    Either ``percent`` (of all prunable channels) or ``max_macs`` (a budget: the fraction of the unpruned MACs to
    keep) sets the global threshold. ``prune_stream`` also prunes a residual network's stream (beyond the paper's
    rules; see :mod:`slimexport.models.preresnet`). With ``ds``, the pruned model's test accuracy before refine
    is recorded.
    """
    if (percent is None) == (max_macs is None):
        raise ConfigError("give either --percent or --max-macs, not both")
    if percent is not None:
        check_percent(percent)
    else:
        check_macs_fraction(max_macs)
    check_normalize(normalize)
    round_to, round_why = resolve_round_to(round_to)
    model, ckpt = load_checkpoint(ckpt_path)
    size = tuple(ckpt["data"].get("image_size") or (32, 32))
    from slimexport.models.external import GraphModel

    if isinstance(model, GraphModel):
        check_prune_stream(model, prune_stream)
        new, record = model.pruned_by_graph(
            percent=percent, min_channels=min_channels, round_to=round_to, max_macs=max_macs, normalize=normalize
        )
    elif percent is not None:
        new, record = prune_model(model, percent, min_channels, round_to, prune_stream, normalize=normalize)
    else:
        new, record = prune_to_macs(model, max_macs, size, min_channels, round_to, prune_stream, normalize)
    record.update(
        {
            "params_before": count_params(model),
            "params_after": count_params(new),
            "macs_before": count_macs(model, model.in_channels, size),
            "macs_after": count_macs(new, new.in_channels, size),
            "source": str(ckpt_path),
            "round_to_reason": round_why,
        }
    )
    if record["floored_layers"]:
        from rich.markup import escape

        from slimexport.console import console

        names = ", ".join(record["floored_layers"])
        console.print(
            "[bold yellow]warning:[/] "
            + escape(
                f"the threshold would have emptied {names}; each keeps its {min_channels} best channel(s), a "
                "bottleneck refine may not recover from (vgg11_w25 at 70% with two one-channel layers stayed at "
                "chance). Lower --percent, raise --min-channels, or compare |γ| per layer with --normalize max."
            )
        )
    meta = {
        "stage": "pruned",
        "parent": ckpt["meta"].get("stage"),
        "prune": record,
        "parent_accuracy": ckpt["meta"].get("accuracy"),
    }
    if ds is not None:
        from slimexport.checkpoint import fit_data
        from slimexport.train import evaluate, resolve_device

        ds = fit_data(ckpt, ckpt_path, ds)
        meta["accuracy"] = evaluate(new, ds, resolve_device(device), shard=False)  # rank 0 alone under torchrun
        new.to("cpu")
    save_checkpoint(make_checkpoint(new, ckpt["data"], meta), out)
    return meta

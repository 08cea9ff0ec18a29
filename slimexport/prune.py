"""The prune stage: a checkpoint in, a physically smaller checkpoint out, by the one graph engine.

Every model, slimexport's own architectures included, is pruned by :mod:`slimexport.graph_prune`: one global
threshold on |γ| over the prunable channel classes, a floor per layer, optional rounding to the CPU's channel
block, β folding, and a plan of kept indices that rebuilds the pruned model from its source.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import PruneConfig
from slimexport.data import Dataset
from slimexport.errors import ConfigError
from slimexport.graph import BN_TYPES
from slimexport.graph_prune import prune_graph
from slimexport.importance import normalize_scores
from slimexport.latency import LatencyProbe
from slimexport.models import GraphModel
from slimexport.records import PruneRecord, undone_line
from slimexport.stats import count_macs, count_params

__all__ = ["PruneConfig", "bn_gammas", "prune", "prune_model", "resolve_round_to"]


def resolve_round_to(round_to: int | str, cfg: PruneConfig | None = None) -> tuple[int, str]:
    """``--round-to``: an integer ≥ 1, or ``auto``: the channel block in whose multiples the target runtime's
    convolutions step, measured there (:func:`slimexport.latency.kernel_step`; ``cfg.runtime``, onnxruntime's
    CPU by default). ncnn's block is read from the CPU's flags (its packing follows the SIMD width). Returns
    (value, why)."""
    if isinstance(round_to, str) and round_to.strip().lower() == "auto":
        runtime = cfg.runtime if cfg is not None else "onnxruntime"
        if runtime != "ncnn":
            from slimexport.latency import kernel_step

            batch = cfg.latency_batch if cfg is not None and runtime == "onnxruntime-cuda" else 1
            return kernel_step(runtime, batch)[:2]
        from slimexport.runtime import machine_facts

        m = machine_facts()
        if m["avx512f"]:
            return 16, "auto: this CPU has AVX-512, ncnn packs its channels in 16s"
        if m["avx2"]:
            return 8, "auto: this CPU has AVX2 without AVX-512, ncnn packs its channels in 8s"
        why = "no AVX2/AVX-512 found" if m["flags_known"] else "CPU flags unknown"
        return 4, f"auto: {why}; ncnn packs its channels in 4s (SSE, NEON)"
    value = PruneConfig(round_to=round_to).validate().round_to  # the one check of --round-to
    return value, "exact channel counts (the paper's)" if value == 1 else f"given: multiples of {value}"


def bn_gammas(model: nn.Module, normalize: str = "none") -> dict[str, torch.Tensor]:
    """|γ| of every BatchNorm with a scale, by module name, in module order (``normalize``: per layer ÷ its max or
    mean, see :func:`~slimexport.importance.normalize_scores`)."""
    return {
        name: normalize_scores(m.weight.detach().abs().float().cpu(), normalize)
        for name, m in model.named_modules()
        if isinstance(m, BN_TYPES) and m.weight is not None
    }


def named_from(record: PruneRecord, prefix: str) -> PruneRecord:
    """The record with every module name as in the model handed in (``prefix`` + the engine's name: ``net.`` for a
    model slimexport built): layers, floored layers, groups, unprunable groups, folded layers. The plan alone keeps
    the names of the network it rebuilds (``GraphModel.net``), as ``PruneConfig.widths`` takes them."""
    for layer in record["layers"]:
        layer["name"] = prefix + layer["name"]
    record["floored_layers"] = [prefix + n for n in record["floored_layers"]]
    for group in (*record.get("groups", []), *record.get("unprunable", [])):
        group["layers"] = [prefix + n for n in group["layers"]]
    record["folded"] = {prefix + n: k for n, k in record.get("folded", {}).items()}
    return record


def prune_model(
    model: nn.Module,
    percent: float | None = None,
    example_input: torch.Tensor | None = None,
    cfg: PruneConfig | None = None,
    **kw: Any,
) -> tuple[nn.Module, PruneRecord]:
    """Prune any CNN by network slimming; ``model`` is not modified. Returns (the smaller model, the record).

    ``percent`` (or ``max_macs=``, ``target_speedup=`` or ``max_latency=``: measured in onnxruntime,
    :mod:`slimexport.latency`, and the other fields of :class:`PruneConfig` as keywords, or ``cfg``) says how
    much. A model slimexport built (``create_model``, a checkpoint) knows its input size; any other
    ``nn.Module`` needs ``example_input`` to be traced: one batch of what its forward takes (a tensor, a tuple of
    tensors for several inputs, or a dict of them by argument name). Every output (a tensor, or the tensors of a
    tuple, list or dict: detection and segmentation heads) keeps its channels.
    """
    if percent is not None:
        kw["percent"] = percent
    if any(k in kw for k in ("max_macs", "target_speedup", "max_latency")) and "percent" not in kw:
        kw["percent"] = None
    cfg = (PruneConfig(**kw) if cfg is None else dataclasses.replace(cfg, **kw)).validate()
    if cfg.round_to == "auto":
        cfg.round_to = resolve_round_to("auto", cfg)[0]
    latency_target = cfg.target_speedup is not None or cfg.max_latency is not None
    if isinstance(model, GraphModel):
        x = model.example_input() if example_input is None else example_input
        probe = LatencyProbe(model.net, x, cfg) if latency_target else None
        net, record = prune_graph(model.net, x, cfg, probe=probe)
        return model.with_plan(record["plan"], net), named_from(record, "net.")
    if example_input is None:
        raise ConfigError(f"pruning a {type(model).__name__} traces it: pass example_input (a batch of inputs)")
    probe = LatencyProbe(model, example_input, cfg) if latency_target else None
    return prune_graph(model, example_input, cfg, probe=probe)


def prune(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: PruneConfig,
    ds: Dataset | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Read a (sparse-trained) checkpoint, prune it by ``cfg``, write the pruned checkpoint ``out``; returns its
    meta. With ``ds``, the pruned model's test accuracy before refine is recorded."""
    cfg = dataclasses.replace(cfg).validate()
    round_to, round_why = resolve_round_to(cfg.round_to, cfg)
    cfg.round_to = round_to
    model, ckpt = load_checkpoint(ckpt_path)
    size = tuple(ckpt["data"].get("image_size") or model.config.get("image_size") or (32, 32))
    # traced (and a --max-macs budget counted) at the data's own image size, not the builder's default
    new, record = prune_model(model, example_input=model.example_input(size), cfg=cfg)
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
    if record.get("undone"):
        from rich.markup import escape

        from slimexport.console import console

        console.print("[bold yellow]warning:[/] " + escape(undone_line(record["undone"])))
    if record["floored_layers"]:
        from rich.markup import escape

        from slimexport.console import console

        names = ", ".join(record["floored_layers"])
        console.print(
            "[bold yellow]warning:[/] "
            + escape(
                f"the threshold would have emptied {names}; each keeps its {cfg.min_channels} best channel(s), a "
                "bottleneck refine may not recover from (vgg11_w25 at 70% with two one-channel layers stayed at "
                "chance). Lower --percent, raise --min-channels or --min-keep (0.25 kept vgg11_w25 at 70% 1.1 pt "
                "higher), or compare |γ| per layer with --normalize max."
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
        from slimexport.loop import evaluate, resolve_device

        ds = fit_data(ckpt, ckpt_path, ds)
        meta["accuracy"] = evaluate(new, ds, resolve_device(device), shard=False)  # rank 0 alone under torchrun
        new.to("cpu")
    save_checkpoint(make_checkpoint(new, ckpt["data"], meta), out)
    return meta

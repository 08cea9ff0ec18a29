"""The engine's self-check: every prune is compared with the original model whose removed channels are zeroed
(:func:`check_pruned`), and :func:`exactness` measures it for any model (the test that catches a wrong grouping)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimexport.graph import ChannelGraph, Inputs, call, random_like


@torch.no_grad()
def zero_removed(model: nn.Module, layers: list[dict[str, Any]], beta: bool) -> nn.Module:
    """An eval copy of ``model`` whose removed BN channels (``layers`` of a record) have γ = 0, and β = 0 with
    ``beta``: the reference the engine's checks compare a pruned model with."""
    zeroed = copy.deepcopy(model).eval()
    mods = dict(zeroed.named_modules())
    for layer in layers:
        bn = mods[layer["name"]]
        gone = sorted(set(range(layer["before"])) - set(layer["kept"]))
        if gone and bn.weight is not None:
            bn.weight[gone] = 0
            if beta:
                bn.bias[gone] = 0
    return zeroed


def raw_removed(g: ChannelGraph, plan: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """--prune-stream: per conv, the input channels it read before any BN that the plan removes."""
    out = {}
    for name, carried in g.raw.items():
        kept = set(plan.get(name, {}).get("inp", range(len(g.uses[name].inp))))
        gone = sorted(p for p in carried if p not in kept)
        if gone:
            out[name] = gone
    return out


@torch.no_grad()
def check_pruned(
    model: nn.Module,
    new: nn.Module,
    layers: list[dict[str, Any]],
    example_input: Inputs,
    raw_removed: dict[str, list[int]] | None = None,
) -> float:
    """The engine's own guarantee, checked on every prune: with γ and β of the removed channels zeroed (they then
    emit exactly 0), the original computes what the pruned model computes (before folding). With --prune-stream a
    removed channel a conv read before any BN is not 0: the reference's conv ignores it too (``raw_removed``). A
    difference is a bug of the engine: it raises rather than hand back a wrong model. Returns the relative error."""
    from torch.utils._pytree import tree_flatten

    zeroed = zero_removed(model, layers, beta=True)
    mods = dict(zeroed.named_modules())
    for name, gone in (raw_removed or {}).items():
        mods[name].weight[:, gone] = 0
    x = random_like(example_input, 2)
    ref, was, why = tree_flatten(call(zeroed, x))[0], new.training, ""
    try:
        out = tree_flatten(call(new.eval(), x))[0]
    except Exception as e:  # noqa: BLE001 - a wrong plan shows as any error in the pruned forward
        out, why = None, f"its forward raised {type(e).__name__}: {str(e).strip()[:120]}"
    finally:
        new.train(was)
    if out is not None and [tuple(a.shape) for a in ref] != [tuple(b.shape) for b in out]:
        why = "its outputs have other shapes"
    err = float("inf") if why else max(
        float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(ref, out)
    )  # fmt: skip
    if not err <= 1e-3:
        why = why or f"it differs from the original with the removed channels zeroed (relative error {err:.2g})"
        raise RuntimeError(
            f"slimexport's own check failed on the pruned {type(model).__name__}: {why}; nothing was written. This "
            "is a bug in the graph engine: please report it with the model"
        )
    return err

"""Exact rewrites of a (pruned) model for the runtime that runs it, as passes over its traced graph; any model.

- :func:`selection_units` finds every *selection unit*: a selecting BatchNorm (:mod:`slimexport.channels`: one
  Gather or Slice in front of it) whose output reaches exactly one conv or linear layer through channel-wise ops
  (activations, pooling, flatten).
- :func:`absorb_selections` absorbs chosen units into zero weights: the BN normalises every input channel (γ = β
  = 0 on the unselected ones, so they are 0) and the consumer gets zero weights for them. The same function with
  no index op and more MACs, which onnxruntime's blocked CPU convolutions can run faster (``--selection dense``,
  ``auto``).
- :func:`for_export` turns a 1×1 conv followed by 2×2 average pooling (DenseNet's transitions, torchvision's
  too) into one 2×2 stride-2 conv: the same function and MACs, without onnxruntime's slow AveragePool kernel.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn import functional as F

from slimexport.channels import SelectingBatchNorm, set_bn_selection
from slimexport.graph import trace
from slimexport.oprules import function_rule, module_rule


def selection_units(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(the selection, its BatchNorm, the one conv or linear layer that reads it) for every selecting BN whose
    output reaches a single such consumer through channel-wise ops, in forward order."""
    if not any(isinstance(m, SelectingBatchNorm) for m in model.modules()):
        return []
    gm = trace(model)
    mods = dict(gm.named_modules())
    units = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], SelectingBatchNorm):
            continue
        bn, cur = mods[node.target], node
        while len(cur.users) == 1:
            cur = next(iter(cur.users))
            m = mods.get(cur.target) if cur.op == "call_module" else None
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == bn.num_features:
                units.append((bn.slim_selection, bn, m))
                break
            if isinstance(m, nn.Linear) and m.in_features == bn.num_features:
                units.append((bn.slim_selection, bn, m))
                break
            rule = module_rule(m) if m is not None else function_rule(cur.op, cur.target)
            flatten = isinstance(m, nn.Flatten) or cur.target in (torch.flatten, "flatten")
            if not (flatten or (rule is not None and rule.kind == "pass")):  # channel by channel, nothing to slice
                break
    return units


@torch.no_grad()
def absorb_selections(model: nn.Module, absorb: list[bool] | None = None) -> nn.Module:
    """A copy of ``model`` with the selection units of :func:`selection_units` (all, or where ``absorb`` says)
    absorbed into zero weights: the same function with no index op for them."""
    n = len(selection_units(model))
    absorb = [True] * n if absorb is None else list(absorb)
    if len(absorb) != n:
        raise ValueError(f"{len(absorb)} absorb flags for {n} selection units")
    new = copy.deepcopy(model)
    for flag, (sel, bn, consumer) in zip(absorb, selection_units(new)):
        if not flag or sel.mode == "identity":
            continue
        idx, width = torch.as_tensor(sel.indices()), sel.num_channels
        for name, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            old = getattr(bn, name)
            if old is None:
                continue
            wide = torch.full((width,), fill, dtype=old.dtype)
            wide[idx] = old
            if isinstance(old, nn.Parameter):
                setattr(bn, name, nn.Parameter(wide, requires_grad=old.requires_grad))
            else:
                setattr(bn, name, wide)
        bn.num_features = width
        set_bn_selection(bn, width, range(width))
        w = consumer.weight
        wide_w = torch.zeros(w.shape[0], width, *w.shape[2:], dtype=w.dtype)
        wide_w[:, idx] = w
        consumer.weight = nn.Parameter(wide_w, requires_grad=w.requires_grad)
        if isinstance(consumer, nn.Conv2d):
            consumer.in_channels = width
        else:
            consumer.in_features = width
    return new


def _is_pool2(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = mods[node.target]
        return (
            isinstance(m, nn.AvgPool2d)
            and m.kernel_size in (2, (2, 2))
            and m.stride in (2, (2, 2))
            and m.padding in (0, (0, 0))
            and not m.ceil_mode
        )
    if node.op == "call_function" and node.target is F.avg_pool2d:
        args = list(node.args[1:]) + [None] * 5
        kernel = node.kwargs.get("kernel_size", args[0])
        stride = node.kwargs.get("stride", args[1])
        padding = node.kwargs.get("padding", args[2] if args[2] is not None else 0)
        ceil = node.kwargs.get("ceil_mode", args[3] if args[3] is not None else False)
        return kernel in (2, (2, 2)) and stride in (None, 2, (2, 2)) and padding in (0, (0, 0)) and not ceil
    return False


def for_export(model: nn.Module) -> nn.Module:
    """``model`` with every 1×1 conv → 2×2 average pooling folded into one 2×2 stride-2 conv (weights ÷ 4); the
    model itself where there is none (or it cannot be traced)."""
    try:
        gm = trace(model)
    except Exception:  # noqa: BLE001 - a model the tracer cannot follow is exported as it is
        return model
    mods = dict(gm.named_modules())
    changed = 0
    for node in list(gm.graph.nodes):
        m = mods.get(node.target) if node.op == "call_module" else None
        if not (
            isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.stride == (1, 1)
            and m.padding in (0, (0, 0))
            and m.groups == 1
            and len(node.users) == 1
            and _is_pool2(next(iter(node.users)), mods)
        ):
            continue
        pool = next(iter(node.users))
        folded = nn.Conv2d(m.in_channels, m.out_channels, 2, stride=2, bias=m.bias is not None)
        with torch.no_grad():
            folded.weight.copy_(m.weight.expand(-1, -1, 2, 2) / 4)
            if m.bias is not None:
                folded.bias.copy_(m.bias)
        name = f"pool_folded_{changed}"
        gm.add_submodule(name, folded.to(m.weight))
        node.target = name
        pool.replace_all_uses_with(node)
        gm.graph.erase_node(pool)
        changed += 1
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    for attr in ("arch", "num_classes", "in_channels", "config"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


__all__ = ["absorb_selections", "for_export", "selection_units"]

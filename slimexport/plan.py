"""The pruning plan, plain data: per module the kept input and output channel indices (for a selecting BN also
the channels it keeps, whose static selection :func:`apply_plan` rebuilds). :func:`make_plan` makes it from the
removed channel classes, :func:`apply_plan` applies it to a freshly built network (the one rebuild path: a pruned
model is its original plus this plan; no module is pickled), :func:`compose_plans` chains two."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimexport.channels import set_bn_selection
from slimexport.errors import ConfigError
from slimexport.graph import ChannelGraph
from slimexport.oprules import module_rule, weight_norm_of

PRODUCERS = ("conv", "convT", "grouped", "linear")  # the modules that make the channels they write
SPLIT = "split:"  # a plan entry for the FX node of a split whose sizes are written into forward (not a module)


def make_plan(g: ChannelGraph, removed: set[int]) -> dict[str, dict[str, Any]]:
    """Per module that loses channels: its kind and the kept indices of its input and output channel axes. A
    selecting BN's entry has ``select: True``; its ``out`` are the BN channels it keeps."""
    plan: dict[str, dict[str, Any]] = {}
    for use in g.uses.values():
        entry: dict[str, Any] = {"kind": use.kind} | ({"select": True} if use.select is not None else {})
        for side in ("inp", "out"):
            atoms = getattr(use, side)
            if atoms is None or (side == "out" and use.kind not in PRODUCERS and use.select is None):
                continue
            cls = g.classes(atoms)
            keep = [i for i, c in enumerate(cls.tolist()) if c not in removed]
            if len(keep) < len(cls):
                entry[side] = keep
        if "inp" in entry or "out" in entry:
            plan[use.name] = entry
    for node, pieces in g.splits.items():  # a split with its sizes written into forward gets its new sizes
        sizes = [sum(1 for c in g.classes(p).tolist() if c not in removed) for p in pieces]
        if sizes != [len(p) for p in pieces]:
            plan[SPLIT + node] = {"kind": "split", "sizes": sizes}
    return plan


def _param(t: torch.Tensor, ref: nn.Parameter | None) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=ref.requires_grad if ref is not None else True)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Shrink ``model``'s modules in place by ``plan`` (from :func:`make_plan` or a checkpoint); returns it, or where
    the plan gives a split new sizes, the model's traced graph with them written in (its modules are the model's)."""
    modules = dict(model.named_modules())
    splits = {name[len(SPLIT) :]: p["sizes"] for name, p in plan.items() if name.startswith(SPLIT)}
    for name, p in plan.items():
        if name.startswith(SPLIT):
            continue
        if name not in modules:
            raise ConfigError(f"the pruning plan names a module {name!r} this model does not have")
        m, kind = modules[name], p["kind"]
        inp = torch.as_tensor(p["inp"], dtype=torch.long) if "inp" in p else None
        out = torch.as_tensor(p["out"], dtype=torch.long) if "out" in p else None
        if p.get("bias") and getattr(m, "bias", 1) is None:  # folding gave it a bias (zero until weights load)
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))
        if kind in ("conv", "linear"):  # weight (out, in, ...): the same slicing, other attribute names
            out_attr, in_attr = ("out_channels", "in_channels") if kind == "conv" else ("out_features", "in_features")
            if out is not None:
                setattr(m, out_attr, len(out))
                if m.bias is not None:
                    m.bias = _param(m.bias[out], m.bias)
            if inp is not None:
                setattr(m, in_attr, len(inp))
            slice_weight(m, out, inp)
        elif kind == "convT":
            w = m.weight  # (in, out, k...)
            if inp is not None:
                w = w[inp]
                m.in_channels = len(inp)
            if out is not None:
                w = w[:, out]
                m.out_channels = len(out)
                if m.bias is not None:
                    m.bias = _param(m.bias[out], m.bias)
            m.weight = _param(w, m.weight)
        elif kind == "grouped":  # whole groups: the group width stays, the number of groups falls
            cout = m.out_channels // m.groups
            w = m.weight
            if out is not None:
                w = w[out]
                m.out_channels = len(out)
                if m.bias is not None:
                    m.bias = _param(m.bias[out], m.bias)
            if inp is not None:
                m.in_channels = len(inp)
            m.groups = m.out_channels // cout
            m.weight = _param(w, m.weight)
        elif kind == "depthwise":
            m.weight = _param(m.weight[inp], m.weight)
            if m.bias is not None:
                m.bias = _param(m.bias[inp], m.bias)
            m.in_channels = m.out_channels = m.groups = len(inp)
        elif kind == "bn" and p.get("select"):
            _select(name, m, p.get("inp"), p.get("out"))
        elif kind == "bn":
            _slice_bn(m, inp)
        elif kind in ("channelwise", "prelu"):  # (version-1 plans name PReLU's kind)
            rule = module_rule(m)
            if rule is None or rule.prune is None:
                raise ConfigError(
                    f"the pruning plan slices {name} ({type(m).__name__}) by a rule registered for it; register it "
                    "again before loading (slimexport.register_module_rule, in the model's own file)"
                )
            rule.prune(m, inp)
        else:
            raise ConfigError(f"unknown module kind {kind!r} in the pruning plan")
    return _with_split_sizes(model, splits) if splits else model


def _with_split_sizes(model: nn.Module, splits: dict[str, list[int]]) -> nn.Module:
    """``model``'s own eval forward, traced, with each named split's sizes replaced: the network a plan with split
    sizes rebuilds. Only the plan's numbers go in; the code is torch.fx's, from the model built here."""
    from slimexport.trace import trace

    was = model.training
    gm = trace(model.eval(), allow_opaque=False)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, sizes in splits.items():
        node = nodes.get(name)
        if node is None or node.op not in ("call_function", "call_method"):
            raise ConfigError(
                f"the pruning plan gives new sizes to a split {name!r} this model's forward does not have"
            )
        if "split_size_or_sections" in node.kwargs:
            node.update_kwarg("split_size_or_sections", list(sizes))
        else:
            node.update_arg(1, list(sizes))
    gm.recompile()
    return gm.train(was)


@torch.no_grad()
def slice_weight(m: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> None:
    """A conv's or linear layer's weight (out, in, ...) cut to the kept output and input channels. Under weight norm
    (w = g·v/‖v‖ per output channel) its g and v are cut instead, g scaled by ‖v kept‖/‖v‖, so that every kept
    weight is what it was (an output channel whose kept inputs are all zero gets g = 0)."""
    wn = weight_norm_of(m)
    if wn is None:
        w = m.weight
        w = w[out] if out is not None else w
        m.weight = _param(w[:, inp] if inp is not None else w, m.weight)
        return
    holder, (g_name, v_name) = (
        (wn[1], ("original0", "original1")) if wn[0] == "param" else (m, ("weight_g", "weight_v"))
    )
    g, v = getattr(holder, g_name), getattr(holder, v_name)
    g2, v2 = (g[out], v[out]) if out is not None else (g, v)
    if inp is not None:
        dims = tuple(range(1, v2.dim()))
        full, v2 = torch.linalg.vector_norm(v2, dim=dims, keepdim=True), v2[:, inp]
        kept = torch.linalg.vector_norm(v2, dim=dims, keepdim=True)
        g2 = torch.where(kept > 0, g2 * kept / full.clamp_min(1e-30), torch.zeros_like(g2))
        v2 = torch.where(kept > 0, v2, torch.ones_like(v2))
    setattr(holder, g_name, _param(g2, g))
    setattr(holder, v_name, _param(v2, v))
    if wn[0] == "hook":  # the older API recomputes the weight before each forward; have it right now too
        m.weight = wn[1].compute_weight(m)


def _slice_bn(m: nn.Module, keep: torch.Tensor) -> None:
    if m.weight is not None:
        m.weight = _param(m.weight[keep], m.weight)
        m.bias = _param(m.bias[keep], m.bias)
    if m.running_mean is not None:
        m.running_mean = m.running_mean[keep].clone()
        m.running_var = m.running_var[keep].clone()
    m.num_features = len(keep)


def _select(name: str, m: nn.Module, inp: list[int] | None, out: list[int] | None) -> None:
    """A selecting BN keeps its channels ``out``, read from the input channels ``inp`` keeps. On a BN that
    already selects (pruning a pruned model) both are relative to the current widths and the selections compose."""
    earlier = getattr(m, "slim_selection", None)
    width = earlier.num_channels if earlier is not None else m.num_features
    current = earlier.indices() if earlier is not None else list(range(m.num_features))
    new_inp = list(range(width)) if inp is None else list(inp)
    keep = list(range(m.num_features)) if out is None else list(out)
    where = {c: i for i, c in enumerate(new_inp)}
    try:
        index = [where[current[k]] for k in keep]
    except (KeyError, IndexError):
        raise ConfigError(f"the pruning plan keeps a channel of {name} whose input it removes") from None
    if out is not None:
        _slice_bn(m, torch.as_tensor(keep, dtype=torch.long))
    set_bn_selection(m, len(new_inp), index)


def compose_plans(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The plan that applies ``first`` and then ``second`` (whose indices are relative to ``first``'s result),
    relative to the original model."""
    out = copy.deepcopy(first)
    for name, p in second.items():
        if name.startswith(SPLIT):  # sizes, not indices: the later prune's are the ones that hold
            out[name] = copy.deepcopy(p)
            continue
        e = out.setdefault(name, {"kind": p["kind"]})
        if p.get("select"):  # a selecting BN: the sides compose as any module's; apply_plan rebuilds the index
            e["select"] = True
        if p.get("bias"):  # folding gave a conv or linear layer a bias
            e["bias"] = True
        for side in ("inp", "out"):
            if side in p:
                e[side] = [e[side][i] for i in p[side]] if side in e else list(p[side])
    return out

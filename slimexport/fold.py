"""β folding, a pass over the plan: what a removed channel still sends on (act(β) of its BN, or with
``--prune-stream`` the running mean a conv read before any BN) is carried into the bias or BN running mean of the
layers that read it (:func:`fold_dropped`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import fx, nn

from slimexport.graph import BN_TYPES, ChannelGraph, Inputs, call, random_like
from slimexport.oprules import function_rule, module_rule, structural
from slimexport.selfcheck import zero_removed


@torch.no_grad()
def fold_dropped(
    model: nn.Module,
    new: nn.Module,
    g: ChannelGraph,
    plan: dict[str, dict[str, Any]],
    layers: list[dict[str, Any]],
    example_input: Inputs,
) -> dict[str, Any]:
    """β folding, in place on ``new`` (and ``plan``): what a removed channel still sent on goes into what read it.

    A removed channel's BN has a small γ, so its output is nearly the constant β, and act(β) after the activation;
    pruning without folding loses that signal. This pass finds the constants by running the original with only
    the removed channels' γ set to 0 (β left) on a random input: every removed input channel of a conv or linear
    layer that is constant there, whatever ops it came through (activations, pooling, residual adds, concatenation,
    depthwise convs), is folded into the layer's output as ``W·c``: into its bias where it has one, else carried on
    (:func:`_carry_shift`) through adds, concatenation, pooling and bias-free convs into the running mean of every
    BN it reaches, so no parameter is added; only where it meets a nonlinearity first does the layer get a bias
    (``bias`` in the plan). With ``prune_stream`` a channel read before any BN is not constant; the running mean
    of a BN reading the same tensor stands in for it. Exact where the reader is a 1×1 conv or a linear layer; a
    zero-padded k×k conv differs at the border. Returns {layer: channels folded}."""
    zeroed = zero_removed(model, layers, beta=False)
    mods = dict(zeroed.named_modules())
    readers = [u for u in g.uses.values() if u.kind in ("conv", "linear") and "inp" in plan.get(u.name, {})]
    gone_of = {u.name: sorted(set(range(len(u.inp))) - set(plan[u.name]["inp"])) for u in readers}
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)  # per reader, its removed input channels, per call

    def keep_removed(m: nn.Module, args: tuple, name: str) -> None:
        seen[name].append(args[0].detach()[:, gone_of[name]].float().flatten(2) if args[0].dim() > 2 else
                          args[0].detach()[:, gone_of[name]].float().unsqueeze(2))  # fmt: skip

    hooks = [mods[u.name].register_forward_pre_hook(lambda m, a, n=u.name: keep_removed(m, a, n)) for u in readers]
    try:
        call(zeroed, random_like(example_input, 1))
    finally:
        for h in hooks:
            h.remove()
    orig, out_mods = dict(model.named_modules()), dict(new.named_modules())
    nodes = {n.name: n for n in g.graph.nodes}
    kept_of = {layer["name"]: layer["kept"] for layer in layers}
    folded: dict[str, int] = {}
    for u in readers:
        gone, const, done = gone_of[u.name], torch.zeros(len(u.inp)), []
        if not seen[u.name]:
            continue
        vals = torch.cat([t.transpose(0, 1).flatten(1) for t in seen[u.name]], 1)  # (removed channels, values)
        c = vals.mean(1)
        constant = (vals - c[:, None]).abs().amax(1) <= 1e-5 * (1 + c.abs())
        for i, p in enumerate(gone):
            if constant[i]:
                const[p] = c[i]
                done.append(p)
            elif p in g.raw.get(u.name, {}):  # --prune-stream: read before any BN; its BN's running mean
                bn_name, k = g.raw[u.name][p]
                const[p] = float(orig[bn_name].running_mean[k])
                done.append(p)
        if not done or not bool(const.any()):
            continue
        w = orig[u.name].weight.detach().float()
        shift = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ const
        m = out_mods[u.name]
        if m.bias is not None:
            m.bias += shift[_kept(plan, u.name, "out", len(shift))].to(m.bias)
        else:
            mask = torch.zeros(len(shift), dtype=torch.bool)
            mask[_kept(plan, u.name, "out", len(shift))] = True
            shift = shift * mask  # what a removed output channel would carry is folded where it is read
            actions = _carry_shift(g, orig, nodes[u.node], shift)
            if actions is None:  # it reaches something that is not linear in it: the layer gets a bias
                m.bias = nn.Parameter(shift[_kept(plan, u.name, "out", len(shift))].to(m.weight).clone())
                plan[u.name]["bias"] = True
            for kind, name, vec in actions or []:
                if kind == "bn":
                    mean = out_mods[name].running_mean
                    mean -= vec[torch.as_tensor(kept_of[name])].to(mean)
                else:
                    out_mods[name].bias += vec[_kept(plan, name, "out", len(vec))].to(out_mods[name].bias)
        folded[u.name] = len(done)
    return folded


def _kept(plan: dict[str, dict[str, Any]], name: str, side: str, width: int) -> torch.Tensor:
    return torch.as_tensor(plan.get(name, {}).get(side, range(width)), dtype=torch.long)


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _carry_shift(
    g: ChannelGraph, mods: dict[str, nn.Module], start: fx.Node, shift: torch.Tensor
) -> list[tuple[str, str, torch.Tensor]] | None:
    """Where a per-channel constant ``shift`` added to the tensor ``start`` goes, if only through ops linear in it
    (adds, concatenation, pooling, flatten, convs and linear layers) until BatchNorms absorb it into their running
    mean or layers with a bias into that bias: [("bn" | "bias", module, vector in its original coordinates)], or
    None where it reaches anything else (an activation, a product, the output)."""
    actions: list[tuple[str, str, torch.Tensor]] = []
    stack, steps = [(start, shift)], 0
    while stack:
        node, vec = stack.pop()
        steps += 1
        if steps > 4 * len(g.uses) + 64:
            return None
        for user in node.users:
            t = user.target
            if structural(user.op, t) == "size":
                continue
            if user.op == "call_module":
                m, use = mods[t], g.uses.get(t)
                if user.args[0] is not node or (use is not None and use.node != user.name):
                    return None  # reads the shift other than as its input, or is called more than once
                if isinstance(m, BN_TYPES):
                    if m.running_mean is None or use is None:
                        return None
                    actions.append(("bn", t, vec if use.select is None else vec[torch.as_tensor(use.select)]))
                    continue
                rule = module_rule(m)
                if rule is not None and rule.shifts:
                    stack.append((user, vec))
                    continue
                if use is not None and use.kind in ("conv", "depthwise", "linear"):
                    w = m.weight.detach().float()
                    out = w.flatten(1).sum(1) * vec if use.kind == "depthwise" else w.flatten(2).sum(2) @ vec if (
                        w.dim() > 2) else w @ vec  # fmt: skip
                    if m.bias is not None:
                        actions.append(("bias", t, out))
                    else:
                        stack.append((user, out))
                    continue
                return None
            if user.op not in ("call_function", "call_method"):
                return None
            kind = structural(user.op, t)
            if kind in ("add", "sub"):
                sign = -1.0 if kind == "sub" and user.args[0] is not node else 1.0
                if sum(a is node for a in user.args) != 1 or _channels(user) != len(vec):
                    return None
                stack.append((user, sign * vec))
            elif (rule := function_rule(user.op, t)) is not None and rule.shifts:
                if _channels(user) != len(vec):
                    return None
                stack.append((user, vec))
            elif kind == "cat":
                parts = user.args[0]
                dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
                if dim not in (1, -3) or sum(a is node for a in parts) != 1:
                    return None
                offset = sum(_channels(a) or 0 for a in parts[: list(parts).index(node)])
                wide = torch.zeros(_channels(user) or 0)
                wide[offset : offset + len(vec)] = vec
                stack.append((user, wide))
            elif kind in ("flatten", "reshape"):
                width = _channels(user)
                if width is None or width % len(vec) or len(user.meta["tensor_meta"].shape) != 2:
                    return None
                stack.append((user, vec.repeat_interleave(width // len(vec))))
            else:
                return None
    return actions

"""Network slimming for any traced CNN: importance, one global threshold, and a physically smaller copy.

Three steps, three functions:

- :func:`class_scores`: a channel class's importance is the **largest** |γ| among the BatchNorms that normalise
  it. A class normalised by several BNs (a residual stream: every block's last BN and the shortcut's; DenseNet's
  concatenated map: every later layer's first BN) is removed only when *every* one of them rates it low, because
  removing a channel that one BN still scales up would change that path's output; the mean or sum would let one
  large γ hide among small ones. A class no BN normalises has no score and is kept.
- :func:`importance`: a selecting BN's channels (:mod:`slimexport.graph`) are classes of their own, scored by
  its γ alone; the input class they read is removed only when every one of them is (and nothing else needs it),
  so its *effective* score is the largest of theirs. Each BN then keeps exactly what its own γ says, as the
  hand-written pre-activation ResNet and DenseNet rules do.
- :func:`choose`: one global threshold over all scored, prunable classes (by percent, like the hand-written
  rules: the value at index ⌊n·percent⌋ of the sorted scores; classes strictly above it survive), then per
  producing layer (a conv or linear) and selecting BN a floor of ``min_channels``, and per producing layer a
  multiple of ``round_to``.
- :func:`make_plan` / :func:`apply_plan`: the plan is plain data (per module, the kept input and output channel
  indices; for a selecting BN also the channels it keeps, whose static selection ``apply_plan`` rebuilds), so
  a pruned model is rebuilt by constructing the original and re-applying the plan; no module is ever pickled.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimexport.errors import ConfigError
from slimexport.graph import BN_TYPES, ChannelGraph, trace_channels
from slimexport.importance import check_normalize, normalize_scores
from slimexport.models.common import set_bn_selection
from slimexport.records import PruneRecord

PRODUCERS = ("conv", "convT", "linear")


def class_scores(model: nn.Module, g: ChannelGraph, normalize: str = "none") -> dict[int, float]:
    """Class root → max |γ| over the BN channels in it (only BNs with an affine scale count); with ``normalize``
    each BN's |γ| is first divided by that BN's max or mean (:func:`slimexport.importance.normalize_scores`)."""
    modules = dict(model.named_modules())
    scores: dict[int, float] = {}
    for use in g.uses.values():
        if use.kind != "bn":
            continue
        bn = modules[use.name]
        if bn.weight is None:
            continue
        gam = normalize_scores(bn.weight.detach().abs().float().cpu(), normalize).numpy()
        for cls, v in zip(g.classes(use.out).tolist(), gam.tolist()):
            if v > scores.get(cls, -1.0):
                scores[cls] = v
    return scores


@dataclass
class Importance:
    """What :func:`choose` needs: per class its own score, its dependents (the selecting BNs' channels that read
    it), its effective score (the largest γ that still needs it) and whether it may go at all."""

    scores: dict[int, float]
    deps: dict[int, set[int]]
    eff: dict[int, float]
    ok: set[int]  # not frozen, scored or read only through selecting BNs, and every dependent may go too

    @property
    def prunable(self) -> dict[int, float]:
        """The scored classes that may go: the values the global threshold is taken over."""
        return {c: s for c, s in self.scores.items() if c in self.ok}


def importance(model: nn.Module, g: ChannelGraph, normalize: str = "none") -> Importance:
    scores = class_scores(model, g, normalize)
    deps: dict[int, set[int]] = defaultdict(set)
    for use in g.uses.values():
        if use.kind == "bn" and use.select is not None:
            for a, b in zip(g.classes(use.reads()).tolist(), g.classes(use.out).tolist()):
                if a != b:
                    deps[a].add(b)
    eff: dict[int, float] = {}
    ok: set[int] = set()

    def visit(c: int) -> None:  # dependents first; a class on a cycle counts as it stands when met again
        if c in eff:
            return
        eff[c] = scores.get(c, float("-inf"))
        fine = not g.frozen.get(c) and (c in scores or bool(deps.get(c)))
        if fine:
            ok.add(c)
        for d in deps.get(c, ()):
            visit(d)
            eff[c] = max(eff[c], eff[d])
            fine = fine and d in ok
        if not fine:
            ok.discard(c)

    for c in list(scores) + list(deps):
        visit(c)
    return Importance(scores, dict(deps), eff, ok)


def threshold_at(values: list[float], percent: float) -> float:
    if not 0.0 <= percent < 1.0:
        raise ConfigError(f"--percent must be in [0, 1), got {percent}")
    if percent == 0.0 or not values:
        return float("-inf")
    allv = sorted(values)
    return float(allv[int(len(allv) * percent)])


def choose(
    g: ChannelGraph, imp: Importance, threshold: float, min_channels: int = 1, round_to: int = 1
) -> tuple[set[int], list[str]]:
    """The classes to remove, and the layers whose floor kicked in. A class goes only with all its dependents."""
    if min_channels < 1:
        raise ConfigError(f"--min-channels must be at least 1, got {min_channels}")
    if round_to < 1:
        raise ConfigError(f"--round-to must be at least 1, got {round_to}")
    removed = {c for c in imp.ok if imp.eff[c] <= threshold}
    producers = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind in PRODUCERS]
    selecting = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind == "bn" and u.select is not None]
    floored: list[str] = []

    def restore(lst: list[int], target: int) -> bool:
        """Put back the best removed classes of one layer until it keeps ``target`` channels."""
        kept = sum(1 for c in lst if c not in removed)
        changed = False
        for c in sorted({c for c in lst if c in removed}, key=lambda c: -imp.eff[c]):
            if kept >= target:
                break
            removed.discard(c)
            kept += lst.count(c)
            changed = True
        return changed

    changed = True
    while changed:  # restoring a class widens every layer it spans, and its inputs: repeat until nothing moves
        changed = False
        for name, cls in producers + selecting:  # never empty a layer: keep its min_channels best
            lst = cls.tolist()
            if restore(lst, min(min_channels, len(lst))):
                changed = True
                if name not in floored:
                    floored.append(name)
        if round_to > 1:
            for _, cls in producers:
                lst = cls.tolist()
                kept = sum(1 for c in lst if c not in removed)
                changed |= restore(lst, min(len(lst), math.ceil(kept / round_to) * round_to))
        for c in list(removed):  # a channel some selecting BN still reads stays
            if any(d not in removed for d in imp.deps.get(c, ())):
                removed.discard(c)
                changed = True
    return removed, floored


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
    return plan


def _param(t: torch.Tensor, ref: nn.Parameter | None) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=ref.requires_grad if ref is not None else True)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Shrink ``model``'s modules in place by ``plan`` (from :func:`make_plan` or a checkpoint); returns it."""
    modules = dict(model.named_modules())
    for name, p in plan.items():
        if name not in modules:
            raise ConfigError(f"the pruning plan names a module {name!r} this model does not have")
        m, kind = modules[name], p["kind"]
        inp = torch.as_tensor(p["inp"], dtype=torch.long) if "inp" in p else None
        out = torch.as_tensor(p["out"], dtype=torch.long) if "out" in p else None
        if kind in ("conv", "linear"):  # weight (out, in, ...): the same slicing, other attribute names
            out_attr, in_attr = ("out_channels", "in_channels") if kind == "conv" else ("out_features", "in_features")
            w = m.weight
            if out is not None:
                w = w[out]
                setattr(m, out_attr, len(out))
                if m.bias is not None:
                    m.bias = _param(m.bias[out], m.bias)
            if inp is not None:
                w = w[:, inp]
                setattr(m, in_attr, len(inp))
            m.weight = _param(w, m.weight)
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
        elif kind == "depthwise":
            m.weight = _param(m.weight[inp], m.weight)
            if m.bias is not None:
                m.bias = _param(m.bias[inp], m.bias)
            m.in_channels = m.out_channels = m.groups = len(inp)
        elif kind == "bn" and p.get("select"):
            _select(name, m, p.get("inp"), p.get("out"))
        elif kind == "bn":
            _slice_bn(m, inp)
        elif kind == "prelu":
            m.weight = _param(m.weight[inp], m.weight)
            m.num_parameters = len(inp)
        else:
            raise ConfigError(f"unknown module kind {kind!r} in the pruning plan")
    return model


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


def describe(model: nn.Module, g: ChannelGraph, imp: Importance, removed: set[int]) -> dict[str, Any]:
    """Groups (classes that span the same layers), the unprunable ones with their reasons, and per BN its kept
    channels."""
    members: dict[int, set[str]] = defaultdict(set)
    for use in g.uses.values():
        for side in ("inp", "out"):
            atoms = getattr(use, side)
            if atoms is not None and (side == "inp" or use.kind in PRODUCERS or use.select is not None):
                for c in set(g.classes(atoms).tolist()):
                    members[c].add(use.name)
    groups: dict[frozenset, dict[str, Any]] = {}
    for c, names in members.items():
        key = frozenset(names)
        grp = groups.setdefault(key, {"layers": sorted(names), "channels": 0, "removed": 0, "reasons": []})
        grp["channels"] += 1
        grp["removed"] += int(c in removed)
        if g.frozen.get(c):
            reasons = g.frozen[c]
        elif c in imp.ok:
            reasons = []
        elif c in imp.scores or imp.deps.get(c):
            reasons = ["read by a BatchNorm whose channels cannot go"]
        else:
            reasons = ["no BatchNorm normalises these channels"]
        for r in reasons:
            if r not in grp["reasons"]:
                grp["reasons"].append(r)
    out = list(groups.values())
    for i, grp in enumerate(out):
        grp["id"] = i
        grp["prunable"] = not grp["reasons"]
    layers = []
    for use in g.uses.values():
        if use.kind == "bn":
            cls = g.classes(use.out).tolist()
            kept = [i for i, c in enumerate(cls) if c not in removed]
            layers.append({"name": use.name, "before": len(cls), "after": len(kept), "kept": kept})
    return {"groups": out, "layers": layers}


def prune_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    percent: float | None = 0.5,
    min_channels: int = 1,
    round_to: int = 1,
    max_macs: float | None = None,
    normalize: str = "none",
) -> tuple[nn.Module, PruneRecord]:
    """Prune any CNN by network slimming; returns (a physically smaller copy, the record). ``model`` is unchanged.

    Either ``percent`` (of the prunable channel classes) or ``max_macs`` (the fraction of the unpruned MACs to
    keep) sets the single global threshold, over |γ| as they are or, with ``normalize``, each BN's divided by its
    max or mean. A model with no BatchNorm is a :class:`ConfigError`.
    """
    if (percent is None) == (max_macs is None):
        raise ConfigError("give either percent or max_macs, not both")
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} has no BatchNorm layer: network slimming scores channels by BN's γ")
    check_normalize(normalize)
    g = trace_channels(model, example_input)
    imp = importance(model, g, normalize)
    prunable = imp.prunable
    if not prunable:
        raise ConfigError(f"no channel of {type(model).__name__} can be pruned: {_why_none(g, imp.scores)}")
    values = list(prunable.values())

    def at(threshold: float) -> tuple[nn.Module, set[int], list[str], dict[str, Any]]:
        removed, floored = choose(g, imp, threshold, min_channels, round_to)
        plan = make_plan(g, removed)
        new = apply_plan(copy.deepcopy(model), plan)
        return new, removed, floored, plan

    extra: dict[str, Any] = {}
    if max_macs is not None:
        from slimexport.stats import count_macs_on

        if not (0.0 < max_macs <= 1.0):
            raise ConfigError(f"--max-macs must be in (0, 1], got {max_macs}")
        full = count_macs_on(model, example_input[:1])
        budget = max_macs * full
        allv = sorted(values)
        lo, hi = 0, len(allv)
        best = at(allv[-1])
        if count_macs_on(best[0], example_input[:1]) > budget:
            raise ConfigError(f"--max-macs {max_macs:g} cannot be reached: the floors keep more MACs than that")
        threshold = allv[-1]
        while lo < hi:  # the smallest number of removed classes whose MACs fit the budget
            mid = (lo + hi) // 2
            thr = float("-inf") if mid == 0 else allv[mid - 1]
            cand = at(thr)
            if count_macs_on(cand[0], example_input[:1]) <= budget:
                hi, best, threshold = mid, cand, thr
            else:
                lo = mid + 1
        percent = hi / len(allv)
        extra = {"max_macs": max_macs}
    else:
        threshold = threshold_at(values, percent)
        best = at(threshold)
    new, removed, floored, plan = best
    info = describe(model, g, imp, removed)
    total = sum(x["before"] for x in info["layers"])
    kept = sum(x["after"] for x in info["layers"])
    record: PruneRecord = {
        "engine": "graph",
        "percent": percent,
        "threshold": threshold if math.isfinite(threshold) else None,
        "min_channels": min_channels,
        "round_to": round_to,
        "normalize": normalize,
        "channels_before": total,
        "channels_after": kept,
        "pruned_fraction": 1 - kept / total if total else 0.0,
        "floored_layers": floored,
        "layers": info["layers"],
        "groups": info["groups"],
        "unprunable": [
            {"id": x["id"], "layers": x["layers"], "channels": x["channels"], "reasons": x["reasons"]}
            for x in info["groups"]
            if not x["prunable"]
        ],
        "classes": {
            "total": len(set(g.classes(np.arange(len(g.parent))).tolist())),
            "prunable": len(prunable),
            "removed": len(removed),
        },  # fmt: skip
        "trace_seconds": g.trace_seconds,
        "plan": plan,
    } | extra
    return new, record


def _why_none(g: ChannelGraph, scores: dict[int, float]) -> str:
    reasons: dict[str, int] = defaultdict(int)
    for c in scores:
        for r in g.frozen.get(c, []):
            reasons[r] += 1
    if not reasons:
        return "no BatchNorm normalises a conv or linear output"
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:2]
    return "; ".join(r for r, _ in top)


@torch.no_grad()
def exactness(model: nn.Module, example_input: torch.Tensor, percent: float = 0.5, **kw) -> dict[str, Any]:
    """The grouping check that needs no knowledge of the groups: zero γ and β of the BN channels the engine
    removes (those channels then emit exactly 0), prune that zeroed model again at the same setting (the zeroed
    channels now score lowest, so the same ones go), and compare its output with the zeroed original's. A wrong
    grouping shows up as a difference or a shape error. Returns {relative_error, same_channels, record}."""
    _, rec = prune_graph(model, example_input, percent, **kw)
    zeroed = copy.deepcopy(model).eval()
    modules = dict(zeroed.named_modules())
    for layer in rec["layers"]:
        bn = modules[layer["name"]]
        gone = sorted(set(range(layer["before"])) - set(layer["kept"]))
        if gone and bn.weight is not None:
            bn.weight[gone] = 0
            bn.bias[gone] = 0
    again, rec2 = prune_graph(zeroed, example_input, percent, **kw)
    ref, out = zeroed(example_input), again.eval()(example_input)
    if out.shape != ref.shape:
        return {"relative_error": float("inf"), "same_channels": False, "record": rec}
    rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    same = [x["kept"] for x in rec2["layers"]] == [x["kept"] for x in rec["layers"]]
    return {"relative_error": rel, "same_channels": same, "record": rec}

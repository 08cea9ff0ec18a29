"""Network slimming for any traced CNN: importance, one global threshold, a physically smaller copy, and the
passes over its plan. Every model slimexport prunes goes through here, its own architectures included.

- :func:`class_scores`: a channel class's importance is the **largest** |γ| among the BatchNorms that normalise
  it. A class normalised by several BNs (a residual stream: every block's last BN and the shortcut's; DenseNet's
  concatenated map: every later layer's first BN) is removed only when *every* one of them rates it low, because
  removing a channel that one BN still scales up would change that path's output; the mean or sum would let one
  large γ hide among small ones. A class no BN normalises has no score and is kept.
- :func:`importance`: a selecting BN's channels (:mod:`slimexport.graph`) are classes of their own, scored by
  its γ alone; the input class they read is removed only when every one of them is (and nothing else needs it),
  so its *effective* score is the largest of theirs. Each BN then keeps exactly what its own γ says.
- :func:`threshold_at` / :func:`choose`: one global threshold, the paper's: the score at position ⌊W·percent⌋ of
  the W prunable BN channels sorted (a class spanning k BNs counts k times); classes strictly above it survive.
  Then per producing layer (conv, grouped conv, linear) and selecting BN a floor of ``min_channels``, and per
  producing layer a multiple of ``round_to``. ``max_macs`` bisects for the lowest threshold within a budget.
- :func:`make_plan` / :func:`apply_plan`: the plan is plain data (per module, the kept input and output channel
  indices; for a selecting BN also the channels it keeps, whose static selection ``apply_plan`` rebuilds), so
  a pruned model is rebuilt by constructing the original and re-applying the plan; no module is ever pickled.
- :func:`check_pruned`: every prune checks itself against the original with the removed channels zeroed.
- :func:`fold_dropped`: β folding (and ``--prune-stream``'s carried means), a pass over the plan.
- :class:`PruneConfig`: what a prune is asked to do, validated in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimexport.channels import set_bn_selection
from slimexport.config import PruneConfig
from slimexport.errors import ConfigError
from slimexport.graph import BN_TYPES, ChannelGraph, Inputs, call, first_sample, random_like, trace_channels
from slimexport.importance import normalize_scores
from slimexport.oprules import function_rule, module_rule
from slimexport.records import PruneRecord

PRODUCERS = ("conv", "convT", "grouped", "linear")


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


def class_weights(model: nn.Module, g: ChannelGraph) -> dict[int, int]:
    """Class root → how many BN channels (γ values) it spans: a residual stream shared by 16 BNs weighs 16, so
    ``--percent`` counts BN channels, as the paper's threshold does, not channel classes."""
    modules = dict(model.named_modules())
    weights: dict[int, int] = defaultdict(int)
    for use in g.uses.values():
        if use.kind == "bn" and modules[use.name].weight is not None:
            for cls in g.classes(use.out).tolist():
                weights[cls] += 1
    return dict(weights)


def threshold_at(prunable: dict[int, float], weights: dict[int, int], percent: float) -> float:
    """The paper's threshold: the |γ| at position ⌊W·percent⌋ of all W prunable BN channels' scores sorted (a class
    spanning k BNs counts k times); channels strictly above it survive. -inf at 0%."""
    if percent == 0 or not prunable:
        return float("-inf")
    order = sorted(prunable, key=prunable.get)
    cum = np.cumsum([max(1, weights.get(c, 1)) for c in order])
    return float(prunable[order[int(np.searchsorted(cum, int(cum[-1] * percent), side="right"))]])


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
    modules = dict(model.named_modules())
    for use in g.uses.values():  # a BatchNorm with no γ still drives its channels, and nothing scores them
        if use.kind == "bn" and modules[use.name].weight is None:
            for c in set(g.classes(use.out).tolist()):
                reason = f"{use.name}: normalised by a BatchNorm without γ (affine=False), which no score can rate"
                if reason not in g.frozen.setdefault(c, []):
                    g.frozen[c].append(reason)
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


def choose(
    g: ChannelGraph, imp: Importance, threshold: float, min_channels: int = 1, round_to: int = 1, min_keep: float = 0.0
) -> tuple[set[int], list[str]]:
    """The classes to remove, and the layers the threshold left fewer than ``min_channels`` (each layer keeps at
    least that many, or ``min_keep`` of its channels, whichever is more: its largest). A class goes only with all
    its dependents."""
    removed = {c for c in imp.ok if imp.eff[c] <= threshold}
    producers = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind in PRODUCERS]
    selecting = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind == "bn" and u.select is not None]
    # --round-to rounds every BatchNorm's channels (a conv's outputs through the BN that normalises them; a selecting
    # BN's, which are the next conv's inputs), as the paper's per-layer view has it; a producer no BN normalises
    # alone (a DenseNet layer's 12 new channels) is not rounded up to 16 for nothing
    bns = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind == "bn"]
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
            floor = min(max(min_channels, math.ceil(min_keep * len(lst) - 1e-9)), len(lst))
            # a layer held by --min-keep is held by design; one held by --min-channels alone would have been emptied
            short = floor <= min_channels and sum(1 for c in lst if c not in removed) < floor
            if restore(lst, floor):
                changed = True
                if short and name not in floored:
                    floored.append(name)
        if round_to > 1:
            for _, cls in bns:
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
        if p.get("bias") and getattr(m, "bias", 1) is None:  # folding gave it a bias (zero until weights load)
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))
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
    model: nn.Module, example_input: Inputs, cfg: PruneConfig | None = None, **kw: Any
) -> tuple[nn.Module, PruneRecord]:
    """Prune any CNN by network slimming; returns (a physically smaller copy, the record). ``model`` is unchanged.

    ``cfg`` (or its fields as keywords) says how much and how (:class:`PruneConfig`). A model with no BatchNorm
    is a :class:`ConfigError`.
    """
    cfg = (PruneConfig(**kw) if cfg is None else dataclasses.replace(cfg, **kw)).validate()
    if cfg.round_to == "auto":
        raise ConfigError("round_to='auto' is resolved by the prune stage; the engine takes an integer")
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} has no BatchNorm layer: network slimming scores channels by BN's γ")
    g = trace_channels(model, example_input, carry_raw=cfg.prune_stream)
    if cfg.prune_stream and not g.raw:
        raise ConfigError(
            f"--prune-stream: no conv of {type(model).__name__} reads channels before a BatchNorm that another "
            "BatchNorm reads too (a pre-activation residual stream); there is nothing for it to prune"
        )
    imp = importance(model, g, cfg.normalize)
    prunable = imp.prunable
    if not prunable:
        raise ConfigError(f"no channel of {type(model).__name__} can be pruned: {_why_none(g, imp.scores)}")
    values = sorted(prunable.values())

    def at(threshold: float) -> tuple[nn.Module, set[int], list[str], dict[str, Any]]:
        removed, floored = choose(g, imp, threshold, cfg.min_channels, cfg.round_to, cfg.min_keep)
        plan = make_plan(g, removed)
        return apply_plan(copy.deepcopy(model), plan), removed, floored, plan

    extra: dict[str, Any] = {}
    if cfg.max_macs is not None:
        threshold, best = _bisect_macs(model, first_sample(example_input), cfg.max_macs, values, at)
        w = class_weights(model, g)
        percent = sum(max(1, w.get(c, 1)) for c, v in prunable.items() if v <= threshold) / sum(
            max(1, w.get(c, 1)) for c in prunable
        )
        extra = {"max_macs": cfg.max_macs}
    else:
        percent = cfg.percent
        threshold = threshold_at(prunable, class_weights(model, g), percent)
        best = at(threshold)
    new, removed, floored, plan = best
    info = describe(model, g, imp, removed)
    check_pruned(model, new, info["layers"], example_input, _raw_removed(g, plan))
    folded = fold_dropped(model, new, g, plan, info["layers"], example_input) if cfg.fold else {}
    total = sum(x["before"] for x in info["layers"])
    kept = sum(x["after"] for x in info["layers"])
    record: PruneRecord = {
        "percent": percent,
        "threshold": threshold if math.isfinite(threshold) else None,
        "min_channels": cfg.min_channels,
        "min_keep": cfg.min_keep,
        "round_to": cfg.round_to,
        "normalize": cfg.normalize,
        "fold": cfg.fold,
        "prune_stream": cfg.prune_stream,
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
        "folded": folded,
        "trace_seconds": g.trace_seconds,
        "plan": plan,
    } | extra
    return new, record


def _bisect_macs(model, x1, max_macs, values, at):
    """The lowest threshold (fewest removed classes) whose pruned model keeps at most ``max_macs`` of the MACs."""
    from slimexport.stats import count_macs_on

    budget = max_macs * count_macs_on(model, x1)
    best = at(values[-1])
    if count_macs_on(best[0], x1) > budget:
        raise ConfigError(f"--max-macs {max_macs:g} cannot be reached: the floors keep more MACs than that")
    lo, hi, threshold = 0, len(values), values[-1]
    while lo < hi:  # the smallest number of removed classes whose MACs fit the budget
        mid = (lo + hi) // 2
        thr = float("-inf") if mid == 0 else values[mid - 1]
        cand = at(thr)
        if count_macs_on(cand[0], x1) <= budget:
            hi, best, threshold = mid, cand, thr
        else:
            lo = mid + 1
    return threshold, best


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


def _raw_removed(g: ChannelGraph, plan: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
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


_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub, torch.sub, "sub", "sub_"}


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
            if user.op in ("call_function", "call_method") and (t in ("size", "dim") or t is getattr):
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
            if t in _ADDS:
                sign = (
                    -1.0
                    if (t in (operator.sub, operator.isub, torch.sub, "sub", "sub_") and user.args[0] is not node)
                    else 1.0
                )
                if sum(a is node for a in user.args) != 1 or _channels(user) != len(vec):
                    return None
                stack.append((user, sign * vec))
            elif (rule := function_rule(user.op, t)) is not None and rule.shifts:
                if _channels(user) != len(vec):
                    return None
                stack.append((user, vec))
            elif t in (torch.cat, torch.concat, "cat"):
                parts = user.args[0]
                dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
                if dim not in (1, -3) or sum(a is node for a in parts) != 1:
                    return None
                offset = sum(_channels(a) or 0 for a in parts[: list(parts).index(node)])
                wide = torch.zeros(_channels(user) or 0)
                wide[offset : offset + len(vec)] = vec
                stack.append((user, wide))
            elif t in (torch.flatten, "flatten", "view", "reshape"):
                width = _channels(user)
                if width is None or width % len(vec) or len(user.meta["tensor_meta"].shape) != 2:
                    return None
                stack.append((user, vec.repeat_interleave(width // len(vec))))
            else:
                return None
    return actions


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
def exactness(model: nn.Module, example_input: Inputs, percent: float = 0.5, **kw) -> dict[str, Any]:
    """Two checks that need no knowledge of the groups.

    Grouping: zero γ and β of the BN channels the engine removes (those channels then emit exactly 0), prune that
    zeroed model again at the same setting (the zeroed channels now score lowest, so the same ones go), and
    compare its output with the zeroed original's: a wrong grouping shows up as a difference or a shape error.

    Folding: zero only γ of the removed channels (they then emit the constant β), prune again, and compare with
    that original, with and without :func:`fold_dropped`: exact where the constants reach 1×1 convs, linear
    layers, or BNs through pooling or adds; off at the borders where a zero-padded k×k conv reads them.

    Returns {relative_error, same_channels, folded_error, unfolded_error, record}."""
    kw.setdefault("fold", False)
    _, rec = prune_graph(model, example_input, percent=percent, **kw)

    def zeroed(beta: bool) -> nn.Module:
        return zero_removed(model, rec["layers"], beta)

    def error(ref_model: nn.Module, fold: bool) -> tuple[float, dict]:
        again, rec2 = prune_graph(ref_model, example_input, percent=percent, **(kw | {"fold": fold}))
        from torch.utils._pytree import tree_flatten

        ref, out = tree_flatten(call(ref_model, example_input))[0], tree_flatten(call(again.eval(), example_input))[0]
        if [a.shape for a in ref] != [b.shape for b in out]:
            return float("inf"), rec2
        return max(float((b - a).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(ref, out)), rec2

    rel, rec2 = error(zeroed(beta=True), False)
    same = [x["kept"] for x in rec2["layers"]] == [x["kept"] for x in rec["layers"]]
    with_beta = zeroed(beta=False)
    folded, _ = error(with_beta, True)
    unfolded, _ = error(with_beta, False)
    return {
        "relative_error": rel,
        "same_channels": same,
        "folded_error": folded,
        "unfolded_error": unfolded,
        "record": rec,
    }

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
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from slimexport.config import PruneConfig
from slimexport.errors import ConfigError
from slimexport.fold import fold_dropped
from slimexport.graph import BN_TYPES, ChannelGraph, Inputs, call, first_sample, trace_channels
from slimexport.importance import Importance, class_weights, from_scores, importance, per_latency, threshold_at
from slimexport.plan import PRODUCERS, apply_plan, make_plan
from slimexport.records import PruneRecord
from slimexport.selfcheck import check_pruned, raw_removed, zero_removed


def choose(
    g: ChannelGraph,
    imp: Importance,
    threshold: float,
    min_channels: int = 1,
    round_to: int = 1,
    min_keep: float = 0.0,
    widths: dict[str, int] | None = None,
) -> tuple[set[int], list[str]]:
    """The classes to remove, and the layers the threshold left fewer than ``min_channels`` (each layer keeps at
    least that many, or ``min_keep`` of its channels, whichever is more: its largest). ``widths``: the channel
    counts ``min_keep`` is a fraction of, per layer (a prune in steps: the sparse model's, so that the floor does
    not shrink from step to step); a layer not named there, its own. A class goes only with all its dependents."""
    widths = widths or {}
    removed = {c for c in imp.ok if imp.eff[c] <= threshold}
    producers = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind in PRODUCERS]
    selecting = [(u.name, g.classes(u.out)) for u in g.uses.values() if u.kind == "bn" and u.select is not None]
    # every piece of a split rewritten with its new sizes keeps channels too (an empty piece would feed a layer none)
    selecting += [(f"{n}[{k}]", g.classes(p)) for n, pieces in g.splits.items() for k, p in enumerate(pieces)]
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
            floor = min(max(min_channels, math.ceil(min_keep * widths.get(name, len(lst)) - 1e-9)), len(lst))
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


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Each conv's, linear layer's and BatchNorm's channel count, by module name: what :func:`choose`'s floors are
    fractions of when a prune goes in steps (``PruneConfig.widths``)."""
    out = {}
    for name, m in model.named_modules():
        width = getattr(m, "out_channels", None) or getattr(m, "out_features", None) or getattr(m, "num_features", 0)
        if isinstance(width, int) and width > 0 and isinstance(m, (nn.Linear, *BN_TYPES, nn.modules.conv._ConvNd)):
            out[name] = width
    return out


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
    model: nn.Module, example_input: Inputs, cfg: PruneConfig | None = None, probe: Any = None, **kw: Any
) -> tuple[nn.Module, PruneRecord]:
    """Prune any CNN by network slimming; returns (a physically smaller copy, the record). ``model`` is unchanged.

    ``cfg`` (or its fields as keywords) says how much and how (:class:`PruneConfig`). A model with no BatchNorm
    is a :class:`ConfigError`. For a latency target, ``probe`` (a :class:`slimexport.latency.LatencyProbe`: the
    engine knows no runtime) says whether a candidate is fast enough.
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
    if cfg.allocate == "latency" and probe is not None:
        imp = per_latency(imp, g, _latency_costs(model, g, imp, cfg.round_to, probe))
    prunable = imp.prunable
    if not prunable:
        raise ConfigError(f"no channel of {type(model).__name__} can be pruned: {_why_none(g, imp.scores)}")

    def at(threshold: float) -> tuple[nn.Module, set[int], list[str], dict[str, Any]]:
        removed, floored = choose(g, imp, threshold, cfg.min_channels, cfg.round_to, cfg.min_keep, cfg.widths)
        plan = make_plan(g, removed)
        return apply_plan(copy.deepcopy(model), plan), removed, floored, plan

    threshold, best, percent, extra = _threshold(model, example_input, cfg, probe, g, prunable, at)
    new, removed, floored, plan = best
    info = describe(model, g, imp, removed)
    check_pruned(model, new, info["layers"], example_input, raw_removed(g, plan))
    folded = fold_dropped(model, new, g, plan, info["layers"], example_input) if cfg.fold else {}
    total = sum(x["before"] for x in info["layers"])
    kept = sum(x["after"] for x in info["layers"])
    undone = _undone(model, g, imp, threshold, cfg, 1 - kept / total if total else 0.0)
    extra |= {"undone": undone} if undone else {}
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


def _latency_costs(model: nn.Module, g: ChannelGraph, imp: Importance, round_to: int, probe) -> dict[int, float]:
    """``--allocate latency``'s table, per class: for each producing layer, about half of its prunable channels
    (a multiple of ``round_to``, the runtime's block: off it a runtime times its slow path; the lowest scored,
    with all that depends on them) are pruned from the whole model, and ``probe`` times what that saves per
    channel (:meth:`~slimexport.latency.LatencyProbe.group_costs`). Layers sharing their channels (a residual
    stream) are one group. A layer of at most one block is not measured."""
    groups: dict[str, list[int]] = {}
    seen: set[frozenset[int]] = set()
    for use in g.uses.values():
        cls = sorted({c for c in g.classes(use.out).tolist() if c in imp.ok}, key=lambda c: imp.eff[c]) if (
            use.kind in PRODUCERS) else []  # fmt: skip
        if len(cls) > round_to and frozenset(cls) not in seen:
            seen.add(frozenset(cls))
            groups[use.name] = cls

    def candidates():
        for name, cls in groups.items():
            drop = set(cls[: max(round_to, len(cls) // 2 // round_to * round_to)])
            removed = choose(g, from_scores(g, {c: float(c not in drop) for c in imp.scores}), 0.5)[0]
            if removed:
                yield name, len(cls), len(removed), apply_plan(copy.deepcopy(model), make_plan(g, removed))

    per_group = probe.group_costs(candidates())
    return {c: per_group[name] for name, cls in groups.items() if name in per_group for c in cls}


def _threshold(model, example_input, cfg: PruneConfig, probe, g: ChannelGraph, prunable: dict, at):
    """The global threshold the prune asks for (``--percent``, a ``--max-macs`` budget, or a latency target the
    ``probe`` measures), the pruned candidate at it, the fraction of channel classes it removes, and the record's
    extra fields."""
    values = sorted(prunable.values())
    extra: dict[str, Any] = {}
    if cfg.max_macs is not None or probe is not None:
        if probe is not None:
            threshold, best, reached = _bisect(values, at, lambda m: probe.fits(m))
            probe.retime(best[0])
            extra = {"latency_target": probe.record() | ({} if reached else {"unreachable": UNREACHABLE})}
        else:
            threshold, best = _bisect_macs(model, first_sample(example_input), cfg.max_macs, values, at)
            extra = {"max_macs": cfg.max_macs}
        w = class_weights(model, g)
        percent = sum(max(1, w.get(c, 1)) for c, v in prunable.items() if v <= threshold) / sum(
            max(1, w.get(c, 1)) for c in prunable
        )
    else:
        percent = cfg.percent
        threshold = threshold_at(prunable, class_weights(model, g), percent)
        best = at(threshold)
    return threshold, best, percent, extra


def _undone(model: nn.Module, g: ChannelGraph, imp: Importance, threshold: float, cfg: PruneConfig,
            removed: float) -> dict[str, Any] | None:  # fmt: skip
    """When --round-to or the floors put back most of what the threshold removed (``--percent 0.3`` on layers of 8
    and 16 channels at round-to 16 removes nothing): what the threshold alone would have removed, which of the two
    undid it, and what to change. None when they undid less than half."""
    if cfg.round_to == 1 and cfg.min_keep == 0 and cfg.min_channels == 1:
        return None

    def fraction(round_to: int, min_channels: int, min_keep: float) -> float:
        layers = describe(model, g, imp, choose(g, imp, threshold, min_channels, round_to, min_keep, cfg.widths)[0])
        before = sum(x["before"] for x in layers["layers"])
        return 1 - sum(x["after"] for x in layers["layers"]) / before if before else 0.0

    alone = fraction(1, 1, 0.0)
    if alone < 0.02 or removed >= 0.5 * alone:
        return None
    floors_only = fraction(1, cfg.min_channels, cfg.min_keep)
    if cfg.round_to > 1 and floors_only >= 0.5 * alone:
        by = f"--round-to {cfg.round_to}"
        lower = "1, or 8" if cfg.round_to > 8 else "1"
        advice = (f"layers narrower than about {2 * cfg.round_to} channels keep a whole block of {cfg.round_to}: "
                  f"use --round-to {lower}, or prune more (a higher --percent)")  # fmt: skip
    else:
        by = "the floors (--min-channels, --min-keep)"
        advice = "lower --min-keep or --min-channels, or prune more (a higher --percent)"
    return {"threshold_alone": alone, "removed": removed, "by": by, "advice": advice}


UNREACHABLE = "even the most the floors let the threshold remove is not that fast: the nearest feasible model"


def _bisect(values, at, fits):
    """The lowest threshold (fewest removed classes) whose pruned model ``fits`` (a measured predicate: it is
    asked about O(log n) candidates), and whether any does; where none does, the most pruned model."""
    most = at(values[-1])
    if not fits(most[0]):
        return values[-1], most, False
    lo, hi, threshold, best = 0, len(values), values[-1], most
    step = max(1, len(values) // 200)  # within 0.5% of the channel classes: finer than timing noise can tell
    while hi - lo >= step:
        mid = (lo + hi) // 2
        thr = float("-inf") if mid == 0 else values[mid - 1]
        cand = at(thr)
        if fits(cand[0]):
            hi, best, threshold = mid, cand, thr
        else:
            lo = mid + 1
    return threshold, best, True  # the least pruning found to fit (hi), to within ``step`` classes


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

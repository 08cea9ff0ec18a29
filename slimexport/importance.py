"""A channel's importance in network slimming: its BN's |γ|, compared across layers as it is (the paper's) or
divided by its layer's max or mean (``--normalize``), as the graph engine (:mod:`slimexport.graph_prune`) scores
every channel class."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimexport.config import NORMALIZE, check_normalize
from slimexport.graph import ChannelGraph

__all__ = ["NORMALIZE", "check_normalize", "normalize_scores"]


def normalize_scores(gam: torch.Tensor, normalize: str) -> torch.Tensor:
    """One layer's |γ| as the global threshold compares them: as they are (``none``, the paper's), or divided by the
    layer's largest (``max``) or mean (``mean``) |γ|.

    Why: a BN whose output reaches the next BN only through ReLU, pooling and a conv can scale its γ and β by any
    c > 0 without changing the network's function (the next BN divides c out again), and the L1 term pushes every
    such layer's scale down as a whole. Raw |γ| then compares layers on scales that mean nothing, and one global
    threshold can empty a layer whose channels are all alike but small (vgg11_w25 at 70%). Divided by its own
    max or mean, each layer's scores are the same whatever that scale.
    """
    check_normalize(normalize)
    if normalize == "none" or gam.numel() == 0:
        return gam
    ref = gam.max() if normalize == "max" else gam.mean()
    return gam / ref.clamp_min(torch.finfo(gam.dtype).tiny)


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
    return from_scores(g, class_scores(model, g, normalize))


def per_latency(imp: Importance, g: ChannelGraph, costs: dict[int, float]) -> Importance:
    """Latency-aware allocation (``--allocate latency``): each class's score divided by the latency it costs (ms
    per channel, measured in the whole model on the runtime: :meth:`slimexport.latency.LatencyProbe.group_costs`),
    scaled by the median cost, so the threshold keeps the most importance per unit of latency. A class that costs
    (next to) nothing gets the floor of 5% of the median: it is kept, as it saves no time; one that was not
    measured (a layer too narrow to halve) costs the median, as under the plain |γ| threshold."""
    positive = sorted(v for c, v in costs.items() if c in imp.scores and v > 0)
    median = positive[len(positive) // 2] if positive else 1.0
    scores = {c: s * median / max(costs.get(c, median), 0.05 * median) for c, s in imp.scores.items()}
    return from_scores(g, scores)


def from_scores(g: ChannelGraph, scores: dict[int, float]) -> Importance:
    """The :class:`Importance` of classes scored ``scores``: dependents, effective scores, which may go."""
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

"""A channel's importance in network slimming: its BN's |γ|, compared across layers as it is (the paper's) or
divided by its layer's max or mean (``--normalize``), as the graph engine (:mod:`slimexport.graph_prune`) scores
every channel class."""

from __future__ import annotations

import torch

from slimexport.config import NORMALIZE, check_normalize

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

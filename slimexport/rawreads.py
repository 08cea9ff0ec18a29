"""After the channel walk (:mod:`slimexport.graph`): which channels a conv or linear layer reads before any
BatchNorm normalises them. Those are frozen (or, with ``--prune-stream``, carried as a BN's running mean)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from torch import fx, nn

from slimexport.oprules import BINARY, BN_TYPES, function_rule, module_rule, structural


class _RawReads:
    """After the walk: which channels a conv or linear layer reads before any BatchNorm normalises them."""

    def __init__(self, b: Any):  # the walk's graph._Builder, with its uses, modules and vectors
        self.b = b

    def run(self, gm: fx.GraphModule) -> None:
        """A BN scores the channels it normalises, but the same channels may also be read *before* it (a conv
        reading the raw output of another conv that a BN elsewhere normalises: MaxViT's stem feeding both a BN and
        a shortcut conv; a pre-activation ResNet's stream feeding the next stage's downsampling conv). Removing
        such a channel changes what that reader computes whatever its γ, so it is frozen. A tensor counts as
        normalised, channel by channel, when it is a BN's output or made from BN outputs by ops that keep zeros
        at zero (ReLU-like activations, pooling, dropout, interpolation, sums of normalised tensors, products with
        one normalised factor, cat/split/flatten)."""
        memo: dict[fx.Node, Any] = {}
        bns_of: dict[str, list[Any]] = defaultdict(list)  # tensor (FX node) → the BNs reading it
        for u in self.b.uses.values():
            if u.kind == "bn" and u.src is not None and self.b.modules[u.name].running_mean is not None:
                bns_of[u.src].append(u)
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            use = self.b.uses.get(node.target)
            if use is None or use.kind not in ("conv", "convT", "grouped", "linear") or not node.args:
                continue
            flags = self.normalised(node.args[0], memo)
            if not isinstance(flags, np.ndarray) or len(flags) != len(use.inp):
                continue
            positions = np.flatnonzero(~flags).tolist()
            if self.b.carry_raw and use.kind == "conv" and isinstance(node.args[0], fx.Node):
                carried = self.mean_sources(positions, bns_of.get(node.args[0].name, []))
                if carried:
                    self.b.raw[node.target] = carried
                    positions = [p for p in positions if p not in carried]
            if positions:
                self.b.freeze(
                    use.inp[positions], f"{node.target}: reads these channels before any BatchNorm normalises them"
                )

    @staticmethod
    def mean_sources(positions: list[int], bns: list[Any]) -> dict[int, tuple[str, int]]:
        """``--prune-stream``: for each raw-read input position, a BN that reads the same tensor and whose running
        mean of that channel stands in for it once it is removed."""
        found: dict[int, tuple[str, int]] = {}
        for bn in bns:
            index = bn.select if bn.select is not None else list(range(len(bn.inp)))
            where = {p: k for k, p in enumerate(index)}
            for p in positions:
                if p not in found and p in where:
                    found[p] = (bn.name, where[p])
        return found

    def normalised(self, node: Any, memo: dict) -> Any:
        if not isinstance(node, fx.Node):
            return None
        if node in memo:
            return memo[node]
        memo[node] = None  # cycles cannot happen in an FX graph; this only guards re-entry
        memo[node] = out = self._normalised(node, memo)
        return out

    def _normalised(self, node: fx.Node, memo: dict) -> Any:
        v = self.b.vec.get(node)
        if isinstance(v, list):
            src = node.args[0] if node.args else None
            flags = self.normalised(src, memo) if isinstance(src, fx.Node) else None
            if not isinstance(flags, np.ndarray):
                return [np.zeros(len(x), bool) if isinstance(x, np.ndarray) else None for x in v]
            if all(isinstance(x, np.ndarray) and len(x) == len(flags) for x in v) and len(v) > 1:
                if sum(len(x) for x in v) != len(flags):  # a split along another axis: every piece has every channel
                    return [flags for _ in v]
            out, start = [], 0
            for x in v:
                n = len(x) if isinstance(x, np.ndarray) else 0
                out.append(flags[start : start + n] if n and len(flags) >= start + n else np.zeros(n, bool))
                start += n
            return out
        if not isinstance(v, np.ndarray):
            return None
        if node.op == "call_module":
            return self._module_flags(node, v, memo)
        if node.op not in ("call_function", "call_method"):
            return np.zeros(len(v), bool)
        return self._function_flags(node, v, memo)

    def _module_flags(self, node: fx.Node, v: np.ndarray, memo: dict) -> np.ndarray:
        raw = np.zeros(len(v), bool)
        first = node.args[0] if node.args else None
        m = self.b.modules[node.target]
        if isinstance(m, BN_TYPES):
            return np.ones(len(v), bool)
        use = self.b.uses.get(node.target)
        if use is not None and use.kind == "depthwise":
            f = self.normalised(first, memo)
            return f if isinstance(f, np.ndarray) and m.bias is None else raw
        rule = module_rule(m)
        if rule is not None and rule.kind != "other" and rule.keeps_zero:
            f = self.normalised(first, memo)
            return f if isinstance(f, np.ndarray) and len(f) == len(v) else raw
        if isinstance(m, nn.Flatten):
            f = self.normalised(first, memo)
            return np.repeat(f, len(v) // len(f)) if isinstance(f, np.ndarray) and len(f) else raw
        return raw

    def _function_flags(self, node: fx.Node, v: np.ndarray, memo: dict) -> np.ndarray:
        raw = np.zeros(len(v), bool)
        first = node.args[0] if node.args else None
        t = node.target
        kind = structural(node.op, t)
        if kind in BINARY:
            parts = []
            for a in node.args:
                if not isinstance(a, fx.Node) or self.b.shape(a) is None:
                    continue  # a python number: adds a constant (not zero-keeping for + and -)
                f = self.normalised(a, memo)
                parts.append(f if isinstance(f, np.ndarray) and len(f) == len(v) else None)
            if kind == "mul":  # zero when any factor is
                ok = [f for f in parts if f is not None]
                return np.logical_or.reduce(ok) if ok else raw
            if any(f is None for f in parts) or not parts:
                return raw
            if kind == "div":
                return parts[0]
            consts = [a for a in node.args if not isinstance(a, fx.Node)]
            return np.logical_and.reduce(parts) if not any(c != 0 for c in consts) else raw
        if kind == "getitem":
            src = self.normalised(node.args[0], memo)
            if isinstance(src, list):
                return src[node.args[1]]
            if isinstance(src, np.ndarray):
                idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
                if len(idx) >= 2 and isinstance(idx[1], slice):
                    return src[idx[1]] if len(src[idx[1]]) == len(v) else raw
                return src if len(src) == len(v) else raw
            return raw
        if kind == "cat":
            fs = [self.normalised(a, memo) for a in (node.args[0] if node.args else [])]
            if all(isinstance(f, np.ndarray) for f in fs) and sum(len(f) for f in fs) == len(v):
                return np.concatenate(fs)
            if fs and all(isinstance(f, np.ndarray) and len(f) == len(v) for f in fs):  # along another axis
                return np.logical_and.reduce(fs)  # a channel is normalised where every part of it is
            return raw
        f = self.normalised(first, memo) if isinstance(first, fx.Node) else None
        vin = self.b.vec.get(first) if isinstance(first, fx.Node) else None
        if not isinstance(f, np.ndarray) or not isinstance(vin, np.ndarray) or not len(vin) or len(v) % len(vin):
            return raw
        k = len(v) // len(vin)
        if not np.array_equal(v, np.repeat(vin, k)):
            return raw  # the channels moved (the forward pass froze them): nothing to carry
        flatten = kind in ("flatten", "reshape")
        rule = function_rule(node.op, t)
        return np.repeat(f, k) if flatten or (rule is not None and rule.keeps_zero) else raw

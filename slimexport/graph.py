"""Channel dependencies of any CNN, found from its traced graph.

**Why torch.fx.** A symbolic trace gives every op with its arguments (``cat``'s dim, ``view``'s target sizes,
whether a size came from ``x.size()`` or was written as a number) and which module object each call went to, so a
module called twice is seen as one module. The autograd graph (Torch-Pruning's choice) loses those arguments and
needs a backward-capable forward; ``torch.export`` decomposes into aten ops and takes seconds per model. torch.fx
traces a torchvision ResNet-50 in about 0.1 s. A submodule that FX cannot trace (data-dependent control flow:
MobileViT's blocks) is traced as one opaque op whose channels are kept; an eval forward that branches only in
its head (YOLO's Detect) is traced in training mode first; a model whose own forward cannot be traced gets a
one-line error naming what failed, never a half-pruned model.

**The model.** Every channel of every tensor is an *atom*. A conv or linear layer creates new atoms for its
outputs; BatchNorm, activations, pooling, dropout, interpolation pass their input's atoms through; a depthwise
conv passes them through too (its input and output channels are tied); element-wise ops between tensors
(add/sub/mul/div: residual streams, squeeze-excite gating) *join* the atoms they combine, ``cat`` on the channel
axis concatenates its inputs' atoms, ``split``/``chunk``/slicing take a range of them (and freeze it: their sizes
are written into ``forward`` and would cut elsewhere once the input is narrower), and a flatten of
C×H×W repeats each atom H·W times, so a Linear reading it loses each pruned channel's H·W columns. Joined atoms
form a *class*: channels that can only be removed together. A BatchNorm whose input is also read elsewhere (a
pre-activation ResNet's stream, DenseNet's concatenated features: :meth:`_Builder.escapes`) is *selecting*: its
channels are new atoms, each *depending on* the input atom it reads, so it can drop a channel the other readers
keep (a static Gather or Slice in front of it); the input channel goes only when every reader has dropped it.
Anything the engine does not understand (view/reshape/permute touching the channel axis, channel shuffle, pixel
shuffle, grouped convs, sizes written into ``forward``, parameters used outside modules, the model's inputs and
outputs) *freezes* the classes it touches, with the reason recorded, and so does a conv or linear that reads
channels before any BatchNorm normalises them (:class:`_RawReads`). A frozen class is never pruned.

A class's importance is the largest |γ| among the BatchNorms that normalise it (:mod:`slimexport.graph_prune`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimexport.errors import ConfigError
from slimexport.oprules import BINARY, BN_TYPES, CONV_TYPES, function_rule, module_rule, structural, weight_norm_of
from slimexport.rawreads import _RawReads
from slimexport.trace import Inputs, _placeholder_args, call, first_sample, random_like, trace

__all__ = [
    "BN_TYPES", "CONV_TYPES", "ChannelGraph", "Inputs", "ModuleUse", "call", "first_sample", "random_like", "trace",
    "trace_channels",
]  # fmt: skip


@dataclass
class ModuleUse:
    """How one module reads and writes channels: the atoms of its input and output channel axes."""

    name: str
    kind: str  # conv | convT | depthwise | grouped | linear | bn | channelwise
    inp: np.ndarray | None = None
    out: np.ndarray | None = None
    # A *selecting* BN (its input is also read elsewhere): its channels are new atoms, channel k reading input
    # position select[k]; it can drop a channel its input keeps for the other readers (a static index op).
    select: list[int] | None = None
    src: str | None = None  # the FX node it reads (its first call's), and its own node with its number of readers
    node: str | None = None
    readers: int = 0

    def reads(self) -> np.ndarray | None:
        """The input atoms this module's channels come from (a selecting BN's selected ones)."""
        if self.select is None or self.inp is None:
            return self.inp
        return self.inp[np.asarray(self.select, dtype=np.int64)]


@dataclass
class ChannelGraph:
    """The result of :func:`trace_channels`: atoms, their classes, and where each module reads and writes them."""

    parent: list[int]
    frozen: dict[int, list[str]]  # class root → reasons it cannot be pruned
    uses: dict[str, ModuleUse]
    trace_seconds: float = 0.0
    # with carry_raw: per conv/linear, the input positions it reads before any BatchNorm, left prunable; each maps
    # to (a BN reading the same tensor, the index of that channel in it), whose running mean stands in for it
    raw: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    graph: fx.Graph | None = None  # the traced graph, with tensor shapes (for the folding pass)
    # channel splits whose sizes are written into forward (split([16, 16, 16], 1)), by FX node name: the atoms of
    # each piece. The plan gives each its new sizes and the pruned network is the traced graph with them
    # (plan.apply_plan), so the channels they cut stay prunable.
    splits: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def classes(self, atoms: np.ndarray) -> np.ndarray:
        """The class (union-find root) of every atom."""
        return np.fromiter((_find(self.parent, int(a)) for a in atoms), dtype=np.int64, count=len(atoms))


def _find(parent: list[int], a: int) -> int:
    """Union-find root of ``a``, halving the path as it goes."""
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


class _Atoms:
    """Union-find over channel atoms: each class's root, and the reasons a class is frozen."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, list[str]] = defaultdict(list)

    def new(self, n: int, reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        atoms = np.arange(start, start + n, dtype=np.int64)
        if reason:
            self.freeze(atoms, reason)
        return atoms

    def find(self, a: int) -> int:
        return _find(self.parent, a)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if ry < rx:
                rx, ry = ry, rx
            self.parent[ry] = rx
            if ry in self.frozen:
                self.frozen[rx].extend(self.frozen.pop(ry))

    def freeze(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is None:
            return
        for a in set(self.find(int(x)) for x in atoms):
            if reason not in self.frozen[a]:
                self.frozen[a].append(reason)

    def classes(self, atoms: np.ndarray) -> list[int]:
        return [self.find(int(x)) for x in atoms]


class _StructureOps:
    """The ops that move channels between tensors without weights (element-wise ops between tensors, cat, split,
    indexing, flatten, reshape, transpose), for :class:`_Builder`."""

    def flatten(self, node: fx.Node, xin: Any, start: int = 1, end: int = -1) -> Any:
        si, so = self.shape(node.args[0]), self.shape(node)
        if xin is None or si is None or so is None:
            return self.fresh(node)
        end = end % len(si)
        if start == 1 and end == len(si) - 1:
            return np.repeat(xin, int(np.prod(si[2:], dtype=np.int64)))
        if start >= 2:
            return xin
        return self.freeze_all(node, f"{self.where(node)}: flatten over the batch and channel axes")

    def reshape(self, node: fx.Node, xin: Any, sizes: list[Any]) -> Any:
        si, so = self.shape(node.args[0]), self.shape(node)
        if xin is None or si is None or so is None:
            return self.fresh(node)
        fixed = [s for s in sizes[1:] if isinstance(s, int) and s != -1]
        is_flatten = len(so) == 2 and so[0] == si[0] and so[1] == int(np.prod(si[1:], dtype=np.int64))
        if is_flatten and not fixed:
            return np.repeat(xin, int(np.prod(si[2:], dtype=np.int64)))
        if len(so) >= 2 and len(si) >= 2 and so[:2] == si[:2] and not any(isinstance(s, int) for s in sizes[1:2]):
            return xin  # only the spatial axes change
        reason = "reshape with sizes written into forward" if is_flatten else "view/reshape across the channel axis"
        return self.freeze_all(node, f"{self.where(node)}: {reason}")

    def _keeps_axes_01(self, node: fx.Node) -> bool:
        dims = [a for a in node.args[1:] if isinstance(a, int)]
        if node.target in ("permute", torch.permute):
            dims = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else dims
            return len(dims) >= 2 and dims[0] == 0 and dims[1] == 1
        return len(dims) == 2 and all(d % len(self.shape(node)) >= 2 for d in dims)

    def binary(self, node: fx.Node) -> Any:
        so = self.shape(node)
        if so is None or len(so) < 2:
            return self.freeze_all(node, f"{self.where(node)}: element-wise op without a channel axis")
        out = None
        for a in node.args:
            if not isinstance(a, fx.Node):
                continue
            v, sa = self.vec.get(a), self.shape(a)
            if sa is None:
                continue  # a python number
            axis = 1 - (len(so) - len(sa))
            if axis < 0 or sa[axis] == 1:
                continue  # broadcast along the channel axis: no constraint
            if axis == 1 and isinstance(v, np.ndarray) and len(v) == so[1]:
                if out is None:
                    out = v
                else:
                    self.union(out, v)
                continue
            return self.freeze_all(node, f"{self.where(node)}: broadcast against a tensor whose channel axis differs")
        return out if out is not None else self.fresh(node)

    def cat(self, node: fx.Node) -> Any:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        so = self.shape(node)
        vecs = [self.vec.get(a) for a in tensors]
        if any(not isinstance(v, np.ndarray) for v in vecs) or so is None:
            return self.freeze_all(node, f"{self.where(node)}: cat of tensors without channels")
        if dim % len(so) == 1:
            return np.concatenate(vecs)
        for v in vecs[1:]:
            self.union(vecs[0], v)
        return vecs[0]

    def split(self, node: fx.Node, xin: Any) -> Any:
        meta = self.metas(node)
        args = node.args
        dim = node.kwargs.get("dim", args[2] if len(args) > 2 else 0)
        si = self.shape(args[0])
        if xin is None or si is None or meta is None:
            return self.freeze_all(node, f"{self.where(node)}: split not understood")
        if dim % len(si) != 1:
            return [xin for _ in meta]
        sizes = [m.shape[1] for m in meta]
        if structural(node.op, node.target) == "chunk" and len(set(sizes)) == 1 and sum(sizes) == len(xin):
            # chunk(n) into equal pieces cuts a narrower tensor into equal pieces too: if channel k goes from every
            # piece at once, each piece keeps what it had (YOLO's C2f: cv1(x).chunk(2, 1)). So position k of
            # every piece is one class.
            pieces = xin.reshape(len(sizes), sizes[0])
            for other in pieces[1:]:
                self.union(pieces[0], other)
            return list(pieces)
        out, start = [], 0
        for m in meta:
            out.append(xin[start : start + m.shape[1]])
            start += m.shape[1]
        # Sizes written into forward (split(8), split((c, c))) would cut elsewhere once the input is narrower: the
        # pruned network is this graph with each piece's new size written in (plan.apply_plan), where the model's
        # own eval forward traced; else the channels they cut stay as they are.
        if self.rewritable and _literal_sizes(node):
            self.splits[node.name] = out
        else:
            self.freeze(xin, f"{self.where(node)}: channel split whose sizes are written into forward")
        return out

    def getitem(self, node: fx.Node, xin: Any) -> Any:
        src, idx = node.args[0], node.args[1]
        if isinstance(self.vec.get(src), list):  # a tuple from split/chunk
            return self.vec[src][idx]
        si, so = self.shape(src), self.shape(node)
        if not isinstance(xin, np.ndarray) or si is None or so is None:
            return self.fresh(node) if so is not None else None
        items = idx if isinstance(idx, tuple) else (idx,)
        if len(items) < 2 or items[0] != slice(None):
            if items and items[0] == slice(None) and len(items) == 1:
                return xin
            return self.freeze_all(node, f"{self.where(node)}: indexing across the channel axis")
        ch = items[1]
        if ch == slice(None) and len(so) == len(si):
            return xin
        if isinstance(ch, slice) and all(v is None or isinstance(v, int) for v in (ch.start, ch.stop, ch.step)):
            if ch.start in (None, 0) and ch.step in (None, 1) and (ch.stop is None or ch.stop >= si[1]):
                return xin  # x[:, :k] with k ≥ C takes every channel, and still does once C shrinks (GhostNet)
            if len(so) == len(si):  # bounds written into forward: the sliced tensor's channels stay
                self.freeze(xin, f"{self.where(node)}: channel slice whose bounds are written into forward")
                return xin[ch]
        if ch is Ellipsis and len(so) == len(si) and so[1] == si[1]:
            return xin
        return self.freeze_all(node, f"{self.where(node)}: indexing across the channel axis")


class _Builder(_StructureOps, _Atoms):
    """The walk over the traced graph: per node, the atoms of its channel axis (see the module doc)."""

    def __init__(self, model: nn.Module, carry_raw: bool = False):
        self.opaque: dict[str, str] = {}  # modules traced as one op (graph.trace), name → why
        self.model = model
        self.carry_raw = carry_raw
        self.raw: dict[str, dict[int, tuple[str, int]]] = {}
        self.splits: dict[str, list[np.ndarray]] = {}
        self.rewritable = False  # the graph is the model's own eval forward, so a rewrite of it can replace it
        self.modules = dict(model.named_modules())
        super().__init__()
        self.uses: dict[str, ModuleUse] = {}
        self.vec: dict[fx.Node, Any] = {}

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    @staticmethod
    def metas(node: fx.Node) -> list | None:
        """The tensor metadata of a node returning several tensors (split, chunk), else None."""
        meta = node.meta.get("tensor_meta")
        if meta is None or hasattr(meta, "shape") or not isinstance(meta, (list, tuple)):
            return None
        return list(meta) if all(hasattr(m, "shape") for m in meta) else None

    def freeze_all(self, node: fx.Node, reason: str) -> Any:
        """Freeze every tensor input's channels; the output gets new frozen atoms."""
        for a in node.all_input_nodes:
            v = self.vec.get(a)
            if isinstance(v, np.ndarray):
                self.freeze(v, reason)
            elif isinstance(v, list):
                for x in v:
                    self.freeze(x, reason)
        return self.fresh(node, reason)

    def fresh(self, node: fx.Node, reason: str | None = None) -> Any:
        """New atoms for a tensor whose channels come from no layer the engine follows (a parameter or a constant
        reshaped, the model's input): frozen, so that nothing joined to them is pruned without its source."""
        reason = reason or (
            f"{self.where(node)}: channels of a tensor made from a parameter or constant (a module of your own? "
            "slimexport.register_module_rule teaches the engine its channels)"
        )
        metas = self.metas(node)
        if metas is not None:
            return [self.new(m.shape[1], reason) if len(m.shape) >= 2 else None for m in metas]
        shape = self.shape(node)
        return self.new(shape[1], reason) if shape is not None and len(shape) >= 2 else None

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[node.target]).__name__})"
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name} at {node.name}"

    # -- the walk -----------------------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule) -> None:
        self.opaque = gm.meta.get("slim_opaque", {})
        for node in gm.graph.nodes:
            try:
                self.vec[node] = self.visit(node)
            except (IndexError, ValueError, TypeError, KeyError) as e:  # an op in a form the rules do not cover
                self.vec[node] = self.freeze_all(node, f"{self.where(node)}: not understood ({type(e).__name__})")
        _RawReads(self).run(gm)

    # -- channels read before their BatchNorm --------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.fresh(node, "model input")
        if node.op == "get_attr":
            return self.fresh(
                node,
                f"tensor {node.target} used outside a module (a module of your own? slimexport.register_module_rule "
                "teaches the engine its channels)",
            )
        if node.op == "output":
            for a in node.all_input_nodes:
                v = self.vec.get(a)
                for x in v if isinstance(v, list) else [v]:
                    self.freeze(x, "model output (classes are never pruned)")
            return None
        if node.op == "call_module":
            out = self.module(node, self.modules[node.target])
            use = self.uses.get(node.target)
            if use is not None and use.node is None:
                first = node.args[0] if node.args else None
                use.src = first.name if isinstance(first, fx.Node) else None
                use.node, use.readers = node.name, len(node.users)
            return out
        return self.function(node)

    def module(self, node: fx.Node, m: nn.Module) -> Any:
        name = node.target
        x = node.args[0] if node.args else None
        xin = self.vec.get(x) if isinstance(x, fx.Node) else None
        shape_in = self.shape(x)
        if name in self.opaque:
            return self.freeze_all(
                node, f"{name}: {type(m).__name__}'s forward cannot be traced ({self.opaque[name]}); kept whole"
            )
        extra = _unknown_state(m)
        if extra:
            return self.freeze_all(
                node, f"{name}: {type(m).__name__} holds {', '.join(extra)} besides its weight and bias; kept as it is"
            )
        if isinstance(m, CONV_TYPES) or isinstance(m, nn.ConvTranspose2d):
            if xin is None:
                return self.freeze_all(node, f"{name}: input without channels")
            transposed = isinstance(m, nn.ConvTranspose2d)
            if m.groups == 1:
                return self._use(name, "convT" if transposed else "conv", xin, m.out_channels)
            if not transposed and m.groups == m.in_channels == m.out_channels:
                return self._use(name, "depthwise", xin, None)
            if not transposed and len(xin) == m.in_channels:
                return self.grouped(name, m, xin)
            return self.freeze_all(node, f"{name}: grouped conv (groups={m.groups}) kept as it is")
        if isinstance(m, BN_TYPES):
            if xin is None or (shape_in and len(shape_in) < 2):
                return self.freeze_all(node, f"{name}: BatchNorm without a channel axis")
            earlier = getattr(m, "slim_selection", None)  # from an earlier pruning (graph_prune.apply_plan)
            if earlier is not None or self.escapes(x, node, set()):
                select = earlier.indices() if earlier is not None else list(range(len(xin)))
                return self._use(name, "bn", xin, len(select), select)
            return self._use(name, "bn", xin, None)
        if isinstance(m, nn.Linear):
            if xin is None or shape_in is None or len(shape_in) != 2:
                return self.freeze_all(node, f"{name}: Linear on a tensor of rank {len(shape_in or ())}")
            return self._use(name, "linear", xin, m.out_features)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, xin, m.start_dim, m.end_dim)
        rule = module_rule(m)
        if rule is not None and rule.kind == "channelwise":  # parameters on the channel axis, sliced by its rule
            if xin is None or self.passthrough(node, xin) is not xin:
                return self.freeze_all(node, f"{name}: changes the channel axis")
            return self._use(name, "channelwise", xin, None)
        if rule is not None and rule.kind == "pass":
            return self.passthrough(node, xin)
        return self.freeze_all(
            node, f"{name}: module {type(m).__name__} not understood (slimexport.register_module_rule teaches it)"
        )

    def grouped(self, name: str, m: nn.Module, xin: np.ndarray) -> np.ndarray:
        """A grouped conv (ResNeXt, RegNet; a depthwise conv with a channel multiplier): output group g reads input
        group g alone, so a group's input and output channels are one class and go as a whole group; the pruned
        conv keeps its group width and has fewer groups."""
        out = self._use(name, "grouped", xin, m.out_channels)
        use = self.uses[name]
        cin, cout = m.in_channels // m.groups, m.out_channels // m.groups
        for g in range(m.groups):
            members = np.concatenate([use.inp[g * cin : (g + 1) * cin], use.out[g * cout : (g + 1) * cout]])
            self.union(np.full(len(members) - 1, members[0]), members[1:])
        return out

    def _use(
        self, name: str, kind: str, xin: np.ndarray, n_out: int | None, select: list[int] | None = None
    ) -> np.ndarray:
        """A module reads ``xin`` and writes new atoms (conv, linear, selecting BN) or passes its input's (bn,
        depthwise). A module called again (shared weights) reads and writes the same classes."""
        use = self.uses.get(name)
        if use is not None:
            if use.inp is not None and len(use.inp) == len(xin):
                self.union(use.inp, xin)
            else:
                self.freeze(xin, f"{name}: called on inputs of different widths")
            return use.out
        out = self.new(n_out) if n_out is not None else xin
        self.uses[name] = ModuleUse(name, kind, xin, out, select)
        return out

    def escapes(self, node: Any, reader: fx.Node, seen: set) -> bool:
        """Whether the channels ``reader`` gets from ``node`` are also read by something else: another user of
        ``node``, or of a tensor ``node`` took its channels from (the inputs of a ``cat``, an activation's input,
        both sides of a residual add). A BN reading such a tensor (pre-activation ResNets' streams, DenseNet's
        concatenated features) gets its own channels, so it can drop one the other readers keep."""
        if not isinstance(node, fx.Node) or node in seen:
            return False
        seen.add(node)
        for u in node.users:
            if u is not reader and (u.op == "output" or self.shape(u) is not None or self.metas(u) is not None):
                return True  # (size() and dim() calls read no channel)
        v = self.vec.get(node)
        if not isinstance(v, np.ndarray):
            return False
        mine = set(self.classes(v))
        for a in node.all_input_nodes:
            va = self.vec.get(a)
            parts = [p for p in (va if isinstance(va, list) else [va]) if isinstance(p, np.ndarray)]
            if any(mine.intersection(self.classes(p)) for p in parts) and self.escapes(a, node, seen):
                return True
        return False

    def passthrough(self, node: fx.Node, xin: Any) -> Any:
        si, so = self.shape(node.args[0]) if node.args else None, self.shape(node)
        if xin is None or si is None or so is None or len(so) < 2 or len(si) != len(so) or si[1] != so[1]:
            return self.freeze_all(node, f"{self.where(node)}: changes the channel axis")
        return xin

    def function(self, node: fx.Node) -> Any:
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        args = node.args
        first = args[0] if args else None
        xin = self.vec.get(first) if isinstance(first, fx.Node) else None
        kind = structural(node.op, t)
        if kind in BINARY:
            return self.binary(node)
        if kind == "getitem":
            return self.getitem(node, xin)
        if kind == "size":
            return None
        so = self.shape(node)
        if so is None and self.metas(node) is None:
            return None  # not a tensor (a size, a shape, a python value)
        rule = function_rule(node.op, t)
        if rule is not None and rule.kind == "pass":
            return self.passthrough(node, xin)
        if kind == "cat":
            return self.cat(node)
        if kind == "flatten":
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self.flatten(node, xin, start, end)
        if kind == "reshape":
            sizes = list(args[1:]) if node.op == "call_method" else list(args[1])
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                sizes = list(sizes[0])
            return self.reshape(node, xin, sizes)
        if kind in ("split", "chunk"):
            return self.split(node, xin)
        if kind == "reduce":
            dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            si = self.shape(first)
            if dims and si and all(d % len(si) >= 2 for d in dims) and so and len(so) >= 2:
                return xin
            return self.freeze_all(node, f"{self.where(node)}: reduction over the channel axis")
        if kind == "permute":
            si = self.shape(first)
            if si and so and len(si) == len(so) and si[:2] == so[:2] and self._keeps_axes_01(node):
                return xin
            return self.freeze_all(node, f"{self.where(node)}: {name} moves the channel axis")
        if kind == "shuffle":
            return self.freeze_all(node, f"{self.where(node)}: {name} mixes channels")
        return self.freeze_all(node, f"{self.where(node)}: op {name or t} not understood")


_KNOWN_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _unknown_state(m: nn.Module) -> list[str]:
    """Parameters and buffers of a conv, linear or BatchNorm (or a subclass) that the engine would not slice: a
    parametrization (weight_norm), weight_g/weight_v, a per-channel gain a subclass adds. Such a layer is kept."""
    if not isinstance(m, (*CONV_TYPES, nn.ConvTranspose2d, nn.Linear, *BN_TYPES)):
        return []
    if weight_norm_of(m) is not None and (isinstance(m, nn.Linear) or (isinstance(m, CONV_TYPES) and m.groups == 1)):
        return []  # sliced exactly through its g and v (plan.slice_weight)
    if hasattr(m, "parametrizations"):
        return [f"a parametrization of {', '.join(m.parametrizations.keys())}"]
    names = [n for n, _ in m.named_parameters() if not n.startswith("slim_selection.")]
    names += [n for n, _ in m.named_buffers() if not n.startswith("slim_selection.")]
    return [n for n in names if n not in _KNOWN_STATE]


@torch.no_grad()
def trace_channels(model: nn.Module, example_input: Inputs, carry_raw: bool = False) -> ChannelGraph:
    """Trace ``model`` on ``example_input`` and find which channels must go together (see the module doc). With
    ``carry_raw`` (``--prune-stream``) a channel a conv reads before any BatchNorm stays prunable where a BN reads
    the same tensor: the conv then gets that BN's running mean of the channel as a constant
    (:attr:`ChannelGraph.raw`)."""
    import time

    from torch.fx.passes.shape_prop import ShapeProp

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    rewritable = True
    try:
        try:
            gm = trace(model, allow_opaque=False)
        except ConfigError:
            rewritable = False
            # An eval forward with shape-dependent control flow (YOLO's Detect decodes boxes only in eval) is traced
            # in training mode, where the head returns its raw maps; on a copy, whose BN statistics may move.
            # Failing that, the modules that cannot be traced become opaque ops (MobileViT's blocks).
            try:
                gm = trace(copy.deepcopy(model).train(), allow_opaque=False)
            except ConfigError:
                gm = trace(model)
        try:
            ShapeProp(gm).propagate(*_placeholder_args(gm, example_input))
        except Exception as e:  # noqa: BLE001
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"the traced {type(model).__name__} does not run on the example input: {text[:160]}"
            ) from None
        b = _Builder(model, carry_raw)
        b.rewritable = rewritable
        b.run(gm)
    finally:
        model.train(was_training)
    return ChannelGraph(b.parent, dict(b.frozen), b.uses, time.perf_counter() - t0, b.raw, gm.graph, b.splits)


def _literal_sizes(node: fx.Node) -> bool:
    """A split whose sizes are numbers written into forward (not computed from the tensor)."""
    sizes = node.kwargs.get("split_size_or_sections", node.args[1] if len(node.args) > 1 else None)
    if isinstance(sizes, (list, tuple)):
        return all(isinstance(s, int) for s in sizes)
    return isinstance(sizes, int)

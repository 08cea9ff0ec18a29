"""Tracing any model with torch.fx for the channel engine (:mod:`slimexport.graph`): a forward whose
pieces are iterated (``list(x.chunk(2, 1))``) traces through :class:`_PiecesProxy`; a submodule that cannot be
traced becomes one opaque op (:func:`trace`); and the helpers that run a model on its example inputs, whatever
their form (a tensor, positional tensors, keyword tensors)."""

from __future__ import annotations

import bisect
import dis
import inspect
from typing import Any

import torch
from torch import fx, nn

from slimexport.errors import ConfigError
from slimexport.oprules import BN_TYPES, CONV_TYPES, module_rule, structural

# A model's example input: one tensor, a tuple of them (several inputs), or a dict by forward's argument names.
Inputs = torch.Tensor | tuple | list | dict


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` on ``inputs`` as forward takes them (a tensor, positional tensors, or keyword tensors)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def random_like(inputs: Inputs, seed: int) -> Inputs:
    """Random inputs of the same shapes, dtypes and devices (integer tensors, ids or masks, are kept)."""
    g = torch.Generator().manual_seed(seed)

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return torch.randn(t.shape, generator=g).to(t)

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def first_sample(inputs: Inputs) -> Inputs:
    """The first sample of every batched input (for counting MACs per sample)."""
    if isinstance(inputs, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(v[:1] if isinstance(v, torch.Tensor) else v for v in inputs)
    return inputs[:1]


def _placeholder_args(gm: fx.GraphModule, inputs: Inputs) -> list:
    """``inputs`` in the order of the traced graph's placeholders (a dict by their names)."""
    if not isinstance(inputs, dict):
        return list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ConfigError(f"the example inputs have no {', '.join(missing)} (forward takes {', '.join(names)})")
    return [inputs[n] for n in names]


class _PiecesProxy(fx.Proxy):
    """A proxy that can be iterated where the number of pieces is in the graph: ``list(x.chunk(2, 1))`` (YOLO's
    C2f), ``a, b = x.split([c, c], 1)``; torch.fx's own proxy refuses any iteration but unpacking."""

    def __iter__(self):
        if self.node.op == "placeholder" and str(self.node.target).startswith("*"):
            return iter(())  # forward(x, *args): traced with the example inputs alone, *args is empty
        n = _pieces(self.node)
        if n is None:  # torch.fx's own rule, `a, b = proxy`, read from the caller's bytecode (one frame up)
            frame = inspect.currentframe().f_back
            insts = list(dis.get_instructions(frame.f_code))
            at = bisect.bisect_left(insts, frame.f_lasti, key=lambda i: i.offset)
            if at < len(insts) and insts[at].opname == "UNPACK_SEQUENCE":
                n = insts[at].argval
        return iter([self[i] for i in range(n)]) if n is not None else self.tracer.iter(self)

    def keys(self):  # forward(x, **kwargs) passing **kwargs on: empty
        if self.node.op == "placeholder" and str(self.node.target).startswith("**"):
            return []
        return super().keys()

    def __len__(self) -> int:  # list() and *args ask for the length first
        if self.node.op == "placeholder" and str(self.node.target).startswith("*"):
            return 0
        n = _pieces(self.node)
        return n if n is not None else super().__len__()


def _pieces(node: fx.Node) -> int | None:
    if node.op not in ("call_method", "call_function"):
        return None
    kind = structural(node.op, node.target)
    if kind == "chunk":
        n = node.kwargs.get("chunks", node.args[1] if len(node.args) > 1 else None)
        return n if isinstance(n, int) else None
    if kind == "split":
        sizes = node.kwargs.get("split_size_or_sections", node.args[1] if len(node.args) > 1 else None)
        return len(sizes) if isinstance(sizes, (list, tuple)) else None
    return None


class _Tracer(fx.Tracer):
    """Traces through every user module; torch.nn modules, subclasses of conv/BN/linear, and torchvision's
    StochasticDepth stay leaves, and so do the ``opaque`` modules: those whose own forward cannot be traced."""

    def __init__(self, opaque: dict[str, str] | None = None) -> None:
        super().__init__()
        self.opaque = opaque or {}
        self.stack: list[str] = []  # the modules being traced through, outermost first
        self.failed_in: list[str] | None = None  # the stack where tracing failed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _PiecesProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Subclasses of the layers the engine knows stay leaves too (timm's BatchNormAct2d: BN + activation;
        # Conv2dSame: conv with "same" padding): their channels behave as their base class's.
        if qualname in self.opaque:
            return True
        if type(m).__name__ == "StochasticDepth" or isinstance(m, (*BN_TYPES, *CONV_TYPES, nn.Linear)):
            return True
        if module_rule(m) is not None:  # a module with a rule (the user's own, registered) is one op
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


OPAQUE_LIMIT = 64  # modules traced as one op before the model is refused


def trace(model: nn.Module, allow_opaque: bool = True) -> fx.GraphModule:
    """The model's graph. A submodule whose forward cannot be traced (data-dependent control flow: MobileViT's
    ``if new_h != H``) becomes one opaque op, its channels kept (``gm.meta["slim_opaque"]``: name → why), so the
    rest of the model still prunes; the model itself failing is a one-line error."""
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # noqa: BLE001 - FX raises TraceError, TypeError, NotImplementedError, ...
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = [q for q in tracer.failed_in or [] if q and q not in opaque]
            if allow_opaque and where and len(opaque) < OPAQUE_LIMIT:
                opaque[where[-1]] = f"{type(e).__name__}: {text[:120]}"
                continue
            raise ConfigError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {text[:160]}); the graph "
                "engine needs a forward without data-dependent control flow"
            ) from None
    gm = fx.GraphModule(model, graph)
    gm.meta["slim_opaque"] = opaque
    return gm

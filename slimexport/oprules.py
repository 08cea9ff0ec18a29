"""How each op treats the channel axis: one table the graph engine reads, and a hook for the user's own modules.

The walker (:mod:`slimexport.graph`) knows the ops that create or mix channels (conv, linear, BatchNorm, cat,
split, view, element-wise ops between tensors) by their structure. Every other op is looked up here, by module
class (its base classes too), function or method name. An op with no rule freezes the channels it touches, with
the reason in the record: never a guess.

Each rule says three things:

- ``kind``: ``"pass"``: output channel c depends on input channel c alone and the op holds nothing per channel
  (activations, pooling, dropout); ``"channelwise"``: the same, with parameters of its own on the channel axis
  (PReLU, a learnable per-channel gain), which ``prune(module, keep)`` slices; ``"other"``: the walker handles its
  channels (flatten, reductions); the rule only adds the two facts below;
- ``keeps_zero``: a channel that is 0 everywhere stays 0 (ReLU: yes; sigmoid: no). A channel counts as
  normalised by a BatchNorm only through such ops;
- ``shifts``: a per-channel constant added to the input comes out unchanged (pooling, dropout, identity,
  interpolation), so β folding can carry a removed channel's constant through it.

Your own module: ``slimexport.register_module_rule(MyGain, prune=lambda m, keep: ...)`` (the slicing of its
per-channel parameters), or ``register_module_rule(MyActivation, keeps_zero=True)`` for one with no parameters.
A model file that registers its rules at import gets them wherever it is built, checkpoints included.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class OpRule:
    kind: str = "pass"  # pass | channelwise | other
    keeps_zero: bool = False
    shifts: bool = False
    prune: Callable[[nn.Module, torch.Tensor], None] | None = None  # channelwise: slice the module to `keep`


def _table(keys, **kw) -> dict:
    return {k: OpRule(**kw) for k in keys}


def _prune_prelu(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = nn.Parameter(m.weight.detach()[keep].clone(), requires_grad=m.weight.requires_grad)
    m.num_parameters = len(keep)


_KEEP_ZERO_ACT = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardtanh,
)  # fmt: skip
_SHIFTING = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)  # fmt: skip
MODULE_RULES: dict[type, OpRule] = {
    **_table(_KEEP_ZERO_ACT, keeps_zero=True),
    **_table((nn.Hardsigmoid, nn.Sigmoid, nn.Softplus, nn.ConstantPad2d)),
    **_table(_SHIFTING, keeps_zero=True, shifts=True),
    nn.ZeroPad2d: OpRule(keeps_zero=True),
    nn.PReLU: OpRule("channelwise", keeps_zero=True, prune=_prune_prelu),
    nn.Flatten: OpRule("other", keeps_zero=True),
}
FUNCTION_RULES: dict[Any, OpRule] = {
    **_table((F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.hardtanh,
              torch.relu, torch.tanh, operator.neg, torch.neg, torch.abs, torch.square), keeps_zero=True),
    **_table((F.hardsigmoid, F.sigmoid, torch.sigmoid, F.softplus, torch.clamp, torch.exp, torch.sqrt, F.pad)),
    **_table((F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
              F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.interpolate, torch.clone), keeps_zero=True,
             shifts=True),
    **_table((torch.flatten, torch.mean, torch.sum), kind="other", keeps_zero=True),
}  # fmt: skip
METHOD_RULES: dict[str, OpRule] = {
    **_table(("relu", "relu_", "tanh", "hardtanh", "hardtanh_", "abs", "neg", "square"), keeps_zero=True),
    **_table(("sigmoid", "sigmoid_", "clamp", "clamp_", "clamp_min", "exp", "sqrt")),
    **_table(("contiguous", "clone", "float", "to", "type_as", "detach"), keeps_zero=True, shifts=True),
    **_table(("mean", "sum", "amax", "flatten", "view", "reshape"), kind="other", keeps_zero=True),
}  # fmt: skip


# The weightless ops that move, split, join or combine channels. The walker (:mod:`slimexport.graph`), its analysis
# of channels read before a BatchNorm, and β folding (:mod:`slimexport.fold`) each dispatch on
# :func:`structural`'s answer: one table, so the three cannot drift apart.
def _kinds(kind: str, *targets: Any) -> dict[Any, str]:
    return dict.fromkeys(targets, kind)


STRUCTURAL: dict[Any, str] = {
    **_kinds("add", operator.add, operator.iadd, torch.add, "add", "add_"),
    **_kinds("sub", operator.sub, operator.isub, torch.sub, "sub", "sub_"),
    **_kinds("mul", operator.mul, operator.imul, torch.mul, "mul", "mul_"),
    **_kinds("div", operator.truediv, operator.itruediv, torch.div, "div", "div_"),
    **_kinds("minmax", torch.maximum, torch.minimum, "maximum", "minimum"),
    **_kinds("getitem", operator.getitem),
    **_kinds("cat", torch.cat, torch.concat, "cat", "concat"),
    **_kinds("split", torch.split, "split"),
    **_kinds("chunk", torch.chunk, "chunk"),
    **_kinds("flatten", torch.flatten, "flatten"),
    **_kinds("reshape", torch.reshape, "view", "reshape"),
    **_kinds("reduce", torch.mean, torch.sum, "mean", "sum", "amax"),
    **_kinds("permute", torch.transpose, torch.permute, "transpose", "permute"),
    **_kinds("shuffle", F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle),
    **_kinds("size", getattr, "size", "dim"),
}
BINARY = ("add", "sub", "mul", "div", "minmax")  # element-wise between tensors (or a tensor and a number)


def structural(op: str, target: Any) -> str | None:
    """What a call_function (``target`` the function) or call_method (``target`` the name) is to the channel axis,
    from :data:`STRUCTURAL`; a function named ``cat``/``concat``/``size``/``dim`` elsewhere counts as one. None:
    not a structural op (look it up in the op rules)."""
    if op not in ("call_function", "call_method") or (op == "call_method") != isinstance(target, str):
        return None
    try:
        kind = STRUCTURAL.get(target)
    except TypeError:  # an unhashable target
        return None
    if kind is None and op == "call_function":
        kind = {"cat": "cat", "concat": "cat", "size": "size", "dim": "size"}.get(getattr(target, "__name__", ""))
    return kind


def weight_norm_of(m: nn.Module) -> tuple[str, Any] | None:
    """How ``m``'s weight is weight-normalised over its output channels (w = g·v/‖v‖, dim 0), if it is: ("param",
    the parametrization list: ``torch.nn.utils.parametrizations.weight_norm``) or ("hook", the hook: the older
    ``torch.nn.utils.weight_norm``); None otherwise, or for another parametrization or dim."""
    plist = getattr(getattr(m, "parametrizations", None), "weight", None)
    if plist is not None:
        if len(m.parametrizations) == 1 and len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm":
            return ("param", plist) if plist[0].dim == 0 else None
        return None
    if hasattr(m, "parametrizations"):
        return None
    hooks = [h for h in m._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm" and h.name == "weight"]
    return ("hook", hooks[0]) if len(hooks) == 1 and hooks[0].dim == 0 else None


def register_module_rule(
    cls: type,
    *,
    keeps_zero: bool = False,
    shifts: bool = False,
    prune: Callable[[nn.Module, torch.Tensor], None] | None = None,
) -> None:
    """Teach the engine a module type of your own whose output channel c depends on input channel c alone. With
    ``prune`` (called as ``prune(module, keep)``, ``keep`` the kept channel indices, a LongTensor) the module holds
    per-channel parameters and ``prune`` slices them; without it the module holds none. ``keeps_zero``: it maps an
    all-zero channel to zero; ``shifts``: a constant added to a channel comes out unchanged. Subclasses inherit it."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_module_rule takes an nn.Module subclass, got {cls!r}")
    MODULE_RULES[cls] = OpRule("channelwise" if prune else "pass", keeps_zero, shifts, prune)


def module_rule(m: nn.Module) -> OpRule | None:
    """The rule for module ``m``: registered for its class or the nearest base class; None if there is none."""
    if type(m).__name__ == "StochasticDepth" or (isinstance(m, nn.Sequential) and len(m) == 0):
        return OpRule(keeps_zero=True)  # torchvision.ops.StochasticDepth scales whole samples
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return OpRule(keeps_zero=True)
    for cls in type(m).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


def function_rule(op: str, target: Any) -> OpRule | None:
    """The rule for a call_function (``target`` the function) or call_method (``target`` the name)."""
    if op == "call_method":
        return METHOD_RULES.get(target)
    try:
        return FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable target
        return None

"""Choosing, per channel selection, the cheaper of its two exact exports in onnxruntime: ``gather`` or ``dense``.

A selection unit is ``select → BN(k) → ReLU → consumer`` (a conv, or global pooling and the classifier). It can
export two ways that compute the same function:

- ``gather``: one Gather (or Slice) picks the k kept channels of the C-channel input; BN, ReLU and the consumer
  then work on k channels. Fewest MACs.
- ``dense``: the selection is absorbed into zero weights (:func:`slimexport.rewrite.absorb_selections`):
  BN, ReLU and the consumer work on all C channels, no index op. More MACs, but on a CPU whose convolutions
  work on channel blocks (onnxruntime's NCHWc kernels) this can still be faster than the copy plus the layout
  changes a Gather forces.

Which is faster depends on the shapes, the neighbours and the runtime, so it is measured. :func:`unit_costs` builds
both variants of each unit as small ONNX graphs at the unit's real shapes and times them side by side in
onnxruntime (interleaved, median); :func:`candidates` turns those timings into a few whole-model variants, and
``export --selection auto`` times those whole and keeps the fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimexport.config import BenchConfig
from slimexport.rewrite import absorb_selections, for_export, selection_units
from slimexport.runtime import INPUT_NAME, OUTPUT_NAME, latency


@dataclass(frozen=True)
class UnitShape:
    """What decides a unit's cost: the input's channels and size, the kept channels and the consumer."""

    channels: int  # C, the selection's input channels
    kept: tuple[int, ...]  # the kept indices
    mode: str  # the selection's op: "slice" (contiguous) or "gather"
    height: int
    width: int
    consumer: str  # "conv" or "linear" (after global average pooling)
    out_channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    def key(self) -> tuple:
        return (self.channels, len(self.kept), self.mode, self.height, self.width, self.consumer,
                self.out_channels, self.kernel, self.stride, self.padding)  # fmt: skip


def unit_shapes(model: nn.Module, image_shape: tuple[int, int, int]) -> list[UnitShape | None]:
    """The shape of every selection unit of ``model`` (None where the selection keeps every channel)."""
    units = selection_units(model)
    seen: dict[int, tuple[int, ...]] = {}
    hooks = [
        sel.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, tuple(args[0].shape)))
        for i, (sel, _, _) in enumerate(units)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape))
    finally:
        for h in hooks:
            h.remove()
    shapes: list[UnitShape | None] = []
    for i, (sel, _, consumer) in enumerate(units):
        if sel.mode == "identity":
            shapes.append(None)
            continue
        _, c, h, w = seen[i]
        if isinstance(consumer, nn.Conv2d):
            shapes.append(
                UnitShape(
                    c,
                    tuple(sel.indices()),
                    sel.mode,
                    h,
                    w,
                    "conv",
                    consumer.out_channels,
                    consumer.kernel_size[0],
                    consumer.stride[0],
                    consumer.padding[0],
                )
            )
        else:
            shapes.append(UnitShape(c, tuple(sel.indices()), sel.mode, h, w, "linear", consumer.out_features))
    return shapes


def _unit_graph(shape: UnitShape, dense: bool, batch: int, opset: int = 20) -> bytes:
    """One selection unit as a standalone ONNX model (random weights; only the cost matters)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = shape.channels if dense else len(shape.kept)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    x = INPUT_NAME
    if not dense:
        kept = np.asarray(shape.kept, dtype=np.int64)
        if shape.mode == "slice":  # as ChannelSelection exports it
            nodes.append(helper.make_node("Slice", [x, const("starts", kept[:1]), const("ends", kept[-1:] + 1),
                                                    const("axes", np.array([1], np.int64))], ["sel"]))  # fmt: skip
        else:
            nodes.append(helper.make_node("Gather", [x, const("idx", kept)], ["sel"], axis=1))
        x = "sel"
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    bn_in = [x, const("g", f32(c)), const("b", f32(c)), const("m", f32(c)), const("v", np.abs(f32(c)) + 1)]
    nodes += [helper.make_node("BatchNormalization", bn_in, ["bn"]), helper.make_node("Relu", ["bn"], ["act"])]
    if shape.consumer == "conv":
        k, p, s = shape.kernel, shape.padding, shape.stride
        w = const("w", f32(shape.out_channels, c, k, k))
        conv = helper.make_node("Conv", ["act", w], [OUTPUT_NAME], kernel_shape=[k, k], pads=[p] * 4, strides=[s, s])
        nodes.append(conv)
        ho, wo = (shape.height + 2 * p - k) // s + 1, (shape.width + 2 * p - k) // s + 1
        y_shape = [batch, shape.out_channels, ho, wo]
    else:
        nodes += [
            helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
            helper.make_node(
                "Gemm", ["flat", const("w", f32(shape.out_channels, c)), const("bias", f32(shape.out_channels))],
                [OUTPUT_NAME], transB=1,
            ),
        ]  # fmt: skip
        y_shape = [batch, shape.out_channels]
    in_hw = [shape.height, shape.width]
    graph = helper.make_graph(
        nodes,
        "unit",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, shape.channels, *in_hw])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, y_shape)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return proto.SerializeToString()


def time_unit(
    shape: UnitShape, batch: int = 1, threads: int = 1, seconds: float = 0.1, device: str = "cpu"
) -> dict[str, float]:
    """Median milliseconds of the unit's gather and dense variants in onnxruntime on ``device``, side by side."""
    graphs = {v: _unit_graph(shape, v == "dense", batch) for v in ("gather", "dense")}
    cfg = BenchConfig(batches=[batch], threads=[threads], warmup=3, min_runs=15, seconds=seconds, device=device)
    rows = latency(graphs, (shape.channels, shape.height, shape.width), cfg)
    return {r["model"]: r["median_ms"] for r in rows}


# The per-unit mixes tried by `candidates`: a unit is absorbed when its dense variant measured at most this much
# slower than its gather alone. Context (a Gather breaking a run of blocked convolutions) can make a slightly
# slower unit pay off in the whole model; whole-model timing decides among the mixes.
MIX_TOLERANCES = (0.0, 0.1, 0.25)


def unit_costs(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    batch: int = 1,
    threads: int = 1,
    seconds: float = 0.1,
    device: str = "cpu",
) -> list[dict[str, Any] | None]:
    """Per selection unit of ``model``, its gather and dense variants timed alone (None for identity selections).

    Units of the same shape are measured once.
    """
    cache: dict[tuple, dict[str, float]] = {}
    costs: list[dict[str, Any] | None] = []
    model = for_export(model)  # the consumers as exported (DenseNet's transitions: a 2×2 stride-2 conv)
    for (sel, _, _), shape in zip(selection_units(model), unit_shapes(model, image_shape)):
        if shape is None:
            costs.append(None)
            continue
        if shape.key() not in cache:
            cache[shape.key()] = time_unit(shape, batch, threads, seconds, device)
        t = cache[shape.key()]
        costs.append(
            {
                "channels": shape.channels,
                "kept": len(shape.kept),
                "op": sel.mode,
                "gather_ms": t["gather"],
                "dense_ms": t["dense"],
            }  # fmt: skip
        )
    return costs


def mix(costs: list[dict[str, Any] | None], tolerance: float = 0.0) -> list[bool]:
    """Absorb flags: each unit whose dense variant measured less than (1 + ``tolerance``) × its gather variant.
    With no tolerance a tie goes to the gather (fewer MACs, no assumption about the runtime)."""
    return [c is not None and c["dense_ms"] < c["gather_ms"] * (1 + tolerance) for c in costs]


def candidates(
    model: nn.Module, image_shape: tuple[int, int, int], batch: int = 1, threads: int = 1, device: str = "cpu"
) -> tuple[dict[str, tuple[nn.Module, list[bool]]], list[dict[str, Any]]]:
    """The exact variants of ``model`` worth timing whole, each with its per-unit absorb flags: ``gather`` (the model
    itself), ``dense`` (every selection absorbed) and the per-unit mixes of :data:`MIX_TOLERANCES` that differ from
    those two and from each other (``per-unit``, ``per-unit+10%``, ...). Whole-model timing has the last word
    because a unit's cost depends on its neighbours: onnxruntime keeps runs of convolutions in its blocked NCHWc
    layout, and a Gather breaks such a run, which no single-unit graph shows. A model without a channel-removing
    selection has just the one candidate. Also returns the per-unit timings.
    """
    units = selection_units(model)
    active = [sel.mode != "identity" for sel, _, _ in units]
    if not any(active):
        return {"gather": (model, [False] * len(units))}, []
    costs = unit_costs(model, image_shape, batch, threads, device=device)
    out = {"gather": (model, [False] * len(units)), "dense": (absorb_selections(model), [True] * len(units))}
    seen = {tuple([False] * sum(active)), tuple([True] * sum(active))}
    for tol in MIX_TOLERANCES:
        flags = mix(costs, tol)
        key = tuple(f for f, on in zip(flags, active) if on)
        if key not in seen:
            seen.add(key)
            out["per-unit" + (f"+{tol:.0%}" if tol else "")] = (absorb_selections(model, flags), flags)
    return out, [c for c in costs if c is not None]

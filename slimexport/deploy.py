"""The deploy stage: INT8 quantization (onnxruntime static QDQ) and conversion to the onnxruntime mobile format
(``.ort``), each verified against the model it came from on real test images.

- :func:`quantize`: ``quant_pre_process`` (symbolic shape inference and graph optimisation), then
  ``quantize_static`` in QDQ format with per-channel weights, calibrated on training images through a
  :class:`~onnxruntime.quantization.CalibrationDataReader`. The INT8 model is measured against the FP32 one on
  the whole test split: accuracy of both, top-1 agreement, max |Δ logits|, bytes.
- :func:`convert`: ``onnxruntime.tools.convert_onnx_models_to_ort`` (fixed or runtime optimisation, a target
  platform), then the ``.ort`` file is loaded by onnxruntime and its outputs compared with the ONNX model's.

Activation/weight types follow what is fast and safe on the CPU it runs on (:func:`choose_types`): S8S8 by
default; where the CPU lacks VNNI, U8S8 with ``reduce_range`` (7-bit weights), because the AVX2/AVX-512 integer
dot product without VNNI (``vpmaddubsw``) sums pairs of u8×s8 products into int16 and can saturate with full-range
weights. The record says which was used and why.

Every output is written atomically, and only once verified; bad input (not a model, a model whose input does not
fit the data, an empty calibration set) is a one-line error that leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from slimexport.config import OPT_STYLES, PLATFORMS, QuantizeConfig
from slimexport.data import Dataset, conform
from slimexport.errors import ConfigError, ModelFileError, ParityError, SlimExportError
from slimexport.fileio import atomic_dir, atomic_path
from slimexport.runtime import (
    NCNN_HINT,
    check_input_shape,
    io_names,
    machine_facts,
    ort_session,
    predictor,
    require_model,
    static_image_size,
)


def choose_types(types: str = "auto", facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Activation and weight types, ``reduce_range``, and why."""
    if types == "s8s8":
        return {"activation": "int8", "weight": "int8", "reduce_range": False, "why": "given: S8S8"}
    if types == "u8s8":
        return {"activation": "uint8", "weight": "int8", "reduce_range": True, "why": "given: U8S8 with reduce_range"}
    facts = facts or machine_facts()
    if facts["vnni"] or not facts["flags_known"]:
        why = (
            "S8S8, onnxruntime's default for QDQ: this CPU has VNNI, whose int8 dot products do not saturate"
            if facts["vnni"]
            else "S8S8, onnxruntime's default for QDQ (CPU flags unknown)"
        )
        return {"activation": "int8", "weight": "int8", "reduce_range": False, "why": why}
    return {
        "activation": "uint8",
        "weight": "int8",
        "reduce_range": True,
        "why": "U8S8 with reduce_range: this CPU has no VNNI, and its u8×s8 dot product (vpmaddubsw) adds pairs into "
        "int16, which full-range weights can saturate",
    }


class _Calibration:
    """onnxruntime's CalibrationDataReader over calibration inputs (an array, N first), in batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int):
        self.x, self.name, self.batch, self.pos = x, input_name, batch, 0

    def get_next(self):
        if self.pos >= len(self.x):
            return None
        xb = self.x[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.name: xb}

    def rewind(self) -> None:
        self.pos = 0


def compare(reference: str | os.PathLike, candidate: str | os.PathLike, ds: Dataset, images: int | None = None,
            batch: int = 256) -> dict[str, Any]:  # fmt: skip
    """Both models on the first ``images`` test images (all by default), each in its runtime (onnxruntime, or
    ncnn for an ``.ncnn.param`` model): each one's accuracy, top-1 agreement and max |Δ logits|."""
    threads, shape = os.cpu_count() or 1, (ds.in_channels, *ds.image_size)
    ref = predictor(reference, threads, image_shape=shape)
    cand = predictor(candidate, threads, image_shape=shape)
    n = len(ds.y_test) if images is None else min(images, len(ds.y_test))
    agree = correct_ref = correct_cand = 0
    max_diff = 0.0
    for xb, yb in ds.test_batches(batch, images=n, device="cpu"):
        x, y = xb.numpy(), yb.numpy()
        a, b = ref(x), cand(x)
        if a.shape != b.shape:
            raise ParityError(f"{candidate} outputs shape {b.shape}, {reference} {a.shape}")
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        correct_ref += int((a.argmax(1) == y).sum())
        correct_cand += int((b.argmax(1) == y).sum())
    return {
        "images": n,
        "reference_accuracy": correct_ref / n,
        "accuracy": correct_cand / n,
        "top1_agreement": agree / n,
        "max_abs_diff": max_diff,
    }


# Ops that only a quantized model holds.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul"}  # fmt: skip


def _open_onnx(model: str | os.PathLike, ds: Dataset, who: str):
    """The ONNX model's session and the data fitted to its input (resized to its image size; channels must match);
    a missing or invalid file, or another kind of model (an .ort, ncnn), is a one-line error naming it."""
    model, _ = require_model(model, ("onnx",), who)
    sess = ort_session(model)
    ds = conform(ds, static_image_size(sess), str(model))
    check_input_shape(sess, (ds.in_channels, *ds.image_size), str(model))
    return model, sess, ds


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(sorted(Counter(n.op_type for n in onnx.load(str(path)).graph.node).items()))


PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "MaxPool"}  # one input, float


def _float_inputs(path: Path, names: set[str]) -> None:
    """Make the nodes ``names`` of the QDQ model at ``path`` read their activations in float: an input that comes
    through QuantizeLinear → DequantizeLinear is read from before the pair, as it was in the FP32 model (onnxruntime's
    ``nodes_to_exclude`` leaves the weights float but still rounds the input to the producer's INT8 grid, so an
    "excluded" conv was only half back in FP32). Pairs nothing reads any more are dropped."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}

    def unround(node) -> None:  # its first (activation) input, read from before the Q/DQ pair
        src = producer.get(node.input[0])
        q = producer.get(src.input[0]) if src is not None and src.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
            src = producer.get(node.input[0])
        if src is not None and src.op_type in PASS_THROUGH:  # a ReLU before it (QDQKeepRemovableActivations)
            unround(src)

    for node in graph.node:
        if node.name in names and node.input:
            unround(node)
    while True:  # drop the Q/DQ nodes whose outputs nobody reads now
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]  # fmt: skip
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    onnx.save(proto, str(path))


def _quantize_static(model: Path, pre: Path, dst: Path, out: Path, reader, cfg: QuantizeConfig, types: dict,
                     op_types: list[str] | None = None, exclude: list[str] | None = None) -> None:  # fmt: skip
    """onnxruntime's pre-processing and static QDQ quantization of ``model`` into ``dst``; its many kinds of failure
    as one line naming the user's files (not the temporary ones)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            # where symbolic shape inference gives up (a detector's decode head) onnxruntime saves its half-done
            # model, sym_shape_infer_temp.onnx and a uuid.data, into the working directory: run it in a scratch one
            with tempfile.TemporaryDirectory(prefix="slimexport-preprocess-") as scratch, contextlib.chdir(scratch):
                try:
                    quant_pre_process(str(model.resolve()), str(pre.resolve()))
                except Exception as e:  # noqa: BLE001 - a detector's decode head defeats symbolic shape inference
                    if "symbolic shape" not in str(e):
                        raise
                    quant_pre_process(str(model.resolve()), str(pre.resolve()), skip_symbolic_shape=True)
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            reduce_range=types["reduce_range"], activation_type=qtype[types["activation"]],
                            weight_type=qtype[types["weight"]], calibrate_method=methods[cfg.calibrate],
                            op_types_to_quantize=op_types, nodes_to_exclude=exclude,
                            extra_options={"CalibTensorRangeSymmetric": False,
                                           # an excluded conv's float input must exist to be read (its ReLU)
                                           "QDQKeepRemovableActivations": bool(exclude)})  # fmt: skip
            if exclude:
                _float_inputs(dst, set(exclude))
    except SlimExportError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises many types
        text = str(e).strip().replace(str(pre), str(model)).replace(str(dst), str(out))
        raise SlimExportError(
            f"quantizing {model} failed: {type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"
        ) from None


def quantize(
    model: str | os.PathLike, out: str | os.PathLike, ds: Dataset, cfg: QuantizeConfig | None = None
) -> dict[str, Any]:
    """Quantize the FP32 ONNX ``model`` to INT8 (QDQ) at ``out``; returns the record (see the module doc)."""
    cfg = cfg or QuantizeConfig()
    cfg.validate()
    model, sess, ds = _open_onnx(model, ds, "quantize")
    if len(ds.y_train) == 0:
        raise ConfigError("the calibration set is empty: the data set has no training images")
    n = min(cfg.calib_images, len(ds.y_train))
    import torch

    idx = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(cfg.seed))[:n]  # a fixed subset
    images = ds.normalize(ds.x_train[idx].cpu()).numpy()
    rec = quantize_onnx(model, out, images, cfg, lambda dst: compare(model, dst, ds))
    if cfg.keep == "auto":
        keep = _keep_auto(model, Path(out), images, cfg, ds, rec)
        rec = keep.pop("file_record") | {"keep": keep}  # the record of the INT8 file left at ``out``
    return rec | {
        "fp32_accuracy": rec["measured"]["reference_accuracy"],
        "accuracy": rec["measured"]["accuracy"],
        "top1_agreement": rec["measured"]["top1_agreement"],
        "max_abs_diff": rec["measured"]["max_abs_diff"],
        "images": rec.pop("measured")["images"],
    }


def _ms_b1(reference: Path, candidate: Path, image_shape: tuple[int, ...]) -> tuple[float, float]:
    """Median ms of both models at batch 1, one thread, timed side by side."""
    from slimexport.config import BenchConfig
    from slimexport.runtime import latency

    rows = latency({"fp32": reference, "int8": candidate}, image_shape, BenchConfig(batches=[1], threads=[1]))
    ms = {r["model"]: r["median_ms"] for r in rows}
    return ms["fp32"], ms["int8"]


WEIGHTED = ("Conv", "Gemm", "MatMul")  # the nodes with weights that INT8 can put back to FP32 one by one


def weight_errors(model: Path) -> list[tuple[str, float]]:
    """Each weighted node's (:data:`WEIGHTED`: convs and the classifier) weight error under per-output-channel
    symmetric INT8, relative to its weights' norm, worst first (data-free): which layers the measured ranking
    (:func:`rank_layers`) looks at first where a model has more than :data:`RANK_MAX` of them."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type in WEIGHTED and len(node.input) > 1 else None
        if w is None or w.ndim < 2:
            continue
        flat = w.reshape(w.shape[0], -1).astype(np.float64)
        scale = np.abs(flat).max(axis=1, keepdims=True) / 127.0
        q = np.round(flat / np.where(scale > 0, scale, 1)) * scale
        out.append((node.name, float(np.linalg.norm(flat - q) / max(np.linalg.norm(flat), 1e-12))))
    return sorted(out, key=lambda x: -x[1])


RANK_IMAGES = 300  # NNCF's ranking subset
RANK_MAX = 32  # layers ranked by measurement at most (the worst by weight error, where a model has more)


def _logits(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    sess = ort_session(path, threads=os.cpu_count() or 1)
    inp, out = io_names(sess)
    return np.concatenate([sess.run([out], {inp: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def rank_layers(model: Path, int8: Path, images: np.ndarray, cfg: QuantizeConfig) -> list[dict[str, Any]]:
    """Which layers (convs, the classifier) lose most in INT8, measured as NNCF's accuracy control does: on a
    ranking subset (the :data:`RANK_IMAGES` calibration images whose INT8 output is furthest from FP32's, those
    whose class changed first), each layer alone is put back in FP32 (quantized again with it excluded) and scored
    by the top-1 agreement with FP32 it restores, then by its mean squared logit error. The calibration images
    stand in for NNCF's validation subset, so the test images the drop is measured on play no part in the choice.
    Returns a row per layer (``layer``, ``agreement``, ``mse``), the most harmful first."""
    from slimexport.console import make_progress

    ref, q = _logits(model, images), _logits(int8, images)
    err = ((q - ref) ** 2).mean(axis=1)
    order = np.lexsort((-err, q.argmax(1) == ref.argmax(1)))[:RANK_IMAGES]  # changed class first, then by error
    sub, want = images[order], ref[order]
    rows = []
    layers = [name for name, _ in weight_errors(model)[:RANK_MAX]]
    with tempfile.TemporaryDirectory(prefix="slimexport-rank-") as tmp, make_progress() as progress:
        task = progress.add_task("ranking layers for INT8", total=len(layers), info="each alone back in FP32")
        for name in layers:
            path = Path(tmp) / "rank.onnx"
            quantize_onnx(model, path, images, cfg, exclude=[name])
            got = _logits(path, sub)
            rows.append({"layer": name, "agreement": float((got.argmax(1) == want.argmax(1)).mean()),
                         "mse": float(((got - want) ** 2).mean())})  # fmt: skip
            progress.advance(task)
    return sorted(rows, key=lambda r: (-r["agreement"], r["mse"]))


def _keep_auto(model: Path, out: Path, images: np.ndarray, cfg: QuantizeConfig, ds: Dataset, rec: dict) -> dict:
    """``--int8-keep auto``: is the INT8 model faster than FP32 here and within ``max_drop``? If it is faster but
    loses more, the layers are ranked by the accuracy each one alone costs (:func:`rank_layers`) and put back to
    FP32 one at a time in that order, quantizing again and measuring the drop each time, until it fits or half
    the layers are back (NNCF's accuracy control); the INT8 file that fits is left at ``out``. Returns the
    decision, with ``file_record`` the quantizer's record of the file left at ``out`` (the last one quantized)."""
    shape = (ds.in_channels, *ds.image_size)
    fp32_ms, int8_ms = _ms_b1(model, out, shape)
    drop = rec["measured"]["reference_accuracy"] - rec["measured"]["accuracy"]
    tries = [{"fp32_layers": 0, "accuracy_drop": drop, "int8_ms": int8_ms}]
    base = {"fp32_ms": fp32_ms, "max_drop": cfg.max_drop, "tries": tries, "file_record": rec}
    if int8_ms >= fp32_ms:
        return base | {"chosen": "fp32", "why": f"INT8 is not faster here: {int8_ms:.3g} ms against FP32's "
                       f"{fp32_ms:.3g} ms (batch 1, one thread)"}  # fmt: skip
    if drop > cfg.max_drop:
        t0 = time.perf_counter()
        base["ranking"] = rank_layers(model, out, images, cfg)
        base["ranking_seconds"] = time.perf_counter() - t0
    ranked = [r["layer"] for r in base.get("ranking", [])]
    k = 1
    while drop > cfg.max_drop and k <= max(1, len(ranked) // 2):
        excluded = ranked[:k]
        again = quantize_onnx(model, out, images, cfg, lambda dst: compare(model, dst, ds), exclude=excluded)
        base["file_record"] = again
        drop = again["measured"]["reference_accuracy"] - again["measured"]["accuracy"]
        fp32_ms, int8_ms = _ms_b1(model, out, shape)
        tries.append({"fp32_layers": k, "layers": excluded, "accuracy_drop": drop, "int8_ms": int8_ms})
        k += 1
    if drop > cfg.max_drop:
        back = tries[-1]["fp32_layers"]
        return base | {"chosen": "fp32", "why": f"INT8 loses {100 * drop:.2f} pt > --int8-max-drop "
                       f"{100 * cfg.max_drop:.2f} even with {back} layers back in FP32"}  # fmt: skip
    if int8_ms >= fp32_ms:
        return base | {"chosen": "fp32", "why": f"within the accuracy budget only with {tries[-1]['fp32_layers']} "
                       f"layers in FP32, and then not faster ({int8_ms:.3g} against {fp32_ms:.3g} ms)"}  # fmt: skip
    n = tries[-1]["fp32_layers"]
    return base | {"chosen": "int8" if n == 0 else f"int8, {n} layer(s) in FP32",
                   "why": f"×{fp32_ms / int8_ms:.2f} faster than FP32 at batch 1, one thread, losing "
                   f"{100 * drop:.2f} pt (≤ {100 * cfg.max_drop:.2f})" + (f"; the {n} layer(s) whose INT8 cost most "
                   "accuracy, measured one at a time, stay FP32" if n else "")}  # fmt: skip


def quantize_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    calibration: np.ndarray,
    cfg: QuantizeConfig,
    measure: Any = None,
    op_types: list[str] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """The quantizer of any ONNX model with one image input: static QDQ INT8 at ``out`` (atomically), calibrated on
    ``calibration`` (inputs as the model takes them, N first); ``measure(path)``, where given, is called on the
    INT8 file before it is moved into place and its result recorded as ``measured``. ``op_types``: quantize only
    these operators (a detector's ``["Conv"]``: its box decoding, which mixes pixel coordinates and
    probabilities in one tensor, stays float); all that onnxruntime quantizes by default otherwise."""
    model = Path(model)
    quantized = sorted(set(_op_counts(model)) & QUANTIZED_OPS)
    if quantized:
        raise ModelFileError(
            f"{model} is already quantized (it has {', '.join(quantized)} nodes): quantize its FP32 source instead"
        )
    types = choose_types(cfg.types)
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp,
        atomic_path(out, suffix=".onnx") as dst,
    ):
        reader = _Calibration(calibration, io_names(ort_session(model))[0], cfg.calib_batch)
        _quantize_static(model, Path(tmp) / "pre.onnx", dst, out, reader, cfg, types, op_types, exclude)
        quant_seconds = time.perf_counter() - t0
        measured = measure(dst) if measure is not None else None
        size = dst.stat().st_size
        ops = _op_counts(dst)
    return {
        "path": str(out),
        "source": str(model),
        "bytes": size,
        "fp32_bytes": model.stat().st_size,
        "bytes_ratio": size / model.stat().st_size,
        "format": "QDQ",
        "activation_type": types["activation"],
        "weight_type": types["weight"],
        "reduce_range": types["reduce_range"],
        "types_why": types["why"],
        "per_channel": cfg.per_channel,
        "calibrate": cfg.calibrate,
        "calib_images": len(calibration),
        "op_counts": ops,
        "quantize_seconds": quant_seconds,
        "config": asdict(cfg),
        "op_types": op_types or "default",
        "fp32_nodes": exclude or [],
    } | ({"measured": measured} if measured is not None else {})


def convert(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    ds: Dataset,
    optimization_style: str = "fixed",
    target_platform: str = "amd64",
    parity_images: int = 512,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Convert ``model`` to the onnxruntime mobile format in ``out_dir`` (``NAME.ort`` plus the operator config a
    reduced onnxruntime build takes), load the ``.ort`` in onnxruntime and check its outputs against the ONNX
    model's on real test images. ``out_dir`` appears only once verified."""
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if optimization_style not in OPT_STYLES:
        raise ConfigError(f"--optimization-style must be fixed or runtime, got {optimization_style!r}")
    if target_platform not in PLATFORMS:
        raise ConfigError(f"--target-platform must be amd64 or arm, got {target_platform!r}")
    model, _, ds = _open_onnx(model, ds, "convert")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as work:
        src = work / "src"
        src.mkdir()
        shutil.copy2(model, src / model.name)
        built = work / "result"
        style = {"fixed": OptimizationStyle.Fixed, "runtime": OptimizationStyle.Runtime}[optimization_style]
        log = io.StringIO()
        try:
            # its native log warns that a fixed-style model holds optimisations for this CPU: the record says so
            ort.set_default_logger_severity(3)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                convert_onnx_models_to_ort(src, built, [style], target_platform=target_platform)
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            raise SlimExportError(f"converting {model} to .ort failed: {type(e).__name__}: {str(e)[:200]}") from None
        orts = sorted(built.rglob("*.ort"))
        if len(orts) != 1:
            raise SlimExportError(f"converting {model} to .ort produced {len(orts)} .ort files, expected one")
        par = compare(model, orts[0], ds, images=parity_images)
        if not par["max_abs_diff"] <= atol:
            raise ParityError(
                f"the .ort model differs from {model} by {par['max_abs_diff']:.3g} > atol {atol:g}; "
                f"{out_dir} not written"
            )
        ort_path = out_dir / orts[0].name
    return {
        "path": str(ort_path),
        "dir": str(out_dir),
        "source": str(model),
        "bytes": ort_path.stat().st_size,
        "onnx_bytes": model.stat().st_size,
        "optimization_style": optimization_style,
        "target_platform": target_platform,
        "parity": {k: par[k] for k in ("images", "max_abs_diff", "top1_agreement")} | {"atol": atol},
        "files": sorted(p.name for p in out_dir.iterdir()),
        "seconds": time.perf_counter() - t0,
    }


def ncnn_available() -> bool:
    try:
        import ncnn  # noqa: F401
        import pnnx  # noqa: F401
    except ImportError:
        return False
    return True


def pnnx_convert(model: Path, work: Path, shape: tuple[int, ...]) -> tuple[Path, Path]:
    """pnnx's conversion of the ONNX ``model`` to ncnn in the folder ``work``: (``.ncnn.param``, ``.ncnn.bin``), or
    a one-line error naming the model."""
    import subprocess

    import pnnx

    exe = Path(pnnx.__file__).parent / "pnnx"
    src = work / model.name
    if src.resolve() != Path(model).resolve():
        shutil.copy2(model, src)
    res = subprocess.run([str(exe), src.name, f"inputshape=[{','.join(str(d) for d in shape)}]"], cwd=work,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    param, weights = work / f"{model.stem}.ncnn.param", work / f"{model.stem}.ncnn.bin"
    if res.returncode != 0 or not param.is_file() or not weights.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        raise SlimExportError(f"pnnx could not convert {model} to ncnn: {tail[0][:200]}")
    return param, weights


def convert_ncnn(
    model: str | os.PathLike, out_dir: str | os.PathLike, ds: Dataset, parity_images: int = 256, atol: float = 1e-2
) -> dict[str, Any]:
    """Convert an ONNX model to ncnn (a runtime made for phones: ARM NEON, Vulkan) with pnnx, then run the ncnn
    model on real test images and compare it with onnxruntime. ``out_dir`` gets ``NAME.ncnn.param`` and
    ``NAME.ncnn.bin`` once verified. ncnn's convolutions (Winograd, other summation orders) differ from
    onnxruntime's in the last digits, so the default tolerance on logits is 1e-2; the record keeps the measured
    difference and the top-1 agreement."""

    if not ncnn_available():
        raise ConfigError(NCNN_HINT)
    import pnnx

    model, _, ds = _open_onnx(model, ds, "convert --to ncnn")
    if "QuantizeLinear" in _op_counts(model):
        raise ConfigError(
            f"{model} is an INT8 (QDQ) model: ncnn takes the FP32 model (its own INT8 uses ncnn2int8's calibration)"
        )
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as work:
        param, weights = pnnx_convert(model, work, (1, ds.in_channels, *ds.image_size))
        built = work / "result"
        built.mkdir()
        os.replace(param, built / param.name)
        os.replace(weights, built / weights.name)
        par = compare(model, built / param.name, ds, images=parity_images)
        if not par["max_abs_diff"] <= atol:
            raise ParityError(
                f"the ncnn model differs from {model} by {par['max_abs_diff']:.3g} > atol {atol:g}; {out_dir} not "
                "written"
            )
    path = out_dir / f"{model.stem}.ncnn.param"
    import ncnn

    return {
        "path": str(path),
        "dir": str(out_dir),
        "source": str(model),
        "runtime": f"ncnn {ncnn.__version__}, pnnx {getattr(pnnx, '__version__', '?')}",
        "bytes": path.stat().st_size + (out_dir / f"{model.stem}.ncnn.bin").stat().st_size,
        "onnx_bytes": model.stat().st_size,
        "parity": {k: par[k] for k in ("images", "max_abs_diff", "top1_agreement")} | {"atol": atol},
        "seconds": time.perf_counter() - t0,
    }

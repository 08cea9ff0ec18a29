"""The runtime everyone uses: onnxruntime sessions, execution providers, input/output names, latency timing.

A leaf module: it imports nothing else from slimexport but errors, so export, bench, the ``auto`` export choice
and the deploy stage (INT8, ``.ort``) all build on it without import cycles.

A model file that is not a valid ONNX (or ``.ort``) model is a :class:`ModelFileError` with one line, never the
runtime's own exception. A provider is checked by creating a real session on it and reading back the providers
the session got: onnxruntime-gpu lists ``CUDAExecutionProvider`` even where its CUDA/cuDNN libraries fail to
load, and then silently runs on the CPU.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from slimexport.config import BenchConfig, parse_device
from slimexport.errors import ConfigError, DeviceError, ModelFileError

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the names slimexport's own exports use
CUDA_HINT = (
    "switch to the GPU build with: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
    "(it shares the CPU wheel's import folder), with the CUDA and cuDNN its release notes name"
)


def _providers(provider: str, device_id: int = 0) -> list:
    return [(provider, {"device_id": str(device_id)})] if provider == "CUDAExecutionProvider" else [provider]


def _probe_model() -> bytes:
    """A one-node ONNX model, to see which provider a real session gets."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


@cache
def provider_for(device: str) -> str:
    """The onnxruntime provider for ``device``, checked by a real session: :class:`DeviceError` in one line if the
    session does not really run on it (on CUDA: libraries that fail to load make onnxruntime fall back to the
    CPU)."""
    import onnxruntime as ort

    provider, device_id = parse_device(device)
    if provider == "CPUExecutionProvider":
        return provider
    available = ort.get_available_providers()
    if provider not in available:
        raise DeviceError(
            f"onnxruntime {ort.__version__} has no {provider} (available: {', '.join(available)}); {CUDA_HINT}"
        )
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: load CUDA/cuDNN from the pip packages or torch
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - the session below is the real check
            pass
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        got = ort.InferenceSession(_probe_model(), so, providers=_providers(provider, device_id)).get_providers()
    except Exception as e:  # noqa: BLE001 - any failure to create the session means the provider is not usable
        got, why = [], _first_line(e)
    else:
        why = "its CUDA/cuDNN libraries did not load, so onnxruntime fell back to the CPU"
    if not got or got[0] != provider:
        raise DeviceError(f"onnxruntime lists {provider} but cannot run on it ({why}); {CUDA_HINT}")
    return provider


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_model_file(path: str | os.PathLike) -> Path:
    """A path that exists and is a file: else :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    return path


FORMATS = {"onnx": "an ONNX model", "ort": "an .ort model (onnxruntime's mobile format)", "ncnn": "an ncnn model"}


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None


def _is_ort(path: Path) -> bool:
    """An onnxruntime mobile-format model: a flatbuffer whose identifier (bytes 4-8) is ``ORTM``."""
    return _head(path)[4:8] == b"ORTM"


def model_format(path: str | os.PathLike) -> str:
    """What a model file is, read from its first bytes rather than its name: ``onnx``, ``ort`` (a flatbuffer whose
    identifier is ``ORTM``) or ``ncnn`` (a ``.ncnn.param`` text, magic 7767517). The one place every command asks;
    a missing file, or one that is none of these (text, an image, a checkpoint), is a one-line
    :class:`ModelFileError` naming it."""
    path = check_model_file(path)
    head = _head(path)
    if head[4:8] == b"ORTM":  # as _is_ort reads it
        return "ort"
    if head.lstrip().startswith(b"7767517"):
        return "ncnn"
    if head and head[0] in (0x08, 0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42):  # a protobuf's first field tag
        import onnx

        try:
            onnx.load(str(path), load_external_data=False)
            return "onnx"
        except Exception:  # noqa: BLE001 - google.protobuf's DecodeError, onnx's own errors
            pass
    raise ModelFileError(f"{path} is not a valid ONNX, .ort or ncnn model (empty, truncated, or another file)")


def require_model(path: str | os.PathLike, accepted: tuple[str, ...], who: str) -> tuple[Path, str]:
    """(path, format) of a model file ``who`` (a command) can read, or a one-line :class:`ModelFileError` that
    says what the file is and what ``who`` takes."""
    fmt = model_format(path)
    if fmt not in accepted:
        takes = " or ".join(FORMATS[a] for a in accepted)
        raise ModelFileError(f"{path} is {FORMATS[fmt]}; {who} takes {takes}: give it the .onnx it came from")
    return Path(path), fmt


def ort_session(
    path: str | os.PathLike | bytes,
    threads: int = 1,
    provider: str = "CPUExecutionProvider",
    profile_prefix: str | None = None,
    device_id: int = 0,
):
    """An onnxruntime session (sequential, all graph optimisations); a model file that is missing, not ONNX/ORT,
    truncated or invalid is a one-line :class:`ModelFileError`; a session that did not get ``provider`` is a
    :class:`DeviceError`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if isinstance(path, bytes):
        src: str | bytes = path
        what = "in-memory model"
    else:
        src = str(check_model_file(path))
        what = src
        if _is_ort(Path(src)):
            so.add_session_config_entry("session.load_model_format", "ORT")
    try:
        sess = ort.InferenceSession(src, so, providers=_providers(provider, device_id))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises InvalidProtobuf, InvalidGraph, Fail, ... (pybind types)
        raise ModelFileError(f"{what} is not a valid ONNX/ORT model onnxruntime can load ({_first_line(e)})") from None
    if sess.get_providers()[0] != provider:
        raise DeviceError(f"the onnxruntime session for {what} runs on {sess.get_providers()[0]}, not {provider}")
    return sess


def io_names(sess) -> tuple[str, str]:
    """The (first) input and output names of a session: slimexport's own are ``input``/``logits``, a user's
    model may name them otherwise."""
    return sess.get_inputs()[0].name, sess.get_outputs()[0].name


def check_input_shape(sess, image_shape: tuple[int, ...], what: str) -> None:
    """The model's input must be (N, *image_shape) where its dimensions are static."""
    shape = sess.get_inputs()[0].shape
    if len(shape) != 1 + len(image_shape):
        raise ModelFileError(f"{what} takes inputs of rank {len(shape)} ({shape}); the data has {len(image_shape) + 1}")
    for want, got in zip(image_shape, shape[1:]):
        if isinstance(got, int) and got != want:
            dims = "×".join(map(str, image_shape))
            raise ModelFileError(f"{what} takes inputs of shape {shape}; the data set's images are {dims}")


def static_image_size(sess) -> list[int] | None:
    """(H, W) of a session's NCHW input where both are fixed numbers, else None."""
    shape = sess.get_inputs()[0].shape
    if len(shape) == 4 and all(isinstance(v, int) for v in shape[2:]):
        return [int(shape[2]), int(shape[3])]
    return None


NCNN_HINT = "the ncnn runtime is an optional extra: pip install -e '.[ncnn]' (or pip install ncnn pnnx)"


def is_ncnn(path: Any) -> bool:
    return not isinstance(path, bytes) and str(path).endswith(".ncnn.param")


class NcnnModel:
    """A model in ncnn's format (``NAME.ncnn.param`` + ``NAME.ncnn.bin``, as pnnx writes them), run in fp32 (no
    fp16/bf16 storage or arithmetic, so it can be compared with onnxruntime). ncnn takes one image at a time; a
    batch runs image by image, as on a phone."""

    def __init__(self, param: str | os.PathLike, threads: int = 1):
        try:
            import ncnn
        except ImportError:
            raise ConfigError(NCNN_HINT) from None
        param = check_model_file(param)
        weights = Path(str(param)[: -len(".param")] + ".bin")
        check_model_file(weights)
        self.ncnn = ncnn
        net = ncnn.Net()
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
            setattr(net.opt, flag, False)
        net.opt.num_threads = threads
        if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
            raise ModelFileError(f"{param} is not an ncnn model ncnn can load")
        self.net = net
        self.input, self.output = _ncnn_blobs(param)

    def run(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for xi in x:
            ex = self.net.create_extractor()
            ex.input(self.input, self.ncnn.Mat(np.ascontiguousarray(xi)).clone())
            _, out = ex.extract(self.output)
            outs.append(np.array(out).reshape(-1))
        return np.stack(outs)


def _ncnn_blobs(param: Path) -> tuple[str, str]:
    """The input blob (the Input layer's) and the output blob (the last layer's) of an ncnn .param file."""
    try:
        lines = [ln.split() for ln in Path(param).read_text().splitlines()[2:] if ln.strip()]
        first = next(ln for ln in lines if ln[0] == "Input")
        last = lines[-1]
        n_in, n_out = int(last[2]), int(last[3])
        return first[4], last[4 + n_in + n_out - 1]
    except (StopIteration, IndexError, ValueError, OSError):
        raise ModelFileError(f"{param} is not an ncnn .param file") from None


def predictor(
    path: str | os.PathLike,
    threads: int = 1,
    provider: str = "CPUExecutionProvider",
    image_shape: tuple[int, ...] | None = None,
    device_id: int = 0,
):
    """A function from a float32 NCHW batch to logits, for an ONNX/ORT file (onnxruntime) or an ncnn model; with
    ``image_shape``, an ONNX model whose input does not fit it is a one-line error (ncnn records no shape)."""
    if is_ncnn(path):
        return NcnnModel(path, threads).run
    sess = ort_session(path, threads=threads, provider=provider, device_id=device_id)
    if image_shape is not None:
        check_input_shape(sess, image_shape, str(path))
    return lambda x: run_logits(sess, x)


class _Runner:
    """One session and a fixed input; ``run()`` times one inference. On CUDA, IOBinding keeps inputs and outputs
    on the device (``device_id``) so that no host copy is timed. An ncnn model runs on the CPU, image by image."""

    def __init__(
        self,
        path: Path | bytes,
        provider: str,
        batch: int,
        threads: int,
        image_shape: tuple[int, ...],
        device_id: int = 0,
    ):
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal((batch, *image_shape)).astype(np.float32)
        self.ncnn = NcnnModel(path, threads) if is_ncnn(path) else None
        self.cuda = False
        if self.ncnn is not None:
            self.x = x
            return
        self.sess = ort_session(path, threads=threads, provider=provider, device_id=device_id)
        self.input, self.output = io_names(self.sess)
        self.cuda = provider == "CUDAExecutionProvider"
        if self.cuda:
            self.binding = self.sess.io_binding()
            self.x = ort.OrtValue.ortvalue_from_numpy(x, "cuda", device_id)
            self.binding.bind_ortvalue_input(self.input, self.x)
            self.binding.bind_output(self.output, "cuda", device_id)
        else:
            self.feed = {self.input: x}

    def run(self) -> float:
        t0 = time.perf_counter()
        if self.ncnn is not None:
            self.ncnn.run(self.x)
        elif self.cuda:
            self.sess.run_with_iobinding(self.binding)
        else:
            self.sess.run([self.output], self.feed)
        return (time.perf_counter() - t0) * 1e3


def latency(
    models: dict[str, Path | bytes], image_shape: tuple[int, ...], cfg: BenchConfig, progress=None
) -> list[dict]:
    """Rows {model, provider, batch, threads, median_ms, p90_ms, runs} for every model (a path or serialized ONNX)
    and setting. Models are timed side by side: runs alternate between them, so that machine noise hits all."""
    cfg.validate()
    provider = provider_for(cfg.device)
    device_id = parse_device(cfg.device)[1]
    threads = cfg.threads if cfg.device == "cpu" else [cfg.threads[0]]
    rows = []
    settings = [(b, t) for b in cfg.batches for t in threads]
    task = progress.add_task("latency", total=len(settings), info="") if progress is not None else None
    for batch, nthreads in settings:
        if task is not None:
            progress.update(task, info=f"batch {batch}, {nthreads} thread(s)")
        runners = {
            name: _Runner(path, provider, batch, nthreads, image_shape, device_id) for name, path in models.items()
        }
        for r in runners.values():  # warm-up (on CUDA this also covers cuDNN's algorithm search)
            for _ in range(cfg.warmup):
                r.run()
        times: dict[str, list[float]] = defaultdict(list)
        start = time.perf_counter()
        budget = cfg.seconds * len(runners)
        while True:
            for name, r in runners.items():
                times[name].append(r.run())
            n = len(times[next(iter(runners))])
            if n >= cfg.max_runs or (n >= cfg.min_runs and time.perf_counter() - start >= budget):
                break
        for name, ts in times.items():
            rows.append(
                {
                    "model": name,
                    "provider": "ncnn" if runners[name].ncnn is not None else provider,
                    "batch": batch,
                    "threads": nthreads,
                    "median_ms": float(np.median(ts)),
                    "p90_ms": float(np.percentile(ts, 90)),
                    "runs": len(ts),
                }
            )
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return rows


def run_logits(sess, x: np.ndarray) -> np.ndarray:
    """The first output of ``sess`` on ``x`` (float32 NCHW)."""
    inp, out = io_names(sess)
    return sess.run([out], {inp: x})[0]


def machine_facts() -> dict[str, Any]:
    """The CPU features that decide onnxruntime's fast paths: vendor/model, AVX2, AVX-512, VNNI."""
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),  # native bf16 arithmetic (Intel AMX, Zen 4+)
        "flags_known": bool(flags),
    }

"""The records stages hand each other and write to disk, as types: one place that says what report.json holds.

Each field carries its meaning (``Annotated[type, "doc"]``); :func:`schema_table` renders the README's
report.json table from these types (a test keeps the two equal), so the documentation cannot drift from the code.
Accuracies are fractions in [0, 1]; ratios are baseline ÷ pruned.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict, get_args, get_origin, get_type_hints, is_typeddict


class LatencyRow(TypedDict):
    provider: Annotated[str, "onnxruntime execution provider (or ncnn)"]
    batch: Annotated[int, "batch size"]
    threads: Annotated[int, "intra-op threads"]
    median_ms: Annotated[float, "median latency, ms"]
    p90_ms: Annotated[float, "90th percentile, ms"]
    runs: Annotated[int, "timed runs"]


class Parity(TypedDict):
    max_abs_diff: Annotated[float, "largest |ONNX − PyTorch| over the logits"]
    top1_agreement: Annotated[float, "fraction of images with the same top-1 class"]
    images: Annotated[int, "real test images compared"]
    atol: Annotated[float, "the tolerance export enforced"]


class ModelReport(TypedDict, total=False):
    checkpoint: Annotated[str, "its checkpoint in the run directory"]
    onnx: Annotated[str, "its ONNX file in the run directory"]
    params: Annotated[int, "parameters"]
    macs: Annotated[int, "multiply-accumulates per image"]
    onnx_bytes: Annotated[int, "ONNX file size"]
    accuracy: Annotated[float, "onnxruntime, whole test split"]
    torch_accuracy: Annotated[float, "PyTorch, whole test split"]
    latency: Annotated[list[LatencyRow], "one row per (batch, threads)"]
    parity: Annotated[Parity, "the export's check against PyTorch"]
    op_counts: Annotated[dict[str, int], "ONNX op type → count"]
    op_time: Annotated[dict[str, Any], "`shares` of node time per op type at batch 1 (profiler), `provider`"]
    selection: Annotated[dict[str, Any], "--selection auto: the chosen export and every candidate's time"]
    sparse_accuracy: Annotated[float, "pruned only: the sparse-trained model's accuracy"]
    accuracy_before_refine: Annotated[float, "pruned only: right after pruning"]


class SpeedupRow(TypedDict):
    provider: Annotated[str, "execution provider"]
    batch: Annotated[int, "batch size"]
    threads: Annotated[int, "threads"]
    speedup: Annotated[float, "baseline median ÷ pruned median"]


class Ratios(TypedDict):
    params: Annotated[float, "baseline ÷ pruned"]
    macs: Annotated[float, "baseline ÷ pruned"]
    onnx_bytes: Annotated[float, "baseline ÷ pruned"]
    speedup: Annotated[list[SpeedupRow], "per setting"]


class PruneLayer(TypedDict):
    name: Annotated[str, "the BN's module name"]
    before: Annotated[int, "channels before"]
    after: Annotated[int, "channels after"]
    kept: Annotated[list[int], "the kept channel indices"]


class PruneRecord(TypedDict, total=False):
    percent: Annotated[
        float,
        "where the threshold sits: the fraction of the prunable BN channels (γ values, the "
        "paper's count) at or below it, asked (--percent) or found (--max-macs); floors and "
        "rounding can keep some of them, so the fraction pruned is pruned_fraction",
    ]
    threshold: Annotated[float | None, "|γ| above which channels survive"]
    min_channels: Annotated[int, "per-layer floor"]
    min_keep: Annotated[float, "per-layer floor as a fraction of the layer's channels (0: none)"]
    normalize: Annotated[str, "|γ| compared as they are (none, the paper's) or per layer ÷ its max or mean"]
    round_to: Annotated[int, "channel counts in multiples of this"]
    round_to_reason: Annotated[str, "why that multiple (auto: the CPU's onnxruntime channel block)"]
    prune_stream: Annotated[bool, "--prune-stream: channels read before any BatchNorm were pruned too (mean carried)"]
    fold: Annotated[bool, "β folding: removed channels' constant output carried into the layers that read them"]
    folded: Annotated[dict[str, int], "per layer that reads removed channels: how many constants were folded into it"]
    max_macs: Annotated[float, "--max-macs: the budget, as a fraction of the unpruned MACs"]
    macs_fraction: Annotated[float, "--max-macs: the fraction reached"]
    latency_target: Annotated[
        dict[str, Any],
        "--target-speedup / --max-latency: `{target_speedup or max_latency_ms, runtime, batch, threads, image_shape, "
        "probes: [{ms, base_ms, speedup, cached}], retimed: {ms, base_ms, speedup}, search_seconds, cache, allocate, "
        "latency_table (--allocate latency: `{groups: [{layer, channels, removed, ms, base_ms, ms_per_channel, "
        "cached}], seconds}`, each producing layer's channels half pruned in the whole model and timed)}`, "
        "`unreachable` where even the most pruned model is not that fast (it is then the result)",
    ]
    source: Annotated[str, "the checkpoint that was pruned"]
    channels_before: Annotated[int, "prunable BN channels before"]
    channels_after: Annotated[int, "and after"]
    pruned_fraction: Annotated[
        float,
        "the fraction pruned, the one meaning reports and summaries use: 1 − "
        "channels_after / channels_before, over every BatchNorm's channels",
    ]
    floored_layers: Annotated[list[str], "layers kept at their floor"]
    undone: Annotated[
        dict[str, Any],
        "only when --round-to or the floors put back most of what the threshold removed: `{threshold_alone, "
        "removed, by, advice}`",
    ]
    layers: Annotated[list[PruneLayer], "per BN"]
    params_before: Annotated[int, "parameters before"]
    params_after: Annotated[int, "and after"]
    macs_before: Annotated[int, "MACs per image before"]
    macs_after: Annotated[int, "and after"]
    groups: Annotated[list[dict[str, Any]], "channel groups, `{layers, channels, removed, reasons}`"]
    unprunable: Annotated[list[dict[str, Any]], "groups left as they are, with the reasons"]
    plan: Annotated[dict[str, Any], "kept input/output indices per module (and `bias` where folding added one)"]
    classes: Annotated[dict[str, int], "channel classes (channels removed together) in all, prunable, removed"]
    trace_seconds: Annotated[float, "time to trace and group"]
    steps: Annotated[
        list[dict[str, Any]],
        "--prune-steps: per step `{step, percent_of_rest, channels_after, accuracy_pruned, refine_epochs, "
        "accuracy_refined}`",
    ]


class StageRecord(TypedDict, total=False):
    seconds: Annotated[float, "wall time"]
    accuracy: Annotated[float, "the stage's model's test accuracy"]
    images_per_s: Annotated[float, "training throughput (compile time excluded)"]
    compile_seconds: Annotated[float, "--compile: compilation, outside the timed epochs"]
    reused: Annotated[str, "--baseline/--sparse: the checkpoint taken instead of training"]
    sparsity: Annotated[float, "sparse: the s it trained with (--sparsity auto: the probe's choice)"]
    regularizer: Annotated[str, "sparse: l1 or polar"]
    sparsity_probe: Annotated[dict[str, Any], "--sparsity auto: `{sparsity, reason, target, table, ...}`"]
    distill: Annotated[dict[str, Any], "refine with --distill: `{teacher, teacher_accuracy, weight, temperature}`"]


class VariantRow(TypedDict, total=False):
    name: Annotated[str, "baseline, pruned, baseline-int8, pruned-int8, pruned-ort, pruned-int8-ort, pruned-ncnn"]
    file: Annotated[str, "in the run directory"]
    bytes: Annotated[int, "file size (ncnn: .param + .bin)"]
    accuracy: Annotated[float, "in its runtime, whole test split"]
    parity: Annotated[dict[str, Any], "`reference`, `top1_agreement`, `max_abs_diff` against the model it came from"]
    types: Annotated[str, "INT8: activation/weight types"]
    keep: Annotated[dict[str, str], "INT8, --int8-keep auto: `{chosen, why}` (int8, int8 with N layers in FP32, fp32)"]
    latency: Annotated[list[LatencyRow], "per setting"]


class ExportResult(TypedDict, total=False):
    path: Annotated[str, "the ONNX file written"]
    onnx_bytes: Annotated[int, "its size"]
    opset: Annotated[int, "ONNX opset"]
    simplified: Annotated[bool, "onnxsim ran and its result was kept"]
    op_counts: Annotated[dict[str, int], "op type → count in the file"]
    op_counts_before_simplify: Annotated[dict[str, int], "the same, as torch.onnx exported it"]
    parity: Annotated[Parity, "the check against PyTorch on real images"]
    export_seconds: Annotated[float, "wall time"]
    config: Annotated[dict[str, Any], "the ExportConfig"]
    selection: Annotated[dict[str, Any], "--selection auto: the chosen export and every candidate's time"]


class BenchRow(LatencyRow):
    model: Annotated[str, "the model's name"]


class BenchModel(TypedDict, total=False):
    path: Annotated[str, "the model file"]
    onnx_bytes: Annotated[int, "its size"]
    accuracy: Annotated[float, "in onnxruntime, whole test split"]
    op_time: Annotated[dict[str, Any], "`shares` of node time per op type at batch 1 (profiler), `provider`"]


class BenchResult(TypedDict, total=False):
    models: Annotated[dict[str, BenchModel], "per model name"]
    latency: Annotated[list[BenchRow], "one row per (model, batch, threads), models interleaved"]
    config: Annotated[dict[str, Any], "the BenchConfig"]


class GammaStats(TypedDict):
    channels: Annotated[int, "prunable BN channels"]
    quantiles: Annotated[dict[str, float], "|γ| at the 10/25/50/75/90% quantiles"]
    fraction_small: Annotated[float, "fraction of |γ| below 1e-2"]
    l1_reach: Annotated[float, "s·Σlr/(1−momentum): the most the L1 term alone moved any γ"]


class Report(TypedDict):
    schema: Annotated[str, "`slimexport.report/1`"]
    created: Annotated[str, "UTC time"]
    command: Annotated[str, "the command line"]
    baseline: Annotated[ModelReport, "the unpruned model"]
    pruned: Annotated[ModelReport, "the pruned, refined model"]
    ratios: Annotated[Ratios, "baseline ÷ pruned"]
    parity: Annotated[dict[str, float], "the worse of the two models' `max_abs_diff` and `top1_agreement`"]
    prune: Annotated[PruneRecord, "what pruning did"]
    stages: Annotated[
        dict[str, StageRecord], "per stage: baseline, sparse, prune, refine, export_*, quantize_*, convert_*, bench"
    ]
    variants: Annotated[list[VariantRow], "every benchmarked model; with --int8/--ort/--ncnn their deploy forms too"]
    gamma: Annotated[GammaStats, "how far sparse training polarised |γ|"]
    config: Annotated[dict[str, Any], "the resolved options"]
    versions: Annotated[dict[str, str], "slimexport, python, torch, torchvision, onnx, onnxruntime, onnxsim"]
    machine: Annotated[dict[str, Any], "CPU model, cores, GPU, platform"]


def undeclared(record: Any, td: type, where: str = "") -> list[str]:
    """Keys of ``record`` (recursively, into nested records, lists and dicts of records) that the TypedDict ``td``
    does not declare: what a test asserts empty, so a record cannot grow a field its type does not document."""
    if not isinstance(record, dict):
        return []
    hints = get_type_hints(td)
    out = [f"{where}{k}" for k in record if k not in hints]
    for k, tp in hints.items():
        if k not in record:
            continue
        v, origin = record[k], get_origin(tp)
        if is_typeddict(tp):
            out += undeclared(v, tp, f"{where}{k}.")
        elif origin is list and is_typeddict(get_args(tp)[0]) and isinstance(v, list):
            for i, x in enumerate(v):
                out += undeclared(x, get_args(tp)[0], f"{where}{k}[{i}].")
        elif origin is dict and is_typeddict(get_args(tp)[-1]) and isinstance(v, dict):
            for name, x in v.items():
                out += undeclared(x, get_args(tp)[-1], f"{where}{k}[{name}].")
    return out


def _fields(td: type) -> str:
    return "`{" + ", ".join(get_type_hints(td)) + "}`"


def _describe(tp: Any) -> str:
    """The nested record's field names, for a field whose type is a record (or a list or dict of records)."""
    if is_typeddict(tp):
        return _fields(tp)
    if get_origin(tp) in (list, dict) and is_typeddict(get_args(tp)[-1]):
        return ("list of " if get_origin(tp) is list else "name → ") + _fields(get_args(tp)[-1])
    return ""


def schema_table() -> str:
    """The README's report.json table, from :class:`Report`."""
    rows = ["| key | meaning | fields |", "|---|---|---|"]
    hints = get_type_hints(Report, include_extras=True)
    for key, hint in hints.items():
        tp, doc = get_args(hint)[0], get_args(hint)[1]
        doc = doc.replace("|", "\\|")  # a bare "|" (as in |γ|) would end the markdown cell
        rows.append(f"| `{key}` | {doc} | {_describe(tp)} |")
    return "\n".join(rows)


def latency_line(t: dict[str, Any]) -> str:
    """The one line that says what a latency target (--target-speedup, --max-latency) found and what it cost."""
    asked = f"×{t['target_speedup']:g}" if "target_speedup" in t else f"≤ {t['max_latency_ms']:g} ms"
    r = t["retimed"]
    got = f"re-timed ×{r['speedup']:.2f} ({r['ms']:.3g} ms against {r['base_ms']:.3g} ms)"
    where = f"{t['runtime']}, batch {t['batch']}, {t['threads']} thread(s)"
    cost = f"{len(t['probes'])} candidate(s) timed, search {t['search_seconds']:.0f} s"
    short = f"; {t['unreachable']}" if t.get("unreachable") else ""
    return f"latency target {asked} on {where}: {got}; {cost}{short}"


def undone_line(u: dict[str, Any]) -> str:
    """The one line that says an asked-for prune mostly did not happen, why, and what to change."""
    return (f"the threshold alone removes {100 * u['threshold_alone']:.0f}% of the BN channels but {u['by']} put most "
            f"back: {100 * u['removed']:.0f}% removed; {u['advice']}")  # fmt: skip

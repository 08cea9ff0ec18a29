"""export, bench, quantize and convert: a model file in, a model file or a measurement out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimexport.cli.app import app, check_out, handle_errors, ints, say, trusting
from slimexport.cli.options import (
    AccuracyOpt,
    BatchesOpt,
    CalibImagesOpt,
    CalibrateOpt,
    D,
    DataDirOpt,
    DatasetOpt,
    ForceOpt,
    Int8KeepOpt,
    Int8MaxDropOpt,
    QuantTypesOpt,
    SecondsOpt,
    SelectionOpt,
    ThreadsOpt,
    TrustArchOpt,
    TrustOpt,
    enum_of,
    fill,
    option,
    plain,
)
from slimexport.config import BENCH_DEVICES, OPT_STYLES, PLATFORMS, BenchConfig, ExportConfig, QuantizeConfig
from slimexport.console import console

OpsetOpt = option("opset", int)
AtolOpt = option("atol", float)
ParityImagesOpt = option("parity_images", int, min=1)
SimplifyOpt = option("simplify", bool)
OptStyle, Platform, BenchDevice = enum_of(OPT_STYLES), enum_of(PLATFORMS), enum_of(BENCH_DEVICES)


def bench_config(batch: str, threads: str | None, device, seconds: float, accuracy: bool = True) -> BenchConfig:
    """The benchmark settings from their options (comma-separated lists; threads None: the field's default)."""
    cfg = BenchConfig(batches=ints(batch, "--batch"), device=plain(device), seconds=seconds, accuracy=accuracy)
    if threads:
        cfg.threads = ints(threads, "--threads")
    return cfg


@app.command("export")
@handle_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    opset: OpsetOpt = D.opset,
    atol: AtolOpt = D.atol,
    parity_images: ParityImagesOpt = D.parity_images,
    simplify: SimplifyOpt = D.simplify,
    selection: SelectionOpt = D.selection,
    arch: TrustArchOpt = None,
    trust_model_code: TrustOpt = False,
    force: ForceOpt = D.force,
):
    """Export to ONNX (dynamic batch), check, simplify, and verify against PyTorch on real test images."""
    from slimexport.data import load_dataset
    from slimexport.export import export

    cfg = fill(ExportConfig, locals()).validate()
    check_out(out, force)
    ds = load_dataset(dataset, data_dir)
    with trusting(arch, trust_model_code):
        r = export(checkpoint, out, ds, cfg)
    p = r["parity"]
    say(
        f"exported {out} ({r['onnx_bytes']:,} bytes, {sum(r['op_counts'].values())} nodes): max |Δ| "
        f"{p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} on {p['images']} images"
    )
    if r.get("selection", {}).get("candidates"):
        times = ", ".join(f"{n} {c['median_ms']:.3f} ms" for n, c in r["selection"]["candidates"].items())
        say(f"selection: {r['selection']['chosen']} (onnxruntime CPU, batch 1, 1 thread: {times})")


@app.command("bench")
@handle_errors
def bench_cmd(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="ONNX or .ort models; the first is the reference for ratios (e.g. baseline.onnx pruned.onnx)."
        ),
    ],
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    batch: BatchesOpt = D.batch,
    threads: ThreadsOpt = None,
    device: Annotated[
        BenchDevice,
        typer.Option(
            "--device", help="onnxruntime execution provider: cpu, or cuda (needs onnxruntime-gpu; IOBinding)."
        ),
    ] = D.bench_device,
    seconds: SecondsOpt = D.seconds,
    accuracy: AccuracyOpt = D.accuracy,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON here.")] = None,
    force: ForceOpt = D.force,
):
    """Time onnxruntime inference (median, p90) side by side, and measure accuracy with onnxruntime itself."""
    from slimexport.bench import bench, latency_table, model_names
    from slimexport.data import load_dataset
    from slimexport.fileio import write_json

    if out is not None:
        check_out(out, force)
    names = model_names(models)
    ds = load_dataset(dataset, data_dir)
    cfg = bench_config(batch, threads, device, seconds, accuracy)
    res = bench(dict(zip(names, models)), ds, cfg)
    console.print(latency_table(res, names[0], title=f"onnxruntime {cfg.device}"))
    if out is not None:
        write_json(out, res)
    accs = ", ".join(f"{n} {m['accuracy']:.4f}" for n, m in res["models"].items() if "accuracy" in m)
    say(
        f"benchmarked {len(models)} model(s) in {len(res['latency']) // len(models)} setting(s)"
        + (f"; onnxruntime accuracy: {accs}" if accs else "")
        + (f" -> {out}" if out else "")
    )


@app.command()
@handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="An FP32 ONNX model (e.g. pruned.onnx).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="INT8 model to write (default: MODEL.int8.onnx).")
    ] = None,
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    calib_images: CalibImagesOpt = D.calib_images,
    calibrate: CalibrateOpt = D.calibrate,
    types: QuantTypesOpt = D.types,
    int8_keep: Int8KeepOpt = D.int8_keep,
    int8_max_drop: Int8MaxDropOpt = D.int8_max_drop,
    force: ForceOpt = D.force,
):
    """INT8 static quantization (onnxruntime QDQ, per-channel weights), measured against the FP32 model."""
    from slimexport.data import load_dataset
    from slimexport.deploy import quantize as quantize_fn

    out = out or model.with_name(model.stem + ".int8.onnx")
    check_out(out, force)
    cfg = fill(QuantizeConfig, locals())
    cfg.validate()
    ds = load_dataset(dataset, data_dir)
    r = quantize_fn(model, out, ds, cfg)
    say(
        f"quantized {model} -> {out}: {r['activation_type']}/{r['weight_type']}"
        f"{' reduce_range' if r['reduce_range'] else ''} ({r['types_why']}); {r['fp32_bytes']:,} -> {r['bytes']:,} "
        f"bytes (×{1 / r['bytes_ratio']:.2f}); onnxruntime accuracy {r['fp32_accuracy']:.4f} -> {r['accuracy']:.4f}, "
        f"top-1 agreement {r['top1_agreement']:.4f}, max |Δ logits| {r['max_abs_diff']:.3g} on {r['images']} images"
        + (f"; --int8-keep auto: deploy {r['keep']['chosen']} ({r['keep']['why']})" if r.get("keep") else "")
    )


def _converted(folder: Path) -> bool:
    """A directory ``convert`` wrote: an .ort model or an ncnn model in it."""
    return any(f.suffix == ".ort" or f.name.endswith(".ncnn.param") for f in folder.iterdir())


@app.command()
@handle_errors
def convert(
    model: Annotated[Path, typer.Argument(help="An ONNX model (FP32 or INT8).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the .ort model and its operator config to.")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="ort (the onnxruntime mobile format) or ncnn (a phone runtime; FP32 models; the ncnn extra: "
            "pip install -e '.\\[ncnn]').",
        ),
    ] = "ort",
    dataset: DatasetOpt = D.dataset,
    data_dir: DataDirOpt = D.data_dir,
    optimization_style: Annotated[
        OptStyle,
        typer.Option(
            "--optimization-style",
            help="fixed: optimisations for this CPU are baked into the .ort file; runtime: applied when loaded.",
        ),
    ] = OptStyle.fixed,
    target_platform: Annotated[
        Platform, typer.Option("--target-platform", help="The CPU the .ort file is for: amd64 or arm.")
    ] = Platform.amd64,
    force: ForceOpt = D.force,
):
    """Convert to the onnxruntime mobile format (.ort) and check it against the ONNX model on real test images."""
    from slimexport.data import load_dataset
    from slimexport.deploy import convert as convert_fn
    from slimexport.errors import ConfigError

    if to not in ("ort", "ncnn"):
        raise ConfigError(f"--to {to!r} is not supported: ort or ncnn")
    check_out(out, force, kind="dir", ours=_converted)
    if to == "ncnn":
        from slimexport.deploy import convert_ncnn, ncnn_available
        from slimexport.runtime import NCNN_HINT

        if not ncnn_available():
            raise ConfigError(NCNN_HINT)
    ds = load_dataset(dataset, data_dir)
    if to == "ncnn":
        r = convert_ncnn(model, out, ds)
        p = r["parity"]
        say(
            f"converted {model} -> {r['path']} ({r['bytes']:,} bytes, {r['runtime']}): max |Δ| {p['max_abs_diff']:.2e} "
            f"against onnxruntime, top-1 agreement {p['top1_agreement']:.4f} on {p['images']} images"
        )
        return
    r = convert_fn(model, out, ds, plain(optimization_style), plain(target_platform))
    p = r["parity"]
    say(
        f"converted {model} -> {r['path']} ({r['bytes']:,} bytes, {r['optimization_style']} optimisations for "
        f"{r['target_platform']}): max |Δ| {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f} on "
        f"{p['images']} images"
    )

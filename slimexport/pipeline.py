"""The whole workflow into one run directory, as a list of stages: each reads artifacts of the run and writes its
own, and returns a record (``stages.json``).

    baseline → sparse → prune → refine → export_baseline, export_pruned
        [→ quantize_baseline, quantize_pruned (--int8)] [→ convert_pruned[.int8] (--ort)] → bench → report

The run is built in a hidden sibling directory, ``.NAME.partial``, and renamed into place only when it completes,
so an earlier run directory is replaced (with ``force``) only by a finished one. When a run stops early (an error,
Ctrl-C), the partial directory stays with every finished stage's artifacts, and ``resume`` continues it: a stage
whose outputs and record are there, and whose inputs come from stages that did not rerun, is skipped; an
interrupted training stage continues from its per-epoch state (``NAME.pt.resume``). Resume needs the same options
as the interrupted run (those that only say where to write, or whether to overwrite, may differ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from slimexport import distributed
from slimexport.bench import bench, provider_for
from slimexport.checkpoint import (
    check_checkpoint_source,
    fit_data,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from slimexport.config import PipelineConfig, PruneConfig, TrainConfig
from slimexport.console import console
from slimexport.data import Dataset, load_dataset
from slimexport.deploy import convert, convert_ncnn, ncnn_available, quantize
from slimexport.errors import CheckpointError, ConfigError
from slimexport.export import export
from slimexport.fileio import check_output, output_lock, read_json, write_json
from slimexport.graph import BN_TYPES
from slimexport.graph_prune import layer_widths
from slimexport.loop import evaluate, resolve_device, schedule_lrs
from slimexport.models import create_model, default_config
from slimexport.models.external import canonical_source, is_external, torchvision_weights_file, trusted_code
from slimexport.prune import bn_gammas, prune, prune_model
from slimexport.report import build_report, plot_channels, plot_gammas, plot_latency, plot_variants, write_report
from slimexport.rundir import Stage, check_start, execute, is_run_dir, partial_dir, run_config, start
from slimexport.runtime import NCNN_HINT
from slimexport.stats import count_macs, count_params
from slimexport.train import adopt, data_meta, initial_model, probe_model, train

DEFAULT_ARCH = "vgg11_w25"
# Under torchrun every rank runs these (with DDP); rank 0 alone runs the others while the rest wait.
TRAINING_STAGES = ("baseline", "sparse", "refine")


@dataclass
class _Run:
    cfg: PipelineConfig
    ds: Dataset
    device: torch.device
    dir: Path
    records: dict[str, dict[str, Any]]
    command: str = ""

    def path(self, name: str) -> Path:
        return self.dir / name


def _reuse(src: Path, dst: Path, ds, device: torch.device) -> dict[str, Any]:
    """Copy a given checkpoint into the run (re-measuring its accuracy on this data set); returns its meta."""
    model, ck = load_checkpoint(src)
    ds = fit_data(ck, src, ds)
    meta = ck["meta"] | {"accuracy": evaluate(model, ds, device), "reused": str(src)}  # every rank evaluates
    if distributed.is_main():
        save_checkpoint(make_checkpoint(model.cpu(), data_meta(ds), meta), dst)
    return meta


def _stage_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """What a training stage reports: its accuracy, its speed, and where a reused checkpoint came from."""
    facts = {"accuracy": meta["accuracy"], "images_per_s": meta.get("images_per_s")}
    if meta.get("compile_seconds"):
        facts["compile_seconds"] = meta["compile_seconds"]  # not in images_per_s
    return facts | ({"reused": meta["reused"]} if "reused" in meta else {})


def _sparsity(r: _Run) -> tuple[float, dict[str, Any]]:
    """The sparse stage's s: the given one, or with ``--sparsity auto`` the probe's choice (kept in sparsity.json,
    so that a resumed run trains with the same s)."""
    if r.cfg.sparsity != "auto":
        return float(r.cfg.sparsity), {}
    f = r.path("sparsity.json")
    if f.is_file():
        rec = read_json(f)
        return rec["sparsity"], rec
    from slimexport.sparsity import choose_sparsity

    if r.cfg.from_trained:  # sparse training fine-tunes the baseline: the probe starts from it too
        model, ck = load_checkpoint(r.path("baseline.pt"))
        ds = fit_data(ck, r.path("baseline.pt"), r.ds)
    else:  # from the initialisation sparse training starts from
        model, ds = initial_model(r.cfg.arch, r.ds, r.cfg.seed, r.cfg.weights), r.ds
    s, rec = choose_sparsity(model, ds, r.cfg.train_config("sparse"), r.cfg.channels_to_remove())
    console.print(f"--sparsity auto: s = {s:g} ({escape(rec['reason'])})")
    if distributed.is_main():
        write_json(f, rec)
    return s, rec


def _train_stage(name: str, reuse: str | None) -> Callable[[_Run], dict[str, Any]]:
    def run(r: _Run) -> dict[str, Any]:
        out = r.path(f"{name}.pt")
        if reuse is not None:
            return _stage_facts(_reuse(Path(reuse), out, r.ds, r.device))
        if name == "baseline" and r.cfg.from_trained:  # the given weights are the baseline: measured, not trained
            return _stage_facts(adopt(out, r.ds, r.cfg.arch, r.cfg.weights, r.device))
        extra: dict[str, Any] = {}
        s = None
        if name == "sparse":
            s, probe = _sparsity(r)
            extra = {"sparsity": s, "regularizer": r.cfg.regularizer} | ({"sparsity_probe": probe} if probe else {})
        cfg = r.cfg.train_config(name, sparsity=s)
        if name == "sparse" and r.cfg.from_trained:  # fine-tune the trained baseline with the sparsity term
            meta = train(out, r.ds, cfg, init=r.path("baseline.pt"), stage="sparse", resume=True)
            return _stage_facts(meta) | extra
        meta = train(out, r.ds, cfg, arch=r.cfg.arch, resume=True, weights=r.cfg.weights)
        return _stage_facts(meta) | extra

    return run


def _teacher(r: _Run) -> Path | None:
    return r.path(f"{r.cfg.teacher}.pt") if r.cfg.distill else None


def _prune_stage(r: _Run) -> dict[str, Any]:
    """One global threshold (the paper's one-shot prune), or with ``--prune-steps N`` the target reached in N
    steps: each prunes, by one global threshold over what is left, its share of the BN channels to remove (of the
    sparse model's count: step i ends at i/N of --percent; with --max-macs F, at 1 − (1 − F)·i/N of its MACs),
    and all but the last are followed by a short refine (refine's epochs split among the steps; the refine stage
    runs the last share)."""
    cfg = r.cfg
    if cfg.prune_steps == 1:
        meta = prune(r.path("sparse.pt"), r.path("pruned.pt"), cfg.prune, ds=r.ds, device=str(r.device))
        return {"accuracy": meta["accuracy"], "record": meta["prune"]}
    src, steps, recs, first, total, n = r.path("sparse.pt"), [], [], None, 0, cfg.prune_steps
    epochs = cfg.refine_epochs_per_step()
    # every step's floors (--min-keep) are fractions of the sparse model's layers, not of what the last step left
    widths = layer_widths(load_checkpoint(src)[0].net)
    for i in range(1, n + 1):
        model, _ = load_checkpoint(src)
        now = sum(len(g) for g in bn_gammas(model).values())
        total = total or now
        if cfg.prune.max_macs is None:
            goal = round(total * cfg.prune.percent * i / n)  # BN channels removed after this step
            step_cfg = dataclasses.replace(cfg.prune, percent=min(max(0.0, (goal - (total - now)) / now), 0.99))
        else:  # the MACs this step ends at, as a fraction of the current model's
            keep = 1 - (1 - cfg.prune.max_macs) * i / n
            if first:  # of the sparse model's MACs → of the current model's
                keep *= first["macs_before"] / steps[-1]["macs_after"]
            step_cfg = dataclasses.replace(cfg.prune, max_macs=min(keep, 1.0))
        step_cfg.widths = widths
        out = r.path("pruned.pt") if i == n else r.path(f"pruned.step{i}.pt")
        meta = prune(src, out, step_cfg, ds=r.ds, device=str(r.device))
        rec = meta["prune"]
        recs.append(rec)
        first = first or rec
        step = {"step": i, "percent_of_rest": rec["percent"], "channels_after": rec["channels_after"],
                "macs_after": rec["macs_after"], "accuracy_pruned": meta["accuracy"]}  # fmt: skip
        if i < cfg.prune_steps:
            src = r.path(f"refined.step{i}.pt")
            tm = train(src, r.ds, cfg.train_config("refine", epochs=epochs[i - 1]), init=out, stage="refined",
                       resume=True, teacher=_teacher(r))  # fmt: skip
            step |= {"refine_epochs": epochs[i - 1], "accuracy_refined": tm["accuracy"]}
        steps.append(step)
    record = _compose(recs, steps, cfg.prune)
    ck = read_checkpoint(r.path("pruned.pt"))
    ck["meta"]["prune"] = record
    save_checkpoint(ck, r.path("pruned.pt"))
    return {"accuracy": meta["accuracy"], "record": record}


def _compose(recs: list[dict[str, Any]], steps: list[dict[str, Any]], asked: PruneConfig) -> dict:
    """The record of a prune in steps, as one prune from the sparse model: the first step's "before" figures, the
    last step's "after" figures and threshold, each layer's channels from the first to the last (its kept indices
    into the sparse model's channels, through every step), and the steps."""
    first, last = recs[0], recs[-1]
    kept_of = {x["name"]: list(x["kept"]) for x in first["layers"]}
    for rec in recs[1:]:
        for x in rec["layers"]:
            if x["name"] in kept_of:
                kept_of[x["name"]] = [kept_of[x["name"]][i] for i in x["kept"]]
    before = {x["name"]: x["before"] for x in first["layers"]}
    layers = [x | {"before": before.get(x["name"], x["before"]), "kept": kept_of.get(x["name"], x["kept"])}
              for x in last["layers"]]  # fmt: skip
    kept = sum(x["after"] for x in layers)
    total = first["channels_before"]
    budget = {"max_macs": asked.max_macs, "macs_fraction": last["macs_after"] / first["macs_before"]}
    return (
        last
        | (budget if asked.max_macs is not None else {})
        | {
            "percent": asked.percent if asked.percent is not None else 1 - kept / total,
            "layers": layers,
            "channels_before": total,
            "channels_after": kept,
            "pruned_fraction": 1 - kept / total if total else 0.0,
            "params_before": first["params_before"],
            "macs_before": first["macs_before"],
            "source": first["source"],
            "floored_layers": sorted({n for rec in (first, last) for n in rec["floored_layers"]}),
            "steps": steps,
        }
    )


def _refine_stage(r: _Run) -> dict[str, Any]:
    cfg = r.cfg.train_config("refine", epochs=r.cfg.refine_epochs_per_step()[-1])
    meta = train(r.path("refined.pt"), r.ds, cfg, init=r.path("pruned.pt"), stage="refined", resume=True,
                 teacher=_teacher(r))  # fmt: skip
    facts = _stage_facts(meta)
    if r.cfg.distill:
        facts["distill"] = {"teacher": r.cfg.teacher, "teacher_accuracy": meta.get("teacher_accuracy"),
                            "weight": r.cfg.distill_weight, "temperature": r.cfg.distill_temperature}  # fmt: skip
    return facts


def _export_stage(name: str, ckpt: str) -> Callable[[_Run], dict[str, Any]]:
    def run(r: _Run) -> dict[str, Any]:
        ex = export(r.path(ckpt), r.path(f"{name}.onnx"), r.ds, r.cfg.export)
        model, ck = load_checkpoint(r.path(ckpt))
        return {
            "model": {
                "params": count_params(model),
                "macs": count_macs(model, r.ds.in_channels, r.ds.image_size),
                "checkpoint": ckpt,
                "onnx": f"{name}.onnx",
                "onnx_bytes": ex["onnx_bytes"],
                "torch_accuracy": ck["meta"]["accuracy"],
                "parity": ex["parity"],
                "op_counts": ex["op_counts"],
            }
            | ({"selection": ex["selection"]} if "selection" in ex else {})
        }

    return run


def _quantize_stage(name: str) -> Callable[[_Run], dict[str, Any]]:
    def run(r: _Run) -> dict[str, Any]:
        q = quantize(r.path(f"{name}.onnx"), r.path(f"{name}.int8.onnx"), r.ds, r.cfg.quantize)
        return {"accuracy": q["accuracy"], "record": q}

    return run


def _convert_stage(name: str) -> Callable[[_Run], dict[str, Any]]:
    def run(r: _Run) -> dict[str, Any]:
        c = convert(r.path(f"{name}.onnx"), r.path(f"ort/{name}"), r.ds)
        return {"record": c | {"path": str(Path(c["path"]).relative_to(r.dir))}}

    return run


def _ncnn_stage(r: _Run) -> dict[str, Any]:
    c = convert_ncnn(r.path("pruned.onnx"), r.path("ncnn"), r.ds)
    return {"record": c | {"path": str(Path(c["path"]).relative_to(r.dir))}}


def variants(cfg: PipelineConfig) -> dict[str, str]:
    """Every model the bench stage times, by name: the FP32 ONNX pair, and with --int8/--ort their deploy forms."""
    out = {"baseline": "baseline.onnx", "pruned": "pruned.onnx"}
    if cfg.int8:
        out |= {"baseline-int8": "baseline.int8.onnx", "pruned-int8": "pruned.int8.onnx"}
    if cfg.ort:
        out["pruned-ort"] = "ort/pruned/pruned.ort"
        if cfg.int8:
            out["pruned-int8-ort"] = "ort/pruned.int8/pruned.int8.ort"
    if cfg.ncnn:
        out["pruned-ncnn"] = "ncnn/pruned.ncnn.param"
    return out


def _bench_stage(r: _Run) -> dict[str, Any]:
    res = bench({n: r.path(f) for n, f in variants(r.cfg).items()}, r.ds, r.cfg.bench)
    return {"result": res}


def _variant_rows(r: _Run, res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmarked model: bytes, onnxruntime accuracy, agreement with its FP32 source, latency."""
    recs = r.records
    rows = []
    for name, f in variants(r.cfg).items():
        base = name.split("-")[0]
        row: dict[str, Any] = {
            "name": name,
            "file": f,
            "bytes": r.path(f).stat().st_size,
            "accuracy": res["models"][name].get("accuracy"),
            "latency": [
                {k: x[k] for k in ("provider", "batch", "threads", "median_ms", "p90_ms")}
                for x in res["latency"]
                if x["model"] == name
            ],
        }
        if name.endswith("int8"):
            q = recs[f"quantize_{base}"]["record"]
            row["parity"] = {"reference": f"{base}.onnx", "top1_agreement": q["top1_agreement"],
                             "max_abs_diff": q["max_abs_diff"], "images": q["images"]}  # fmt: skip
            row["types"] = f"{q['activation_type']}/{q['weight_type']}" + (" reduce_range" if q["reduce_range"] else "")
            if q.get("keep"):  # --int8-keep auto: what was chosen for deployment, and why
                row["keep"] = {k: q["keep"][k] for k in ("chosen", "why")}
        elif name.endswith("ncnn"):
            row["parity"] = {"reference": "pruned.onnx"} | recs["convert_ncnn"]["record"]["parity"]
            row["bytes"] += r.path(f.replace(".param", ".bin")).stat().st_size  # the weights file too
            row["runtime"] = recs["convert_ncnn"]["record"]["runtime"]
        elif name.endswith("ort"):
            src = name.removesuffix("-ort").replace("-int8", ".int8")
            c = recs[f"convert_{src}"]["record"]
            row["parity"] = {"reference": f"{src}.onnx"} | c["parity"]
        else:
            row["parity"] = {"reference": "PyTorch"} | recs[f"export_{base}"]["model"]["parity"]
        rows.append(row)
    return rows


def gamma_stats(gammas: list[float], cfg: TrainConfig, n_train: int) -> dict[str, Any]:
    """How far sparse training polarised |γ|: quantiles, the fraction below 1e-2, and the most the L1 term alone
    can have moved any γ: s·Σ lr / (1 − momentum) over the schedule (a gradient of constant sign builds up SGD's
    momentum to 1/(1 − μ) times the step, ×10 at μ = 0.9). Compare it with the γ the model starts from (1 for
    torchvision's BNs, 0.5 for the reference's); weight decay pulls γ towards 0 as well."""
    g = torch.tensor(gammas)
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    lrs = schedule_lrs(cfg, n_train)
    return {
        "channels": len(gammas),
        "quantiles": {str(q): float(g.quantile(q)) for q in qs},
        "fraction_small": float((g < 1e-2).float().mean()),
        "l1_reach": cfg.sparsity * sum(lrs) / (1.0 - cfg.momentum),
    }


def _report_stage(r: _Run) -> dict[str, Any]:
    cfg, recs = r.cfg, r.records
    res = recs["bench"]["result"]
    models = {n: dict(recs[f"export_{n}"]["model"]) for n in ("baseline", "pruned")}
    for name, m in models.items():
        m["latency"] = [
            {k: x[k] for k in ("provider", "batch", "threads", "median_ms", "p90_ms", "runs")}
            for x in res["latency"]
            if x["model"] == name
        ]
        m["accuracy"] = res["models"][name].get("accuracy")
        if "op_time" in res["models"][name]:
            m["op_time"] = res["models"][name]["op_time"]
    models["pruned"] |= {
        "sparse_accuracy": recs["sparse"]["accuracy"],
        "accuracy_before_refine": recs["prune"]["accuracy"],
    }
    stages = {n: {k: v for k, v in rec.items() if k not in ("record", "model", "result")} for n, rec in recs.items()}
    record = recs["prune"]["record"]
    config = read_json(r.path("config.json"))
    report = build_report(models["baseline"], models["pruned"], record, stages, config, r.command)
    report["variants"] = _variant_rows(r, res)
    sparse_model, _ = load_checkpoint(r.path("sparse.pt"))
    gam = torch.cat(list(bn_gammas(sparse_model).values())).tolist()
    s = recs["sparse"].get("sparsity", 0.0 if cfg.sparsity == "auto" else cfg.sparsity)  # auto: the probe's
    report["gamma"] = gamma_stats(gam, r.cfg.train_config("sparse", sparsity=float(s)), len(r.ds.y_train))
    title = f"{cfg.arch}: BN |γ| after sparse training ({cfg.regularizer}, s={float(s):g})"
    plot_gammas(gam, record["threshold"], r.path("gamma_hist.png"), title)
    plot_channels(
        record["layers"],
        r.path("channels.png"),
        f"{cfg.arch}: channels per BN layer, {record['pruned_fraction']:.0%} pruned",
    )
    plot_latency(report, r.path("latency.png"))
    if len(report["variants"]) > 2:
        plot_variants(report["variants"], r.path("variants.png"))
    write_report(r.dir, report)
    return {"report": "report.json"}


def stages(cfg: PipelineConfig) -> list[Stage]:
    """The pipeline's stages, in order."""
    return [
        Stage("baseline", ("baseline.pt",), _train_stage("baseline", cfg.baseline)),
        Stage("sparse", ("sparse.pt",), _train_stage("sparse", cfg.sparse)),
        Stage("prune", ("pruned.pt",), _prune_stage),
        Stage("refine", ("refined.pt",), _refine_stage),
        Stage("export_baseline", ("baseline.onnx",), _export_stage("baseline", "baseline.pt")),
        Stage("export_pruned", ("pruned.onnx",), _export_stage("pruned", "refined.pt")),
        *(
            [Stage(f"quantize_{n}", (f"{n}.int8.onnx",), _quantize_stage(n)) for n in ("baseline", "pruned")]
            if cfg.int8
            else []
        ),
        *([Stage("convert_pruned", ("ort/pruned/pruned.ort",), _convert_stage("pruned"))] if cfg.ort else []),
        *(
            [Stage("convert_pruned.int8", ("ort/pruned.int8/pruned.int8.ort",), _convert_stage("pruned.int8"))]
            if cfg.ort and cfg.int8
            else []
        ),
        *([Stage("convert_ncnn", ("ncnn/pruned.ncnn.param",), _ncnn_stage)] if cfg.ncnn else []),
        Stage("bench", (), _bench_stage),
        Stage("report", ("report.json", "report.md", "gamma_hist.png", "channels.png", "latency.png"), _report_stage),
    ]


def _same_arch(a: str, b: str) -> bool:
    """Two --arch values name the same model (a model file by its absolute path)."""
    return a == b or (is_external(a) and is_external(b) and canonical_source(a) == canonical_source(b))


def _resolve(cfg: PipelineConfig) -> None:
    """Fill in the architecture (from --baseline/--sparse or the default) and check it, before any data or training:
    a checkpoint's model code runs only where the user named it, and a model that network slimming cannot prune
    (no BatchNorm) is refused now, not after two trainings."""
    for option, src in (("--baseline", cfg.baseline), ("--sparse", cfg.sparse)):
        if src is None:
            continue
        ck = read_checkpoint(src)
        check_checkpoint_source(ck, src)
        if cfg.arch is not None and not _same_arch(ck["arch"], cfg.arch):
            what = "the requested" if option == "--baseline" else "the baseline's"
            raise CheckpointError(f"{option} {src} holds a {ck['arch']} model, not {what} {cfg.arch}")
        if cfg.arch is None:
            cfg.arch = ck["config"]["source"] if is_external(ck["arch"]) else ck["arch"]
    cfg.arch = cfg.arch or DEFAULT_ARCH
    default_config(cfg.arch)  # fail now, not after loading data or training
    if cfg.weights is not None and str(cfg.weights).startswith("torchvision:"):
        torchvision_weights_file(cfg.arch, str(cfg.weights))  # in the hub cache, or say where it goes
    elif cfg.weights is not None and not Path(cfg.weights).is_file():
        raise ConfigError(f"--weights {cfg.weights} not found")


def _check_model(cfg: PipelineConfig, ds: Dataset) -> None:
    """Build the model for this data once before any training: a factory or forward that fails, an output that is
    not the data's class logits, or no BatchNorm to score (nothing network slimming can prune) is refused now, not
    after two trainings."""
    model = create_model(cfg.arch, ds.num_classes, ds.in_channels)
    if not any(m.weight is not None for m in model.modules() if isinstance(m, BN_TYPES)):
        raise ConfigError(
            f"{cfg.arch} has no BatchNorm layer with a scale γ: network slimming scores channels by it, so there "
            "is nothing to prune"
        )
    probe_model(model, ds, f"--arch {cfg.arch}")
    # the prune stage's own refusals (a model it cannot trace, nothing prunable, --prune-stream with nothing to
    # carry), before training; at 0% (an untrained model's |γ| are all alike: its threshold means nothing)
    trial = dataclasses.replace(cfg.prune, percent=0.0, max_macs=None, target_speedup=None, max_latency=None,
                                allocate="gamma", fold=False, round_to=1)  # fmt: skip
    prune_model(model, cfg=trial)


def run_pipeline(cfg: PipelineConfig, command: str = "") -> dict[str, Any]:
    """Run every stage (or, with ``cfg.resume``, those an interrupted run did not finish); returns the report
    (also written to ``cfg.out``/report.json). The model code ``cfg.arch`` names is the caller's to run; a
    checkpoint given as ``cfg.baseline``/``cfg.sparse`` runs only code the caller named (see
    :func:`~slimexport.models.external.trusted_code`). The run directory is locked while the run writes it."""
    cfg.validate()
    if cfg.train_args:
        raise ConfigError("--train-args are Ultralytics' training arguments: for detectors (--arch ultralytics:FILE)")
    if cfg.ncnn and not ncnn_available():
        raise ConfigError(f"--ncnn: {NCNN_HINT}")
    out = Path(cfg.out)
    # writable, of the right kind, and if it exists a run directory (that --force or --resume may replace)
    check_output(out, True, "dir", is_run_dir)
    with trusted_code(cfg.arch), output_lock(out):
        return _run_locked(cfg, out, command)


def _run_locked(cfg: PipelineConfig, out: Path, command: str) -> dict[str, Any]:
    work = partial_dir(out)
    device = distributed.setup(resolve_device(cfg.device))  # under torchrun: join the group first
    check_start(out, work, cfg.resume, cfg.force)
    distributed.barrier()  # every rank has checked before rank 0 creates anything
    if cfg.bench.device != "cpu":
        provider_for(cfg.bench.device)  # a real session on CUDA, before any training
        cfg.export.tune_device = cfg.bench.device  # `--selection auto` chooses for the device it is benched on
    if cfg.prune_steps > 1 and distributed.world_size() > 1:
        raise ConfigError("--prune-steps above 1 runs its short refines in the prune stage, on one process: not under "
                          "torchrun")  # fmt: skip
    _resolve(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.data_cache)
    _check_model(cfg, ds)
    config = run_config(cfg, device, ds)
    main = distributed.is_main()
    records = start(work, config, cfg.resume, main)
    distributed.barrier()
    console.print(f"[bold]slimexport pipeline[/] {escape(f'{cfg.arch} on {ds.summary()}, device {device}')}")
    run = _Run(cfg, ds, device, work, records, command)
    return execute(stages(cfg), run, work, out, records, main, TRAINING_STAGES)

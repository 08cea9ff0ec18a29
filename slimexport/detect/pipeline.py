"""``slimexport pipeline --arch ultralytics:FILE --dataset ultralytics:DATA.yaml``: the pipeline's stages for an
Ultralytics YOLO detector, in a run directory built and resumed as for classifiers (:mod:`slimexport.rundir`).

    baseline → sparse → prune → refine → export_baseline, export_pruned [→ quantize_*] → bench → report

Ultralytics' trainer trains (baseline, sparse with the sparsity hook, refine of the pruned model as it is);
slimexport prunes (the graph engine, the Detect head's outputs kept), exports (ONNX with Ultralytics' metadata,
verified, simplified), quantizes, and measures: mAP50-95 and mAP50 by Ultralytics' validator on the ONNX models in
onnxruntime, parameters, MACs, and onnxruntime latency at the training size and at 640. Stages read only
slimexport's plain-data checkpoints (``*.ckpt``); ``baseline.pt`` and ``pruned.pt`` are Ultralytics checkpoints for
the user (``YOLO("pruned.pt")``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimexport.config import PipelineConfig
from slimexport.console import console
from slimexport.deploy import quantize_onnx
from slimexport.detect import evaluate as ev
from slimexport.detect.data import PREFIX, check_data, images_of, is_detector_run  # noqa: F401 - re-exported
from slimexport.detect.train import bn_gamma_values, require_ultralytics, train_detector
from slimexport.errors import ConfigError
from slimexport.fileio import check_output, output_lock, write_json, write_text
from slimexport.loop import resolve_device
from slimexport.prune import prune_model
from slimexport.records import undone_line
from slimexport.report import machine, plot_channels, plot_gammas, versions
from slimexport.rundir import Stage, check_start, execute, is_run_dir, partial_dir, start
from slimexport.runtime import latency
from slimexport.stats import count_macs_on

DEFAULT_IMAGE_SIZE = 640  # Ultralytics' own default
DEPLOY_SIZE = 640  # latency is also measured here, the size detectors ship at
# Options of the classifier pipeline that mean nothing here: refused where given, never ignored in silence.
NOT_FOR_DETECTORS = ("distill", "prune_steps", "compile", "sync_bn", "baseline", "sparse", "weights", "data_dir",
                     "precision", "lr", "refine_lr", "eval_every", "ort", "ncnn")  # fmt: skip


@dataclass
class _Run:
    cfg: PipelineConfig
    data: Path
    info: dict[str, Any]
    dir: Path
    records: dict[str, dict[str, Any]]
    command: str
    device: str
    size: int
    train_args: dict[str, Any]
    files: dict[str, list[Path]] = field(default_factory=dict)  # each split's images, listed once per run

    def sample(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` images of a split, letterboxed as Ultralytics feeds them."""
        if split not in self.files:
            self.files[split] = images_of(self.data, split)
        files = self.files[split]
        return ev.letterboxed(files[:n] if n else files, self.size)

    def train(self, model, name: str, epochs: int, sparsity: float = 0.0):
        trained, rec = train_detector(
            model, self.data, self.dir / "ultralytics" / name, epochs, self.size, self.cfg.batch_size or 16,
            self.device, self.cfg.seed, sparsity, self.cfg.regularizer, self.cfg.polar_t, **self.train_args,
        )  # fmt: skip
        return trained, rec | {"ultralytics_dir": f"ultralytics/{name}"}  # in the run directory, wherever it moves


def _baseline_stage(r: _Run) -> dict[str, Any]:
    src = Path(str(r.cfg.arch).removeprefix(PREFIX)).expanduser()
    model = ev.read_user_model(src)
    epochs = r.cfg.epochs if r.cfg.baseline_epochs is None else r.cfg.baseline_epochs
    if epochs == 0:
        if ev.nc_of(model) != r.info["nc"]:
            raise ConfigError(f"{src} detects {ev.nc_of(model)} classes but {r.data} has {r.info['nc']}: train it "
                              "on this data first (--baseline-epochs N)")  # fmt: skip
        model.names, rec = dict(enumerate(r.info["names"])), {"epochs": 0}
    else:
        if ev.nc_of(model) != r.info["nc"]:  # as Ultralytics does: a head for the data's classes, the rest kept
            fresh = ev.build(model.yaml, r.info["nc"], None, str(src))
            fresh.load_state_dict(
                {k: v for k, v in model.state_dict().items() if fresh.state_dict()[k].shape == v.shape}, strict=False
            )
            model = fresh
        model, rec = r.train(model, "baseline", epochs)
    ev.save_detector(model, r.dir / "baseline.ckpt", None, {"stage": "baseline", "source": str(src)})
    ev.save_ultralytics(model, r.dir / "baseline.pt")
    return {"source": str(src)} | rec


def _sparse_stage(r: _Run) -> dict[str, Any]:
    model, _ = ev.load_detector(r.dir / "baseline.ckpt")
    sparsity = float(r.cfg.sparsity)
    model, rec = r.train(model, "sparse", r.cfg.epochs, sparsity)
    ev.save_detector(model, r.dir / "sparse.ckpt", None, {"stage": "sparse"})
    g = torch.tensor(bn_gamma_values(model))
    return rec | {
        "gamma": {"count": len(g), "median": float(g.median()), "below_1e-2": float((g < 1e-2).float().mean())}
    }


def _prune_stage(r: _Run) -> dict[str, Any]:
    model, _ = ev.load_detector(r.dir / "sparse.ckpt")
    pruned, rec = prune_model(model, example_input=r.sample(1), cfg=r.cfg.prune)
    pruned = ev.ultralytics_form(pruned)  # as build() rebuilds it from the plan: the saved weights fit
    ev.save_detector(pruned, r.dir / "pruned.ckpt", rec["plan"], {"stage": "pruned", "prune": _summary(rec)})
    if rec.get("undone"):
        console.print(f"[yellow]prune: {undone_line(rec['undone'])}[/]")
    return _summary(rec) | {"layers": rec["layers"]}


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    keep = ("percent", "max_macs", "latency_target", "threshold", "round_to", "normalize", "min_channels",
            "channels_before", "channels_after", "pruned_fraction", "undone", "unprunable")  # fmt: skip
    return {k: rec[k] for k in keep if k in rec}


def _refine_stage(r: _Run) -> dict[str, Any]:
    model, ckpt = ev.load_detector(r.dir / "pruned.ckpt")
    model, rec = r.train(model, "refine", r.cfg.refine_epochs)
    ev.save_detector(model, r.dir / "refined.ckpt", ckpt["plan"], {"stage": "refined"})
    ev.save_ultralytics(model, r.dir / "pruned.pt")
    return rec


def _export_stage(name: str, ckpt: str):
    def run(r: _Run) -> dict[str, Any]:
        model, _ = ev.load_detector(r.dir / ckpt)
        res = ev.export_detector(model, r.dir / f"{name}.onnx", r.sample(8), {}, r.cfg.export)
        return {k: res[k] for k in ("onnx_bytes", "parity", "op_counts") if k in res}

    return run


def _quantize_stage(name: str):
    def run(r: _Run) -> dict[str, Any]:
        calib = r.sample(r.cfg.quantize.calib_images, "train").numpy()
        # convs only: the Detect head's decoding concatenates box pixels and class probabilities into one tensor,
        # which one INT8 scale cannot hold (quantized, every score rounds to 0 and mAP to 0)
        rec = quantize_onnx(r.dir / f"{name}.onnx", r.dir / f"{name}.int8.onnx", calib, r.cfg.quantize,
                            op_types=["Conv"])  # fmt: skip
        return {k: v for k, v in rec.items() if k != "config"}

    return run


def variants(cfg: PipelineConfig) -> dict[str, str]:
    names = {"baseline": "baseline.onnx", "pruned": "pruned.onnx"}
    if cfg.int8:
        names |= {"baseline.int8": "baseline.int8.onnx", "pruned.int8": "pruned.int8.onnx"}
    return names


def _bench_stage(r: _Run) -> dict[str, Any]:
    """mAP of every ONNX variant in onnxruntime, and latency side by side at the training size and at 640."""
    files = {n: r.dir / f for n, f in variants(r.cfg).items()}
    maps = {}
    for name, path in files.items():
        console.print(f"[dim]mAP of {name} in onnxruntime…[/]")
        maps[name] = ev.onnx_map(path, r.data, r.size)
    rows = [row | {"image_size": r.size} for row in latency(files, (3, r.size, r.size), r.cfg.bench)]
    if r.size != DEPLOY_SIZE:
        rows += _latency_at(r, DEPLOY_SIZE)
    return {"map": maps, "latency": rows}


def _latency_at(r: _Run, size: int) -> list[dict[str, Any]]:
    """Latency of the FP32 baseline and pruned models exported at ``size`` (a detector's anchors are fixed at
    export), written under ``at{size}/``."""
    x = torch.nn.functional.interpolate(r.sample(2), size=(size, size), mode="bilinear")
    files = {}
    for name, ckpt in (("baseline", "baseline.ckpt"), ("pruned", "refined.ckpt")):
        model, _ = ev.load_detector(r.dir / ckpt)
        files[name] = r.dir / f"at{size}" / f"{name}.onnx"
        ev.export_detector(model, files[name], x, {}, dataclasses.replace(r.cfg.export, atol=1e-2))
    return [row | {"image_size": size} for row in latency(files, (3, size, size), r.cfg.bench)]


def _model_facts(r: _Run, ckpt: str, x: torch.Tensor) -> dict[str, Any]:
    model, _ = ev.load_detector(r.dir / ckpt)
    # every parameter, as Ultralytics counts them (its DFL conv is frozen: count_params would leave it out)
    return {"params": sum(q.numel() for q in model.parameters()), "macs": count_macs_on(model, x)}


def _report_stage(r: _Run) -> dict[str, Any]:
    x = r.sample(1)
    bench = r.records["bench"]
    models = {}
    for name, ckpt in (("baseline", "baseline.ckpt"), ("pruned", "refined.ckpt")):
        models[name] = _model_facts(r, ckpt, x) | {
            "onnx_bytes": r.records[f"export_{name}"]["onnx_bytes"], "map": bench["map"][name],
            "latency": [row for row in bench["latency"] if row["model"] == name],
        }  # fmt: skip
    b, p = models["baseline"], models["pruned"]
    speedups = []
    for row in b["latency"]:
        q = next(y for y in p["latency"] if (y["batch"], y["threads"], y["image_size"]) ==
                 (row["batch"], row["threads"], row["image_size"]))  # fmt: skip
        speedups.append({k: row[k] for k in ("batch", "threads", "image_size")}
                        | {"speedup": row["median_ms"] / q["median_ms"]})  # fmt: skip
    report = {
        "kind": "detector", "arch": r.cfg.arch, "dataset": str(r.data), "data": r.info | {"image_size": r.size},
        "command": r.command, "baseline": b, "pruned": p,
        "int8": {n: bench["map"][n] for n in bench["map"] if n.endswith(".int8")},
        "ratios": {"params": b["params"] / p["params"], "macs": b["macs"] / p["macs"], "speedup": speedups,
                   "map50_95_drop": b["map"]["map50_95"] - p["map"]["map50_95"]},
        "prune": {k: v for k, v in r.records["prune"].items() if k != "layers"},
        "training": {n: {k: r.records[n].get(k) for k in ("epochs", "seconds", "sparsity", "amp", "sparse_steps")}
                     for n in ("baseline", "sparse", "refine")},
        "latency_rows": bench["latency"], "versions": versions() | {"ultralytics": _ultralytics_version()},
        "machine": machine(),
    }  # fmt: skip
    sparse, _ = ev.load_detector(r.dir / "sparse.ckpt")
    plot_gammas(bn_gamma_values(sparse), r.records["prune"].get("threshold"), r.dir / "gamma_hist.png",
                "BN |γ| after sparse training")  # fmt: skip
    plot_channels(r.records["prune"]["layers"], r.dir / "channels.png", "channels per BN layer")
    write_json(r.dir / "report.json", report)
    write_text(r.dir / "report.md", render(report))
    return {"map50_95": [b["map"]["map50_95"], p["map"]["map50_95"]]}


def _ultralytics_version() -> str:
    from ultralytics import __version__

    return __version__


def render(rep: dict[str, Any]) -> str:
    """report.md of a detector run."""
    b, p, q = rep["baseline"], rep["pruned"], rep["ratios"]
    lines = [
        f"# slimexport: {rep['arch']} on {rep['dataset']}", "",
        f"Image size {rep['data']['image_size']}, {rep['data']['nc']} classes, {rep['data']['train']} train / "
        f"{rep['data']['val']} val images. mAP by Ultralytics' validator on the ONNX models in onnxruntime.", "",
        "| | baseline | pruned | ratio |", "|---|---:|---:|---:|",
        f"| parameters | {b['params']:,} | {p['params']:,} | ×{q['params']:.2f} |",
        f"| MACs | {b['macs'] / 1e6:,.1f} M | {p['macs'] / 1e6:,.1f} M | ×{q['macs']:.2f} |",
        f"| mAP50-95 | {b['map']['map50_95']:.4f} | {p['map']['map50_95']:.4f} | {-100 * q['map50_95_drop']:+.2f} pt |",
        f"| mAP50 | {b['map']['map50']:.4f} | {p['map']['map50']:.4f} | |",
        f"| ONNX bytes | {b['onnx_bytes']:,} | {p['onnx_bytes']:,} | |", "",
        "| image size | batch | threads | baseline ms | pruned ms | speed-up |", "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for s in q["speedup"]:
        key = (s["batch"], s["threads"], s["image_size"])
        ms = [next(x["median_ms"] for x in m["latency"] if (x["batch"], x["threads"], x["image_size"]) == key)
              for m in (b, p)]  # fmt: skip
        lines.append(f"| {key[2]} | {key[0]} | {key[1]} | {ms[0]:.2f} | {ms[1]:.2f} | ×{s['speedup']:.2f} |")
    if rep["int8"]:
        lines += ["", "| INT8 | mAP50-95 | mAP50 |", "|---|---:|---:|"]
        lines += [f"| {n} | {m['map50_95']:.4f} | {m['map50']:.4f} |" for n, m in rep["int8"].items()]
    if rep["prune"].get("undone"):
        lines += ["", f"**Note:** {undone_line(rep['prune']['undone'])}"]
    lines += ["", f"Pruned {100 * rep['prune']['pruned_fraction']:.1f}% of the BN channels (threshold "
              f"{rep['prune']['threshold']:.4g}). ![γ](gamma_hist.png) ![channels](channels.png)", ""]  # fmt: skip
    return "\n".join(lines)


def stages(cfg: PipelineConfig) -> list[Stage]:
    return [
        Stage("baseline", ("baseline.ckpt", "baseline.pt"), _baseline_stage),
        Stage("sparse", ("sparse.ckpt",), _sparse_stage),
        Stage("prune", ("pruned.ckpt",), _prune_stage),
        Stage("refine", ("refined.ckpt", "pruned.pt"), _refine_stage),
        Stage("export_baseline", ("baseline.onnx",), _export_stage("baseline", "baseline.ckpt")),
        Stage("export_pruned", ("pruned.onnx",), _export_stage("pruned", "refined.ckpt")),
        *(
            [Stage(f"quantize_{n}", (f"{n}.int8.onnx",), _quantize_stage(n)) for n in ("baseline", "pruned")]
            if cfg.int8
            else []
        ),  # fmt: skip
        Stage("bench", (), _bench_stage),
        Stage("report", ("report.json", "report.md", "gamma_hist.png", "channels.png"), _report_stage),
    ]


OWN_ARGS = ("model", "data", "epochs", "imgsz", "batch", "device", "seed", "project", "name", "exist_ok", "resume")


def train_args(text: str | None) -> dict[str, Any]:
    """``--train-args`` KEY=VALUE[,KEY=VALUE] as Ultralytics training arguments (values read as YAML scalars),
    checked against Ultralytics' own list; those slimexport sets from its options are refused."""
    import yaml
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--train-args {item!r}: expected KEY=VALUE")
        if key not in DEFAULT_CFG_DICT:
            raise ConfigError(f"--train-args {key}: not an Ultralytics training argument")
        if key in OWN_ARGS:
            raise ConfigError(f"--train-args {key}: set by slimexport's own options (--epochs, --image-size, ...)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--train-args {key}={value!r}: not a value") from None
    return out


def _check_options(cfg: PipelineConfig) -> None:
    default = PipelineConfig()
    given = [f for f in NOT_FOR_DETECTORS if getattr(cfg, f) != getattr(default, f)]
    if cfg.prune.prune_stream:
        given.append("prune_stream")
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ConfigError(f"{flags}: not for detectors (Ultralytics' trainer trains them with its own schedule)")
    train_args(cfg.train_args)
    arch = Path(str(cfg.arch).removeprefix(PREFIX))
    if cfg.baseline_epochs == 0 and arch.suffix in (".yaml", ".yml"):
        raise ConfigError(f"--baseline-epochs 0 takes a trained .pt as the baseline, not the yaml {arch}")
    if not isinstance(cfg.sparsity, (int, float)):
        raise ConfigError("--sparsity auto is for classifiers: give detectors a number (e.g. 1e-3)")


def _preflight(model: torch.nn.Module) -> None:
    """Prune a copy at 50% with random γ before any training: a model the engine cannot prune fails in seconds."""
    import copy

    from slimexport.graph import BN_TYPES

    trial = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in trial.modules():
            if isinstance(m, BN_TYPES) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.05)
    prune_model(trial, 0.5, example_input=torch.rand(1, 3, 64, 64), round_to=1)


def run_detector_pipeline(cfg: PipelineConfig, command: str = "") -> dict[str, Any]:
    """Run (or with ``cfg.resume`` continue) a detector's pipeline; returns the report (``report.json``)."""
    cfg.validate()
    _check_options(cfg)
    require_ultralytics()
    out = Path(cfg.out)
    check_output(out, True, "dir", is_run_dir)
    with output_lock(out):
        work = partial_dir(out)
        check_start(out, work, cfg.resume, cfg.force)
        data = Path(cfg.dataset.removeprefix(PREFIX)).expanduser().resolve()
        info = check_data(data)
        _preflight(ev.read_user_model(Path(str(cfg.arch).removeprefix(PREFIX))))  # fails now, not after training
        device = resolve_device(cfg.device)
        size = cfg.image_size or DEFAULT_IMAGE_SIZE
        config = dataclasses.asdict(cfg) | {"resolved_device": str(device), "data": info, "image_size": size}
        records = start(work, config, cfg.resume, True)
        ul_device = "cpu" if device.type == "cpu" else str(device.index or 0)
        console.print(f"[bold]slimexport pipeline[/] {cfg.arch} on {data} ({info['train']} train / {info['val']} "
                      f"val images, {info['nc']} classes) at {size}, device {device}")  # fmt: skip
        run = _Run(cfg, data, info, work, records, command, ul_device, size, train_args(cfg.train_args))
        return execute(stages(cfg), run, work, out, records, True)

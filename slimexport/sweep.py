"""``slimexport sweep``: from one sparse checkpoint, several targets (measured speed-ups, latencies, percents,
MACs budgets), each pruned, refined with a short schedule, exported and benchmarked, then all of them timed side by
side with the unpruned model in one onnxruntime run; an accuracy-against-latency chart (``sweep.png``, the unpruned
model marked) and a table (``report.md``, ``sweep.json``) to decide from.

    OUT/
      baseline.onnx                  the unpruned model (the sparse checkpoint, or --baseline), exported
      speedup-2/ pruned.pt refined.pt model.onnx row.json     one folder per target; row.json once it finished
      sweep.json report.md sweep.png

A sweep that stops early keeps every finished target; ``--resume`` (same options) skips them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from slimexport.bench import bench
from slimexport.config import BenchConfig, PruneConfig, TrainConfig
from slimexport.console import console
from slimexport.data import Dataset
from slimexport.errors import ConfigError, OutputExistsError
from slimexport.export import export
from slimexport.fileio import check_output, output_lock, read_json, write_json, write_text
from slimexport.prune import prune
from slimexport.report import machine, versions
from slimexport.train import train

KINDS = {"speedup": "target_speedup", "latency": "max_latency", "percent": "percent", "macs": "max_macs"}


def parse_targets(text: str) -> list[tuple[str, dict[str, float]]]:
    """``speedup:2,latency:5,percent:0.5,macs:0.5`` → [(folder name, PruneConfig fields)], each checked."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, _, value = item.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"--targets {item!r}: KIND:VALUE with KIND one of {', '.join(KINDS)}")
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"--targets {item!r}: {value!r} is not a number") from None
        fields = {"percent": None, "max_macs": None, "target_speedup": None, "max_latency": None} | {KINDS[kind]: v}
        PruneConfig(**fields).validate()  # the same one-line errors as the prune command's
        out.append((f"{kind}-{v:g}", fields))
    if not out:
        raise ConfigError("--targets: give at least one, e.g. speedup:1.5,speedup:2,speedup:3")
    if len({n for n, _ in out}) != len(out):
        raise ConfigError(f"--targets {text!r}: a target is given twice")
    return out


def _target(sparse: Path, folder: Path, fields: dict, prune_cfg: PruneConfig, refine: TrainConfig | None,
            ds: Dataset) -> dict[str, Any]:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    meta = prune(sparse, folder / "pruned.pt", dataclasses.replace(prune_cfg, **fields), ds=ds)
    last = folder / "pruned.pt"
    if refine is not None:
        train(folder / "refined.pt", ds, refine, init=last, stage="refined")
        last = folder / "refined.pt"
    exp = export(last, folder / "model.onnx", ds)
    rec = meta["prune"]
    row = {"target": folder.name, "fields": {k: v for k, v in fields.items() if v is not None},
           "pruned_fraction": rec["pruned_fraction"], "macs_ratio": rec["macs_before"] / rec["macs_after"],
           "params_ratio": rec["params_before"] / rec["params_after"], "onnx_bytes": exp["onnx_bytes"],
           "latency_target": rec.get("latency_target"), "accuracy_before_refine": meta.get("accuracy")}  # fmt: skip
    write_json(folder / "row.json", row)
    return row


def run_sweep(sparse: str | Path, out: str | Path, targets: str, ds: Dataset, prune_cfg: PruneConfig,
              refine: TrainConfig | None, bench_cfg: BenchConfig, baseline: str | Path | None = None,
              force: bool = False, resume: bool = False, command: str = "") -> dict[str, Any]:  # fmt: skip
    """Run the sweep (see the module); returns ``sweep.json``'s content."""
    sparse, out = Path(sparse), Path(out)
    wanted = parse_targets(targets)
    settings = {"sparse": str(sparse), "targets": targets, "baseline": str(baseline) if baseline else None,
                "prune": dataclasses.asdict(prune_cfg), "refine": dataclasses.asdict(refine) if refine else None,
                "data": ds.summary()}  # fmt: skip
    check_output(out, True, "dir", lambda d: (d / "settings.json").is_file())
    with output_lock(out):
        if out.exists() and not resume and not force:
            raise OutputExistsError(f"{out} exists: --resume continues that sweep, --force starts over")
        if resume and out.exists() and read_json(out / "settings.json") != settings:
            raise ConfigError(f"cannot resume {out}: its settings differ (settings.json); start over with --force")
        if force and not resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "settings.json", settings)
        if not (out / "baseline.onnx").is_file():
            export(Path(baseline) if baseline else sparse, out / "baseline.onnx", ds)
        rows = []
        for name, fields in wanted:
            done = out / name / "row.json"
            if done.is_file():
                console.print(f"[dim]{name}: kept from the interrupted sweep[/]")
                rows.append(read_json(done))
                continue
            console.print(f"[bold]{name}[/]")
            rows.append(_target(sparse, out / name, fields, prune_cfg, refine, ds))
        models = {"baseline": out / "baseline.onnx", **{r["target"]: out / r["target"] / "model.onnx" for r in rows}}
        res = bench(models, ds, dataclasses.replace(bench_cfg, profile=False, accuracy=True))
        report = _report(res, rows, settings, command)
        write_json(out / "sweep.json", report)
        write_text(out / "report.md", render(report))
        plot_sweep(report, out / "sweep.png")
        return report


def _report(res: dict, rows: list[dict], settings: dict, command: str) -> dict[str, Any]:
    lat = res["latency"]
    first = (min(x["batch"] for x in lat), min(x["threads"] for x in lat))
    b1 = [r for r in lat if (r["batch"], r["threads"]) == first]
    ms = {r["model"]: r["median_ms"] for r in b1}
    base = {"accuracy": res["models"]["baseline"]["accuracy"], "median_ms": ms["baseline"]}
    for r in rows:
        r["accuracy"] = res["models"][r["target"]]["accuracy"]
        r["median_ms"] = ms[r["target"]]
        r["speedup"] = ms["baseline"] / ms[r["target"]]
    return {"kind": "sweep", "command": command, "settings": settings, "baseline": base, "rows": rows,
            "timed_at": {"batch": b1[0]["batch"], "threads": b1[0]["threads"]}, "latency": lat,
            "versions": versions(), "machine": machine()}  # fmt: skip


def render(rep: dict[str, Any]) -> str:
    t = rep["timed_at"]
    lines = [f"# slimexport sweep: {rep['settings']['sparse']}", "",
             f"Latency: onnxruntime, batch {t['batch']}, {t['threads']} thread(s), all models side by side; accuracy "
             "in onnxruntime on the test split. ![accuracy against latency](sweep.png)", "",
             "| target | re-timed speed-up | ms | accuracy | MACs ratio | params ratio | BN channels pruned |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| unpruned | ×1.00 | {rep['baseline']['median_ms']:.3f} | {100 * rep['baseline']['accuracy']:.2f}% "
             "| | | |"]  # fmt: skip
    for r in rep["rows"]:
        note = " (unreachable: the nearest feasible)" if (r.get("latency_target") or {}).get("unreachable") else ""
        lines.append(f"| {r['target']}{note} | ×{r['speedup']:.2f} | {r['median_ms']:.3f} "
                     f"| {100 * r['accuracy']:.2f}% | ×{r['macs_ratio']:.2f} | ×{r['params_ratio']:.2f} "
                     f"| {100 * r['pruned_fraction']:.1f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_sweep(rep: dict[str, Any], path: Path) -> None:
    """Accuracy against measured latency: one point per target, the unpruned model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimexport.report import _save_fig

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["median_ms"] for r in rep["rows"]]
    ys = [100 * r["accuracy"] for r in rep["rows"]]
    ax.plot(xs, ys, "o", color="tab:blue", label="pruned (refined)")
    for r, x, y in zip(rep["rows"], xs, ys):
        ax.annotate(r["target"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    b = rep["baseline"]
    ax.plot([b["median_ms"]], [100 * b["accuracy"]], "*", color="tab:red", markersize=14, label="unpruned")
    t = rep["timed_at"]
    ax.set_xlabel(f"latency, ms (onnxruntime, batch {t['batch']}, {t['threads']} thread(s))")
    ax.set_ylabel("accuracy, % (onnxruntime)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_fig(fig, path)

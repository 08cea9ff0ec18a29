"""The run report: report.json (machine-readable; its schema is :class:`slimexport.records.Report`, which also
generates the README's table), report.md (for people) and plots."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slimexport.fileio import atomic_path, write_text
from slimexport.records import Report, latency_line, undone_line

SCHEMA = "slimexport.report/1"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimexport")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    try:
        import onnxsim

        sim = getattr(onnxsim, "__version__", "?")
    except ImportError:  # pragma: no cover - onnxsim is a dependency
        sim = "not installed"
    return {
        "slimexport": _package_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxsim": sim,
    }


def machine() -> dict[str, Any]:
    import torch

    from slimexport.runtime import machine_facts

    cpu = machine_facts()["cpu"] or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def ratios(baseline: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    def key(row):
        return row["provider"], row["batch"], row["threads"]

    base_lat = {key(r): r for r in baseline.get("latency", [])}
    speedup = []
    for r in pruned.get("latency", []):
        b = base_lat.get(key(r))
        if b is not None:
            speedup.append(
                {
                    "provider": r["provider"],
                    "batch": r["batch"],
                    "threads": r["threads"],
                    "speedup": b["median_ms"] / r["median_ms"],
                }
            )
    return {k: baseline[k] / pruned[k] for k in ("params", "macs", "onnx_bytes") if pruned.get(k)} | {
        "speedup": speedup
    }


def build_report(
    baseline: dict[str, Any],
    pruned: dict[str, Any],
    prune_record: dict[str, Any],
    stages: dict[str, Any],
    config: dict[str, Any],
    command: str = "",
) -> Report:
    par = [m["parity"] for m in (baseline, pruned) if "parity" in m]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "baseline": baseline,
        "pruned": pruned,
        "ratios": ratios(baseline, pruned),
        "parity": {
            "max_abs_diff": max(p["max_abs_diff"] for p in par),
            "top1_agreement": min(p["top1_agreement"] for p in par),
        }
        if par
        else {},
        "prune": prune_record,
        "stages": stages,
        "config": config,
        "versions": versions(),
        "machine": machine(),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _latency_rows(b: dict[str, Any], p: dict[str, Any], q: dict[str, Any]) -> list[str]:
    """The latency table's rows: each setting the pruned model was timed in, beside the baseline's."""
    lines: list[str] = []
    base = {(x["provider"], x["batch"], x["threads"]): x for x in b.get("latency", [])}
    sp = {(x["provider"], x["batch"], x["threads"]): x["speedup"] for x in q["speedup"]}
    for x in p.get("latency", []):
        k = (x["provider"], x["batch"], x["threads"])
        y = base.get(k, {})
        lines.append(
            f"| {x['provider'].replace('ExecutionProvider', '')} | {x['batch']} | {x['threads']} | "
            f"{y.get('median_ms', float('nan')):.3f} | {y.get('p90_ms', float('nan')):.3f} | "
            f"{x['median_ms']:.3f} | {x['p90_ms']:.3f} | ×{sp.get(k, float('nan')):.2f} |"
        )
    return lines


def _prune_lines(x: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """What pruning did, in words: accuracy before refine, the threshold, floors, folding, and when the asked-for
    prune mostly did not happen, why."""
    line = (
        f"Pruned model before refine: {_pct(p.get('accuracy_before_refine'))}; sparse model: "
        f"{_pct(p.get('sparse_accuracy'))}. Global threshold |γ| > {x['threshold']} removed "
        f"{x['channels_before'] - x['channels_after']} of {x['channels_before']} channels"
    )
    if x["floored_layers"]:
        line += f"; layers kept at their floor: {', '.join(x['floored_layers'])}"
    if x.get("prune_stream"):
        line += "; channels read before any BatchNorm pruned too (--prune-stream)"
    if x.get("folded"):
        line += f"; β folded into {len(x['folded'])} layers that read removed channels"
    lines = [line + ".", ""]
    if x.get("undone"):
        lines += [f"**The asked-for prune mostly did not happen:** {undone_line(x['undone'])}.", ""]
    if x.get("latency_target"):
        lines += [f"**Pruned to a measured latency:** {latency_line(x['latency_target'])}. The benchmark below "
                  "timed the exported, refined model again on its own.", ""]  # fmt: skip
    return lines


def render_markdown(r: dict[str, Any]) -> str:
    b, p, q = r["baseline"], r["pruned"], r["ratios"]
    cfg = r["config"]
    lines = [
        f"# slimexport report: {cfg.get('arch')} on {cfg.get('dataset')}, "
        f"{100 * r['prune']['pruned_fraction']:.0f}% of the BN channels pruned",
        "",
        f"Created {r['created']} on {r['machine']['cpu']} ({r['machine']['cores']} cores"
        + (f", GPU {r['machine']['gpu']}" if r["machine"].get("gpu") else "")
        + ").",
        "",
        "| | baseline | pruned | ratio (baseline / pruned) |",
        "|---|---:|---:|---:|",
        f"| parameters | {b['params']:,} | {p['params']:,} | ×{q['params']:.2f} |",
        f"| MACs / image | {b['macs']:,} | {p['macs']:,} | ×{q['macs']:.2f} |",
        f"| ONNX bytes | {b['onnx_bytes']:,} | {p['onnx_bytes']:,} | ×{q['onnx_bytes']:.2f} |",
        f"| accuracy (onnxruntime) | {_pct(b.get('accuracy'))} | {_pct(p.get('accuracy'))} | "
        f"{100 * (p.get('accuracy', 0) - b.get('accuracy', 0)):+.2f} points |",
        f"| accuracy (PyTorch) | {_pct(b.get('torch_accuracy'))} | {_pct(p.get('torch_accuracy'))} | |",
        "",
        *_prune_lines(r["prune"], p),
        _gamma_line(r.get("gamma")),
        "",
        "## Latency (onnxruntime, median and p90 in ms)",
        "",
        "| provider | batch | threads | baseline median | baseline p90 | pruned median | pruned p90 | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _latency_rows(b, p, q)
    lines += _variants_markdown(r.get("variants", []))
    lines += [
        "",
        "## Export",
        "",
        "| | max abs diff vs PyTorch | top-1 agreement | ops | Gather/Slice time share |",
        "|---|---:|---:|---|---:|",
    ]
    for name, m in (("baseline", b), ("pruned", p)):
        ops = ", ".join(f"{k} {v}" for k, v in m.get("op_counts", {}).items())
        share = m.get("op_time", {}).get("gather_slice_share")
        lines.append(
            f"| {name} | {m['parity']['max_abs_diff']:.2e} | {m['parity']['top1_agreement']:.4f} | {ops} | "
            f"{_pct(share)} |"
        )
    lines += ["", "## Stages", "", "| stage | seconds | accuracy | images/s |", "|---|---:|---:|---:|"]
    for name, s in r["stages"].items():
        ips = s.get("images_per_s")
        lines.append(
            f"| {name} | {s['seconds']:.1f} | {_pct(s.get('accuracy'))} | {'' if ips is None else f'{ips:,.0f}'} |"
        )
    lines += [
        "",
        "## Plots",
        "",
        "![BN |γ| distribution](gamma_hist.png)",
        "",
        "![channels per layer](channels.png)",
        "",
        "![latency](latency.png)",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def _gamma_line(g: dict[str, Any] | None) -> str:
    if not g:
        return ""
    q = g["quantiles"]
    return (
        f"Sparse training: {100 * g['fraction_small']:.1f}% of |γ| below 1e-2; quantiles 10/50/90% "
        f"{q['0.1']:.3g} / {q['0.5']:.3g} / {q['0.9']:.3g}; the L1 term could move a γ by at most s·Σlr/(1−μ) = "
        f"{g['l1_reach']:.3g} (γ starts at 1, 0.5 in the reference's models; weight decay shrinks it too)."
    )


def _lat(row: dict[str, Any], batch: int, threads: int) -> str:
    x = next((y for y in row["latency"] if y["batch"] == batch and y["threads"] == threads), None)
    return "–" if x is None else f"{x['median_ms']:.3f}"


def _variants_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The deploy table: every benchmarked form of both models (FP32, INT8, .ort), side by side."""
    if len(rows) <= 2:
        return []
    settings = sorted({(x["batch"], x["threads"]) for row in rows for x in row["latency"]})
    head = " | ".join(f"b{b} t{t} ms" for b, t in settings)
    lines = [
        "",
        "## Deployment variants (onnxruntime, median latency)",
        "",
        f"| model | bytes | accuracy | top-1 agreement (vs) | max abs diff | {head} |",
        "|---|---:|---:|---|---:|" + "---:|" * len(settings),
    ]
    for row in rows:
        par = row.get("parity", {})
        lats = " | ".join(_lat(row, b, t) for b, t in settings)
        lines.append(
            f"| {row['name']}{' (' + row['types'] + ')' if row.get('types') else ''} | {row['bytes']:,} | "
            f"{_pct(row.get('accuracy'))} | {par.get('top1_agreement', float('nan')):.4f} ({par.get('reference', '')})"
            f" | {par.get('max_abs_diff', float('nan')):.3g} | {lats} |"
        )
    kept = [f"{row['name']}: **{row['keep']['chosen']}**, {row['keep']['why']}" for row in rows if row.get("keep")]
    if kept:
        lines += ["", "INT8 where it pays (`--int8-keep auto`): " + "; ".join(kept) + "."]
    lines += ["", "![accuracy against latency](variants.png)"]
    return lines


def plot_variants(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against batch-1 single-thread latency, one point per deployment variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for row in rows:
        x = next((y for y in row["latency"] if y["batch"] == 1 and y["threads"] == 1), None) or row["latency"][0]
        acc = row.get("accuracy")
        if acc is None:
            continue
        marker = "s" if "int8" in row["name"] else "o"
        color = "#4C72B0" if row["name"].startswith("pruned") else "#8C8C8C"
        ax.scatter([x["median_ms"]], [100 * acc], marker=marker, color=color, s=50)
        ax.annotate(row["name"], (x["median_ms"], 100 * acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"median latency (ms), onnxruntime, batch {x['batch']}, {x['threads']} thread(s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against latency")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_gammas(gammas: list[float], threshold: float | None, path: Path, title: str) -> None:
    """Histogram of all prunable BN |γ| with the global threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(gammas, bins=80, color="#4C72B0")
    ax.set_yscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", ls="--", label=f"threshold {threshold:.3g}")
        ax.legend()
    ax.set_xlabel("|γ| (BatchNorm scale)")
    ax.set_ylabel("channels")
    ax.set_title(title)
    _save_fig(fig, path)


def plot_channels(layers: list[dict[str, Any]], path: Path, title: str) -> None:
    """Channels per prunable BN layer, before and after pruning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(layers)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.25 * n + 3)), 3.8))
    xs = range(n)
    ax.bar(xs, [lay["before"] for lay in layers], color="#C9D3E6", label="before")
    ax.bar(xs, [lay["after"] for lay in layers], color="#4C72B0", label="after")
    ax.set_xlabel("BN layer (forward order)")
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend()
    _save_fig(fig, path)


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """Median latency per setting, baseline against pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["pruned"].get("latency", [])
    base = {(x["provider"], x["batch"], x["threads"]): x for x in report["baseline"].get("latency", [])}
    labels = [f"b{x['batch']} t{x['threads']}" + ("" if x["provider"].startswith("CPU") else " cuda") for x in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    ax.bar(
        [i - 0.2 for i in xs],
        [base[(x["provider"], x["batch"], x["threads"])]["median_ms"] for x in rows],
        0.4,
        label="baseline",
        color="#C9D3E6",
    )
    ax.bar([i + 0.2 for i in xs], [x["median_ms"] for x in rows], 0.4, label="pruned", color="#4C72B0")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms)")
    ax.set_title("onnxruntime latency")
    ax.legend()
    _save_fig(fig, path)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    from slimexport.fileio import write_json

    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", render_markdown(report))

"""RESULTS.md sections for the graph engine's coverage, torchvision models' speed, the deploy table and the
default run's seeds (the pipeline suites' tables are rendered by benchmarks/run.py)."""

from __future__ import annotations


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"×{ratio:.2f}"


def _lat(v: dict, batch: int, threads: int) -> float | None:
    return next((x["median_ms"] for x in v["latency"] if x["batch"] == batch and x["threads"] == threads), None)


def coverage(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "graph_coverage"]
    if not res:
        return []
    r = res[-1]
    s = r["summary"]
    no_bn = [m["model"] for m in r["models"] if m.get("has_bn") is False]
    skipped = [m["model"] for m in r["models"] if "skipped" in m]
    lines = [
        "## Any CNN: the graph engine on every torchvision classification model",
        "",
        f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}; Torch-Pruning {r['versions'].get('torch_pruning')}). "
        "Random weights, random BN statistics, 50% global, input 64×64 (larger where a model needs it). "
        "*exact*: the zeroing check (zero γ, β of the removed channels, prune again, compare outputs; relative "
        "error ≤ 1e-4). *ONNX*: the default exporter, checker, onnxsim, onnxruntime parity (≤ 1e-3), and no "
        "NonZero/GatherND/Where/ScatterND.",
        "",
        f"**{s['pruned_exactly']} of {s['with_bn']} models with BatchNorm prune exactly** "
        f"({100 * s['pruned_exactly'] / max(1, s['with_bn']):.0f}%); {s['refused']} refused, {s['crashed']} crashed; "
        f"Torch-Pruning pruned {s['torch_pruning_pruned']} of {s['with_bn']} without an error. "
        f"Without BatchNorm, refused in one line (network slimming scores channels by BN's γ): {', '.join(no_bn)}. "
        f"Not run (over the --max-params limit: several copies each on a 24 GB, two-core machine): "
        f"{', '.join(skipped) or 'none'}.",
        "",
    ]
    if r.get("engine_speed"):
        e = r["engine_speed"]
        lines += [
            f"Engine speed, {e['model']} at {e['input'][2]}×{e['input'][3]}, trace and prune, median of {e['runs']}: "
            f"**slimexport {e['slimexport_s']:.2f} s**, Torch-Pruning {e['torch_pruning_s']:.2f} s.",
            "",
        ]
    lines += [
        "| model | input | slimexport | groups | unprunable | MACs ratio | exact (rel. error) | ONNX | Torch-Pruning "
        "| TP MACs ratio | TP ONNX | what slimexport left, and why |",
        "|---|---:|---|---:|---:|---:|---|---|---|---:|---|---|",
    ]
    for m in r["models"]:
        if "skipped" in m or "build_error" in m:
            lines.append(f"| {m['model']} | | skipped: {m.get('skipped') or m.get('build_error')} | | | | | | | | | |")
            continue
        o, t = m["slimexport"], m.get("torch_pruning", {})
        if not m.get("has_bn"):
            continue
        exact = (
            "–"
            if "exact" not in o
            else ("yes" if o["exact"] else "NO") + (f" ({o['exact_rel_error']:.1e})" if "exact_rel_error" in o else "")
        )
        onnx = o.get("onnx", {})
        tonnx = t.get("onnx", {})
        why = "; ".join(x for x in o.get("unprunable_reasons", []) if x not in ("model input",
                        "model output (classes are never pruned)"))[:160]  # fmt: skip
        status = o["status"] if o["status"] == "pruned" else f"{o['status']}: {o.get('error', '')[:80]}"
        tstatus = t.get("status", "–") if t.get("status") != "crashed" else f"crashed: {t.get('error', '')[:60]}"
        lines.append(
            f"| {m['model']} | {m['input']} | {status} | {o.get('groups', '')} | {o.get('unprunable_groups', '')} | "
            f"{_x(o.get('macs_ratio'))} | {exact} | "
            f"{'yes' if onnx.get('ok') else ('NO' if onnx else '–')} | {tstatus} | "
            f"{_x(t.get('macs_ratio'))} | "
            f"{'yes' if tonnx.get('ok') else ('NO' if tonnx else '–')} | {why.replace('|', '/')} |"
        )
    return lines + [""]


def speed(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "torchvision_speed"]
    if not res:
        return []
    r = res[-1]
    lines = [
        "## torchvision models: onnxruntime speed-up against the MACs ratio",
        "",
        f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}); {r['round_to_reason']}. Random weights and BN "
        "statistics; Torch-Pruning's BN-scale pruner at the ratio that reaches slimexport's MACs. One interleaved "
        "onnxruntime run, batch 1, median.",
        "",
        "| model | pruner | MACs | MACs ratio | b1 t1 ms | speed-up t1 | speed-up / MACs ratio | b1 t2 ms "
        "| speed-up t2 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        ms = {(x["model"], x["threads"]): x["median_ms"] for x in row["latency"]}
        lines.append(f"| {row['model']} {row['input']}×{row['input']} | baseline | {row['macs']['baseline']:,} | "
                     f"×1.00 | {ms[('baseline', 1)]:.2f} | ×1.00 | | {ms[('baseline', 2)]:.2f} | ×1.00 |")  # fmt: skip
        rt = f" (round-to {row['round_to']})"
        for tag in ("slimexport", "torch-pruning"):
            v = row[tag]
            lines.append(
                f"| | {tag}{rt if tag == 'slimexport' else ''} | "
                f"{row['macs'][tag]:,} | ×{v['macs_ratio']:.2f} | {ms[(tag, 1)]:.2f} | ×{v['speedup_t1']:.2f} | "
                f"**{v['fraction_of_macs_ratio_t1']:.2f}** | {ms[(tag, 2)]:.2f} | ×{v['speedup_t2']:.2f} |"
            )
    return lines + [""]


def deploy(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "deploy"]
    if not res:
        return []
    r = res[-1]
    lines = [
        "## Deploy: baseline FP32 → pruned FP32 → pruned INT8",
        "",
        f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}); from `slimexport pipeline --int8` runs (their "
        "commands below). onnxruntime CPU, median ms, each run's models timed side by side; ×: against baseline "
        "FP32. INT8: onnxruntime static QDQ, per-channel weights, 512 calibration images.",
        "",
        "| model | variant | bytes | accuracy | top-1 agreement (vs) | b1 t1 ms (×) | b1 tN ms | b32 t1 ms (×) "
        "| b32 tN ms |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        vs = {v["name"]: v for v in run["variants"]}
        base = vs["baseline"]
        tn = max(x["threads"] for x in base["latency"])
        for name in ("baseline", "baseline-int8", "pruned", "pruned-int8", "pruned-ncnn"):
            v = vs.get(name)
            if v is None:
                continue
            b1, b32 = _lat(v, 1, 1), _lat(v, 32, 1)
            sp1 = f" (×{_lat(base, 1, 1) / b1:.2f})" if b1 else ""
            sp32 = f" (×{_lat(base, 32, 1) / b32:.2f})" if b32 else ""
            par = v.get("parity", {})
            fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(
                f"| {run['arch']} ({run['dataset'].split(':')[0]}, {100 * run['percent']:.0f}%) | {name} | "
                f"{v['bytes']:,} | {100 * v['accuracy']:.2f}% | {par.get('top1_agreement', float('nan')):.4f} "
                f"({par.get('reference', '')}) | {fmt(b1)}{sp1} | {fmt(_lat(v, 1, tn))} | {fmt(b32)}{sp32} | "
                f"{fmt(_lat(v, 32, tn))} |"
            )
    lines += ["", "Runs: " + "; ".join(f"`{x['command']}`" for x in r["runs"]), ""]
    return lines

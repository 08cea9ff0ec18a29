"""RESULTS.md sections for the graph engine's coverage, torchvision models' speed, the deploy table and the
default run's seeds (the pipeline suites' tables are rendered by benchmarks/run.py)."""

from __future__ import annotations

import statistics

from benchmarks.common import run_name


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"×{ratio:.2f}"


def _lat(v: dict, batch: int, threads: int) -> float | None:
    return next((x["median_ms"] for x in v["latency"] if x["batch"] == batch and x["threads"] == threads), None)


def _coverage_one(r: dict) -> list[str]:
    s = r["summary"]
    timm = r.get("zoo") == "timm"
    no_bn = [m["model"] for m in r["models"] if m.get("has_bn") is False]
    skipped = [m["model"] for m in r["models"] if "skipped" in m]
    title = (
        f"## Any CNN: the graph engine on {len(r['models'])} timm CNNs across families"
        if timm
        else "## Any CNN: the graph engine on every torchvision classification model"
    )
    bn = ""
    if s.get("bn_removed_mean") is not None:
        tp = s.get("torch_pruning_bn_removed_mean")
        bn = f" Mean fraction of BN channels removed: slimexport {100 * s['bn_removed_mean']:.0f}%" + (
            f", Torch-Pruning {100 * tp:.0f}% (over the models it pruned)." if tp is not None else "."
        )
    lines = [
        title,
        "",
        f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}; Torch-Pruning {r['versions'].get('torch_pruning')}). "
        "Random weights, random BN statistics, 50% global, input 64×64 (larger where a model needs it). "
        "*exact*: the zeroing check (zero γ, β of the removed channels, prune again, compare outputs; relative "
        "error ≤ 1e-4). *ONNX*: the default exporter, checker, onnxsim, onnxruntime parity (≤ 1e-3), and no "
        "NonZero/GatherND/Where/ScatterND. *BN removed*: the fraction of BatchNorm channels each pruner removed "
        "(a model that is exact because everything froze is not a success).",
        "",
        f"**{s['pruned_exactly']} of {s['with_bn']} models with BatchNorm prune exactly** "
        f"({100 * s['pruned_exactly'] / max(1, s['with_bn']):.0f}%); {s.get('inexact', 0)} inexact, {s['refused']} "
        f"refused, {s['crashed']} crashed, {s.get('timeout', 0)} timed out; "
        + (f"{s['onnx_failed']} pruned models fail the ONNX check, {s.get('onnx_failed_unpruned_too', 0)} of them "
           "because the unpruned model fails it too; " if s.get("onnx_failed") else "")  # fmt: skip
        + f"Torch-Pruning pruned {s['torch_pruning_pruned']} of {s['with_bn']} without an error.{bn} "
        + (f"Without BatchNorm, refused in one line (network slimming scores channels by BN's γ): {', '.join(no_bn)}. "
           if no_bn else "")
        + f"Not run (over the --max-params limit): {', '.join(skipped) or 'none'}.",
        "",
    ]  # fmt: skip
    if r.get("engine_speed"):
        e = r["engine_speed"]
        lines += [
            f"Engine speed, {e['model']} at {e['input'][2]}×{e['input'][3]}, trace and prune, median of {e['runs']}: "
            f"**slimexport {e['slimexport_s']:.2f} s**, Torch-Pruning {e['torch_pruning_s']:.2f} s.",
            "",
        ]
    lines += [
        "| model | input | slimexport | groups | unprunable | MACs ratio | BN removed | exact (rel. error) "
        "| β folding: rel. error folded / not | ONNX | Torch-Pruning | TP MACs ratio | TP BN removed | TP ONNX "
        "| what slimexport left, and why |",
        "|---|---:|---|---:|---:|---:|---:|---|---|---|---|---:|---:|---|---|",
    ]
    for m in r["models"]:
        if "skipped" in m or "build_error" in m:
            why = m.get("skipped") or m.get("build_error")
            lines.append(f"| {m['model']} | | skipped: {why} | | | | | | | | | | | | |")
            continue
        o, t = m["slimexport"], m.get("torch_pruning", {})
        if not m.get("has_bn"):
            continue
        exact = (
            "–"
            if "exact" not in o
            else ("yes" if o["exact"] else "NO") + (f" ({o['exact_rel_error']:.1e})" if "exact_rel_error" in o else "")
        )
        fe = o.get("fold_error")
        fold = f"{fe['folded']:.1e} / {fe['unfolded']:.1e}" if fe else "–"
        onnx = o.get("onnx", {})
        tonnx = t.get("onnx", {})
        onnx_cell = "yes" if onnx.get("ok") else ("NO" if onnx else "–")
        if o.get("onnx_unpruned", {}).get("ok") is False:
            onnx_cell = "NO, nor the unpruned model"
        why = "; ".join(x for x in o.get("unprunable_reasons", []) if x not in ("model input",
                        "model output (classes are never pruned)"))[:160]  # fmt: skip
        status = o["status"] if o["status"] == "pruned" else f"{o['status']}: {o.get('error', '')[:80]}"
        tstatus = t.get("status", "–") if t.get("status") != "crashed" else f"crashed: {t.get('error', '')[:60]}"
        lines.append(
            f"| {m['model']} | {m['input']} | {status} | {o.get('groups', '')} | {o.get('unprunable_groups', '')} | "
            f"{_x(o.get('macs_ratio'))} | {_share(o.get('bn_removed'))} | {exact} | {fold} | "
            f"{onnx_cell} | {tstatus.replace('|', '/')} | "
            f"{_x(t.get('macs_ratio'))} | {_share(t.get('bn_removed'))} | "
            f"{'yes' if tonnx.get('ok') else ('NO' if tonnx else '–')} | {why.replace('|', '/')} |"
        )
    return lines + [""]


def _share(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def coverage(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "graph_coverage"]
    out: list[str] = []
    for zoo in ("torchvision", "timm"):
        mine = [r for r in res if r.get("zoo", "torchvision") == zoo]
        if mine:
            out += _coverage_one(mine[-1])
    return out


def speed(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "torchvision_speed"]
    if not res or "speedup_t1" in res[-1]["rows"][0].get("slimexport", {}):  # none, or the earlier layout
        return []
    r = res[-1]
    batches = r.get("batches", [1])
    cols = " | ".join(f"b{b} ms | b{b} speed-up | b{b} fraction" for b in batches)
    table = [
        f"| model | pruner | BN removed | MACs ratio | {cols} | where the time went (below 0.8) |",
        "|---|---|---:|---:|" + "---:|---:|---:|" * len(batches) + "---|",
    ]
    fr: dict[str, list[float]] = {"slimexport": [], "torch-pruning": []}
    for row in r["rows"]:
        ms = {(x["model"], x["batch"]): x["median_ms"] for x in row["latency"]}
        cells = " | ".join(f"{ms[('baseline', b)]:.2f} | |" for b in batches)
        table.append(f"| {row['model']} | baseline | | ×1.00 | {cells} | |")
        for tag in ("slimexport", "torch-pruning"):
            v = row.get(tag)
            if v is None:
                empty = " | ".join("| |" for _ in batches)
                table.append(f"| | {tag} | | | {empty} | {row.get('tp_error', '')[:80]} |")
                continue
            fr[tag].append(min(v[f"fraction_b{b}"] for b in batches))
            cells = " | ".join(
                f"{ms[(tag, b)]:.2f} | ×{v[f'speedup_b{b}']:.2f} | **{v[f'fraction_b{b}']:.2f}**" for b in batches
            )
            bn = _share(row.get("bn_removed")) if tag == "slimexport" else ""
            table.append(f"| | {tag} | {bn} | ×{v['macs_ratio']:.2f} | {cells} | {v.get('why', '')} |")
    summary = " ".join(
        f"**{tag}**: speed-up ÷ MACs ratio (the lower of batch {' and '.join(map(str, batches))}) median "
        f"{statistics.median(v):.2f} over {len(v)} models, lowest {min(v):.2f}; {sum(x >= 0.8 for x in v)} of "
        f"{len(v)} at 0.8 or more."
        for tag, v in fr.items()
        if v
    )
    return [
        "## torchvision models: onnxruntime speed-up against the MACs ratio",
        "",
        f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}); {r['round_to_reason']}. Random weights and BN "
        "statistics, 224×224, one thread; Torch-Pruning's BN-scale pruner (same round-to) at the ratio that "
        "reaches slimexport's MACs. One interleaved onnxruntime run per model, median. *fraction*: speed-up ÷ "
        "MACs ratio (1.0: every saved MAC turned into time). Below 0.8, onnxruntime's profiler names the kind of "
        "node that holds the pruned model back (batch 1).",
        "",
        summary,
        "",
        *table,
        "",
    ]


def techniques(every: list[dict]) -> list[str]:
    res = [r for r in every if r.get("kind") == "techniques"]
    out: list[str] = []
    for r in res:
        out += [
            f"## What each technique buys: {r['arch']} on {r['dataset']} at {100 * r['max_macs']:.0f}% of the MACs, "
            f"{len(r['seeds'])} seeds",
            "",
            f"`{r['command']}` ({r['machine_tag']}, {r['date'][:10]}); {r['epochs']} epochs of baseline and of "
            f"sparse training, {r['refine_epochs']} of refine, fast preset, seeds {r['seeds']}; every row pruned to "
            "the same MACs budget (`--max-macs`). Same baseline per seed; distill and steps prune the same sparse "
            "model as none. Accuracy in onnxruntime, mean ± sd; Δ "
            "against the baseline; refine time is the refine stage (with --prune-steps, the prune stage's short "
            "refines too), median, on a shared two-core machine.",
            "",
            "| technique | accuracy | Δ vs baseline | MACs ratio | params ratio | refine s | sparse s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in r["summary"].items():
            out.append(
                f"| {name} | {100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_sd']:.2f} | "
                f"{100 * s['drop_mean']:+.2f} ± {100 * s['drop_sd']:.2f} | ×{s['macs_ratio_mean']:.2f} | "
                f"×{s['params_ratio_mean']:.2f} | {s['refine_seconds_median']:.0f} | {s['sparse_seconds_median']:.0f} |"
            )
        out.append("")
    return out


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


def _options(r: dict) -> str:
    """The prune options a converged row used beyond the paper's (no "|": it would split the table's cell)."""
    norm, rt = r.get("normalize", "none"), r.get("round_to", 1)
    return (f", --normalize {norm}" if norm != "none" else "") + (f", --round-to {rt}" if rt > 1 else "")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _ms(m: dict, batch: int) -> str:
    x = next((y for y in m["latency"] if y["batch"] == batch and y["threads"] == 1), None)
    return "–" if x is None else f"{x['median_ms']:.3f} (×{x['speedup']:.2f})"


def converged(every: list[dict]) -> list[str]:
    """Issue 15's table: converged CPU runs on all of CIFAR-10, what the method's claim rests on."""
    rows = [r for r in every if r.get("suite") == "converged"]
    if not rows:
        return []
    # per model: the paper's raw |γ| rows first, then --normalize's; exact counts before --round-to; by percent
    rows.sort(
        key=lambda r: (
            ":" in r["arch"],  # slimexport's own architectures first, then torchvision's and others
            r["arch"],
            r.get("train_subset") or 0,
            r.get("normalize", "none") != "none",
            r.get("round_to", 1),
            r["percent"],
        )
    )
    seeds = {r["run"]: r for r in every if r.get("kind") == "peer_seeds" and r["run"].startswith("converged-")}
    lines = [
        "## Converged runs on two CPU cores: does pruning keep the accuracy?",
        "",
        "Schedules sized for about two hours of two CPU cores (`make benchmark-converged`: ~130 min, estimated "
        "from its measured parts, not timed end to end): one-cycle schedules that anneal the "
        "learning rate to zero (the last test evaluations are listed below, so you can see how far the accuracy "
        "still moved), sparse training, one global threshold, refine. Accuracy in % by "
        "onnxruntime on the whole CIFAR-10 test split (10,000 images). Latency: onnxruntime CPU, one thread, median "
        "ms (× = baseline ÷ model, one interleaved run). *peer*: Torch-Pruning's BN-scale pruner on the same sparse "
        "model, and slimexport pruned to the peer's MACs (`prune --max-macs`), refined alike; with seeds where "
        "`benchmarks/peer_seeds.py` ran (mean ± sd).",
        "",
        "| model | pruned | params (×) | MACs (×) | baseline / sparse / before refine / refined "
        "| refined − baseline, pt | b1 ms | b32 ms | at the peer's MACs: slimexport / Torch-Pruning |",
        "|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        b, s = r["baseline"], r["slimexport"]
        opts = r.get("round_to", 1), r.get("normalize", "none")
        tag = run_name(r["suite"], r["arch"], r["dataset"], r["percent"], *opts)
        peer = "–"
        if tag in seeds:
            z = seeds[tag]
            peer = (
                f"{100 * z['slimexport']['mean']:.2f} ± {100 * z['slimexport']['stdev']:.2f} / "
                f"{100 * z['torch_pruning']['mean']:.2f} ± {100 * z['torch_pruning']['stdev']:.2f} "
                f"({len(z['runs'])} seeds; difference {100 * z['difference']['mean']:+.2f} ± "
                f"{100 * z['difference']['stdev']:.2f} pt)"
            )
        elif "torch_pruning" in r and "slimexport_matched" in r:
            t = r["torch_pruning"]
            peer = (
                f"{_pct(r['slimexport_matched']['accuracy'])} / {_pct(t['accuracy'])} at MACs "
                f"×{b['macs'] / t['macs']:.2f} (1 seed)"
            )
        subset = f", {r['train_subset']:,}-image train subset" if r.get("train_subset") else ""
        lines.append(
            f"| {r['arch']}{subset} | {100 * r['percent']:.0f}%{_options(r)} "
            f"| {s['params']:,} (×{b['params'] / s['params']:.2f}) "
            f"| {s['macs']:,} (×{b['macs'] / s['macs']:.2f}) | {_pct(b['accuracy'])} / {_pct(s['sparse_accuracy'])}"
            f" / {_pct(s['accuracy_before_refine'])} / {_pct(s['accuracy'])} "
            f"| {100 * (s['accuracy'] - b['accuracy']):+.2f} | {_ms(s, 1)} | {_ms(s, 32)} | {peer} |"
        )
    lines.append("")
    done: set = set()
    for r in rows:
        key = (r["arch"], r.get("train_subset"))
        if key in done:
            continue
        done.add(key)
        b = r["baseline"]
        st = r["stages"]
        group = [o for o in rows if (o["arch"], o.get("train_subset")) == key]
        usual = max((o["refine_epochs"] for o in group), key=[o["refine_epochs"] for o in group].count)
        others = [
            f"{o['refine_epochs']} for {100 * o['percent']:.0f}%{_options(o)}"
            for o in group
            if o["refine_epochs"] != usual
        ]
        refine = f"{usual} refine" + (f" ({', '.join(others)})" if others else "")
        lr = f"peak lr {r['lr']:g}, " if r.get("lr") else ""
        lines.append(
            f"- **{r['arch']}** ({r['epochs']} epochs baseline, {r['epochs']} sparse at s = {r['sparsity']:g}, "
            f"{refine}; {lr}{r['preset']} preset; {r['machine_tag']}, {r['date'][:10]}; "
            f"`{r['command']}`): baseline {b['params']:,} params, {b['macs']:,} MACs, b1 {_ms(b, 1).split(' ')[0]} "
            f"ms, b32 {_ms(b, 32).split(' ')[0]} ms. Training wall time: "
            + ", ".join(f"{k} {st[k]['seconds'] / 60:.0f} min" for k in ("baseline", "sparse") if k in st)
            + "."
            + (f" {r['note']}" if r.get("note") else "")
        )
        for stage in ("baseline", "sparse"):
            curve = [c for c in r.get("curves", {}).get(stage, []) if c.get("accuracy") is not None]
            if curve:
                tail = ", ".join(f"{c['epoch']}: {100 * c['accuracy']:.2f}" for c in curve[-5:])
                lines.append(f"  - {stage} test accuracy by epoch (last evaluations): {tail}")
        g = r.get("gamma")
        if g:
            q = g["quantiles"]
            lines.append(
                f"  - sparse |γ| over {g['channels']:,} channels: {100 * g['fraction_small']:.1f}% below 1e-2; "
                f"quantiles 10/25/50/75/90% = {', '.join(f'{q[k]:.3g}' for k in q)}; the L1 term's reach "
                f"s·Σlr/(1−μ) = {g['l1_reach']:.3g}"
            )
            if r.get("gamma_plot"):
                lines += ["", f"  ![|γ| after sparse training, {r['arch']}]({r['gamma_plot']})", ""]
    lines.append("")
    return lines


def imagefolder(every: list[dict]) -> list[str]:
    """Issue 25's figures: streaming against in-memory image folders, bf16 against fp32, a pipeline on JPEGs."""
    res = [r for r in every if r.get("kind") == "imagefolder_scale"]
    if not res:
        return []
    lines = ["## Image folders at realistic resolution: streamed from disk or decoded into memory", ""]
    for r in res:
        m = r["machine"]
        isa = "AVX-512" if m.get("avx512f") else "AVX2 only"
        lines += [f"Machine `{r['machine_tag']}` ({m.get('cpu', '?')}, {isa}, native bf16: "
                  f"{'yes' if m.get('bf16') else 'no'}); CIFAR-10 upscaled (bicubic) and written as JPEG q90 by "
                  "`benchmarks/imagefolder_scale.py write`.", ""]  # fmt: skip
        runs = r["runs"]
        for key, v in runs.items():
            cmd = f"`{v['command']}` ({v['date'][:10]})"
            if key.startswith(("memory", "throughput")):
                what = "Peak memory" if key.startswith("memory") else "Training throughput"
                n = v["images"]
                lines += [f"**{what}**, `slimexport train --arch {v['arch']}` one epoch, {n['train']:,} train / "
                          f"{n['val']:,} val images at {v['size']}×{v['size']}, batch {v['batch']}: {cmd}", "",
                          "| --data-cache | main process peak RSS | DataLoader workers' PSS | images/s (training) | "
                          "wall s |", "|---|---:|---:|---:|---:|"]  # fmt: skip
                for cache, row in v["rows"].items():
                    lines.append(f"| {cache} | {row['main_peak_mib']:,.0f} MiB | {row['workers_peak_mib']:,.0f} MiB | "
                                 f"{row['images_per_s']:.1f} | {row['wall_s']:.0f} |")  # fmt: skip
                if "decoded_mib" in v:
                    lines.append(f"\nThe splits decoded take {v['decoded_mib']:,.0f} MiB as uint8.")
                if "off_over_ram" in v:
                    lines.append(f"\nStreamed ÷ in-memory images/s: **{v['off_over_ram']:.2f}**.")
                lines.append("")
            elif key.startswith("precision-accuracy"):
                f, b = v["rows"]["fp32"], v["rows"]["bf16"]
                lines += [f"**bf16 accuracy against fp32**, `slimexport train --arch {v['arch']}` on {v['dataset']}, "
                          f"{v['epochs']} epochs, {len(f['accuracies'])} seeds: fp32 {f['mean']:.2f} ± {f['sd']:.2f}%, "
                          f"bf16 {b['mean']:.2f} ± {b['sd']:.2f}% (difference {b['mean'] - f['mean']:+.2f} pt); "
                          f"median training time fp32 {f['train_seconds']:.0f} s, bf16 {b['train_seconds']:.0f} s: "
                          f"{cmd}", ""]  # fmt: skip
            elif key.startswith("precision"):
                lines += [f"**bf16 against fp32**, one training step (forward + backward) at batch {v['batch']}, "
                          f"{v['size']}×{v['size']}, median of {v['steps']}: {cmd}", "",
                          "| model | fp32 ms | bf16 ms | fp32 ÷ bf16 | auto chose |",
                          "|---|---:|---:|---:|---|"]  # fmt: skip
                for arch, row in v["rows"].items():
                    lines.append(f"| {arch} | {row['fp32_ms']:.0f} | {row['bf16_ms']:.0f} | ×{row['speedup']:.2f} | "
                                 f"{row['auto']} ({row['auto_reason']}) |")  # fmt: skip
                lines.append("")
            elif key.startswith("pipeline"):
                a, n = v["accuracy"], v["images"]
                sp = ", ".join(f"{k.replace('_', ' ')} ×{x:.2f}" for k, x in v["speedup"].items())
                lines += [f"**The pipeline from a trained baseline**, {v['arch']} on {n['train']:,} / {n['val']:,} "
                          f"JPEGs at {v['size']}×{v['size']}, streamed (`--data-cache {v['cache']}`): a baseline "
                          f"trained {v['baseline_epochs']} epochs by `slimexport train` "
                          f"({v['baseline_train']['wall_s'] / 60:.0f} min), then `pipeline --baseline-epochs 0`: "
                          f"{v['epochs']} sparse epochs fine-tuning it, {v['percent']:.0%} pruned, "
                          f"{v['refine_epochs']} refine epochs ({v['pipeline']['wall_s'] / 60:.0f} min): {cmd}", "",
                          f"- accuracy (onnxruntime, % of {n['val']:,}) baseline {100 * a['baseline']:.2f} → sparse "
                          f"{100 * a['sparse']:.2f} → before refine {100 * a['before_refine']:.2f} → refined "
                          f"{100 * a['refined']:.2f};",
                          f"- params {v['params'][0]:,} → {v['params'][1]:,} (×{v['params'][0] / v['params'][1]:.2f}),"
                          f" MACs ×{v['macs'][0] / v['macs'][1]:.2f}; onnxruntime speed-up {sp}.", ""]  # fmt: skip
    return lines


def one_engine(every: list[dict]) -> list[str]:
    """The one engine against the retired hand-written rules (benchmarks/one_engine.py), β folding's accuracy
    before refine (benchmarks/fold_accuracy.py)."""
    lines: list[str] = []
    for r in [x for x in every if x.get("kind") == "one_engine"][-1:]:
        lines += [
            f"## One engine: the retired hand-written rules against the graph engine ({r['machine_tag']}, "
            f"{r['date'][:10]})",
            "",
            f"`{r['command']}`. The same sparse weights (one epoch on a CIFAR-10 subset), pruned by this version and "
            f"by commit {r['compare_with']}'s hand-written rules, exported alike, timed in one interleaved "
            "onnxruntime run (batch 1, one thread, median); speed-up over the unpruned model"
            + (f" (timed again, alone, {r['retimed'][:16]})." if r.get("retimed") else "."),
            "",
            "| model | percent | round-to | --selection | params: rules / engine | MACs: rules / engine "
            "| speed-up: rules (chosen) | speed-up: engine (chosen) | engine ÷ rules |",
            "|---|---:|---:|---|---|---|---|---|---:|",
        ]
        for x in r["selection"]:
            o, n = x.get("old"), x["new"]
            old = f"×{o['speedup']:.2f} ({o['chosen']})" if o else "–"
            ratio = f"{o['median_ms'] / n['median_ms']:.2f}" if o else "–"
            lines.append(
                f"| {x['arch']} | {100 * x['percent']:.0f}% | {x['round_to']} | {x['selection']} "
                f"| {o['params'] if o else '–':,} / {n['params']:,} | {o['macs'] if o else '–':,} / {n['macs']:,} "
                f"| {old} | ×{n['speedup']:.2f} ({n['chosen']}) | {ratio} |"
            )
        if r.get("torchvision"):
            lines += [
                "",
                "torchvision models with selecting BNs, random weights and BN statistics, pruned 50% with "
                "`--round-to auto`, 224×224, batch 1, one thread, speed-up over the unpruned model:",
                "",
                "| model | round-to | selecting BNs | MACs ratio | `--selection gather` "
                "| `--selection auto` (chosen) |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for t in r["torchvision"]:
                lines.append(
                    f"| {t['model']} | {t['round_to']} | {t['selecting_bns']} | ×{t['macs_ratio']:.2f} "
                    f"| ×{t['speedup_gather']:.2f} | ×{t['speedup_auto']:.2f} ({t['auto_chosen']}) |"
                )
        lines.append("")
    for r in [x for x in every if x.get("command", "").startswith("python -m benchmarks.fold_accuracy")][-1:]:
        lines += [
            f"## β folding: accuracy right after pruning ({r['machine_tag']})",
            "",
            f"`{r['command']}`: {r['arch']} sparse-trained {r['epochs']} epochs (s = {r['sparsity']:g}) on "
            f"{r['train_subset'] or 'all'} {r['dataset']} training images, one sparse model per seed, pruned twice "
            "from it; test accuracy (the whole test split) before any refine, and the relative output error against "
            "the original with only the removed channels' γ zeroed.",
            "",
            "| percent | seeds | with folding, % | without, % | folding buys, pt (mean ± sd) "
            "| output error folded / not |",
            "|---:|---|---|---|---:|---|",
        ]
        for k, v in r["summary"].items():
            errs = [x[f"{k}_error"] for x in r["runs"]]
            fe = statistics.median(e["folded"] for e in errs)
            ue = statistics.median(e["unfolded"] for e in errs)
            lines.append(
                f"| {k[1:]}% | {', '.join(str(x['seed']) for x in r['runs'])} "
                f"| {', '.join(f'{100 * a:.2f}' for a in v['fold'])} "
                f"| {', '.join(f'{100 * a:.2f}' for a in v['nofold'])} "
                f"| {v['gain_pt_mean']:+.2f} ± {v['gain_pt_sd']:.2f} | {fe:.2g} / {ue:.2g} (median) |"
            )
        lines.append("")
    return lines


def yolo(every: list[dict]) -> list[str]:
    """Ultralytics detectors through the Python API (benchmarks/yolo.py)."""
    lines: list[str] = []
    for r in [x for x in every if x.get("kind") == "yolo"][-1:]:
        lines += [
            f"## Ultralytics YOLO through the Python API ({r['machine_tag']}, {r['date'][:10]}, ultralytics "
            f"{r['versions'].get('ultralytics')})",
            "",
            f"`{r['command']}`: built from their yaml (random weights and BN statistics), pruned with `prune_model`, "
            "exported with `export_onnx` (parity on every output), timed beside the unpruned detector in "
            "onnxruntime at 640×640, batch 1, one thread, interleaved.",
            "",
            "| model | percent | round-to | BN channels removed | params | MACs ratio | median ms | speed-up "
            "| parity (max abs, px) |",
            "|---|---:|---:|---:|---|---:|---|---:|---:|",
        ]
        for x in r["rows"]:
            ms = x["median_ms"]
            lines.append(
                f"| {x['model']} | {100 * x['percent']:.0f}% | {x['round_to']} | {100 * x['bn_channels_removed']:.1f}% "
                f"| {x['params'][0]:,} → {x['params'][1]:,} | ×{x['macs_ratio']:.2f} "
                f"| {ms['baseline']:.1f} → {ms['pruned']:.1f} | ×{x['speedup']:.2f} | {x['parity_max_abs_diff']:.1e} |"
            )
        lines.append("")
    return lines


def _pm(mean: float, sd: float | None, sign: str = "") -> str:
    return f"{100 * mean:{sign}.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def keep_accuracy(every: list[dict]) -> list[str]:
    """Issue 26's table: what distillation, gradual pruning and the polar regularizer keep at a fixed budget,
    against Torch-Pruning at equal MACs with the same refine recipe. RESULTS.md leads with it."""
    res = [r for r in every if r.get("kind") == "keep_accuracy"]
    if not res:
        return []
    r = res[-1]
    v, s, paired = r["vgg"], r["summary"], r["paired"]
    some = next(x for x in r["rows"] if x["job"].startswith("vgg:"))
    lines = [
        f"## Keeping accuracy at the same speed: {v['arch']} on all of CIFAR-10 at {100 * v['percent']:.0f}% of "
        "the channels pruned",
        "",
        f"`bash benchmarks/keep_accuracy.sh DATA_DIR` (jobs: `{r['command']}`; {r['machine_tag']}, "
        f"{r['date'][:10]}). One baseline ({_pct(some['baseline_accuracy'])}%) and one polar sparse model "
        f"(`--regularizer polar --sparsity {v['sparsity']:g}`, {_pct(some['sparse_accuracy'])}%), "
        f"{v['epochs']} epochs each, fast preset, seed 0; every row prunes that sparse model with one global "
        f"threshold at {100 * v['percent']:.0f}% (`--normalize {v['normalize']}`, exact channel counts) and "
        f"refines {v['refine_epochs']} epochs with the row's seed (with `--prune-steps 3` the 20 epochs are split "
        "over the steps). Torch-Pruning's BN-scale pruner (global) prunes the same sparse model to the ratio whose "
        "MACs come closest to ours from below and is refined with the same schedule, seed and teacher. Accuracy: "
        "the refined model on the whole test split, mean ± sd over seeds; Δ against the baseline; ours − peer "
        "paired by seed. Refine s: median wall time of one refine on one thread (two streams on two cores).",
        "",
        "| recipe | seeds | accuracy | Δ vs baseline | params ratio | MACs ratio | Torch-Pruning, same recipe | "
        "ours − peer | refine s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("vgg:plain", "none"), ("vgg:distill", "--distill"), ("vgg:steps", "--prune-steps 3"),
                      ("vgg:all", "--distill --prune-steps 3"), ("vgg-l1:plain", "none, L1 sparse model"),
                      ("vgg+mean:plain", "--normalize mean (at the MACs of none)"),
                      ("vgg+keep25:plain", "--min-keep 0.25 (at the MACs of none)"),
                      ("vgg+keep25:distill", "--min-keep 0.25 --distill (at the MACs of none)")):  # fmt: skip
        if key not in s:
            continue
        m = s[key]
        recipe = key.split(":")[1]
        peer = s.get(f"tp:{recipe}")
        kind = key.split(":")[0]
        d = paired.get(recipe if kind == "vgg" else f"{kind[4:]}:{recipe}") if kind != "vgg-l1" else None
        lines.append(
            f"| {name} | {m['seeds']} | {_pm(m['accuracy_mean'], m['accuracy_sd'])} | "
            f"{_pm(m['drop_mean'], m['drop_sd'], '+')} | ×{m['params_ratio']:.2f} | ×{m['macs_ratio']:.2f} | "
            + (f"{_pm(peer['accuracy_mean'], peer['accuracy_sd'])} (×{peer['macs_ratio']:.2f} MACs)" if peer else "–")
            + " | "
            + (f"{_pm(d['difference_mean'], d['difference_sd'], '+')} ({d['wins']}/{d['seeds']} won)" if d else "–")
            + f" | {m['refine_seconds_median']:.0f} |"
        )
    mob = next((x for x in r["rows"] if x["job"] == "mobilenet"), None)
    if mob:
        tp = mob["torch_pruning"]
        lat = " ".join(
            f"batch {x['batch']}: ×{x['slimexport_speedup']:.2f} (Torch-Pruning ×{x['torch_pruning_speedup']:.2f});"
            for x in mob["latency"]
        )
        lines += [
            "",
            f"mobilenet_v2 on CIFAR-10 (`--max-macs 0.5 --round-to auto` = {mob['round_to']}): baseline "
            f"{_pct(mob['baseline_accuracy'])}%, pruned and refined {_pct(mob['accuracy'])}% at "
            f"×{mob['macs_ratio']:.2f} fewer MACs; Torch-Pruning at ×{tp['macs_ratio']:.2f}: {_pct(tp['accuracy'])}%. "
            f"onnxruntime speed-up, one thread, {lat}",
        ]
    times = r.get("train_seconds") or {}
    if times:
        lines += [
            "",
            "Training time (one thread each, two in parallel): "
            + ", ".join(f"{k} {t / 60:.0f} min" for k, t in sorted(times.items()))
            + f". The suite's compute: {r['suite_seconds'] / 3600:.1f} thread-hours.",
        ]
    return lines + [""]

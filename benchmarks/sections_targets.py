"""RESULTS.md sections for issue 35 (detectors end to end, against the control and Torch-Pruning) and issue 36
(pruning to a measured speed-up)."""

from __future__ import annotations


def _latest(every: list[dict], kind: str) -> list[dict]:
    """The newest result of ``kind`` from each machine (figures from one machine do not replace another's)."""
    latest: dict[str, dict] = {}
    for r in every:
        if r.get("kind") == kind and r["date"] >= latest.get(r["machine_tag"], {}).get("date", ""):
            latest[r["machine_tag"]] = r
    return [latest[k] for k in sorted(latest)]


def _ms(x: dict, scale: float = 1.0, sign: str = "") -> str:
    return f"{scale * x['mean']:{sign}.2f} ± {scale * x['sd']:.2f}"


def yolo_pipeline(every: list[dict]) -> list[str]:
    lines: list[str] = []
    for r in [x for x in every if x.get("kind") == "yolo_pipeline"][-1:]:
        s = r["settings"]
        lines += [
            f"## Detectors end to end: the pipeline from a trained YOLO against the control ({r['machine_tag']}, "
            f"{r['date'][:10]}, ultralytics {r['versions'].get('ultralytics')})", "",
            f"`{r['command']}`: the offline Fashion-MNIST detection set ({s['train']} train / {s['val']} val images "
            f"of {s['image_size']}², 10 classes); a baseline trained {s['baseline_epochs']} epochs by Ultralytics' "
            f"trainer (`--train-args {s['train_args']}`), then per seed `slimexport pipeline --arch ultralytics:"
            f"baseline.pt --baseline-epochs 0` ({s['sparse_epochs']} sparse epochs at `--sparsity {s['sparsity']}`, "
            f"`--max-macs {s['max_macs']}`, {s['refine_epochs']} refine epochs), and the control: the baseline "
            f"trained {s['sparse_epochs'] + s['refine_epochs']} more epochs, same seed, no pruning. mAP50-95 by "
            "Ultralytics' validator on the ONNX models in onnxruntime; speed-up at batch 1, one thread, "
            "interleaved; mean ± sd over seeds.", "",
            "| model | baseline | control (+epochs) | pruned | pruned − control | pruned INT8 | params ratio "
            "| MACs ratio | speed-up at train size | speed-up at 640 | pipeline s | control s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for model, res in r["results"].items():
            m = res["summary"]
            sp = m["speedup"]
            train = next(v for k, v in sp.items() if not k.startswith("640px"))
            lines.append(
                f"| {model} | {100 * m['baseline_map50_95']:.2f} | {_ms(m['control_map50_95'], 100)} "
                f"| {_ms(m['pruned_map50_95'], 100)} | {_ms(m['pruned_minus_control_pt'], 1, '+')} pt "
                f"| {_ms(m['pruned_int8_map50_95'], 100)} | ×{_ms(m['params_ratio'])} | ×{_ms(m['macs_ratio'])} "
                f"| ×{_ms(train)} | ×{_ms(sp['640px_b1_t1'])} | {m['pipeline_seconds']['mean']:.0f} "
                f"| {m['control_seconds']['mean']:.0f} |"
            )
        lines.append("")
    for r in [x for x in every if x.get("kind") == "yolo_torch_pruning"][-1:]:
        lines += [
            f"### Against Torch-Pruning {r['versions'].get('torch_pruning')} at the same MACs", "",
            f"`{r['command']}`: Torch-Pruning's YOLOv8 procedure (C2f rebuilt without `chunk`, Detect ignored, "
            "BN-scale importance, one global ratio bisected to slimexport's MACs) on the same sparse models, "
            "fine-tuned the same epochs with the same seed, measured the same way.", "",
            "| model | seeds | slimexport mAP50-95 | Torch-Pruning mAP50-95 | slimexport − Torch-Pruning |",
            "|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for model, res in r["results"].items():
            rows = res["rows"]
            ours = ", ".join(f"{100 * x['slimexport_map']['map50_95']:.2f}" for x in rows)
            theirs = ", ".join(f"{100 * x['map']['map50_95']:.2f}" for x in rows)
            diff = _ms(res["slimexport_minus_tp_pt"], 1, "+")
            lines.append(f"| {model} | {len(rows)} | {ours} | {theirs} | {diff} pt |")
        lines.append("")
    return lines


def latency_target(every: list[dict]) -> list[str]:
    lines: list[str] = []
    for r in _latest(every, "latency_target"):
        s = r["summary"]
        lines += [
            f"## Pruning to a measured speed-up (`--target-speedup`, {r['machine_tag']}, {r['date'][:10]})", "",
            f"`{r['command']}`: random weights and BN γ (seeded); the search's chosen model exported the "
            "pipeline's way and timed again side by side with the unpruned model in a separate run (onnxruntime CPU, "
            f"batch 1, one thread). {s['within_7pct']} of {s['reached']} reached targets within ±7% (median "
            f"|error| {s['median_abs_error_pct']:.1f}%); median search {s['median_search_seconds']:.0f} s.", "",
            "| model | size | target | allocate | re-timed speed-up | error | MACs ratio | speed-up ÷ MACs ratio "
            "| candidates | search s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for x in r["rows"]:
            note = " (unreachable)" if x["unreachable"] else ""
            lines.append(
                f"| {x['model']} | {x['image_size']} | ×{x['target']:g}{note} | {x.get('allocate', 'gamma')} "
                f"| ×{x['independent_speedup']:.2f} "
                f"| {x['error_pct']:+.1f}% | ×{x['macs_ratio']:.2f} | {x['independent_speedup'] / x['macs_ratio']:.2f} "
                f"| {x['candidates']} | {x['search_seconds']:.0f} |"
            )
        lines.append("")
    return lines


def allocate(every: list[dict]) -> list[str]:
    lines: list[str] = []
    for r in _latest(every, "allocate"):
        s = r["summary"]
        lines += [
            f"### At one measured speed-up: --allocate latency against the global |γ| threshold and Torch-Pruning "
            f"({r['machine_tag']}, {r['date'][:10]})", "",
            f"`{r['command']}`: the default run (vgg11_w25, embedded Fashion-MNIST, 10 + 10 epochs, refine 10) with "
            f"`--target-speedup {r['target']}`; Torch-Pruning's BN-scale pruner on the same sparse checkpoint, its "
            "ratio bisected to the same measured speed-up, refined with the same schedule. Accuracy in onnxruntime; "
            "speed-up measured by the pipeline's bench on the exported models (batch 1, one thread).", "",
            "| seed | allocate | accuracy | speed-up | MACs ratio | params ratio |", "|---:|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for x in r["rows"]:
            lines.append(f"| {x['seed']} | {x['allocate']} | {100 * x['accuracy']:.2f}% | ×{x['speedup']:.2f} "
                         f"| ×{x['macs_ratio']:.2f} | ×{x['params_ratio']:.2f} |")  # fmt: skip
        for x in r.get("torch_pruning", []):
            lines.append(f"| {x['seed']} | Torch-Pruning (ratio {x['ratio']:.3f}) | {100 * x['accuracy']:.2f}% "
                         f"| ×{x['retimed_speedup']:.2f} (search) | | |")  # fmt: skip
        d, t = s["latency_minus_gamma_pt"], s.get("gamma_minus_torch_pruning_pt")
        lines += ["", f"latency − gamma: {d['mean']:+.2f} ± {d['sd']:.2f} pt"
                  + (f"; gamma − Torch-Pruning: {t['mean']:+.2f} ± {t['sd']:.2f} pt" if t else ""), ""]  # fmt: skip
    return lines


def int8_keep(every: list[dict]) -> list[str]:
    lines: list[str] = []
    for r in _latest(every, "int8_keep"):
        lines += [
            f"## INT8 fallback: layers ranked by measured accuracy against weight error ({r['machine_tag']}, "
            f"{r['date'][:10]})", "",
            f"`{r['command']}`: per architecture and seed a model trained on the embedded Fashion-MNIST subset; the "
            "budget is half of plain INT8's drop against FP32, so every run that loses anything falls back. Each "
            "ranking's layers go back to FP32 one at a time until the drop fits (or half are back). Drops in points "
            "on the 2000 test images; INT8 ÷ FP32 speed at batch 1, one thread, side by side. One row per run (the "
            "drops are bimodal: a mean would hide it).", "",
            "| model | seed | plain INT8 drop | ranking | layers back in FP32 | drop left | fits | INT8 speed ÷ FP32 |",
            "|---|---:|---:|---|---:|---:|---|---:|",
        ]  # fmt: skip
        for x in r["rows"]:
            if "measured" not in x:
                lines.append(f"| {x['arch']} | {x['seed']} | {100 * x['int8_drop']:.2f} | (nothing lost) | | | | |")
                continue
            for sub, name in (("measured", "measured (NNCF)"), ("weight_error", "weight error")):
                y = x[sub]
                lines.append(
                    f"| {x['arch']} | {x['seed']} | {100 * x['int8_drop']:.2f} | {name} | {y['fp32_convs']} "
                    f"| {100 * y['drop']:.2f} | {'yes' if y['fits'] else 'no'} | ×{y['fp32_ms'] / y['int8_ms']:.2f} |"
                )
        lines.append("")
    return lines

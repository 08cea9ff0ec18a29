"""Coverage of the graph engine: every torchvision classification model (``--zoo torchvision``) or 56 timm CNNs
across families (``--zoo timm``), pruned at 50% by slimexport and by Torch-Pruning 1.6.1 (BN-scale importance,
global), side by side.

Per model: status (pruned / refused with the reason / crashed), channel groups and unprunable groups, MACs ratio,
the fraction of BN channels removed (a model that is "exact" because everything froze is not a success),
exactness (the zeroing check of slimexport.graph_prune.exactness), whether the pruned model exports to ONNX and
matches torch in onnxruntime; the same for Torch-Pruning. Also the time to trace and prune resnet50 at 224×224.
Random weights, random BN statistics (seeded), input 64×64 (larger where a model needs it).

Usage (from the repository root): python -m benchmarks.graph_coverage [--zoo torchvision|timm] [--only NAME ...]
    [--no-onnx] [--no-peer]
Writes benchmarks/results/<machine-tag>/graph-coverage.json (timm: graph-coverage-timm.json); finished rows are
kept in benchmarks/work/ so that an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import shlex
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from benchmarks.common import machine_tag
from slimexport.config import ExportConfig
from slimexport.data import from_arrays
from slimexport.export import export_model
from slimexport.fileio import write_json
from slimexport.graph import BN_TYPES
from slimexport.graph_prune import exactness, prune_graph
from slimexport.report import machine, versions
from slimexport.stats import count_macs_on

ROOT = Path(__file__).resolve().parent
SIZES = (64, 96, 128, 224, 299)
FORBIDDEN = {"NonZero", "GatherND", "Where", "ScatterND"}
# timm CNNs with BatchNorm, across families: resnet/resnet-d and friends, se/eca/sk/gc/res2net/resnest,
# efficientnet/mixnet/mnasnet/fbnet/tinynet/mobilenetv3/v4/lcnet, ghostnet, rexnet, regnet x/y/z, hrnet, dla, dpn,
# cspnet/darknet, vovnet, selecsls, tresnet, repvgg, mobileone, gernet, densenet, inception, xception, vgg, and the
# BN hybrids with attention (mobilevit, efficientvit, fastvit, bottleneck attention).
TIMM_MODELS = """resnet18 resnet26t resnet50d resnetblur18 resnetaa50 seresnet50 seresnext26d_32x4d ecaresnet50d
skresnet18 res2net50_26w_4s res2next50 resnest14d legacy_seresnet18 gcresnet33ts efficientnet_b0 efficientnet_lite0
tinynet_a mixnet_s mnasnet_100 semnasnet_100 spnasnet_100 fbnetc_100 hardcorenas_a mobilenetv3_large_100
mobilenetv4_conv_small lcnet_050 ghostnet_100 ghostnetv2_100 repghostnet_050 rexnet_100 regnetx_002 regnety_002
regnetz_b16 hrnet_w18_small hrnet_w18_small_v2 dla34 dla46x_c dpn68 cspresnet50 cspdarknet53 cs3darknet_s darknet53
ese_vovnet19b_dw selecsls42b tresnet_m repvgg_a0 mobileone_s0 gernet_s densenet121 inception_v3 xception41 vgg11_bn
mobilevit_xxs efficientvit_b0 fastvit_t8 bat_resnext26ts""".split()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.05
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()


def build(name: str, zoo: str = "torchvision") -> tuple[nn.Module, torch.Tensor]:
    """The model (random weights, 10 classes) and the smallest input of SIZES it runs on."""
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        m = randomize(timm.create_model(name, pretrained=False, num_classes=10))
    else:
        kw = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        m = randomize(torchvision.models.get_model(name, weights=None, num_classes=10, **kw))
    for s in SIZES:
        x = torch.randn(2, 3, s, s)
        try:
            with torch.no_grad():
                m(x)
            return m, x
        except Exception:  # noqa: BLE001 - too small for this model; try the next size
            continue
    raise RuntimeError("runs on none of the input sizes")


def _data(size: int):
    rng = np.random.default_rng(0)
    return from_arrays(
        "random",
        rng.integers(0, 255, (20, size, size, 3), dtype=np.uint8),
        np.arange(20) % 10,
        rng.integers(0, 255, (16, size, size, 3), dtype=np.uint8),
        np.arange(16) % 10,
    )


def onnx_ok(model: nn.Module, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = export_model(model, Path(tmp) / "m.onnx", _data(size), ExportConfig(parity_images=8, atol=1e-3))
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    bad = sorted(FORBIDDEN & set(r["op_counts"]))
    return {"ok": not bad, "max_abs_diff": r["parity"]["max_abs_diff"], "forbidden_ops": bad}


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, BN_TYPES))


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def ours(m: nn.Module, x: torch.Tensor, with_onnx: bool) -> dict:
    t0 = time.perf_counter()
    try:
        p, rec = prune_graph(m, x, percent=0.5)
    except Exception as e:  # noqa: BLE001 - a refusal (ConfigError) or a crash: both are recorded
        kind = "refused" if type(e).__name__ == "ConfigError" else "crashed"
        return {"status": kind, "error": _err(e)}
    seconds = time.perf_counter() - t0
    out = {
        "status": "pruned",
        "seconds": seconds,
        "groups": len(rec["groups"]),
        "unprunable_groups": len(rec["unprunable"]),
        "unprunable_reasons": sorted({r for u in rec["unprunable"] for r in u["reasons"]})[:12],
        "macs_ratio": count_macs_on(m, x[:1]) / count_macs_on(p, x[:1]),
        "bn_removed": rec["pruned_fraction"],
    }
    try:
        ex = exactness(m, x, 0.5)
        out["exact_rel_error"] = ex["relative_error"]
        out["exact"] = ex["same_channels"] and ex["relative_error"] <= 1e-4
        # β folding: the pruned model against the original with only the removed channels' γ zeroed
        out["fold_error"] = {"folded": ex["folded_error"], "unfolded": ex["unfolded_error"]}
    except Exception as e:  # noqa: BLE001
        out["exact"], out["exact_error"] = False, _err(e)
    if with_onnx:
        out["onnx"] = onnx_ok(p, x.shape[-1])
        if not out["onnx"]["ok"]:  # the unpruned model's export too: does pruning cause it, or the model?
            out["onnx_unpruned"] = onnx_ok(m, x.shape[-1])
    return out


def peer(m: nn.Module, x: torch.Tensor, with_onnx: bool) -> dict:
    import torch_pruning as tp

    pm = copy.deepcopy(m)
    heads = [mod for mod in pm.modules() if isinstance(mod, nn.Linear) and mod.out_features == 10]
    t0 = time.perf_counter()
    try:
        tp.pruner.BNScalePruner(
            pm, x[:1], importance=tp.importance.BNScaleImportance(), global_pruning=True, pruning_ratio=0.5,
            ignored_layers=heads,
        ).step()  # fmt: skip
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            y = pm(x)
        if tuple(y.shape) != (2, 10):
            raise RuntimeError(f"output shape {tuple(y.shape)}")
    except Exception as e:  # noqa: BLE001
        return {"status": "crashed", "error": _err(e)}
    out = {"status": "pruned", "seconds": seconds, "macs_ratio": count_macs_on(m, x[:1]) / count_macs_on(pm, x[:1]),
           "bn_removed": 1 - bn_channels(pm) / bn_channels(m)}  # fmt: skip
    if with_onnx:
        out["onnx"] = onnx_ok(pm, x.shape[-1])
    return out


def engine_speed() -> dict:
    """Trace and prune resnet50 at 224×224 (random weights), slimexport and Torch-Pruning, median of 3."""
    import torch_pruning as tp

    m = randomize(torchvision.models.get_model("resnet50", weights=None))
    x = torch.randn(1, 3, 224, 224)
    ts_ours, ts_tp = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        prune_graph(m, x, percent=0.5)
        ts_ours.append(time.perf_counter() - t0)
        pm = copy.deepcopy(m)
        t0 = time.perf_counter()
        tp.pruner.BNScalePruner(pm, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                pruning_ratio=0.5, ignored_layers=[pm.fc]).step()  # fmt: skip
        ts_tp.append(time.perf_counter() - t0)
    return {"model": "resnet50", "input": [1, 3, 224, 224], "slimexport_s": float(np.median(ts_ours)),
            "torch_pruning_s": float(np.median(ts_tp)), "runs": 3}  # fmt: skip


def _mean_tp(rows: list[dict]) -> float | None:
    v = [r["torch_pruning"]["bn_removed"] for r in rows if "bn_removed" in r.get("torch_pruning", {})]
    return float(np.mean(v)) if v else None


class _Timeout(BaseException):  # not an Exception: the per-step handlers must not swallow it
    pass


def _timeout(signum, frame):
    raise _Timeout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision")
    ap.add_argument("--only", nargs="*", help="these models only")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--max-params", type=float, default=150e6, help="skip larger models (memory: several copies)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model before it is recorded as timed out")
    ap.add_argument("--peer-rows", type=Path, help="reuse Torch-Pruning's results from an earlier run's rows (jsonl)")
    args = ap.parse_args()
    timm_zoo = args.zoo == "timm"
    names = args.only or (TIMM_MODELS if timm_zoo else torchvision.models.list_models(module=torchvision.models))
    from slimexport.models.external import torchvision_table

    sizes = {} if timm_zoo else {r["name"]: r["params"] for r in torchvision_table()}
    suffix = "-timm" if timm_zoo else ""
    cache = ROOT / "work" / f"graph-coverage{suffix}-rows.jsonl"  # finished rows, so a rerun resumes
    cache.parent.mkdir(parents=True, exist_ok=True)
    done, peers = {}, {}
    if cache.exists() and not args.only:
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[r["model"]] = r
    if args.peer_rows and args.peer_rows.exists():  # Torch-Pruning's rows of an earlier run (they do not change)
        for line in args.peer_rows.read_text().splitlines():
            r = json.loads(line)
            if "torch_pruning" in r:
                peers[r["model"]] = r["torch_pruning"]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        if name in done:
            rows.append(done[name])
            continue
        if (sizes.get(name) or 0) > args.max_params:
            rows.append({"model": name, "skipped": f"{sizes[name] / 1e6:.0f}M parameters (over --max-params)"})
            continue
        try:
            m, x = build(name, args.zoo)
        except Exception as e:  # noqa: BLE001
            rows.append({"model": name, "build_error": _err(e)})
            continue
        has_bn = any(isinstance(mod, BN_TYPES) for mod in m.modules())
        if not has_bn:  # refused in one line, nothing to compare
            rows.append({"model": name, "has_bn": False, "slimexport": ours(m, x, False)})
            print(f"{name:28s} refused (no BatchNorm)", flush=True)
            continue
        row = {"model": name, "input": x.shape[-1], "has_bn": has_bn, "params": sum(p.numel() for p in m.parameters())}
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(args.timeout)  # ours, then the peer, each within the limit
        try:
            row["slimexport"] = ours(m, x, not args.no_onnx)
        except _Timeout:
            row["slimexport"] = {"status": "timeout", "error": f"over {args.timeout} s on this 2-core machine"}
        except Exception:  # noqa: BLE001
            row["slimexport"] = {"status": "crashed", "error": traceback.format_exc().splitlines()[-1]}
        if name in peers:
            row["torch_pruning"] = peers[name]
        elif not args.no_peer and has_bn:
            signal.alarm(args.timeout)
            try:
                row["torch_pruning"] = peer(m, x, not args.no_onnx)
            except _Timeout:
                row["torch_pruning"] = {"status": "timeout", "error": f"over {args.timeout} s"}
        signal.alarm(0)
        rows.append(row)
        if not args.only:
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
        s = row["slimexport"]
        print(f"{name:28s} {s['status']:8s} x{s.get('macs_ratio', 0):.2f} exact={s.get('exact')} "
              f"onnx={s.get('onnx', {}).get('ok')} | tp {row.get('torch_pruning', {}).get('status')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    with_bn = [r for r in rows if r.get("has_bn")]
    ok = [r for r in with_bn if r["slimexport"]["status"] == "pruned" and r["slimexport"].get("exact")]
    result = {
        "kind": "graph_coverage",
        "zoo": args.zoo,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.graph_coverage " + shlex.join(sys.argv[1:]),
        "machine_tag": machine_tag(),
        "machine": machine(),
        "versions": versions() | {"torch_pruning": importlib.metadata.version("torch-pruning")},
        "summary": {
            "models": len(rows),
            "with_bn": len(with_bn),
            "pruned_exactly": len(ok),
            "refused": sum(r["slimexport"]["status"] == "refused" for r in with_bn),
            "timeout": sum(r["slimexport"]["status"] == "timeout" for r in with_bn),
            "crashed": sum(r["slimexport"]["status"] == "crashed" for r in with_bn),
            "torch_pruning_pruned": sum(r.get("torch_pruning", {}).get("status") == "pruned" for r in with_bn),
            "inexact": sum(r["slimexport"]["status"] == "pruned" and not r["slimexport"].get("exact") for r in with_bn),
            "onnx_failed": sum(r["slimexport"].get("onnx", {}).get("ok") is False for r in with_bn),
            "onnx_failed_unpruned_too": sum(
                r["slimexport"].get("onnx_unpruned", {}).get("ok") is False for r in with_bn
            ),  # fmt: skip
            "bn_removed_mean": float(np.mean([r["slimexport"]["bn_removed"] for r in ok])) if ok else None,
            "torch_pruning_bn_removed_mean": _mean_tp(with_bn),
        },
        "engine_speed": None if args.no_peer or timm_zoo else engine_speed(),
        "models": rows,
    }
    out = ROOT / "results" / machine_tag() / f"graph-coverage{suffix}{'-only' if args.only else ''}.json"
    write_json(out, result)
    print(result["summary"], result["engine_speed"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Why `--allocate latency` measures its table in the whole model: a layer's cost per channel timed alone (a one-conv
ONNX graph per conv, as the first version of the table did) against the same channels pruned from the whole model,
on onnxruntime CPU, batch 1, one thread.

    python -m benchmarks.table_context [--blocks 2,3,4,7,14,17] [--seconds 3]

For torchvision's mobilenet_v2 at 224×224 (random weights), per inverted-residual block: its expand 1×1, depthwise
3×3 and project 1×1 convs each timed alone at full and half the block's hidden width (the slopes summed), and the
whole model with half the block's hidden channels removed, timed side by side with the unpruned one. Prints and
writes benchmarks/results/<machine>/table_context.json.
"""

from __future__ import annotations

import argparse
import copy
import io
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine_tag
from slimexport.config import BenchConfig
from slimexport.fileio import write_json
from slimexport.latency import _graph, _weight
from slimexport.report import machine, versions
from slimexport.runtime import INPUT_NAME, OUTPUT_NAME, latency

ROOT = Path(__file__).resolve().parent


def _alone(conv: nn.Conv2d, cin: int, cout: int, hw: int) -> bytes:
    """``conv``'s shape as a one-node ONNX graph at ``cin`` → ``cout`` channels (depthwise stays depthwise)."""
    from onnx import helper

    groups = cin if conv.groups > 1 else 1
    k = conv.kernel_size[0]
    node = helper.make_node("Conv", [INPUT_NAME, "w"], [OUTPUT_NAME], kernel_shape=[k, k], pads=[conv.padding[0]] * 4,
                            strides=list(conv.stride), group=groups)  # fmt: skip
    return _graph([node], [_weight("w", (cout, cin // groups, k, k))], [1, cin, hw, hw])


def _onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME])  # fmt: skip
    return buf.getvalue()


def _halved(model: nn.Module, idx: int) -> nn.Module:
    """mobilenet_v2 with the first half of block ``idx``'s hidden channels kept."""
    m = copy.deepcopy(model)
    blk = m.features[idx].conv
    keep = blk[0][0].out_channels // 2
    e, dw, pj = blk[0][0], blk[1][0], blk[2]
    blk[0][0] = nn.Conv2d(e.in_channels, keep, 1, bias=False)
    blk[0][1] = nn.BatchNorm2d(keep)
    blk[1][0] = nn.Conv2d(keep, keep, 3, dw.stride, 1, groups=keep, bias=False)
    blk[1][1] = nn.BatchNorm2d(keep)
    blk[2] = nn.Conv2d(keep, pj.out_channels, 1, bias=False)
    return m.eval()


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="2,3,4,7,14,17")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / machine_tag() / "table_context.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    sizes: dict[nn.Module, int] = {}

    def size(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:  # None: the output is left as it is
        sizes.setdefault(mod, inputs[0].shape[-1])

    hooks = [c.register_forward_hook(size) for c in model.modules() if isinstance(c, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    bench = BenchConfig(batches=[1], threads=[1], seconds=a.seconds)
    full, rows = _onnx(model, x), []
    for idx in map(int, a.blocks.split(",")):
        blk = model.features[idx].conv
        e, dw, pj = blk[0][0], blk[1][0], blk[2]
        c = e.out_channels
        h = c // 2
        shapes = ((e, (e.in_channels, c), (e.in_channels, h)), (dw, (c, c), (h, h)),
                  (pj, (c, pj.out_channels), (h, pj.out_channels)))  # fmt: skip
        alone = 0.0  # the three convs' slopes, each timed alone at full and half the hidden width
        for conv, (cin_f, cout_f), (cin_h, cout_h) in shapes:
            hw = sizes[conv]
            t_full = latency({"f": _alone(conv, cin_f, cout_f, hw)}, (cin_f, hw, hw), bench)[0]["median_ms"]
            t_half = latency({"h": _alone(conv, cin_h, cout_h, hw)}, (cin_h, hw, hw), bench)[0]["median_ms"]
            alone += (t_full - t_half) / (c - h)
        pair = {"full": full, "half": _onnx(_halved(model, idx), x)}
        ms = {r["model"]: r["median_ms"] for r in latency(pair, (3, 224, 224), bench)}
        context = (ms["full"] - ms["half"]) / (c - h)
        rows.append({"block": idx, "channels": c, "resolution": sizes[e], "alone_us_per_channel": 1000 * alone,
                     "context_us_per_channel": 1000 * context, "alone_over_context": alone / context})  # fmt: skip
        print(rows[-1], flush=True)
    command = "python -m benchmarks.table_context " + shlex.join(sys.argv[1:])
    write_json(a.out, {"kind": "table_context", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine_tag": machine_tag(), "machine": machine(), "versions": versions(),
                       "command": command, "rows": rows})  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

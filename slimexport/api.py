"""The Python API, for users who train in their own loop (plain PyTorch, Lightning, timm's script, ...)::

    from slimexport import regularize, prune_model, save_pruned, load_pruned, export_onnx, quantize, benchmark

    loss.backward(); regularize(model, 1e-4); optimizer.step()          # sparse training, any loop
    pruned, record = prune_model(model, 0.5, example_input=x)            # any CNN with BatchNorm
    save_pruned(pruned, record, "pruned.pt", source="my_models.py:build", example_input=x)
    model = load_pruned("pruned.pt", trust=("my_models.py:build",))     # the same plain-data checkpoint
    export_onnx(model, x, "pruned.onnx", data=images)                   # checker, onnxsim, parity with PyTorch
    quantize("pruned.onnx", "pruned.int8.onnx", ds); benchmark({"fp32": "pruned.onnx"}, ds)

A checkpoint from :func:`save_pruned` is the one the CLI writes: ``slimexport export/quantize/bench`` take it and
its ONNX files. It stores the model's source (a registry name, or the factory that builds the unpruned model),
the pruning plan and the weights: plain data, loaded with ``weights_only=True``; a factory of the user's own code
runs on loading only where the caller names it (``trust``). The CLI's ``export`` goes through the same
:func:`slimexport.export.export_model` as :func:`export_onnx`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimexport.bench import bench as _bench
from slimexport.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from slimexport.config import BenchConfig, ExportConfig, PruneConfig, QuantizeConfig
from slimexport.data import Dataset
from slimexport.deploy import quantize as _quantize
from slimexport.errors import ConfigError
from slimexport.export import TensorInputs, export_model
from slimexport.models import is_builtin
from slimexport.models.external import GraphModel, external_config, is_external, trusted_code
from slimexport.models.program import ProgramModel, is_program, load_program, save_program
from slimexport.oprules import register_module_rule
from slimexport.prune import prune_model
from slimexport.regularizer import regularize
from slimexport.train import data_meta

__all__ = ["PruneConfig", "benchmark", "export_onnx", "load_pruned", "prune_model", "quantize", "register_module_rule",
           "regularize", "save_pruned",
           "sparsity_callback"]  # fmt: skip


def save_pruned(
    model: nn.Module,
    record: dict[str, Any],
    path: str | os.PathLike,
    *,
    source: str | None = None,
    example_input: torch.Tensor | None = None,
    data: Dataset | None = None,
) -> Path:
    """Write a pruned model (atomically). ``model`` and ``record`` are what :func:`prune_model` returned. Which
    path a model takes:

    - a model slimexport built (a registry architecture, ``create_model``, a checkpoint): a slimexport checkpoint,
      plain data that the CLI reads too; nothing more is needed;
    - a plain ``nn.Module`` with ``source``, how to build its unpruned original (``torchvision:NAME``,
      ``timm:NAME``, ``my_models.py:build`` or ``package.module:build``, called with ``num_classes``) and
      ``example_input`` (a batch of its inputs): a checkpoint too, rebuilt from that source and the plan;
    - a plain ``nn.Module`` with no source (a class defined in a notebook) and ``example_input``: its torch.export
      programs (:mod:`slimexport.models.program`: graphs, no pickled code) that :func:`load_pruned` returns as a
      module that runs, fine-tunes and exports; prune before saving (a program is not pruned again).

    ``data`` records the normalisation and labels (else the CLI measures on whatever data it is given)."""
    meta = {"stage": "pruned", "prune": dict(record)}
    if isinstance(model, GraphModel):
        ckpt_model = model
    else:
        if example_input is None:
            raise ConfigError("save_pruned of a plain nn.Module needs example_input= (a batch of its inputs)")
        if source is None:
            return save_program(model, example_input, path, dict(record))
        if not (is_external(source) or is_builtin(source)):
            raise ConfigError(
                f"save_pruned: source={source!r} is not how to build a model ('torchvision:resnet18', "
                "'my_models.py:build'); leave it out to save the model as its torch.export programs"
            )
        if "plan" not in record:
            raise ConfigError("the record has no pruning plan: pass the record prune_model returned with the model")
        with torch.no_grad():
            num_classes = int(model.eval()(example_input).shape[1])
        config = external_config(source, image_size=tuple(example_input.shape[2:])) | {"plan": record["plan"]}
        with trusted_code(source):  # the caller names the code that builds the original
            ckpt_model = GraphModel(source, config, num_classes, int(example_input.shape[1]))
        try:
            ckpt_model.net.load_state_dict(model.state_dict())
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200]
            raise ConfigError(f"the pruned model does not fit {source} with its pruning plan: {first}") from None
    data_info = data_meta(data) if data is not None else {"image_size": list(ckpt_model.config.get("image_size", []))}
    save_checkpoint(make_checkpoint(ckpt_model, data_info, meta), path)
    return Path(path)


def load_pruned(path: str | os.PathLike, trust: tuple[str, ...] | bool = ()) -> nn.Module:
    """The model of a slimexport checkpoint (pruned or not), rebuilt from the checkpoint alone, or of a program file
    :func:`save_pruned` wrote for a model with no source. A model from the caller's own code is built only if
    ``trust`` names its source (or is True); see :func:`load_checkpoint`."""
    if is_program(path):
        return load_program(path)
    model, _ = load_checkpoint(path, trust=trust)
    return model.eval()


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    data: Dataset | torch.Tensor | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` (dynamic batch, onnx.checker, onnxsim) and verify it against PyTorch:
    on ``data`` (a :class:`Dataset`'s test images, or a batch of normalised inputs), else on ``example_input``.
    Written only once the parity check passes (a :class:`~slimexport.errors.ParityError` otherwise). ``options``
    are :class:`ExportConfig` fields (``atol``, ``simplify``, ``opset``, ``parity_images``). Returns the record."""
    if data is None:
        data = example_input
    inputs = data if isinstance(data, Dataset) else TensorInputs(data)
    if len(inputs.y_test) == 0:
        raise ConfigError("export_onnx needs at least one input to check parity on")
    cfg = ExportConfig(**options)
    if isinstance(model, ProgramModel):  # its eval program is the graph to export
        model = model.graph
    return export_model(model.eval(), path, inputs, cfg)


def quantize(model: str | os.PathLike, out: str | os.PathLike, data: Dataset, **options: Any) -> dict[str, Any]:
    """INT8 (onnxruntime QDQ) of an FP32 ONNX file, calibrated on ``data``'s training images and measured against
    the FP32 model on its test images; ``options`` are :class:`QuantizeConfig` fields. Returns the record."""
    return _quantize(model, out, data, QuantizeConfig(**options))


def benchmark(models: dict[str, str | os.PathLike], data: Dataset, **options: Any) -> dict[str, Any]:
    """onnxruntime latency (side by side) and accuracy of ONNX/.ort files; ``options`` are :class:`BenchConfig`
    fields (``batches``, ``threads``, ``seconds``, ``accuracy``). Returns the result record."""
    return _bench(models, data, BenchConfig(**options))


def sparsity_callback(sparsity: float, regularizer: str = "l1", t: float = 1.2):
    """A Lightning callback that adds the sparsity term (L1, or ``regularizer="polar"``) on every BN γ before each
    optimizer step (after AMP's unscale)::

    trainer = lightning.Trainer(callbacks=[slimexport.sparsity_callback(1e-4)])
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ConfigError("sparsity_callback needs Lightning: pip install lightning") from None

    class SparsityCallback(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            regularize(pl_module, sparsity, regularizer=regularizer, t=t)

    return SparsityCallback()

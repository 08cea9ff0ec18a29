"""slimexport: Network Slimming (Liu et al., ICCV 2017) as a compress-and-export toolchain.

Each stage is a function from an artifact on disk to a new artifact on disk:

- :func:`slimexport.train.train` — (sparse) training, writes a checkpoint;
- :func:`slimexport.prune.prune` — global |γ| threshold, writes a physically smaller checkpoint;
- :func:`slimexport.export.export` — ONNX export, checker, onnxsim, parity against PyTorch;
- :func:`slimexport.bench.bench` — onnxruntime latency and accuracy;
- :func:`slimexport.pipeline.run_pipeline` — all of the above into one run directory.
"""

__version__ = "0.2.0"


__all__ = ("regularize", "prune_model", "save_pruned", "load_pruned", "export_onnx", "quantize", "benchmark",
           "sparsity_callback", "register_module_rule", "PruneConfig")  # fmt: skip


def __getattr__(name: str):
    """The Python API (:mod:`slimexport.api`), imported on first use (so that ``slimexport --help`` stays light)::

    from slimexport import regularize, prune_model, save_pruned, load_pruned, export_onnx, quantize, benchmark
    """
    if name in __all__:
        from slimexport import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimexport' has no attribute {name!r}")

"""slimexport: Network Slimming (Liu et al., ICCV 2017) as a compress-and-export toolchain.

Each stage is a function from an artifact on disk to a new artifact on disk:

- :func:`slimexport.train.train` — (sparse) training, writes a checkpoint;
- :func:`slimexport.prune.prune` — global |γ| threshold, writes a physically smaller checkpoint;
- :func:`slimexport.export.export` — ONNX export, checker, onnxsim, parity against PyTorch;
- :func:`slimexport.bench.bench` — onnxruntime latency and accuracy;
- :func:`slimexport.pipeline.run_pipeline` — all of the above into one run directory.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """The Python API, imported on first use (so that ``slimexport --help`` stays light)::

    from slimexport import prune_model, regularize
    """
    if name == "prune_model":
        from slimexport.prune import prune_model

        return prune_model
    if name == "regularize":
        from slimexport.train import regularize

        return regularize
    raise AttributeError(f"module 'slimexport' has no attribute {name!r}")

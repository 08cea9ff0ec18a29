"""Training on several processes or machines under ``torchrun``, with DistributedDataParallel.

Nothing here starts processes: ``torchrun`` does (``--nproc_per_node``, ``--nnodes``, ``--rdzv-*``), and sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, which :func:`setup` reads. Without them every function here is the
single-process identity, so the same code runs alone or under torchrun.

The rules (see :func:`slimexport.train.fit`):

- ``--batch-size`` is the global batch; each rank takes its contiguous share of every global batch (the batch
  size must divide by the number of ranks), so a recipe means the same at any N. Every rank draws the same
  shuffling and augmentation for the whole global batch and keeps its share, so the inputs are exactly those of a
  single process. Under DDP the last partial batch is dropped (no rank may run short).
- The sparsity subgradient is added after ``backward()``, i.e. after DDP's all-reduce, so every rank applies the
  same update; parameters are checked to be identical on every rank at the end of training.
- Per-rank BatchNorm statistics are the one expected difference from a single process (``--sync-bn`` on CUDA
  makes them global).
- Rank 0 alone writes files; the others wait at barriers. Evaluation is reduced over ranks.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from slimexport.errors import ConfigError


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on CUDA, one GPU per rank); returns the
    device this rank trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # prune, export and bench run on rank 0 while the others wait: give the barrier time
        dist.init_process_group(backend, timeout=timedelta(hours=4))
        # leave the group before the interpreter exits: gloo's threads, still alive at exit, abort the process
        # ("terminate called without an active exception") and torchrun reports the rank as failed
        atexit.register(_leave)
    return device


_failed = False


def abandon() -> None:
    """This rank is failing: leave the group without waiting for the others (torchrun ends them)."""
    global _failed
    _failed = True


def _leave() -> None:
    """Leave together: a rank that tears its gloo connections down while another still uses them aborts
    ("terminate called without an active exception"). On a normal exit a short monitored barrier (gloo) comes
    first, so the ranks destroy the group at the same point; a failing rank (:func:`abandon`) does not wait."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo" and not _failed:
                dist.monitored_barrier(timeout=timedelta(seconds=30))
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; another rank may already be gone
            pass


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place; ``t`` itself when alone)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def same_on_every_rank(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (compared by a checksum of every parameter's bytes)."""
    if not active():
        return True
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in module.parameters()])
    digest = torch.tensor([float(flat.double().sum()), float((flat.double() * 1.000001).square().sum())],
                          dtype=torch.float64)  # fmt: skip
    if next(module.parameters()).is_cuda:
        digest = digest.cuda()
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)

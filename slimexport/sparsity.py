"""``--sparsity auto``: choose the sparsity s for a model from a short probe, aimed at the pruning target.

The sparsity term pulls every γ towards 0 at a constant rate; the loss holds up the γ it needs. Which of the two
wins depends on the model: the same s = 5e-3 that left vgg11_w25 with 35% of its |γ| below 1e-2 sent 95% of
mobilenet_v2's there (a collapse: the threshold then cuts channels the model needs). So s is measured, not
guessed: from the model sparse training starts from (the same seeded initialisation, or the trained baseline it
fine-tunes), each candidate s runs the sparse schedule compressed into a few steps, with s scaled so that the
term moves γ as far as the whole schedule would (:func:`probe`). The fraction of γ that ends below 1e-2 is what
that s sends to zero; the choice is the smallest s that sends at least the fraction to be pruned (``--percent``),
as long as it does not send nearly everything (:data:`COLLAPSE`). Then the channels the threshold removes are
those the term has already emptied, and those it keeps are the ones the loss defended.

The probe costs ``steps`` SGD steps (a tenth of the schedule, 20 to 100) per candidate tried: candidates go up
from the weakest and stop at the first that reaches the target. Its table is recorded (``choose_sparsity``'s
second return value; the pipeline's sparsity.json).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimexport.config import TrainConfig
from slimexport.console import make_progress
from slimexport.data import Dataset
from slimexport.loop import make_scheduler, resolve_device, schedule_lrs
from slimexport.regularizer import bn_weights, penalty_grads

CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SMALL = 1e-2  # a γ below this counts as sent to zero (the report's fraction_small)
COLLAPSE = 0.97  # a candidate that sent more than this fraction to zero is never chosen


def _batches(ds: Dataset, cfg: TrainConfig, gen: torch.Generator, device: torch.device):
    """Endless augmented training batches on ``device`` (one process's view: every rank probes alike)."""
    epoch = 0
    while True:
        for xb, yb in ds.train_batches(cfg.batch_size, epoch, cfg.seed, gen, augmented=cfg.augment):
            yield ds.normalize(xb.to(device)), yb.to(device)
        epoch += 1


def probe(model: nn.Module, ds: Dataset, cfg: TrainConfig, s: float, steps: int, device: torch.device) -> float:
    """The fraction of ``model``'s |γ| below :data:`SMALL` after ``cfg``'s schedule compressed into ``steps``
    steps, with the sparsity scaled up so that the term moves γ as far as the whole schedule would (equal
    s·Σlr). The term is applied as a truncated step after each SGD step (a γ it would carry across 0 stops at 0,
    the proximal step of L1), so that a γ the loss does not hold up ends at 0 instead of oscillating around it
    as a subgradient at a large rate does; the real run's decaying learning rate ends the same way. The loss has
    fewer steps to hold its γ up than in the real run, so this errs towards more γ at zero: the s it leads to is,
    if anything, too weak."""
    m = copy.deepcopy(model).to(device).train()
    ws = bn_weights(m)
    short = dataclasses.replace(cfg, epochs=1)
    # the whole schedule's s·Σlr, and SGD's momentum, which carries a constant push 1/(1 − μ) times as far
    scaled = (
        s
        * sum(schedule_lrs(cfg, len(ds.y_train)))
        / sum(schedule_lrs(short, steps_per_epoch=steps))
        / (1 - cfg.momentum)
    )
    opt = torch.optim.SGD(
        m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    sched = make_scheduler(opt, short, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _, (xb, yb) in zip(range(steps), _batches(ds, cfg, gen, device)):
        lr = opt.param_groups[0]["lr"]
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for w, g in zip(ws, penalty_grads([w.detach() for w in ws], cfg.regularizer, cfg.polar_t)):
                new = w - lr * scaled * g
                w.copy_(torch.where(torch.sign(new) == torch.sign(w), new, torch.zeros_like(new)))
    g = torch.cat([w.detach().abs().reshape(-1) for w in ws])
    return float((g < SMALL).float().mean())


def choose_sparsity(
    model: nn.Module, ds: Dataset, cfg: TrainConfig, target: float, steps: int | None = None
) -> tuple[float, dict[str, Any]]:
    """The sparsity s for sparse training ``cfg`` of ``model`` (the model it starts from) aimed at pruning the
    fraction ``target`` of its BN channels (see the module doc); returns (s, the probe's record)."""
    device = resolve_device(cfg.device)
    total = len(schedule_lrs(cfg, len(ds.y_train)))
    steps = min(total, steps or max(20, min(100, total // 10)))
    probe_cfg = dataclasses.replace(cfg, sparsity=0.0)
    table: list[dict[str, float]] = []
    chosen, why = None, ""
    with make_progress() as progress:
        task = progress.add_task("sparsity probe", total=len(CANDIDATES) * steps, info="")
        for s in CANDIDATES:
            frac = probe(model, ds, probe_cfg, s, steps, device)
            table.append({"sparsity": s, "fraction_small": frac})
            progress.update(task, advance=steps, info=f"s={s:g}: {frac:.0%} of γ to zero")
            if frac >= target:
                if frac <= COLLAPSE:
                    chosen, why = s, f"the smallest s that sent ≥ {target:.0%} of γ below {SMALL:g}"
                break
    if chosen is None:  # none reached the target without collapsing: the strongest that does not collapse
        fine = [r for r in table if r["fraction_small"] <= COLLAPSE]
        best = max(fine, key=lambda r: (r["fraction_small"], r["sparsity"])) if fine else table[0]
        chosen = best["sparsity"]
        why = (
            f"no candidate sent ≥ {target:.0%} of γ below {SMALL:g} without collapsing (> {COLLAPSE:.0%}); the "
            "one that sent the most (the strongest of equals)"
        )
    record = {"sparsity": chosen, "reason": why, "target": target, "probe_steps": steps, "schedule_steps": total,
              "table": table, "regularizer": cfg.regularizer}  # fmt: skip
    return chosen, record

"""Phase 2, per user: what a fit of the n × L coefficients α returns (``Fit``), and the paper's fit.

θ_p^l = θ_pre^l + Σ_i α_i^l τ_i^l (eq. 2), with everything but α frozen and the network in eval mode.
α starts at softmax_i(SROCC(S, θ_ft_i) / T) for every layer (eq. 4/6, ``start``) and is trained with
the Bradley–Terry rank loss −log σ(ŷ_a − ŷ_b) over every pair in the batch with y_a > y_b (eq. 3): 500
steps, batch 32, learning rate 1e-2 → 1e-3 on a cosine schedule (appendix F).

``backprop`` takes those steps as the paper does: every step merges the model and runs its batch
through it, forward and back. ``linearised.fit_linear`` (the default, ``LearnConfig.fit``) takes the
same Adam steps on the model linearised in α. ``learn.fit`` chooses between them.

Differences from the authors' released code, where the paper is followed here: their code initialises
with softmax(10·SROCC) (T = 0.1 here would match), pairs item i with item i + B/2 instead of every
ordered pair in the batch, and keeps the learning rate constant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .calibrate import Calibration
from .log import progress_bar
from .merger import Linearisation, Merger
from .objective import Support, cosine_lr
from .recipe import LearnConfig
from .start import Start


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Fit:
    """What one fit learned, and what happened on the way."""
    alpha: torch.Tensor  # [n, L], on the CPU
    alpha_init: torch.Tensor  # the start
    tuned: torch.Tensor  # a bool per layer: learned, or held at 1/n
    zero_shot_srocc: list[float]  # each task model's agreement with the support set
    support_srocc_before: float
    support_srocc_after: float
    loss_curve: dict[str, Any]
    seconds: float
    linearisations: tuple[Linearisation, ...] = ()  # fit "linear": the expansions it made, in order
    linearised_at: tuple[int, ...] = ()  # ... the steps they were made at: kept where the expansions are dropped
    # What ``learn.fit_recipe`` adds from out-of-fold fits on a support set of ratings:
    oof: np.ndarray | None = None  # each support image's score by a fit that never saw it
    oof_srocc: float | None = None
    folds: int | None = None
    calibration: Calibration | None = None


def backprop(merger: Merger, support: Support, cfg: LearnConfig, start: Start, progress: bool = False,
             desc: str = "learn", on_step: Callable[[int], Any] | None = None) -> Fit:
    """The paper's fit: every step runs its batch through the model merged at the current α."""
    device = merger.device
    n, L = merger.bank.n, len(merger.layers)
    pixels = support.pixels.to(device)
    alpha0, tuned = start.alpha, start.tuned
    # A copy: on the CPU .to() would share alpha0's storage, and the optimizer's in-place updates
    # would then move the recorded start along with α.
    alpha = torch.nn.Parameter(alpha0.clone().to(device))
    if not cfg.layer_agnostic and not bool(tuned.all()):
        mask = tuned.to(device)
        alpha.register_hook(lambda g: g * mask)  # Adam moves a coefficient whose gradient is always 0 by 0
    opt = torch.optim.Adam([alpha], lr=cfg.lr, weight_decay=0.0)
    template = merger.model.template
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, support.items)
    losses: list[float] = []
    before = support.metric(merger.predict(alpha.detach(), pixels))
    started = time.time()
    bar = progress_bar(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        if on_step:
            on_step(1)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.lr_end)
        order = torch.randperm(support.items, generator=gen).to(device)
        state = merger.state(alpha)
        loss = support.batch_loss(lambda idx: merger.forward(state, pixels[idx]).float(), order, batch, cfg.loss, template)
        if loss is None:  # every image in this batch has the same score: no pair to learn from
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}", refresh=False)
    alpha_full = _full(alpha.detach(), n, L)
    return Fit(alpha=alpha_full, alpha_init=_full(alpha0, n, L), tuned=tuned, zero_shot_srocc=start.zero_shot_srocc,
               support_srocc_before=before, support_srocc_after=support.metric(merger.predict(alpha_full, pixels)),
               loss_curve=loss_curve(losses), seconds=round(time.time() - started, 2))


def _full(alpha: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """A copy of α as the [n, L] matrix a profile stores, on the CPU (a copy: the optimizer goes on
    updating α in place)."""
    if alpha.dim() == 1:  # layer-agnostic: one coefficient per task
        alpha = alpha[:, None].expand(n, L)
    return alpha.detach().float().cpu().clone().contiguous()


def loss_curve(losses: list[float]) -> dict[str, Any]:
    if not losses:
        return {"steps": 0}
    every = max(1, len(losses) // 20)
    return {"steps": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses),
            "mean_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "every": every, "values": [float(np.mean(losses[i:i + every])) for i in range(0, len(losses), every)]}

"""Fit "linear": Adam on the merged model linearised in α, for many support sets at once.

Every ``refresh`` steps each support set's images get the merged model's first-order expansion at its
current α (``Merger.linearise``: one forward and backward per image); the steps in between run on
that linear model, s_j(α) ≈ s_j(α₀) + ⟨g_j, α − α₀⟩, and cost a few tensor products. A support set
is expanded again sooner once its tuned coefficients have moved by an RMS of ``drift`` from the
expansion's point: the first steps leave the linear region within a few steps, and without the
drift rule the fit was up to 0.043 SROCC below the paper's on a sealed population. With drift 0.05
(the default) it was never more than 0.007 below it (benchmarks/README.md, "Learning quality").

The support sets (one user's, the folds of one user's, or a thousand users') are fitted side by side
as one batch of independent problems: each has its own coefficients, start, expansion, loss, batch
order (its own generator, seeded as ``fit.backprop`` seeds one) and Adam state, so a support set
fitted in a batch gets what it gets alone, to float rounding. The passes through the model are the cost;
the batched steps are not.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from .fit import Fit, loss_curve
from .log import progress_bar
from .merger import Linearisation, Merger
from .objective import Paired, Support, cosine_lr
from .recipe import LearnConfig
from .start import Start


class _Terms:
    """Every support set's loss terms as padded tensors: Bradley–Terry pairs (a preferred to b) or,
    for the MSE loss, images with targets; ``units`` are what a batch draws (images, or pairs)."""

    def __init__(self, supports: list[Support], cfg: LearnConfig, template: torch.Tensor, device: torch.device):
        self.mse = cfg.loss == "mse"
        B = len(supports)
        self.units = [s.items for s in supports]
        self.images = max(len(s.pixels) for s in supports)
        pa, pb = [], []
        for s in supports:
            if isinstance(s, Paired):
                a, b = s.pairs[:, 0], s.pairs[:, 1]
            else:
                y = np.asarray(s.scores, dtype=np.float32)
                a, b = np.nonzero(y[:, None] > y[None, :])
            pa.append(a)
            pb.append(b)
        P = max(1, max(len(a) for a in pa))
        self.pa = torch.zeros(B, P, dtype=torch.long)
        self.pb = torch.zeros(B, P, dtype=torch.long)
        self.valid = torch.zeros(B, P, dtype=torch.bool)
        for i, (a, b) in enumerate(zip(pa, pb)):
            self.pa[i, :len(a)], self.pb[i, :len(b)], self.valid[i, :len(a)] = torch.as_tensor(a), torch.as_tensor(b), True
        self.paired = torch.tensor([isinstance(s, Paired) for s in supports])
        if self.mse:
            lo, hi = float(template[0]), float(template[-1])
            self.span = hi - lo
            self.target = torch.zeros(B, self.images)
            for i, s in enumerate(supports):
                y = torch.as_tensor(s.scores, dtype=torch.float32)
                self.target[i, :len(y)] = lo + (hi - lo) * (y - y.min()) / (y.max() - y.min())  # user scale → template scale
        for k in ("pa", "pb", "valid", "paired", *(("target",) if self.mse else ())):
            setattr(self, k, getattr(self, k).to(device))

    def losses(self, scores: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each support set's loss on its batch (``chosen``: [B, units] drawn), and whether it had a term."""
        if self.mse:
            w = chosen[:, :self.images].float()
            count = w.sum(1)
            loss = (w * ((scores - self.target) / self.span) ** 2).sum(1) / count.clamp(min=1)
            return loss, count > 0
        # a pair is in the batch if drawn itself (pairwise answers) or if both its images were (ratings)
        in_batch = torch.where(self.paired[:, None], chosen[:, :self.pa.shape[1]],
                               torch.gather(chosen, 1, self.pa) & torch.gather(chosen, 1, self.pb))
        w = (in_batch & self.valid).float()
        count = w.sum(1)
        diff = torch.gather(scores, 1, self.pa) - torch.gather(scores, 1, self.pb)
        loss = (w * torch.nn.functional.softplus(-diff)).sum(1) / count.clamp(min=1)
        return loss, count > 0


def _stack(lins: list[Linearisation], images: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expansions of different support sets as [B, ...] tensors, padded to ``images``."""
    B, n = len(lins), lins[0].alpha.shape[0]
    dev = lins[0].scores.device
    point = torch.stack([lin.alpha for lin in lins])
    scores = torch.zeros(B, images, device=dev)
    grads = torch.zeros(B, images, n, L, device=dev)
    for i, lin in enumerate(lins):
        scores[i, :len(lin.scores)] = lin.scores
        grads[i, :len(lin.scores)] = lin.grads
    return point, scores, grads


def _moved(alpha: torch.Tensor, point: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """How far ``alpha`` ([..., n, L]) is from an expansion's ``point``: the RMS of the tuned
    coefficients' moves, per support set."""
    return (alpha - point)[..., tuned].pow(2).mean(dim=(-2, -1)).sqrt()


def fit_linear(merger: Merger, supports: list[Support], cfg: LearnConfig, starts: list[Start],
               replays: list[tuple[Linearisation, ...]] | None = None, measure: bool = True, progress: bool = False,
               desc: str = "learn", on_step: Callable[[int], Any] | None = None) -> list[Fit]:
    """``cfg``'s fit of each support set from its start, side by side; one ``Fit`` each.

    ``replays``: per support set, expansions to step on instead of making new ones (each for
    ``refresh`` steps, the last for the rest): an out-of-fold fit replays its final fit's, restricted
    to its own images, and costs no pass through the model. ``measure``: the support's agreement
    after the fit by the model itself (one pass); else by the linear model. ``on_step(k)``: k steps
    done, counted over the support sets (a batch of 5 counts 5 a step)."""
    started = time.time()
    device, n, L = merger.device, merger.bank.n, len(merger.layers)
    B = len(supports)
    agnostic = cfg.layer_agnostic
    terms = _Terms(supports, cfg, merger.model.template, device)
    alpha = torch.stack([s.alpha for s in starts]).to(device)
    tuned = starts[0].tuned.to(device)
    mask = torch.ones_like(alpha) if agnostic else tuned[None, None, :].expand_as(alpha).float()
    m, v = torch.zeros_like(alpha), torch.zeros_like(alpha)
    t = torch.zeros(B, device=device)  # Adam's step count, per support set (one with no pair in its batch skips)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as fit's
    batch = [min(cfg.batch_size, k) for k in terms.units]
    gens = [torch.Generator().manual_seed(cfg.seed) for _ in supports]
    units = max(max(terms.units), terms.images, terms.pa.shape[1])
    all_units = torch.zeros(B, units, dtype=torch.bool, device=device)
    for i, k in enumerate(terms.units):
        all_units[i, :k] = True
    curve = torch.full((cfg.steps, B), float("nan"))
    made: list[list[Linearisation]] = [[] for _ in supports]
    current: list[Linearisation | None] = [None] * B
    at = [0] * B  # replays: the index of the expansion stepped on
    point = lin_scores = lin_grads = None
    bar = progress_bar(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        if on_step:
            on_step(B)
        full = alpha if not agnostic else alpha[:, :, None].expand(B, n, L)
        if replays is not None:  # the latest expansion the replayed fit had made by this step (made in step order)
            due = [i for i, r in enumerate(replays) if at[i] + 1 < len(r) and r[at[i] + 1].step <= step]
            for i in due:
                at[i] += 1
            current = [r[k] for r, k in zip(replays, at)]
            due = due if step else list(range(B))
        else:
            far = (_moved(full, point, tuned) > cfg.drift).tolist() if cfg.drift and point is not None else [False] * B
            due = [i for i, c in enumerate(current) if c is None or step - c.step >= cfg.refresh or far[i]]
            for i in due:
                current[i] = replace(merger.linearise(full[i], supports[i].pixels, tuned), step=step)
                made[i].append(current[i])
        if point is None:
            point, lin_scores, lin_grads = _stack(current, terms.images, L)
        else:  # only the support sets expanded anew: the others' rows stand (a thousand users' every step)
            for i in due:
                k = len(current[i].scores)
                point[i], lin_scores[i, :k], lin_grads[i, :k] = current[i].alpha, current[i].scores, current[i].grads
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.lr_end)
        if all(b == k for b, k in zip(batch, terms.units)):
            chosen = all_units
        else:
            chosen = torch.zeros(B, units, dtype=torch.bool, device=device)
            for i, g in enumerate(gens):
                chosen[i, torch.randperm(terms.units[i], generator=g)[:batch[i]].to(device)] = True
        a = alpha.detach().requires_grad_(True)
        full = a if not agnostic else a[:, :, None].expand(B, n, L)
        scores = lin_scores + torch.einsum("bjnl,bnl->bj", lin_grads, full - point)
        loss, has = terms.losses(scores, chosen)
        (grad,) = torch.autograd.grad(loss.sum(), a)
        grad = grad * mask
        losses = loss.detach()
        curve[step] = torch.where(has, losses, torch.nan).cpu()
        # Adam (torch.optim.Adam's update), with a step count per support set: one whose batch held no
        # pair to learn from takes no step, as fit.backprop skips it
        move = has.view(-1, *[1] * (alpha.dim() - 1))
        t = t + has.float()
        m = torch.where(move, beta1 * m + (1 - beta1) * grad, m)
        v = torch.where(move, beta2 * v + (1 - beta2) * grad * grad, v)
        tt = t.clamp(min=1).view_as(move)
        update = (lr / (1 - beta1 ** tt)) * m / (v.sqrt() / (1 - beta2 ** tt).sqrt() + eps)
        alpha = torch.where(move, alpha - update, alpha)
        recent = curve[max(0, step - 24):step + 1].numpy()
        if step % 25 == 0 and np.isfinite(recent).any():  # a window of batches without a pair has no loss
            bar.set_postfix(loss=f"{float(np.nanmean(recent)):.4f}", refresh=False)
    seconds = round(time.time() - started, 2)
    fits = []
    for i, (s, st) in enumerate(zip(supports, starts)):
        a_i = alpha[i] if not agnostic else alpha[i][:, None].expand(n, L)
        a_i = a_i.detach().float().cpu().clone().contiguous()
        s0 = st.alpha if not agnostic else st.alpha[:, None].expand(n, L)
        lins = tuple(made[i])
        first = (lins or replays[i])[0]  # at the start: the model's own scores there, for a fit that made it
        before = s.metric(first(s0.to(device)).cpu().numpy())
        if measure:
            after = s.metric(merger.predict(a_i, s.pixels))
        else:
            last = (replays[i] if replays else lins)[-1]
            after = s.metric(last(a_i.to(device)).detach().cpu().numpy())
        fits.append(Fit(alpha=a_i, alpha_init=s0.float().cpu().clone().contiguous(), tuned=st.tuned.cpu(),
                        zero_shot_srocc=st.zero_shot_srocc, support_srocc_before=before, support_srocc_after=after,
                        loss_curve=loss_curve([x for x in curve[:, i].tolist() if x == x]), linearisations=lins,
                        linearised_at=tuple(lin.step for lin in lins),
                        seconds=seconds))
    return fits

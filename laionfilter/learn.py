"""Phase 2, per user: learn the n × L coefficients α that merge the bank's task vectors (sections 3.2–3.3).

θ_p^l = θ_pre^l + Σ_i α_i^l τ_i^l (eq. 2), with everything but α frozen and the network in eval mode.
α starts at softmax_i(SROCC(S, θ_ft_i) / T) for every layer (eq. 4/6) and is trained with the
Bradley–Terry rank loss −log σ(ŷ_a − ŷ_b) over every pair in the batch with y_a > y_b (eq. 3): 500
steps, batch 32, learning rate 1e-2 → 1e-3 on a cosine schedule (appendix F).

Beyond the paper, by default: α starts at a softmax-weighted mean of candidate merges (each task,
each pair of tasks averaged, each task less half another; ``mixes``) weighted by their SROCC on the
support set (times ``LearnConfig.mix_scale`` while the anchor holds it), and an anchor penalty keeps α
near that start, its weight falling as N^-4 with the support size N (``LearnConfig.anchor``): with ten
ratings it holds α near the start, with a hundred it lets go.
``init="adaptive", anchor=0`` is the paper's recipe.

Differences from the authors' released code, where the paper is followed here: their code initialises
with softmax(10·SROCC) (T = 0.1 here would match), pairs item i with item i + B/2 instead of every
ordered pair in the batch, and keeps the learning rate constant.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call

from .bank import Bank
from .calibrate import fit_calibration
from .errors import LaionfilterError
from .log import progress_bar
from .merge import merge_weights
from .metrics import srocc
from .model import count_blocks, layer_stage, pick_device
from .jobs import run_jobs
from .recipe import LearnConfig, anchor_weight


def cosine_lr(step: int, total: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` at step 0 to ``end`` at the last step."""
    if total <= 1:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / (total - 1)))


def tuned_layers(layers: list[str], tune: str = "all") -> torch.Tensor:
    """A bool per layer: is its coefficient learned under ``tune``?"""
    if tune == "all":
        return torch.ones(len(layers), dtype=torch.bool)
    blocks = count_blocks(layers)
    first = blocks + 2 if tune == "head" else blocks + 1 - int(tune.removeprefix("top-"))
    if first < 1:
        raise LaionfilterError(f"--tune {tune}: the model has only {blocks} blocks")
    return torch.tensor([layer_stage(l, blocks) >= first for l in layers])


def mixes(n: int) -> np.ndarray:
    """The candidate merges that ``init="mixes"`` weighs, [m, n]: each task alone, each pair averaged
    (a taste that mixes two criteria) and each task less half of another (a taste that runs against a
    criterion). For 6 tasks, 6 + 15 + 30 = 51."""
    eye = np.eye(n)
    pairs = [(eye[i] + eye[j]) / 2 for i, j in itertools.combinations(range(n), 2)]
    against = [eye[i] - eye[j] / 2 for i, j in itertools.permutations(range(n), 2)]
    return np.stack([*eye, *pairs, *against])


def init_coefficients(sroccs: torch.Tensor | list[float], n_layers: int, init: str = "adaptive",
                      temperature: float = 1.0, mix_sroccs: list[float] | None = None,
                      mix_scale: float = 1.0) -> torch.Tensor:
    """α_i^l = softmax_i(SROCC_i / T), the same for every layer (eq. 6); [n, n_layers]. Init "mixes":
    s · Σ_c softmax_c(SROCC_c / T) · c over the candidate merges c of ``mixes`` (``mix_sroccs``: each
    one's SROCC on the support set; T and s are then ``LearnConfig.mix_temperature`` and ``mix_scale``)."""
    s = torch.as_tensor(sroccs, dtype=torch.float64)
    if init == "mixes":
        if mix_sroccs is None:
            raise LaionfilterError("init mixes needs the candidate merges' SROCC")
        w = torch.softmax(torch.as_tensor(mix_sroccs, dtype=torch.float64) / temperature, dim=0)
        a = mix_scale * (w @ torch.as_tensor(mixes(len(s))))
    elif init == "uniform":
        a = torch.full_like(s, 1.0 / len(s))
    elif init == "best-fit":
        a = torch.zeros_like(s)
        a[int(torch.argmax(s))] = 1.0
    else:
        a = torch.softmax(s / temperature, dim=0)
    return a.float()[:, None].expand(len(s), n_layers).clone()


def bradley_terry_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean of −log σ(ŷ_a − ŷ_b) over every pair with y_a > y_b (eq. 3); None when all tie."""
    better = target[:, None] > target[None, :]
    if not better.any():
        return None
    diff = pred[:, None] - pred[None, :]
    return torch.nn.functional.softplus(-diff[better]).mean()


def anchor_penalty(alpha: torch.Tensor, start: torch.Tensor, anchor: float, n_support: int,
                   power: float) -> torch.Tensor:
    """(anchor / N)^power · Σ_i mean_l (α_i^l − α_i^l(0))², N the support size."""
    d2 = (alpha - start) ** 2
    return anchor_weight(anchor, n_support, power) * (d2.sum(0).mean() if d2.dim() == 2 else d2.sum())


def mse_loss(pred: torch.Tensor, target: torch.Tensor, span: float) -> torch.Tensor:
    return torch.mean(((pred - target) / span) ** 2)


class Merger:
    """The bank on one device and a skeleton model run with merged weights through functional_call."""

    def __init__(self, bank: Bank, device: torch.device):
        self.bank, self.device = bank, device
        self.layers = bank.layers
        self.pre = {k: v.to(device) for k, v in bank.pre.items()}
        self.tau = {k: v.to(device) for k, v in bank.tau.items()}  # kept in the stored dtype
        self.model = bank.new_model().to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def state(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        return merge_weights(self.pre, self.tau, self.layers, alpha)

    def forward(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, state, (x,))

    @torch.no_grad()
    def predict(self, alpha: torch.Tensor, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        state = self.state(alpha.to(self.device))
        out = [self.forward(state, pixels[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).numpy()

    def task_predictions(self, pixels: torch.Tensor) -> np.ndarray:
        """[n, N]: each task model θ_pre + τ_i on the images."""
        n = self.bank.n
        return np.stack([self.predict(torch.eye(n)[i], pixels) for i in range(n)])

    def mix_predictions(self, pixels: torch.Tensor, progress: bool = False) -> np.ndarray:
        """[m, N]: each candidate merge of ``mixes`` on the images (the first n rows: the task models)."""
        cands = progress_bar(mixes(self.bank.n), desc="candidate merges", unit="merge", disable=not progress, leave=False)
        return np.stack([self.predict(torch.as_tensor(c, dtype=torch.float32), pixels) for c in cands])


def start_predictions(merger: Merger, pixels: torch.Tensor, cfg: LearnConfig, task_preds: np.ndarray | None,
                      mix_preds: np.ndarray | None, progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``cfg``'s start is chosen from, on ``pixels``: the task models' predictions and, for init
    "mixes", the candidate merges' (whose first n rows are the task models': not run twice). Either
    one given is kept."""
    if cfg.init == "mixes" and mix_preds is None:
        mix_preds = merger.mix_predictions(pixels, progress)
    if task_preds is None:
        task_preds = merger.task_predictions(pixels) if mix_preds is None else mix_preds[:merger.bank.n]
    return task_preds, mix_preds


def pair_agreement(pairs: np.ndarray, pred: np.ndarray) -> float:
    """Kendall-style agreement with pairwise answers, in [-1, 1]: the fraction of (preferred, other) pairs
    a prediction orders the user's way, rescaled as 2f − 1 (a predicted tie counts half). It stands in
    for SROCC where the user gave pairs rather than scores (the adaptive initialisation, support fit)."""
    return float(np.mean(np.sign(pred[pairs[:, 0]] - pred[pairs[:, 1]])))


def fit(merger: Merger, pixels: torch.Tensor, scores: np.ndarray | None, cfg: LearnConfig, progress: bool = False,
        task_preds: np.ndarray | None = None, desc: str = "learn",
        on_step: Callable[[int], Any] | None = None, pairs: np.ndarray | None = None,
        checkpoints: tuple[int, ...] = (), mix_preds: np.ndarray | None = None) -> dict[str, Any]:
    """Learn α on one support set; returns α ([n, L]) and what happened on the way.

    ``checkpoints``: step counts whose α is returned too (``alpha_at``; 0 is the start); the fit ends
    at the last of them, on the learning-rate schedule of ``cfg.steps`` all the same.

    The support set is scored images (``scores``), or pairwise answers (``pairs``: (preferred, other)
    image indices), whose Bradley–Terry loss is taken over those pairs and whose agreement measure is
    ``pair_agreement`` in place of SROCC. ``on_step(k)`` is told of each k steps done (an outer progress
    bar), the steps a converged fit skips included.
    ``task_preds`` and ``mix_preds`` (init "mixes") are the task models' and the candidate merges'
    predictions on ``pixels``, computed here when not given.
    """
    device = merger.device
    n, L = merger.bank.n, len(merger.layers)
    if pairs is not None and cfg.loss != "bt":
        raise LaionfilterError("pairwise answers train with the Bradley–Terry loss only (--loss bt)")
    metric = (lambda pred: pair_agreement(pairs, pred)) if pairs is not None else (lambda pred: srocc(scores, pred))
    task_preds, mix_preds = start_predictions(merger, pixels, cfg, task_preds, mix_preds, progress)
    zs = [metric(p) for p in task_preds]
    mix_zs = None if mix_preds is None else [metric(p) for p in mix_preds]
    # The support's size is its answers: rated images, or answered pairs (not the images those pairs
    # touch: evaluate hands over all of a user's images, and a K-pair split must weigh as K answers).
    items = len(pixels) if pairs is None else len(pairs)
    scale = cfg.start_scale(items)
    alpha0 = init_coefficients(zs, L, cfg.init, cfg.start_temperature, mix_zs, scale)
    tuned = tuned_layers(merger.layers, cfg.tune).to(device)
    alpha0[:, ~tuned.cpu()] = 1.0 / n  # the shared, user-independent value of the layers not tuned
    if cfg.layer_agnostic:
        alpha0 = alpha0[:, 0].clone()
    # A copy: on the CPU .to() would share alpha0's storage, and the optimizer's in-place updates
    # would then move the recorded start (and the anchor's target) along with α.
    alpha = torch.nn.Parameter(alpha0.clone().to(device))
    if not cfg.layer_agnostic and not bool(tuned.all()):
        alpha.register_hook(lambda g: g * tuned)  # Adam moves a coefficient whose gradient is always 0 by 0
    start = alpha0.to(device)
    opt = torch.optim.Adam([alpha], lr=cfg.lr, weight_decay=0.0)
    x_all = pixels.to(device)
    if pairs is None:
        y_raw = torch.as_tensor(scores, dtype=torch.float32, device=device)
        template = merger.model.template
        lo, hi = float(template[0]), float(template[-1])
        y_mse = lo + (hi - lo) * (y_raw - y_raw.min()) / (y_raw.max() - y_raw.min())  # user scale → template scale
    else:
        pair_t = torch.as_tensor(pairs, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, items)
    exact = cfg.tol > 0 and batch == items  # each step's loss is the objective itself
    best, stale, stopped, best_alpha = math.inf, 0, None, None
    losses: list[float] = []
    before = metric(merger.predict(alpha.detach(), pixels))
    started = time.time()
    alpha_at: dict[int, torch.Tensor] = {}
    last = max(checkpoints) if checkpoints else cfg.steps
    bar = progress_bar(range(last), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        if step in checkpoints:
            alpha_at[step] = _full(alpha.detach(), cfg, n, L)
        if on_step:
            on_step(1)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.lr_end)
        if pairs is None:
            idx = torch.randperm(len(x_all), generator=gen)[:batch].to(device)
            pred = merger.forward(merger.state(alpha), x_all[idx]).float()
            loss = bradley_terry_loss(pred, y_raw[idx]) if cfg.loss == "bt" else mse_loss(pred, y_mse[idx], hi - lo)
        else:  # a batch of the given pairs, each image run once
            chosen = pair_t[torch.randperm(len(pair_t), generator=gen)[:batch].to(device)]
            used, where = torch.unique(chosen, return_inverse=True)
            pred = merger.forward(merger.state(alpha), x_all[used]).float()
            loss = torch.nn.functional.softplus(-(pred[where[:, 0]] - pred[where[:, 1]])).mean()
        if loss is None:  # every image in this batch has the same score: no pair to learn from
            continue
        if cfg.anchor:
            loss = loss + anchor_penalty(alpha, start, cfg.anchor, items, cfg.anchor_power)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        if exact:
            stale = stale + 1 if losses[-1] > best - cfg.tol else 0
            if losses[-1] < best:  # this loss is the objective at α before the step: keep that α
                best, best_alpha = losses[-1], alpha.detach().clone()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}", refresh=False)
        if exact and stale >= cfg.patience and step + 1 < last:
            # A stiff anchor (a few ratings weigh it hundreds of times) can leave Adam circling above
            # the start's loss; a fit that stops returns the best α it measured, never a worse one.
            stopped = step + 1
            alpha.data.copy_(best_alpha)
            break
    alpha_full = _full(alpha.detach(), cfg, n, L)
    reached = last if stopped is None else stopped
    alpha_at.update({s: alpha_full for s in checkpoints if s >= reached})  # a converged α stays where it is
    if on_step and reached < last:
        on_step(last - reached)
    after = metric(merger.predict(alpha_full, pixels))
    return {
        "alpha": alpha_full,
        "alpha_at": alpha_at,
        "alpha_init": _full(alpha0, cfg, n, L),
        "zero_shot_srocc": zs,
        **({"mix_srocc": mix_zs} if mix_zs is not None else {}),
        "start_scale": scale,
        "anchor_weight": cfg.anchor_weight(items) if cfg.anchor else 0.0,
        "support_srocc_before": before,
        "support_srocc_after": after,
        "loss_curve": {**_curve(losses), **({"converged_at": stopped} if stopped is not None else {})},
        "tuned": tuned.cpu(),
        "seconds": round(time.time() - started, 2),
    }


def _full(alpha: torch.Tensor, cfg: LearnConfig, n: int, L: int) -> torch.Tensor:
    """A copy of α as the [n, L] matrix a profile stores, on the CPU (a copy: the optimizer goes on
    updating α in place)."""
    if cfg.layer_agnostic:
        alpha = alpha[:, None].expand(n, L)
    return alpha.detach().float().cpu().clone().contiguous()


def fold_plan(n_img: int, cfg: LearnConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) image indices of each of ``cfg.folds`` folds (at most one per image), drawn
    from ``cfg.seed``."""
    k = min(cfg.folds, n_img)
    fold = np.random.default_rng([cfg.seed, n_img]).permutation(n_img) % k
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def fold_fits(merger: Merger, pixels: torch.Tensor, scores: np.ndarray, cfg: LearnConfig,
              task_preds: np.ndarray | None = None, steps: tuple[int, ...] | None = None,
              on_step: Callable[[int], Any] | None = None,
              mix_preds: np.ndarray | None = None, processes: int = 1) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """The recipe ``cfg`` fitted once per fold (``fold_plan``) on the other folds, each with its start
    taken from the images it trains on: (held-out indices, the fit, with ``alpha_at`` at each of
    ``steps``, default ``cfg.steps``), the fits run as ``run_jobs`` runs them."""
    steps = tuple(steps) if steps else (cfg.steps,)
    task_preds, mix_preds = start_predictions(merger, pixels, cfg, task_preds, mix_preds)  # once for every fold
    plan = fold_plan(len(scores), cfg)
    fits = run_jobs(_fold_jobs(merger, pixels, scores, cfg, task_preds, mix_preds, plan, steps), processes, on_step)
    return _held_out(plan, fits)


def _fold_jobs(merger: Merger, pixels: torch.Tensor, scores: np.ndarray, cfg: LearnConfig, task_preds: np.ndarray,
               mix_preds: np.ndarray | None, plan: list[tuple[np.ndarray, np.ndarray]],
               steps: tuple[int, ...]) -> list[Callable[..., dict[str, Any]]]:
    """One ``run_jobs`` job per fold of ``plan``: ``fit`` on its training images, with ``alpha_at`` at ``steps``."""
    return [functools.partial(fit, merger, pixels[train], scores[train], cfg, task_preds=task_preds[:, train],
                              checkpoints=steps, mix_preds=None if mix_preds is None else mix_preds[:, train])
            for train, _ in plan]


def _held_out(plan: list[tuple[np.ndarray, np.ndarray]], fits: list[dict[str, Any]]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """(held-out indices, fit) per fold; fits beyond the plan's (a final fit run with them) are left out."""
    return [(held, r) for (_, held), r in zip(plan, fits)]


def out_of_fold(merger: Merger, pixels: torch.Tensor, scores: np.ndarray, cfg: LearnConfig,
                task_preds: np.ndarray | None = None, steps: tuple[int, ...] | None = None,
                on_step: Callable[[int], Any] | None = None, mix_preds: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Each support image's score by a fit on the other folds (``fold_fits``), at each step count in
    ``steps`` (default: ``cfg.steps``); {steps: [N] predictions}."""
    steps = tuple(steps) if steps else (cfg.steps,)
    return oof_predictions(merger, pixels, fold_fits(merger, pixels, scores, cfg, task_preds, steps, on_step, mix_preds),
                           steps)


def oof_predictions(merger: Merger, pixels: torch.Tensor, fits: list[tuple[np.ndarray, dict[str, Any]]],
                    steps: tuple[int, ...]) -> dict[int, np.ndarray]:
    """{steps: each image's score by the fold fit that left it out, at that step count}."""
    oof = {s: np.zeros(len(pixels)) for s in steps}
    for held, r in fits:
        for s in steps:
            oof[s][held] = merger.predict(r["alpha_at"][s], pixels[held])
    return oof


def fit_recipe(merger: Merger, pixels: torch.Tensor, scores: np.ndarray | None, cfg: LearnConfig,
               task_preds: np.ndarray | None = None, pairs: np.ndarray | None = None, progress: bool = False,
               desc: str = "learn", on_step: Callable[[int], Any] | None = None,
               mix_preds: np.ndarray | None = None, processes: int = 1) -> dict[str, Any]:
    """``fit``, plus what the recipe adds from the support set itself when it has ratings: out-of-fold
    predictions (``out_of_fold``) choose the step count among ``cfg.steps_from`` and fit the calibration
    (``calibration``, a ``Calibration``). Also returns ``oof`` (the chosen step's out-of-fold scores),
    ``oof_srocc`` per candidate, ``steps_chosen`` and ``folds`` (how many fits made them).

    ``processes`` > 1 runs the fold fits, and the final fit when it does not wait for their choice of
    steps, side by side (``run_jobs``): the same results, sooner."""
    if pairs is not None or not cfg.uses_folds:
        return fit(merger, pixels, scores, cfg, progress=progress, task_preds=task_preds, desc=desc,
                   on_step=on_step, pairs=pairs, mix_preds=mix_preds)
    started = time.time()
    task_preds, mix_preds = start_predictions(merger, pixels, cfg, task_preds, mix_preds, progress and on_step is None)
    candidates = cfg.steps_from or (cfg.steps,)
    plan = fold_plan(len(scores), cfg)
    jobs = _fold_jobs(merger, pixels, scores, cfg, task_preds, mix_preds, plan, candidates)
    final = functools.partial(fit, merger, pixels, scores, cfg, task_preds=task_preds, mix_preds=mix_preds)
    together = processes > 1 and len(candidates) == 1  # the final fit's steps are known before the folds end
    if together:
        jobs.append(functools.partial(final, checkpoints=candidates))
    total = len(plan) * max(candidates) + (cfg.steps if together else 0)
    how = f", {min(processes, len(jobs))} at once" if processes > 1 else " out of fold"
    bar = progress_bar(total=total, desc=f"{desc}: {len(jobs)} fits{how}", unit="step",
                       disable=not progress or on_step is not None, leave=False)
    fits = run_jobs(jobs, processes, on_step or bar.update)
    bar.close()
    oof = oof_predictions(merger, pixels, _held_out(plan, fits), candidates)
    cv = {s: srocc(scores, oof[s]) for s in candidates}
    chosen = max(candidates, key=lambda s: (cv[s], -s))  # a tie goes to fewer steps
    r = fits[-1] if together else final(progress=progress, desc=desc, on_step=on_step, checkpoints=(chosen,))
    r.update(oof=oof[chosen], oof_srocc={str(s): v for s, v in cv.items()}, steps_chosen=chosen, folds=len(plan),
             seconds=round(time.time() - started, 2))  # the out-of-fold fits included
    if cfg.calibration != "none":
        r["calibration"] = fit_calibration(oof[chosen], scores, cfg.calibration)
    return r


def _curve(losses: list[float]) -> dict[str, Any]:
    if not losses:
        return {"steps": 0}
    every = max(1, len(losses) // 20)
    return {"steps": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses),
            "mean_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "every": every, "values": [float(np.mean(losses[i:i + every])) for i in range(0, len(losses), every)]}


def learn_device(cfg: LearnConfig) -> torch.device:
    return pick_device(cfg.device)

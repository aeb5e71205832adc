"""Phase 2's recipe: a fit of one support set (``fit``: the paper's backprop or the linearised fit, as
``LearnConfig.fit`` says), plus what the support set tells about the fit itself when it holds ratings:
out-of-fold fits, each on all folds but one, whose predictions on the fold left out fit the
calibration (``calibrate``), the map from score to the user's rating scale; and the same for many
support sets at once (``fit_recipes``).

The default start and recipe, and why, are in ``recipe.LearnConfig``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from .calibrate import fit_calibration
from .fit import Fit, backprop
from .linearised import fit_linear
from .jobs import run_jobs
from .log import progress_bar
from .merger import Merger
from .devices import pick_device
from .objective import Scored, Support
from .recipe import LearnConfig
from .start import Start, starting_point, tuned_layers


def fit(merger: Merger, support: Support, cfg: LearnConfig, progress: bool = False,
        task_preds: np.ndarray | None = None, desc: str = "learn", on_step: Callable[[int], Any] | None = None) -> Fit:
    """Learn α on one support set (``Scored`` ratings or ``Paired`` answers) as ``cfg.fit`` says.

    ``on_step(k)`` is told of each k steps done (an outer progress bar). ``task_preds``: the task
    models' predictions on the support's images, computed here when not given.
    """
    if task_preds is None:
        task_preds = merger.task_predictions(support.pixels)
    merger, (support,) = on_trunk(merger, [support], cfg)
    start = starting_point(merger, support, cfg, task_preds)
    if cfg.fit == "linear":
        return fit_linear(merger, [support], cfg, [start], progress=progress, desc=desc, on_step=on_step)[0]
    return backprop(merger, support, cfg, start, progress, desc, on_step)


def on_trunk(merger: Merger, supports: list[Support], cfg: LearnConfig,
             keys: list[list[str]] | None = None) -> tuple[Merger, list[Support]]:
    """Where ``cfg`` learns only the top of the network (``--tune top-N`` or ``head``): the merger from
    the first tuned stage (``Merger.above``) and the supports with their images' features there in
    place of the images, computed once for every step and fold, and with ``keys`` (one name per image
    of each support) once per distinct image. Otherwise (or already so) as given. The task models'
    predictions need the images: take them first."""
    split = 0 if merger.split or cfg.tune == "all" else merger.split_for(tuned_layers(merger.layers, cfg.tune))
    if not split:
        return merger, supports
    if keys is None:
        return merger.above(split), [replace(s, pixels=merger.trunk(s.pixels, split)) for s in supports]
    pixels, columns = _distinct(supports, keys)
    features = merger.trunk(pixels, split)
    return merger.above(split), [replace(s, pixels=features[c]) for s, c in zip(supports, columns)]


def shared_task_predictions(merger: Merger, supports: list[Support], keys: list[list[str]]) -> list[np.ndarray]:
    """Each support set's task-model predictions ([n, N] each, as ``Merger.task_predictions``), every
    distinct image (``keys``: one name per image of each support) predicted once, however many support
    sets hold it: users who rated images of one pool share their start's passes."""
    pixels, columns = _distinct(supports, keys)
    preds = merger.task_predictions(pixels)
    return [preds[:, c] for c in columns]


def _distinct(supports: list[Support], keys: list[list[str]]) -> tuple[torch.Tensor, list[list[int]]]:
    """The supports' distinct images (by key), stacked, and where each support's images are in them."""
    first: dict[str, tuple[int, int]] = {}
    for i, ks in enumerate(keys):
        for j, k in enumerate(ks):
            first.setdefault(k, (i, j))
    column = {k: c for c, k in enumerate(first)}
    pixels = torch.stack([supports[i].pixels[j] for i, j in first.values()])
    return pixels, [[column[k] for k in ks] for ks in keys]


def fold_plan(n_img: int, cfg: LearnConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) image indices of each of ``cfg.folds`` folds (at most one per image), drawn
    from ``cfg.seed``."""
    k = min(cfg.folds, n_img)
    fold = np.random.default_rng([cfg.seed, n_img]).permutation(n_img) % k
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def fold_fits(merger: Merger, support: Scored, cfg: LearnConfig, task_preds: np.ndarray | None = None,
              on_step: Callable[[int], Any] | None = None, processes: int = 1,
              final: Fit | None = None) -> list[tuple[np.ndarray, Fit]]:
    """The recipe ``cfg`` fitted once per fold (``fold_plan``) on the other folds, each with its start
    taken from the images it trains on: (held-out indices, the fit).

    With fit "linear" and the ``final`` fit on all the images given, each fold fit steps on the final
    fit's expansions restricted to its own images (``linearised.fit_linear``'s replay) and costs no pass
    through the model; otherwise the fits run as ``run_jobs`` runs them. A replayed fold fit is
    expanded at points the final fit reached with the held-out images in its loss; its held-out
    predictions are the real model's at the fold's own α."""
    if task_preds is None:
        task_preds = merger.task_predictions(support.pixels)  # once for every fold
    merger, (support,) = on_trunk(merger, [support], cfg)
    plan = fold_plan(support.items, cfg)
    if final is not None and final.linearisations:
        subsets, starts, replays = _replayed_folds(merger, support, cfg, task_preds, final, plan)
        fits = fit_linear(merger, subsets, cfg, starts, replays, measure=False, on_step=on_step)
    else:
        fits = run_jobs(_fold_jobs(merger, support, cfg, task_preds, plan), processes, on_step)
    return [(held, r) for (_, held), r in zip(plan, fits)]


def _replayed_folds(merger: Merger, support: Scored, cfg: LearnConfig, task_preds: np.ndarray, final: Fit,
                    plan: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Scored], list[Start], list[tuple]]:
    """For ``fit_linear``, each fold of ``plan``: its training images, its start (chosen on them) and
    the ``final`` fit's expansions restricted to them, to replay."""
    subsets = [support.subset(train) for train, _ in plan]
    starts = [starting_point(merger, sub, cfg, task_preds[:, train]) for sub, (train, _) in zip(subsets, plan)]
    return subsets, starts, [tuple(lin.take(train) for lin in final.linearisations) for train, _ in plan]


def _fold_jobs(merger: Merger, support: Scored, cfg: LearnConfig, task_preds: np.ndarray,
               plan: list[tuple[np.ndarray, np.ndarray]]) -> list[Callable[..., Fit]]:
    """One ``run_jobs`` job per fold of ``plan``: ``fit`` on its training images."""
    return [functools.partial(fit, merger, support.subset(train), cfg, task_preds=task_preds[:, train])
            for train, _ in plan]


def oof_predictions(merger: Merger, pixels: torch.Tensor, fits: list[tuple[np.ndarray, Fit]]) -> np.ndarray:
    """Each image's score by the fold fit that left it out."""
    oof = np.zeros(len(pixels))
    for held, r in fits:
        oof[held] = merger.predict(r.alpha, pixels[held])
    return oof


def fit_recipe(merger: Merger, support: Support, cfg: LearnConfig, task_preds: np.ndarray | None = None,
               progress: bool = False, desc: str = "learn", on_step: Callable[[int], Any] | None = None,
               processes: int = 1) -> Fit:
    """``fit``, plus, on a support set of ratings with a calibration, the out-of-fold fits
    (``fold_fits``) and the calibration fitted on their predictions: the ``Fit`` has ``oof``,
    ``oof_srocc``, ``folds`` and ``calibration``.

    ``processes`` > 1 runs the backprop fits (fold fits and the final fit) side by side (``run_jobs``):
    the same results, sooner. A linear fit's folds replay the final fit's expansions and run here."""
    if cfg.fit == "linear":
        return fit_recipes(merger, [support], cfg, None if task_preds is None else [task_preds], progress, desc,
                           on_step)[0]
    if not isinstance(support, Scored) or not cfg.uses_folds:
        return fit(merger, support, cfg, progress=progress, task_preds=task_preds, desc=desc, on_step=on_step)
    started = time.time()
    if task_preds is None:
        task_preds = merger.task_predictions(support.pixels)
    merger, (support,) = on_trunk(merger, [support], cfg)
    plan = fold_plan(support.items, cfg)
    final = functools.partial(fit, merger, support, cfg, task_preds=task_preds)
    bar = progress_bar(total=(len(plan) + 1) * cfg.steps, desc=f"{desc}: {len(plan) + 1} fits", unit="step",
                       disable=not progress or on_step is not None, leave=False)
    jobs = _fold_jobs(merger, support, cfg, task_preds, plan)
    together = processes > 1
    if together:
        jobs.append(final)
    fits = run_jobs(jobs, processes, on_step or bar.update)
    r = fits[-1] if together else final(progress=progress, desc=desc, on_step=on_step or bar.update)
    bar.close()
    return _calibrated(merger, support, cfg, r, [(held, f) for (_, held), f in zip(plan, fits)], started)


def fit_recipes(merger: Merger, supports: list[Support], cfg: LearnConfig, task_preds: list[np.ndarray] | None = None,
                progress: bool = False, desc: str = "learn", on_step: Callable[[int], Any] | None = None) -> list[Fit]:
    """``fit_recipe`` of fit "linear" on many support sets at once (``linearised.fit_linear``): their final
    fits side by side, then the out-of-fold fits of all of them, replaying each one's final fit, side by
    side. Each gets what it would alone."""
    started = time.time()
    preds = task_preds or [merger.task_predictions(s.pixels) for s in supports]
    merger, supports = on_trunk(merger, supports, cfg)
    starts = [starting_point(merger, s, cfg, p) for s, p in zip(supports, preds)]
    finals = fit_linear(merger, supports, cfg, starts, progress=progress, desc=desc, on_step=on_step)
    rated = [i for i, s in enumerate(supports) if isinstance(s, Scored) and cfg.uses_folds]
    if not rated:
        return finals
    subsets, fold_starts, replays, owners = [], [], [], []
    for i in rated:
        plan = fold_plan(supports[i].items, cfg)
        for part, more in zip((subsets, fold_starts, replays),
                              _replayed_folds(merger, supports[i], cfg, preds[i], finals[i], plan)):
            part += more
        owners += [(i, held) for _, held in plan]
    folds = fit_linear(merger, subsets, cfg, fold_starts, replays, measure=False, on_step=on_step)
    out = list(finals)
    for i in rated:
        mine = [(held, f) for (o, held), f in zip(owners, folds) if o == i]
        out[i] = _calibrated(merger, supports[i], cfg, finals[i], mine, started)
    return out


def _calibrated(merger: Merger, support: Scored, cfg: LearnConfig, final: Fit, folds: list[tuple[np.ndarray, Fit]],
                started: float) -> Fit:
    """``final`` with the out-of-fold predictions of ``folds`` and the calibration fitted on them."""
    oof = oof_predictions(merger, support.pixels, folds)
    return replace(final, oof=oof, oof_srocc=support.metric(oof), folds=len(folds),
                   calibration=fit_calibration(oof, support.scores, cfg.calibration),
                   seconds=round(time.time() - started, 2))  # the out-of-fold fits included


def learn_device(cfg: LearnConfig) -> torch.device:
    return pick_device(cfg.device)

"""The paper's evaluation protocol (section 4.4): per user, K support images, test on the rest.

For a pairs file the same protocol runs over answered pairs: K support pairs, test on the others, with
the pair agreement (2·fraction ordered the user's way − 1) in place of SROCC (the field keeps its name).

For each user and each K in ``shots``, ``trials`` random support sets are drawn (seeded; every method
sees the same split), each method is fitted on the support set only, and its SROCC on the user's
remaining images is recorded at the final step (never the best step on the test set). Reported per
method and K: the mean over users of the test SROCC, and its standard deviation over trials.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bank import Bank
from .errors import LaionfilterError
from .calibrate import fit_calibration
from .jobs import fit_processes, learning_threads, run_jobs
from .learn import fit_recipe
from .merger import Merger
from .objective import Paired, Scored, pair_agreement
from .log import note, progress_bar
from .metrics import ranks_anything, srocc
from .devices import pick_device
from .model import eval_transform
from .ratings import UserRatings, read_ratings
from .recipe import CALIBRATIONS, LearnConfig

ZERO_SHOT = "zero-shot ensemble"
SELECTIONS = ("random", "active", "active+fit")
BEST_SINGLE = "best single task"


def paper_recipe(base: LearnConfig) -> LearnConfig:
    """The paper's recipe with ``base``'s steps, seed and device: the adaptive start, and every step
    through the model (fit "backprop"); uncalibrated, as the paper has it."""
    return replace(base, init="adaptive", fit="backprop", calibration="none")


# Every method ``evaluate`` knows, by the name its tables use: each makes the method from the recipe
# the run is based on (its steps, seed, device): a LearnConfig (learned coefficients), or a zero-shot
# baseline's name. ``laionfilter evaluate --methods`` and the benchmarks choose from these.
METHODS: dict[str, Callable[[LearnConfig], LearnConfig | str]] = {
    ZERO_SHOT: lambda base: ZERO_SHOT,
    BEST_SINGLE: lambda base: BEST_SINGLE,
    "merged at init (0 steps)": lambda base: replace(paper_recipe(base), steps=0),
    "the paper's recipe": paper_recipe,
    "uniform init": lambda base: replace(paper_recipe(base), init="uniform"),
    "best-fit init": lambda base: replace(paper_recipe(base), init="best-fit"),
    "layer-agnostic": lambda base: replace(paper_recipe(base), layer_agnostic=True),
    "MSE loss": lambda base: replace(paper_recipe(base), loss="mse"),
    "the default": lambda base: base,
    # the linearised fit refreshed every --refresh steps only, as first measured (the default adds --drift)
    "the linear fit": lambda base: replace(base, fit="linear", drift=0.0),
}


def methods_named(base: LearnConfig, names: list[str] | None = None) -> dict[str, LearnConfig | str]:
    """``METHODS`` (all, or those ``names``) made from ``base``; a clear error for a name it lacks."""
    names = list(METHODS) if names is None else names
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise LaionfilterError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from "
                               f"{', '.join(map(repr, METHODS))}")
    return {n: METHODS[n](base) for n in names}


def tune_methods(base: LearnConfig, tunes: list[str]) -> dict[str, LearnConfig | str]:
    """The zero-shot baselines and ``base`` (the default recipe) learned with each ``--tune`` value."""
    return {**methods_named(base, [ZERO_SHOT, BEST_SINGLE]),
            **{f"the default, tune {t}": replace(base, tune=t, calibration="none") for t in tunes}}


def evaluate(table: str | os.PathLike, bank: Bank, shots: tuple[int, ...] = (10, 100), trials: int = 10,
             methods: dict[str, LearnConfig | str] | None = None, seed: int = 0, device: str = "auto",
             progress: bool = True, min_test: int = 10, threads: int | None = None,
             jobs: int | None = None) -> dict[str, Any]:
    """Run the protocol; returns every number (per user, trial, K and method) plus the summary.
    ``jobs`` splits run at once (default: see ``jobs.fit_processes``); the numbers are the same."""
    dev = pick_device(device)
    with learning_threads(bank, threads):
        methods = methods or methods_named(LearnConfig(device=str(dev)))
        supports = read_ratings(table, eval_transform(bank.architecture)).supports
        merger = Merger(bank, dev)
        processes = fit_processes(merger, jobs)
        size = lambda sup: len(sup.scores) if sup.pairs is None else len(sup.pairs)  # noqa: E731 (images or pairs)
        splits = []
        for u_index, sup in enumerate(progress_bar(supports, desc="task predictions", unit="user", leave=False,
                                                   disable=not progress)):
            task_preds = merger.task_predictions(sup.pixels)  # [n, N], shared by every split and method
            what = "images" if sup.pairs is None else "pairs"
            for k in shots:
                if size(sup) - k < min_test:
                    note(f"user {sup.user!r}: {size(sup)} {what}, too few for {k} shots plus {min_test} test {what}; skipped")
                    continue
                planned = sum(_steps(m, k, sup.pairs is None) for m in methods.values())
                splits += [PlannedJob(planned, split_runs, (merger, sup, u_index, k, trial, methods, seed, task_preds))
                           for trial in range(trials)]
        runs = run_planned(splits, processes, progress, desc="evaluate", unit="step")
        if not runs:
            raise LaionfilterError(f"{table}: no user has enough images for shots {shots}")
        return {"table": str(table), "bank": {"path": str(bank.path), "fingerprint": bank.fingerprint},
                "shots": list(shots), "trials": trials, "seed": seed,
                "methods": {k: (v if isinstance(v, str) else v.to_json()) for k, v in methods.items()},
                "summary": summarise(runs), "runs": runs}


def support_split(n_items: int, seed: int, u_index: int, k: int, trial: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A split of the protocol, seeded by its four numbers alone: the K support items, the rest (the
    test set), and the seed of the methods' batch order (one for every method in the split)."""
    rng = np.random.default_rng([seed, u_index, k, trial])
    perm = rng.permutation(n_items)
    return np.sort(perm[:k]), np.sort(perm[k:]), int(rng.integers(2**31))


def split_runs(merger: Merger, sup: UserRatings, u_index: int, k: int, trial: int,
               methods: dict[str, LearnConfig | str], seed: int, task_preds: np.ndarray,
               on_step: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """One split of the protocol: user ``sup`` (the ``u_index``-th of its table), K support items drawn
    for ``trial`` (seeded by those four numbers alone, so that any subset of splits can run anywhere and
    give the same numbers), every method fitted on them and scored on the rest. Empty when the split
    cannot be learned from (a single score among the support images)."""
    n_items = len(sup.scores) if sup.pairs is None else len(sup.pairs)
    sup_idx, test_idx, trial_seed = support_split(n_items, seed, u_index, k, trial)
    if sup.pairs is None:  # K rated images; the rest are the test set
        y_sup = sup.scores[sup_idx]
        if not ranks_anything(y_sup):
            note(f"user {sup.user!r} trial {trial}: {k} support images with a single score; skipped")
            return []
        on_support = lambda pred: srocc(y_sup, pred[sup_idx])  # noqa: E731
        on_test = lambda pred: srocc(sup.scores[test_idx], pred[test_idx])  # noqa: E731
        support, support_preds = Scored(sup.pixels[sup_idx], y_sup), task_preds[:, sup_idx]
    else:  # K answered pairs; the other pairs are the test set, agreement in place of SROCC
        on_support = lambda pred: pair_agreement(sup.pairs[sup_idx], pred)  # noqa: E731
        on_test = lambda pred: pair_agreement(sup.pairs[test_idx], pred)  # noqa: E731
        support, support_preds = Paired(sup.pixels, sup.pairs[sup_idx]), task_preds
    zs = [on_support(p) for p in task_preds]
    runs = []
    for name, method in methods.items():
        r = None  # a learned method's Fit
        if method == ZERO_SHOT:
            pred = task_preds.mean(axis=0)
        elif method == BEST_SINGLE:
            pred = task_preds[int(np.argmax(zs))]
        else:
            r = fit_recipe(merger, support, replace(method, seed=trial_seed), task_preds=support_preds, on_step=on_step)
            pred = merger.predict(r.alpha, sup.pixels)
        run = {"user": sup.user, "shots": k, "trial": trial, "method": name, "srocc": on_test(pred)}
        if r is not None and r.oof is not None:
            run["mae"] = rating_errors(r.oof, support.scores, pred[test_idx], sup.scores[test_idx])
        runs.append(run)
    return runs


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class PlannedJob:
    """``run(*args, on_step=...)`` as a ``jobs.run_jobs`` job that moves a progress bar by ``planned``
    in all: by each step ``run`` reports, then by what it did not take (a fit that stopped early, a
    split skipped)."""
    planned: int
    run: Callable[..., list[dict[str, Any]]]
    args: tuple[Any, ...]

    def __call__(self, on_step: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
        done = 0

        def step(k: int) -> None:
            nonlocal done
            done += k
            if on_step:
                on_step(k)
        out = self.run(*self.args, on_step=step)
        if on_step and self.planned > done:
            on_step(self.planned - done)
        return out


def run_planned(jobs: list[PlannedJob], processes: int, progress: bool, desc: str,
                unit: str) -> list[dict[str, Any]]:
    """``PlannedJob``s run by ``jobs.run_jobs`` under one progress bar; their runs, in order."""
    bar = progress_bar(total=sum(j.planned for j in jobs), desc=desc, unit=unit, disable=not progress)
    runs = [run for done in run_jobs(jobs, processes, bar.update) for run in done]
    bar.close()
    return runs


def _steps(method: LearnConfig | str, k: int, scored: bool) -> int:
    """What the progress bar counts for one method on one split of K: its learning steps, out-of-fold
    fits included (a baseline or a 0-step fit counts one)."""
    if not isinstance(method, LearnConfig):
        return 1
    folds = min(method.folds, k) if scored and method.uses_folds else 0
    return max(1, method.steps * (folds + 1))


def rating_errors(oof: np.ndarray, y_support: np.ndarray, pred_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Mean absolute error of ratings on the test images: each calibration kind fitted on the support
    set's out-of-fold scores, and two baselines: the test scores' min–max mapped onto the support set's
    rating range, and the support set's mean rating for every image."""
    out = {kind: float(np.mean(np.abs(fit_calibration(oof, y_support, kind)(pred_test) - y_test))) for kind in CALIBRATIONS}
    low, high, span = y_support.min(), y_support.max(), np.ptp(pred_test)
    minmax = low + (high - low) * (pred_test - pred_test.min()) / span if span > 0 else np.full_like(pred_test, (low + high) / 2)
    out["min-max"] = float(np.mean(np.abs(minmax - y_test)))
    out["support mean"] = float(np.mean(np.abs(y_support.mean() - y_test)))
    return out


def evaluate_selection(table: str | os.PathLike, bank: Bank, shots: tuple[int, ...] = (10,), trials: int = 3,
                       recipe: LearnConfig | None = None, selections: tuple[str, ...] = ("random", "active"),
                       seed: int = 0, device: str = "auto", progress: bool = True, threads: int | None = None,
                       jobs: int | None = None) -> dict[str, Any]:
    """Which images to rate: per user and trial, the images are split once into a pool and a test half;
    each selection picks K from the pool (``random``; ``active``: ``suggest.select_active`` on the task
    models' predictions, seeing no score; ``active+fit``: half of K so, then the rest where fits of
    those first ratings disagree, ``suggest.fit_predictions``, as a user rating in two rounds would),
    the same recipe is fitted on them, and SROCC is taken on the same test images. ``jobs``: as for
    ``evaluate``."""
    dev = pick_device(device)
    recipe = recipe or LearnConfig(device=str(dev))
    unknown = set(selections) - set(SELECTIONS)
    if unknown:
        raise LaionfilterError(f"--select: unknown selection(s) {', '.join(sorted(unknown))}; use {', '.join(SELECTIONS)}")
    with learning_threads(bank, threads):
        supports = read_ratings(table, eval_transform(bank.architecture)).supports
        merger = Merger(bank, dev)
        processes = fit_processes(merger, jobs)
        units = []
        for u_index, sup in enumerate(progress_bar(supports, desc="task predictions", unit="user", leave=False,
                                                   disable=not progress)):
            if sup.scores is None:
                raise LaionfilterError(f"{table}: selection is evaluated on scored images, not pairs")
            task_preds = merger.task_predictions(sup.pixels)
            units += [PlannedJob(len(selections), selection_runs, (merger, sup, u_index, trial, k, selections, recipe,
                                                                  seed, task_preds)) for trial in range(trials) for k in shots]
        runs = run_planned(units, processes, progress, desc="evaluate selection", unit="fit")
    if not runs:
        raise LaionfilterError(f"{table}: no user has enough images for shots {shots}")
    return {"table": str(table), "bank": {"path": str(bank.path), "fingerprint": bank.fingerprint},
            "shots": list(shots), "trials": trials, "seed": seed, "recipe": recipe.to_json(),
            "methods": {s: s for s in selections}, "summary": summarise(runs), "runs": runs}


def selection_runs(merger: Merger, sup: UserRatings, u_index: int, trial: int, k: int,
                   selections: tuple[str, ...], recipe: LearnConfig, seed: int, task_preds: np.ndarray,
                   on_step: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """One user, trial and K of ``evaluate_selection`` (seeded by those numbers alone, like ``split_runs``);
    ``on_step(1)`` after each selection's fit."""
    from .suggest import can_fit, fit_predictions, select_active

    rng = np.random.default_rng([seed, u_index, trial])
    perm = rng.permutation(len(sup.scores))
    pool, test = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    if k > len(pool):
        note(f"user {sup.user!r}: a pool of {len(pool)} images is too small for {k} shots; skipped")
        return []
    runs = []
    cfg = replace(recipe, seed=seed + trial, calibration="none")
    for sel in selections:
        if sel == "random":
            picked = np.sort(np.random.default_rng([seed, u_index, trial, k]).choice(pool, k, replace=False))
        elif sel == "active":
            picked = pool[select_active(task_preds[:, pool], k)]
        else:  # active+fit: two rounds, the second chosen by the first's fit
            first = select_active(task_preds[:, pool], k // 2)
            y = sup.scores[pool[first]]
            preds = (fit_predictions(merger, Scored(sup.pixels[pool[first]], y), cfg, sup.pixels[pool]) if can_fit(y)
                     else task_preds[:, pool])
            picked = np.sort(pool[first + select_active(preds, k - len(first), rated=first)])
        r = fit_recipe(merger, Scored(sup.pixels[picked], sup.scores[picked]), cfg, task_preds=task_preds[:, picked])
        pred = merger.predict(r.alpha, sup.pixels[test])
        runs.append({"user": sup.user, "shots": k, "trial": trial, "method": sel, "srocc": srocc(sup.scores[test], pred)})
        if on_step:
            on_step(1)
    return runs


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and K: mean over users per trial, then mean and std of that over trials (of the test
    SROCC, and of each rating error where the runs have them)."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for name in methods:
        for k in sorted({r["shots"] for r in runs}):
            rows = [r for r in runs if r["method"] == name and r["shots"] == k]
            if not rows:
                continue
            trials = sorted({r["trial"] for r in rows})
            per_trial = [np.mean([r["srocc"] for r in rows if r["trial"] == t]) for t in trials]
            users = sorted({r["user"] for r in rows})
            entry = {"method": name, "shots": k, "mean": float(np.mean(per_trial)),
                     "std_over_trials": float(np.std(per_trial)), "users": len(users), "trials": len(per_trial),
                     "per_user": {u: float(np.mean([r["srocc"] for r in rows if r["user"] == u])) for u in users}}
            if all("mae" in r for r in rows):
                kinds = list(rows[0]["mae"])
                mae_per_trial = {c: [np.mean([r["mae"][c] for r in rows if r["trial"] == t]) for t in trials] for c in kinds}
                entry["mae"] = {c: float(np.mean(v)) for c, v in mae_per_trial.items()}
                entry["mae_std_over_trials"] = {c: float(np.std(v)) for c, v in mae_per_trial.items()}
            out.append(entry)
    return out


def markdown_table(result: dict[str, Any]) -> str:
    shots = result["shots"]
    head = "| method | " + " | ".join(f"{k}-shot SROCC" for k in shots) + " |"
    lines = [head, "|---|" + "---|" * len(shots)]
    for name in result["methods"]:
        cells = []
        for k in shots:
            s = next((x for x in result["summary"] if x["method"] == name and x["shots"] == k), None)
            cells.append(f"{s['mean']:.3f} ± {s['std_over_trials']:.3f}" if s else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rated = [x for x in result["summary"] if "mae" in x]
    if rated:
        kinds = list(rated[0]["mae"])
        lines += ["", "Rating MAE on the test images (calibrations fitted on out-of-fold scores; baselines):", "",
                  "| method | K | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        lines += [f"| {x['method']} | {x['shots']} | " + " | ".join(f"{x['mae'][c]:.3f} ± {x['mae_std_over_trials'][c]:.3f}"
                                                                 for c in kinds) + " |" for x in rated]
    return "\n".join(lines)


def plot_per_user(result: dict[str, Any], out: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = result["shots"]
    fig, axes = plt.subplots(1, len(shots), figsize=(7 * len(shots), 4.5), squeeze=False)
    for ax, k in zip(axes[0], shots):
        rows = [s for s in result["summary"] if s["shots"] == k]
        users = sorted({u for s in rows for u in s["per_user"]})
        width = 0.8 / max(1, len(rows))
        for j, s in enumerate(rows):
            ax.bar(np.arange(len(users)) + j * width, [s["per_user"].get(u, np.nan) for u in users], width, label=s["method"])
        ax.set_xticks(np.arange(len(users)) + 0.4 - width / 2, users, rotation=45, ha="right")
        ax.set_title(f"{k}-shot test SROCC per user")
        ax.axhline(0, color="k", lw=0.5)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)

"""Which images to rate next: the ones whose ratings tell the most about the coefficients.

A rating can only move the coefficients where the task models disagree about an image: where they all
rank it alike, any mix of them ranks it alike too. So each candidate gets its task models' predictions
(no label needed), rank-normalised per task to [0, 1]; its *disagreement* is their spread over tasks.
Images are then picked greedily, each one the candidate with the largest disagreement × distance (in
that rank space) to everything picked or rated so far: informative, and not ten near-copies of one
informative image (farthest-point sampling, weighted).

Once a few images are rated (``MIN_RATINGS`` with two different scores), the current fit can say where
it is unsure (``by="fit"``): the recipe is fitted once per fold of those ratings, each fit leaving some
out (``learn.fold_fits``, the fits the calibration makes), and the same greedy pick runs on those fits'
predictions in place of the task models'. Where fits that each miss a few ratings disagree, one more
rating should move the fit most. Measured at 10 shots (docs/research-log.md), choosing the second five so was no
better than choosing all ten by the task models, and costs five fits, so it is not the default.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import ranks_anything


def rank_normalise(preds: np.ndarray) -> np.ndarray:
    """[n tasks, N images] → each task's ranks scaled to [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    n_img = preds.shape[1]
    return np.stack([(rankdata(p) - 1) / max(1, n_img - 1) for p in preds])


def select_active(preds: np.ndarray, k: int, rated: list[int] | None = None) -> list[int]:
    """Pick ``k`` images (indices into the columns of ``preds``) to rate next, none of ``rated``."""
    ranks = rank_normalise(preds)  # [n, N]
    disagreement = ranks.std(axis=0) + 1e-6  # a little, so that agreement everywhere still spreads out
    points = ranks.T  # one point per image, in task-rank space
    chosen = list(rated or [])
    taken = set(chosen)
    if chosen:
        dist = np.min(np.linalg.norm(points[:, None, :] - points[None, chosen, :], axis=-1), axis=1)
    else:
        dist = np.ones(len(points))
    picks: list[int] = []
    for _ in range(min(k, len(points) - len(taken))):
        score = disagreement * dist
        score[list(taken)] = -np.inf
        j = int(np.argmax(score))
        picks.append(j)
        taken.add(j)
        dist = np.minimum(dist, np.linalg.norm(points - points[j], axis=1))
    return picks


# The fewest rated images (with two different scores) from which the current fit's folds choose.
MIN_RATINGS = 4


def fit_predictions(merger, rated, cfg, pixels, processes: int = 1) -> np.ndarray:
    """[folds, M]: the predictions on ``pixels`` of the recipe ``cfg`` fitted on each fold of the
    ratings so far (``rated``, an ``objective.Scored``; ``learn.fold_fits``, ``processes`` fits at once);
    ``select_active`` on them picks where those fits disagree."""
    from .learn import fold_fits

    return np.stack([merger.predict(r.alpha, pixels) for _, r in fold_fits(merger, rated, cfg, processes=processes)])


def can_fit(scores: np.ndarray) -> bool:
    return len(scores) >= MIN_RATINGS and ranks_anything(scores)


def task_predictions_of(items, bank, device: str = "auto", merger=None) -> tuple[np.ndarray, list[int], torch.Tensor]:
    """The bank's task models' predictions [n, M] for the images among ``items`` that decode, which
    items those are, and their pixels."""
    from .images import ImageDecodeError, Preprocessor
    from .merger import Merger
    from .log import note
    from .devices import pick_device

    pre = Preprocessor(bank.architecture.preprocess)
    pixels, kept = [], []
    for i, it in enumerate(items):
        try:
            pixels.append(pre(it.load()))
            kept.append(i)
        except ImageDecodeError as e:
            note(f"{it.label}: unreadable ({e.kind}); not suggested")
    merger = merger or Merger(bank, pick_device(device))
    x = torch.stack(pixels)
    return merger.task_predictions(x), kept, x


def active_order(items, bank, device: str = "auto") -> list[int]:
    """Every decodable item, most informative first (``rate --order active``)."""
    preds, kept, _ = task_predictions_of(items, bank, device)
    return [kept[j] for j in select_active(preds, len(kept))]


def rated_so_far(path: str) -> dict[str, float | None]:
    """The images of a ratings file (``image``, or ``image_a``/``image_b`` for pairs) and each one's mean
    score: None where it has none yet (a blank score, as ``suggest --out`` leaves them, or pairs)."""
    from .errors import LaionfilterError
    from .ratings import parse_score
    from .tables import read_table

    t = read_table(path)
    if "user" in t.column_names and len(set(t.column("user").to_pylist())) > 1:
        raise LaionfilterError(f"{path}: holds several users' ratings; suggest for one user at a time")
    if "image" not in t.column_names:
        return {str(v): None for c in ("image_a", "image_b") if c in t.column_names for v in t.column(c).to_pylist()}
    found: dict[str, list[float]] = {}
    scores = t.column("score").to_pylist() if "score" in t.column_names else [None] * t.num_rows
    for row, (image, score) in enumerate(zip(t.column("image").to_pylist(), scores), start=2):
        values = found.setdefault(str(image), [])
        if score is None or str(score).strip() == "":
            continue
        try:
            values.append(parse_score(score))
        except ValueError as e:
            raise LaionfilterError(f"{path}: row {row}: {e}") from None
    return {k: (float(np.mean(v)) if v else None) for k, v in found.items()}


def suggest(items, bank, n: int = 10, ratings: str | None = None, out: str | None = None,
            recipe=None, by: str = "tasks", jobs: int | None = None) -> list[str]:
    """The labels of the ``n`` images among ``items`` (``rate.collect_images``) to rate next; written
    as a CSV with an empty ``score`` column when ``out`` is given. ``ratings``: a file rated so far
    (its images count as picked). ``by``: ``tasks`` (where the task models disagree) or ``fit`` (where
    fits of ``ratings`` by ``recipe``, default the default recipe, disagree; ``MIN_RATINGS`` needed;
    ``jobs`` of them at once, default: see ``jobs.fit_processes``)."""
    from .errors import LaionfilterError
    from .jobs import fit_processes, learning_threads
    from .merger import Merger
    from .objective import Scored
    from .recipe import LearnConfig
    from .log import note
    from .devices import pick_device

    if by not in ("tasks", "fit"):
        raise LaionfilterError(f"--by must be tasks or fit, not {by!r}")
    recipe = recipe or LearnConfig()
    merger = Merger(bank, pick_device(recipe.device))
    preds, kept, pixels = task_predictions_of(items, bank, merger=merger)
    done = rated_so_far(ratings) if ratings else {}
    rated = [j for j, i in enumerate(kept) if items[i].label in done]
    if by == "fit":
        scored = [j for j in rated if done[items[kept[j]].label] is not None]
        y = np.array([done[items[kept[j]].label] for j in scored])
        if not can_fit(y):
            raise LaionfilterError(f"--by fit needs --ratings with at least {MIN_RATINGS} scores (two of them different) "
                                   f"for images of the source (named as rate names them, relative to the file's folder); "
                                   f"{ratings or 'no ratings file'} has {len(scored)}")
        note(f"{ratings}: {len(scored)} ratings; choosing where {min(recipe.folds, len(scored))} fits of them disagree")
        with learning_threads(bank):
            preds = fit_predictions(merger, Scored(pixels[scored], y), recipe, pixels, fit_processes(merger, jobs))
    labels = [items[kept[j]].label for j in select_active(preds, n, rated)]
    if out:
        from .safefiles import atomic_write
        from .tables import answers_writer

        with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = answers_writer(f)
            w.writerow(["image", "score"])
            w.writerows([label, ""] for label in labels)
    return labels

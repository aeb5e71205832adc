"""Which images to rate next: the ones whose ratings tell the most about the coefficients.

A rating can only move the coefficients where the task models disagree about an image: where they all
rank it alike, any mix of them ranks it alike too. So each candidate gets its task models' predictions
(no label needed), rank-normalised per task to [0, 1]; its *disagreement* is their spread over tasks.
Images are then picked greedily, each one the candidate with the largest disagreement × distance (in
that rank space) to everything picked or rated so far: informative, and not ten near-copies of one
informative image (farthest-point sampling, weighted).
"""

from __future__ import annotations

import numpy as np


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


def task_predictions_of(items, bank, device: str = "auto") -> tuple[np.ndarray, list[int]]:
    """The bank's task models' predictions [n, M] for the images among ``items`` that decode, and
    which items those are."""
    import torch

    from .images import ImageDecodeError, Preprocessor
    from .learn import Merger
    from .log import note
    from .model import pick_device

    pre = Preprocessor(bank.architecture.preprocess)
    pixels, kept = [], []
    for i, it in enumerate(items):
        try:
            pixels.append(pre(it.load()))
            kept.append(i)
        except ImageDecodeError as e:
            note(f"{it.label}: unreadable ({e.kind}); not suggested")
    return Merger(bank, pick_device(device)).task_predictions(torch.stack(pixels)), kept


def active_order(items, bank, device: str = "auto") -> list[int]:
    """Every decodable item, most informative first (``rate --order active``)."""
    preds, kept = task_predictions_of(items, bank, device)
    return [kept[j] for j in select_active(preds, len(kept))]


def suggest(items, bank, n: int = 10, ratings: str | None = None, out: str | None = None,
            device: str = "auto") -> list[str]:
    """The labels of the ``n`` images among ``items`` (``rate.collect_images``) to rate next; written
    as a CSV with an empty ``score`` column when ``out`` is given. ``ratings``: a file rated so far (its
    images count as picked)."""
    import csv

    from .tables import read_table

    preds, kept = task_predictions_of(items, bank, device)
    rated: list[int] = []
    if ratings:
        t = read_table(ratings)
        cols = [c for c in ("image", "image_a", "image_b") if c in t.column_names]
        done = {str(v) for c in cols for v in t.column(c).to_pylist()}
        rated = [j for j, i in enumerate(kept) if items[i].label in done]
    labels = [items[kept[j]].label for j in select_active(preds, n, rated)]
    if out:
        from .safefiles import atomic_write

        with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "score"])
            w.writerows([label, ""] for label in labels)
    return labels

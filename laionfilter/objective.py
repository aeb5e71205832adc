"""What a fit of the coefficients minimises (section 3.3): the support set it learns from, the
Bradley–Terry rank loss (eq. 3) or the squared error, and the learning-rate schedule.

A support set is either scored images (``Scored``: a user's ratings) or pairwise answers (``Paired``:
(preferred, other) image indices). Each gives the fit its size (the answers it holds), a batch's loss
from the scores of the images that batch touches, and its agreement measure: SROCC for ratings, the
pair agreement for pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import LaionfilterError
from .metrics import srocc

Scorer = Callable[[torch.Tensor], torch.Tensor]  # image indices → the model's scores of those images


def cosine_lr(step: int, total: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` at step 0 to ``end`` at the last step."""
    if total <= 1:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / (total - 1)))


def bradley_terry_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean of −log σ(ŷ_a − ŷ_b) over every pair with y_a > y_b (eq. 3); None when all tie."""
    better = target[:, None] > target[None, :]
    if not better.any():
        return None
    diff = pred[:, None] - pred[None, :]
    return torch.nn.functional.softplus(-diff[better]).mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor, span: float) -> torch.Tensor:
    return torch.mean(((pred - target) / span) ** 2)


def pair_agreement(pairs: np.ndarray, pred: np.ndarray) -> float:
    """Kendall-style agreement with pairwise answers, in [-1, 1]: the fraction of (preferred, other) pairs
    a prediction orders the user's way, rescaled as 2f − 1 (a predicted tie counts half). It stands in
    for SROCC where the user gave pairs rather than scores (the adaptive initialisation, support fit)."""
    return float(np.mean(np.sign(pred[pairs[:, 0]] - pred[pairs[:, 1]])))


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class Scored:
    """Rated images: ``pixels`` [N, 3, H, W] and their ``scores`` [N] on the user's scale."""
    pixels: torch.Tensor
    scores: np.ndarray

    @property
    def items(self) -> int:
        """The support's size: its ratings."""
        return len(self.scores)

    def metric(self, pred: np.ndarray) -> float:
        return srocc(self.scores, pred)

    def subset(self, idx: np.ndarray) -> Scored:
        return Scored(self.pixels[idx], self.scores[idx])

    def batch_loss(self, score: Scorer, order: torch.Tensor, batch: int, loss: str,
                   template: torch.Tensor) -> torch.Tensor | None:
        """The loss of the first ``batch`` images of ``order`` (a permutation of the images); None when
        they all have the same score (no pair to learn from)."""
        idx = order[:batch]
        y = torch.as_tensor(self.scores, dtype=torch.float32, device=idx.device)
        pred = score(idx)
        if loss == "bt":
            return bradley_terry_loss(pred, y[idx])
        lo, hi = float(template[0]), float(template[-1])
        y_mse = lo + (hi - lo) * (y - y.min()) / (y.max() - y.min())  # user scale → template scale
        return mse_loss(pred, y_mse[idx], hi - lo)


@dataclass(frozen=True, eq=False)
class Paired:
    """Pairwise answers: ``pairs`` [K, 2] of (preferred, other) indices into ``pixels``."""
    pixels: torch.Tensor
    pairs: np.ndarray

    @property
    def items(self) -> int:
        """The support's size: its answered pairs (not the images they touch: a K-pair split of a user's
        answers must weigh as K answers, whatever images come with it)."""
        return len(self.pairs)

    def metric(self, pred: np.ndarray) -> float:
        return pair_agreement(self.pairs, pred)

    def batch_loss(self, score: Scorer, order: torch.Tensor, batch: int, loss: str,
                   template: torch.Tensor) -> torch.Tensor:
        """The Bradley–Terry loss of the first ``batch`` pairs of ``order``, each image scored once."""
        if loss != "bt":
            raise LaionfilterError("pairwise answers train with the Bradley–Terry loss only (--loss bt)")
        chosen = torch.as_tensor(self.pairs, device=order.device)[order[:batch]]
        used, where = torch.unique(chosen, return_inverse=True)
        pred = score(used)
        return torch.nn.functional.softplus(-(pred[where[:, 0]] - pred[where[:, 1]])).mean()


Support = Scored | Paired

"""Agreement between predicted and true scores (section 4.3)."""

from __future__ import annotations

import math

import numpy as np


def ranks_anything(scores) -> bool:
    """Whether the scores order anything: two different values at least (a rank loss and SROCC need them)."""
    return len(set(np.asarray(scores).ravel().tolist())) > 1


def _correlation(stat, y_true, y_pred) -> float:
    """``stat``'s coefficient; 0 where either side is constant (no ranking or trend to agree with)."""
    a, b = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    r = stat(a, b).statistic
    return 0.0 if math.isnan(r) else float(r)


def srocc(y_true, y_pred) -> float:
    """Spearman's rank-order correlation (eq. 5)."""
    from scipy import stats  # here: scoring imports this module but never ranks

    return _correlation(stats.spearmanr, y_true, y_pred)


def plcc(y_true, y_pred) -> float:
    """Pearson's linear correlation."""
    from scipy import stats

    return _correlation(stats.pearsonr, y_true, y_pred)

"""Agreement between predicted and true scores (section 4.3)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def srocc(y_true, y_pred) -> float:
    """Spearman's rank-order correlation; 0 where either side is constant (no ranking to agree with)."""
    a, b = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    r = stats.spearmanr(a, b).statistic
    return 0.0 if math.isnan(r) else float(r)


def plcc(y_true, y_pred) -> float:
    """Pearson's linear correlation; 0 where either side is constant."""
    a, b = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    r = stats.pearsonr(a, b).statistic
    return 0.0 if math.isnan(r) else float(r)

"""A profile's map from the merged model's score to the user's own rating scale.

The ranking column stays the model's score; the map turns it into "what this user would rate it". It is
monotone (non-decreasing), so it never reorders images, and clipped to the range the user rated in.
It is fitted on out-of-fold predictions (``learn.out_of_fold``): each support image scored by a fit
that never saw it, so that the map learns how far the model's score can be trusted on new images rather
than how well the coefficients fit the images they were trained on.

Two kinds: ``linear`` (least squares with a slope ≥ 0; with weak out-of-fold predictions the slope
shrinks toward the support set's mean rating) and ``isotonic`` (scipy's isotonic regression, a step
function, interpolated between the fitted points and flat beyond them). Linear is the default
(``LearnConfig.calibration``): over 12 users × 3 trials of the benchmark's user sets it had the lower
error at 10 ratings (docs/research-log.md, "Scores in the user's own scale").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import LaionfilterError
from .recipe import CALIBRATIONS, LearnConfig, check_choice


@dataclass(frozen=True)
class Calibration:
    kind: str  # "linear": rating = intercept + slope · score; "isotonic": interpolated through (x, y)
    low: float  # the user's lowest and highest rating in the support set: ratings are clipped to them
    high: float
    slope: float = 0.0
    intercept: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self):
        numbers = (self.low, self.high, self.slope, self.intercept, *self.x, *self.y)
        if not all(np.isfinite(numbers)):
            raise ValueError(f"not finite (low {self.low}, high {self.high}, slope {self.slope}, "
                             f"intercept {self.intercept}{', knots' if self.x else ''})")

    def __call__(self, score: np.ndarray) -> np.ndarray:
        s = np.asarray(score, dtype=np.float64)
        rating = self.intercept + self.slope * s if self.kind == "linear" else np.interp(s, self.x, self.y)
        return np.clip(rating, self.low, self.high)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                if not (self.kind == "linear" and k in ("x", "y"))
                and not (self.kind == "isotonic" and k in ("slope", "intercept"))}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "profile") -> Calibration:
        try:
            kind = d["kind"]
            if kind not in CALIBRATIONS:
                raise ValueError(f"kind {kind!r}")
            cal = cls(kind=kind, low=float(d["low"]), high=float(d["high"]), slope=float(d.get("slope", 0.0)),
                      intercept=float(d.get("intercept", 0.0)), x=tuple(map(float, d.get("x", ()))),
                      y=tuple(map(float, d.get("y", ()))))
        except (KeyError, TypeError, ValueError) as e:
            raise LaionfilterError(f"{source}: malformed calibration ({e})") from None
        if kind == "isotonic" and (len(cal.x) != len(cal.y) or not cal.x or np.any(np.diff(cal.x) <= 0)
                                   or np.any(np.diff(cal.y) < 0)):
            raise LaionfilterError(f"{source}: malformed calibration (isotonic knots must be increasing)")
        if kind == "linear" and cal.slope < 0:
            raise LaionfilterError(f"{source}: malformed calibration (negative slope)")
        return cal


def fit_calibration(pred: np.ndarray, ratings: np.ndarray, kind: str = LearnConfig.calibration) -> Calibration:
    """The monotone map from ``pred`` (out-of-fold model scores) to ``ratings``."""
    check_choice("calibration", kind, CALIBRATIONS)
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(ratings, dtype=np.float64)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, as one error, not numpy warnings
            return _fit(x, y, kind)
    except ValueError as e:  # a calibration that is not finite would rate every image NaN at score time
        raise LaionfilterError(f"the {kind} calibration cannot be fitted: {e}") from None


def _fit(x: np.ndarray, y: np.ndarray, kind: str) -> Calibration:
    low, high = float(y.min()), float(y.max())
    if kind == "linear":
        vx = float(np.var(x))
        slope = max(0.0, float(np.mean((x - x.mean()) * (y - y.mean())) / vx)) if vx > 0 else 0.0
        return Calibration("linear", low, high, slope=slope, intercept=float(y.mean() - slope * x.mean()))
    from scipy.optimize import isotonic_regression

    xs, inverse = np.unique(x, return_inverse=True)  # equal scores share one fitted rating
    counts = np.bincount(inverse)
    means = np.bincount(inverse, weights=y) / counts
    fitted = isotonic_regression(means, weights=counts, increasing=True).x
    return Calibration("isotonic", low, high, x=tuple(xs.tolist()), y=tuple(np.asarray(fitted).tolist()))

"""The settings of phase 2's recipe (``LearnConfig``) and the names they choose from.

Apart from ``learn`` so that the command line can take its defaults from here without importing torch:
one place for every default, whether a fit is run from Python or from ``laionfilter learn``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from .errors import LaionfilterError

CALIBRATIONS = ("linear", "isotonic")  # the maps from score to rating (calibrate.py); "none" turns them off
INITS = ("adaptive", "uniform", "best-fit")
LOSSES = ("bt", "mse")
FITS = ("backprop", "linear")  # how the steps are taken: linearised.fit_linear, fit.backprop


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """A clear error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise LaionfilterError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class LearnConfig:
    """The paper's recipe (section 3.3, appendix F) and the ablations it reports, plus how the steps are
    taken (``fit``) and the calibration. Every field is a `learn` option.

    The default fit is the linearised one (``fit="linear"``), made again every ``refresh`` steps and
    whenever the coefficients have moved by ``drift``: on seven populations of simulated users, two of
    them sealed, it was never more than 0.007 SROCC below the paper's fit (``fit="backprop"``) at 10 or
    100 ratings, at about 1/36 of its passes through the model (benchmarks/README.md "Learning
    quality", "Learning cost"). What was measured and retired (a start weighing candidate merges, an
    anchor penalty, a trust region, early stopping, a step count chosen out of fold) is in
    docs/research-log.md.
    """
    # adaptive: softmax(SROCC/T) over the tasks (eq. 4/6, the paper's); uniform: T → ∞; best-fit: T → 0
    init: str = "adaptive"
    temperature: float = 1.0
    loss: str = "bt"  # bt: Bradley–Terry rank loss (eq. 3); mse: squared error on the template's scale
    layer_agnostic: bool = False  # one coefficient per task instead of one per task and layer
    steps: int = 500
    batch_size: int = 32  # or the whole support set when smaller
    lr: float = 1e-2  # the start of a cosine schedule down to lr / 10
    seed: int = 0
    device: str = "auto"
    # Which layers' coefficients are learned: "all" (the paper), "top-N" (the last N transformer blocks,
    # the layers after them and the head) or "head". The others are fixed to 1/n for every task, the
    # same for every user, so that profiles share everything below their first tuned layer and the
    # scorer can run that trunk once for all of them.
    tune: str = "all"
    # Beyond the paper: the map from score to the user's rating scale ("linear", "isotonic" or "none"),
    # fitted on out-of-fold predictions of ``folds`` fits (see calibrate.py); pairwise answers have no
    # scale and get none.
    calibration: str = "linear"
    folds: int = 5
    # How the steps are taken. "backprop": every step's batch through the merged model (the paper's);
    # "linear": on the merged model linearised in α (one forward and backward per rated image), made
    # again at the current α every ``refresh`` steps. Refreshing every 250 steps lost up to 0.064 SROCC
    # at 10 ratings, every 50 steps up to 0.014; 100 was the best.
    fit: str = "linear"
    refresh: int = 100
    # ... and sooner, once the tuned coefficients have moved by this RMS from the expansion's point (0:
    # never). The first steps move every coefficient by the full learning rate and leave the linear
    # region within a few steps: without it the linear fit was up to 0.043 below the paper's fit (the
    # first sealed population, 100 ratings); with 0.05, never more than 0.007, at about ten times the
    # passes of refreshing every 100 steps alone.
    drift: float = 0.05

    def __post_init__(self):
        check_choice("init", self.init, INITS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("fit", self.fit, FITS)
        if not self.temperature > 0:
            raise LaionfilterError("temperature must be positive")
        if self.steps < 0 or self.batch_size < 2:
            raise LaionfilterError("steps must be ≥ 0 and batch size ≥ 2")
        if not self.lr > 0:
            raise LaionfilterError("the learning rate must be positive")
        if not re.fullmatch(r"all|head|top-\d+", self.tune):
            raise LaionfilterError(f"tune must be all, head or top-N (N blocks), not {self.tune!r}")
        check_choice("calibration", self.calibration, (*CALIBRATIONS, "none"))
        if self.folds < 2:
            raise LaionfilterError("folds must be ≥ 2")
        if self.refresh < 1:
            raise LaionfilterError("refresh must be ≥ 1 step")
        if not self.drift >= 0:
            raise LaionfilterError("drift must be ≥ 0 (0: refresh every --refresh steps only)")
        if self.tune != "all" and self.layer_agnostic:
            raise LaionfilterError("--tune and --layer-agnostic do not combine: choose one")

    @property
    def lr_end(self) -> float:
        """Where the cosine schedule ends (appendix F: 1e-2 → 1e-3)."""
        return self.lr / 10

    @property
    def uses_folds(self) -> bool:
        """Whether a support set of ratings gets the out-of-fold fits (for the calibration)."""
        return self.calibration != "none"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

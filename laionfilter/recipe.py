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
INITS = ("adaptive", "uniform", "best-fit", "mixes")
LOSSES = ("bt", "mse")


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """A clear error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise LaionfilterError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def anchor_weight(anchor: float, n_support: int, power: float) -> float:
    """(anchor / N)^power: the anchor penalty's weight for a support set of N ratings."""
    return (anchor / n_support) ** power


@dataclass(frozen=True)
class LearnConfig:
    # adaptive: softmax(SROCC/T) (the paper); uniform: T → ∞; best-fit: T → 0; mixes (beyond the paper,
    # the default): softmax over candidate merges, see learn.mixes(). Chosen on the benchmark's first user set
    # at 10 shots, where an untrained mixes start beat the best single task by +0.03 (docs/research-log.md).
    init: str = "mixes"
    temperature: float = 1.0
    # Beyond the paper, init "mixes": the temperature of the softmax over the candidate merges' SROCC.
    mix_temperature: float = 0.1
    # Beyond the paper, init "mixes": the start's coefficients times this where the anchor holds α at the
    # start (weight ≥ 1, as with ten ratings), fading to 1 as the anchor lets go (``start_scale``).
    # Averaging task vectors dilutes each of them (task arithmetic scales their sum for the same reason).
    mix_scale: float = 1.25
    loss: str = "bt"  # bt: Bradley–Terry rank loss (eq. 3); mse: squared error on the template's scale
    layer_agnostic: bool = False  # one coefficient per task instead of one per task and layer
    steps: int = 500
    batch_size: int = 32  # or the whole support set when smaller
    lr: float = 1e-2
    lr_end: float | None = None  # None: lr / 10
    seed: int = 0
    device: str = "auto"
    # Beyond the paper: a penalty (anchor / N)^anchor_power · Σ_i mean_l (α_i^l − α_i^l(0))² keeping the
    # coefficients near their start, N the support size: weight 1 at N = anchor. The rank loss is a
    # mean, so a prior of fixed weight would hold a 500-image support set as hard as a 10-image one.
    # Weight 32 at 10 shots: ten ratings trained from the mixes start undid its gain (docs/research-log.md), while at
    # 100 shots even 0.03 held α back (−0.006 mean test SROCC on the user set settings are chosen on);
    # (23.71 / N)^4 is 31.6 at 10, as (31.62 / N)^3 was, and 0.0032 at 100. 0 is the paper's recipe.
    anchor: float = 23.71
    anchor_power: float = 4.0
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
    # Beyond the paper: candidate step counts; the out-of-fold SROCC over the support set picks one, and
    # the final fit stops there (on the schedule of ``steps``). Empty: train ``steps``.
    steps_from: tuple[int, ...] = ()
    # Beyond the paper: where every step sees the whole support set (N ≤ batch size, as with ten
    # ratings) the loss is the exact objective, and the fit stops once it has not fallen by ``tol`` for
    # ``patience`` steps (the rule of scikit-learn's tol / n_iter_no_change), keeping the α of its lowest
    # loss (Keras's restore_best_weights). With the default anchor ten-rating fits settle long before
    # step 500 (docs/research-log.md: one stops at step 66), and stopping them moved no test SROCC of the benchmark by
    # more than 0.005. 0 trains every step (the paper).
    tol: float = 1e-4
    patience: int = 25

    def __post_init__(self):
        if self.lr_end is None:
            object.__setattr__(self, "lr_end", self.lr / 10)
        check_choice("init", self.init, INITS)
        check_choice("loss", self.loss, LOSSES)
        if not (self.temperature > 0 and self.mix_temperature > 0):
            raise LaionfilterError("temperature must be positive")
        if not self.mix_scale > 0:
            raise LaionfilterError("mix scale must be positive")
        if self.steps < 0 or self.batch_size < 2:
            raise LaionfilterError("steps must be ≥ 0 and batch size ≥ 2")
        if self.anchor < 0 or self.anchor_power <= 0:
            raise LaionfilterError("anchor must be ≥ 0 and its power positive")
        if not re.fullmatch(r"all|head|top-\d+", self.tune):
            raise LaionfilterError(f"tune must be all, head or top-N (N blocks), not {self.tune!r}")
        check_choice("calibration", self.calibration, (*CALIBRATIONS, "none"))
        if self.folds < 2:
            raise LaionfilterError("folds must be ≥ 2")
        if self.tol < 0 or self.patience < 1:
            raise LaionfilterError("tol must be ≥ 0 and patience ≥ 1")
        object.__setattr__(self, "steps_from", tuple(sorted(set(int(s) for s in self.steps_from))))
        if any(not 0 <= s <= self.steps for s in self.steps_from):
            raise LaionfilterError(f"steps-from {list(self.steps_from)}: each must be between 0 and steps ({self.steps})")
        if self.tune != "all" and self.layer_agnostic:
            raise LaionfilterError("--tune and --layer-agnostic do not combine: choose one")

    @staticmethod
    def temperature_field(init: str) -> str:
        """Which field holds the temperature of ``init``'s softmax (``--temperature`` sets that one)."""
        return "mix_temperature" if init == "mixes" else "temperature"

    @property
    def start_temperature(self) -> float:
        """The temperature of the chosen start's softmax."""
        return getattr(self, self.temperature_field(self.init))

    def anchor_weight(self, n_support: int) -> float:
        """The anchor penalty's weight with ``n_support`` ratings."""
        return anchor_weight(self.anchor, n_support, self.anchor_power)

    def start_scale(self, n_support: int) -> float:
        """The factor on the mixes start with ``n_support`` ratings: ``mix_scale`` while the anchor holds
        α at the start (weight ≥ 1), fading to 1 with the anchor's weight; 1 for the other starts."""
        if self.init != "mixes":
            return 1.0
        return 1.0 + (self.mix_scale - 1.0) * min(1.0, self.anchor_weight(n_support))

    @property
    def uses_folds(self) -> bool:
        """Whether a support set of ratings gets the out-of-fold fits (for the calibration or the step count)."""
        return self.calibration != "none" or bool(self.steps_from)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

"""Where a fit of the coefficients starts (eq. 4/6), and which layers it learns.

α_i^l = softmax_i(SROCC(S, θ_ft_i) / T) for every layer: the paper's adaptive start, each task weighed
by how well its model alone ranks the support set; ``uniform`` and ``best-fit`` are its limits T → ∞
and T → 0 (the paper's ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import LaionfilterError
from .merger import Merger
from .model import count_blocks, layer_stage
from .objective import Support
from .recipe import LearnConfig


def tuned_layers(layers: list[str], tune: str = "all") -> torch.Tensor:
    """A bool per layer: is its coefficient learned under ``tune``?"""
    if tune == "all":
        return torch.ones(len(layers), dtype=torch.bool)
    blocks = count_blocks(layers)
    first = blocks + 2 if tune == "head" else blocks + 1 - int(tune.removeprefix("top-"))
    if first < 1:
        raise LaionfilterError(f"--tune {tune}: the model has only {blocks} blocks")
    return torch.tensor([layer_stage(l, blocks) >= first for l in layers])


def init_coefficients(sroccs: torch.Tensor | list[float], n_layers: int, init: str = "adaptive",
                      temperature: float = 1.0) -> torch.Tensor:
    """α_i^l = softmax_i(SROCC_i / T), the same for every layer (eq. 6); [n, n_layers]."""
    s = torch.as_tensor(sroccs, dtype=torch.float64)
    if init == "uniform":
        a = torch.full_like(s, 1.0 / len(s))
    elif init == "best-fit":
        a = torch.zeros_like(s)
        a[int(torch.argmax(s))] = 1.0
    else:
        a = torch.softmax(s / temperature, dim=0)
    return a.float()[:, None].expand(len(s), n_layers).clone()


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Start:
    """Where one support set's fit starts, and what chose it."""
    alpha: torch.Tensor  # [n, L] ([n] when layer-agnostic)
    tuned: torch.Tensor  # a bool per layer: learned, or held at 1/n
    zero_shot_srocc: list[float]  # each task model's agreement with the support set


def starting_point(merger: Merger, support: Support, cfg: LearnConfig, task_preds: np.ndarray | None = None) -> Start:
    """``cfg``'s start on ``support`` (``init_coefficients``), the layers not tuned held at 1/n;
    ``task_preds``: the task models' predictions on its images ([n, N]), computed here when not given."""
    n, L = merger.bank.n, len(merger.layers)
    if task_preds is None:
        task_preds = merger.task_predictions(support.pixels)
    zs = [support.metric(p) for p in task_preds]
    alpha0 = init_coefficients(zs, L, cfg.init, cfg.temperature)
    tuned = tuned_layers(merger.layers, cfg.tune)
    alpha0[:, ~tuned] = 1.0 / n  # the shared, user-independent value of the layers not tuned
    if cfg.layer_agnostic:
        alpha0 = alpha0[:, 0].clone()
    return Start(alpha0, tuned, zs)

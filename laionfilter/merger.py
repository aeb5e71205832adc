"""The bank on a device, run with merged weights (eq. 2), and its linearisation in the coefficients α.

A rated image's score s_j(α) is a smooth function of the n × L coefficients. ``Merger.linearise``
gives, at a point α₀, every image's score and its gradient g_j = ∂s_j/∂α, so that near α₀

    s_j(α) ≈ s_j(α₀) + ⟨g_j, α − α₀⟩,

a model in which a step of the fit costs a few multiplications instead of a pass through the network
(``fit.Linearised``). As θ^l = θ_pre^l + Σ_i α_i^l τ_i^l, g_j[i, l] = ⟨∂s_j/∂θ^l, τ_i^l⟩: one forward and
one backward per image through the model merged once, then a product with each layer's task vectors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from .bank import Bank
from .log import progress_bar
from .merge import merge_weights
from .model import count_blocks, layer_stage


# The memory that ``Merger.linearise`` gives to gradients waiting for their products with τ: three images'
# for ViT-B-16 (344 MB each), within learn's 4 GB there; every image at once for the starter bank.
GRADIENT_BYTES = 1 << 30


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Linearisation:
    """The merged model's first-order expansion at ``alpha`` ([n, L]) on a set of images."""
    alpha: torch.Tensor
    scores: torch.Tensor  # [N]: s_j(α₀)
    grads: torch.Tensor  # [N, n, L]: ∂s_j/∂α at α₀ (0 for a layer not tuned)
    step: int = 0  # the fit's step it was made at: a replay steps on it from there

    def __call__(self, alpha: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The linear model's scores at ``alpha`` ([n, L]), of the images ``idx`` (default: all)."""
        s, g = (self.scores, self.grads) if idx is None else (self.scores[idx], self.grads[idx])
        return s + torch.einsum("jnl,nl->j", g, alpha - self.alpha)

    def take(self, idx: np.ndarray | torch.Tensor) -> Linearisation:
        """The same expansion on a subset of its images."""
        idx = torch.as_tensor(idx, device=self.scores.device)
        return Linearisation(self.alpha, self.scores[idx], self.grads[idx], self.step)


class Merger:
    """The bank on one device and a skeleton model run with merged weights through functional_call.

    ``above(split)`` is the same bank from stage ``split`` on (``model.layer_stage``): its inputs are
    ``trunk``'s features instead of images, and it merges and runs only the layers from that stage. A
    fit that learns only the top of the network (``--tune top-N`` or ``head``) holds the layers below at
    1/n for every user, so their output on an image never changes: it is computed once (``trunk``), and
    every step, pass and prediction of the fit runs the top alone.
    """

    def __init__(self, bank: Bank, device: torch.device):
        self.bank, self.device = bank, device
        self.layers = bank.layers
        self.pre = {k: v.to(device) for k, v in bank.pre.items()}
        self.tau = {k: v.to(device) for k, v in bank.tau.items()}  # kept in the stored dtype
        # a skeleton without weights of its own (on the meta device): every call gets the merged ones
        self.model = bank.new_model(empty=True).eval()
        self.model.template = self.model.template.to(device)
        self.split = 0  # the first stage this merger runs (``above``)
        self.stages = [layer_stage(name, count_blocks(self.layers)) for name in self.layers]

    def split_for(self, tuned: torch.Tensor) -> int:
        """The first stage with a tuned layer, where the trunk below it can be computed once; 0 when
        every stage is tuned or the model cannot be split."""
        first = min(stage for stage, t in zip(self.stages, tuned.tolist()) if t)
        return first if first > 0 and self.model.splittable() else 0

    def above(self, split: int) -> Merger:
        """This bank from stage ``split`` on, taking ``trunk(·, split)``'s features as its inputs."""
        top = copy.copy(self)
        top.split = split
        return top

    def trunk(self, pixels: torch.Tensor, split: int, batch_size: int = 256) -> torch.Tensor:
        """The features of ``pixels`` at stage ``split``, every layer below it at 1/n (on the device)."""
        n = self.bank.n
        names = [name for name, stage in zip(self.layers, self.stages) if stage < split]
        with torch.no_grad():
            state = merge_weights(self.pre, self.tau, names, torch.full((n,), 1.0 / n, device=self.device))
            return torch.cat([functional_call(self.model, state, (pixels[i:i + batch_size].to(self.device),),
                                              {"stop": split}) for i in range(0, len(pixels), batch_size)])

    def state(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged weights of the layers this merger runs (all, unless ``above``)."""
        if not self.split:
            return merge_weights(self.pre, self.tau, self.layers, alpha)
        keep = [l for l, stage in enumerate(self.stages) if stage >= self.split]
        alpha = alpha if alpha.dim() == 1 else alpha[:, keep]
        return merge_weights(self.pre, self.tau, [self.layers[l] for l in keep], alpha)

    def forward(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, state, (x,), {"start": self.split})

    @torch.no_grad()
    def predict(self, alpha: torch.Tensor, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        state = self.state(alpha.to(self.device))
        out = [self.forward(state, pixels[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).numpy()

    def task_predictions(self, pixels: torch.Tensor) -> np.ndarray:
        """[n, N]: each task model θ_pre + τ_i on the images."""
        if self.split:
            raise ValueError("a task model differs below the split: its predictions need the whole merger")
        n = self.bank.n
        return np.stack([self.predict(torch.eye(n)[i], pixels) for i in range(n)])

    def linearise(self, alpha: torch.Tensor, pixels: torch.Tensor, tuned: torch.Tensor | None = None,
                  progress: bool = False) -> Linearisation:
        """``Linearisation`` of the merged model at ``alpha`` ([n, L]) on ``pixels``; ``tuned``: a bool per
        layer, the layers whose coefficients are learned (the backward stops below the lowest of them).

        One image at a time: torch's batched per-sample gradients (``vmap``) hold one gradient of the
        whole model per image, and on a CPU ran at half this loop's speed (ViT-B-16, 2 cores). The
        products with τ wait for a chunk of images (as many gradients as ``GRADIENT_BYTES`` hold), so
        that each layer's task vectors are read, and cast to float32, once per chunk."""
        alpha = alpha.detach().to(self.device, torch.float32, copy=True)  # the fit goes on moving its own
        n, L = alpha.shape
        tuned = torch.ones(L, dtype=torch.bool) if tuned is None else tuned.cpu()
        names = [name for name, t in zip(self.layers, tuned.tolist()) if t]
        cols = torch.nonzero(tuned).flatten().to(self.device)
        with torch.no_grad():
            state = self.state(alpha)
        leaves = {name: state[name].requires_grad_(True) for name in names}
        scores = torch.empty(len(pixels), device=self.device)
        grads = torch.zeros(len(pixels), n, L, device=self.device)
        size = sum(leaf.numel() for leaf in leaves.values())
        chunk = max(1, min(len(pixels), GRADIENT_BYTES // (4 * size)))
        bar = progress_bar(total=len(pixels), desc="linearise", unit="image", disable=not progress, leave=False)
        for c in range(0, len(pixels), chunk):
            held = []  # each image's gradients, until the chunk's products with τ
            for j in range(c, min(c + chunk, len(pixels))):
                s = self.forward(state, pixels[j:j + 1].to(self.device))[0].float()
                held.append(torch.autograd.grad(s, list(leaves.values())))
                scores[j] = s.detach()
                bar.update(1)
            with torch.no_grad():
                for k, name in enumerate(names):
                    g = torch.stack([h[k].reshape(-1) for h in held], dim=1).float()  # [P, chunk]
                    grads[c:c + len(held), :, cols[k]] = (self.tau[name].reshape(n, -1).float() @ g).T
        bar.close()
        return Linearisation(alpha, scores, grads)

"""Eq. 2: θ_p^l = θ_pre^l + Σ_i α_i^l τ_i^l, computed per layer in float32 whatever τ's storage dtype."""

from __future__ import annotations

import torch

from .errors import LaionfilterError


def merge_weights(pre: dict[str, torch.Tensor], tau: dict[str, torch.Tensor], layers: list[str],
                  alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merged weights for every layer. ``alpha`` is [n, L] (layer-wise) or [n] (one per task).

    Differentiable in ``alpha``; τ is cast to alpha's dtype and device one layer at a time, so peak memory
    is the bank plus one merged model.
    """
    n = next(iter(tau.values())).shape[0]
    if alpha.dim() == 1:
        alpha = alpha[:, None].expand(n, len(layers))
    if tuple(alpha.shape) != (n, len(layers)):
        raise LaionfilterError(f"coefficients have shape {tuple(alpha.shape)}; the bank needs ({n}, {len(layers)})")
    out = {}
    for l, name in enumerate(layers):
        t = tau[name].to(device=alpha.device, dtype=torch.float32)
        a = alpha[:, l].float()
        out[name] = pre[name].to(alpha.device) + torch.tensordot(a, t, dims=1)
    return out

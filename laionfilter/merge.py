"""Eq. 2: θ_p^l = θ_pre^l + Σ_i α_i^l τ_i^l, computed per layer in float32 whatever τ's storage dtype."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import LaionfilterError


def merge_weights(pre: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], layers: list[str],
                  alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merged weights for every layer. ``alpha`` is [n, L] (layer-wise) or [n] (one per task).

    Differentiable in ``alpha``; τ is cast to alpha's dtype and device one layer at a time, so peak memory
    is the bank plus one merged model. Without gradients (scoring), the float32 copy of τ and the sum
    go through one scratch buffer reused from layer to layer, so that the merged weights are the only
    memory left behind: with a fresh temporary per layer, the allocator kept 140 MiB of freed
    temporaries on top of a ViT-B-16 model's 330 MiB (benchmarks/memory.py). Same arithmetic, same bits.
    """
    n = next(iter(tau.values())).shape[0]
    if alpha.dim() == 1:
        alpha = alpha[:, None].expand(n, len(layers))
    if tuple(alpha.shape) != (n, len(layers)):
        raise LaionfilterError(f"coefficients have shape {tuple(alpha.shape)}; the bank needs ({n}, {len(layers)})")
    out = {}
    if alpha.requires_grad and torch.is_grad_enabled():
        for l, name in enumerate(layers):
            t = tau[name].to(device=alpha.device, dtype=torch.float32)
            out[name] = pre[name].to(alpha.device) + torch.tensordot(alpha[:, l].float(), t, dims=1)
        return out
    scratch = torch.empty(0, device=alpha.device)
    with torch.no_grad():
        for l, name in enumerate(layers):
            stored = tau[name]
            size = stored.numel() + stored[0].numel()
            if scratch.numel() < size:
                scratch = torch.empty(size, device=alpha.device)
            t = scratch[:stored.numel()].view(stored.shape)
            t.copy_(stored)
            delta = scratch[stored.numel():size].view(stored.shape[1:])
            torch.tensordot(alpha[:, l].float(), t, dims=1, out=delta)
            out[name] = torch.add(pre[name].to(alpha.device), delta)
    return out

"""KernelSHAP on superpixels (Lundberg & Lee 2017, https://arxiv.org/abs/1705.07874): coalition sizes drawn
with p(k) ~ (M-1) / (k (M-k)), i.e. the exact Shapley kernel, each sample paired with its complement
(antithetic sampling), the empty and full coalitions weighted 1e6, one batched least-squares solve."""
from __future__ import annotations

import torch

from ._registry import MethodOutput, register
from ._surrogate import (baseline_for, compact, draw_per_example, evaluate_perturbations, feature_masks, spread,
                         weighted_least_squares)

ENDPOINT_WEIGHT = 1e6


def shapley_coalitions(n: int, n_samples: int, m: int, generator: torch.Generator, device) -> torch.Tensor:
    """Return (n, n_samples, m) binary coalitions: the full and empty ones, then sampled pairs (z, 1 - z)."""
    pairs = max(0, (n_samples - 2) // 2)
    if m < 2:
        body = torch.zeros(n, 0, m, device=device)
    else:
        k = torch.arange(1, m, device=device, dtype=torch.float64)
        p = (m - 1) / (k * (m - k))
        sizes = torch.multinomial(p.float().expand(n, -1), pairs, replacement=True, generator=generator) + 1
        ranks = torch.rand(n, pairs, m, generator=generator, device=device).argsort(-1).argsort(-1)
        z = (ranks < sizes[..., None]).float()
        body = torch.stack([z, 1 - z], 2).view(n, 2 * pairs, m)
    ends = torch.stack([torch.ones(n, m, device=device), torch.zeros(n, m, device=device)], 1)
    return torch.cat([ends, body], 1)


@register("kernel_shap", paper="https://arxiv.org/abs/1705.07874", n_samples=256, segments="grid", n_segments=16,
          baseline=0.0)
def kernel_shap(ctx, n_samples: int, segments: str, n_segments: int, baseline: float) -> MethodOutput:
    """Return KernelSHAP attributions (N, C, H, W): each superpixel's Shapley estimate on its pixels."""
    x = ctx.inputs
    n, c = x.shape[:2]
    masks, m = compact(feature_masks(x, segments, n_segments))
    z = draw_per_example(ctx, 43, masks, m, lambda g, mi: shapley_coalitions(1, n_samples, mi, g, x.device)[0])
    y = evaluate_perturbations(ctx, z, masks, baseline_for(ctx, baseline))
    weights = torch.ones(n, z.shape[1], device=x.device, dtype=torch.float64)
    weights[:, :2] = ENDPOINT_WEIGHT
    phi = weighted_least_squares(z, y, weights, ridge=0.0)
    return MethodOutput(spread(phi, masks, c, x.dtype))

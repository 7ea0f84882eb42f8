"""LIME on superpixels (Ribeiro et al. 2016, https://arxiv.org/abs/1602.04938): features kept with
probability 1/2, samples weighted by exp(-d^2 / (2 width^2)) with d the cosine distance between the input and
the perturbed input (Captum's default kernel), a weighted linear surrogate fitted for all images at once."""
from __future__ import annotations

import torch

from ._registry import MethodOutput, register
from ._surrogate import (baseline_for, compact, draw_per_example, evaluate_perturbations, feature_masks, spread,
                         weighted_least_squares)


@register("lime", resolution="segment", paper="https://arxiv.org/abs/1602.04938", n_samples=256, segments="grid", n_segments=16,
          kernel_width=1.0, ridge=0.01, baseline=0.0, forward_only=True)
def lime(ctx, n_samples: int, segments: str, n_segments: int, kernel_width: float, ridge: float,
         baseline: float) -> MethodOutput:
    """Return LIME attributions (N, C, H, W): each superpixel's surrogate coefficient on its pixels."""
    x = ctx.inputs
    n, c = x.shape[:2]
    masks, f = compact(feature_masks(x, segments, n_segments))
    z = draw_per_example(ctx, 41, masks, f, lambda g, fi: torch.bernoulli(
        torch.full((n_samples, fi), 0.5, device=x.device), generator=g))
    b = baseline_for(ctx, baseline)
    y = evaluate_perturbations(ctx, z, masks, b)
    # cosine similarity of x and its perturbation, in closed form: both inner products are linear in z
    onehot = torch.nn.functional.one_hot(masks.view(n, -1), f).to(torch.float64)       # (N, HW, F)
    xx = (x.double() ** 2).sum(1).view(n, 1, -1) @ onehot                                # (N, 1, F)
    xb = (x.double() * b.double()).sum(1).view(n, 1, -1) @ onehot
    bb = (b.double() ** 2).sum(1).view(n, 1, -1) @ onehot
    zd = z.double()
    dot = (zd * xx).sum(2) + ((1 - zd) * xb).sum(2)
    norm_p = ((zd * xx).sum(2) + ((1 - zd) * bb).sum(2)).clamp_min(0).sqrt()
    norm_x = xx.sum(2).sqrt()
    cos = dot / (norm_x * norm_p).clamp_min(1e-12)
    weights = torch.exp(-((1 - cos) ** 2) / (2 * kernel_width ** 2))
    phi = weighted_least_squares(z, y, weights, ridge)
    return MethodOutput(spread(phi, masks, c, x.dtype))

"""GradientSHAP (Lundberg & Lee 2017; Captum's `GradientShap`): the expectation over baselines b, alpha ~ U(0,1)
and input noise e ~ N(0, stdev^2) of (x + e - b) * d logit_target / dx at b + alpha (x + e - b)."""
from __future__ import annotations

import torch

from ._registry import MethodOutput, register
from .engine import per_example
from .integrated_gradients import make_baseline


@register("gradient_shap", paper="https://arxiv.org/abs/1705.07874", n_samples=16, stdev=0.0, baseline="zeros",
          blur_sigma=2.0)
def gradient_shap(ctx, n_samples: int, stdev: float, baseline: str, blur_sigma: float) -> MethodOutput:
    """Return GradientSHAP attributions (N, C, H, W); every sample of every image is batched together."""
    x = ctx.inputs
    base = torch.stack([make_baseline(ctx, baseline, blur_sigma, salt=100 + i) for i in range(n_samples)]) \
        if baseline == "uniform" else make_baseline(ctx, baseline, blur_sigma, salt=100)[None].expand(n_samples, *x.shape)
    noise, alpha = per_example(ctx.generators(31), lambda g: (
        torch.randn((n_samples, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype),
        torch.rand((n_samples, 1, 1, 1), generator=g, device=x.device, dtype=x.dtype)))
    noisy = x[None] + stdev * noise.transpose(0, 1)
    alpha = alpha.transpose(0, 1)
    points = (base + alpha * (noisy - base)).reshape(-1, *x.shape[1:])
    grads = ctx.target_gradient(points, ctx.target.repeat(n_samples)).view(n_samples, *x.shape)
    return MethodOutput(((noisy - base) * grads).mean(0))

"""SmoothGrad: mean over noisy copies x + N(0, s^2) of |d logit_target / dx| (Smilkov et al. 2017,
https://arxiv.org/abs/1706.03825); `noise_level` sets s as a fraction of each image's value range
(the paper's 10-20%), or `stdev` sets it absolutely (Captum's `stdevs`)."""
from __future__ import annotations

import torch

from ._registry import MethodOutput, register
from .engine import per_example


@register("smoothgrad", paper="https://arxiv.org/abs/1706.03825", n_samples=16, noise_level=0.15, stdev=None)
def smoothgrad(ctx, n_samples: int, noise_level: float, stdev: float | None) -> MethodOutput:
    """Return the SmoothGrad attributions (N, C, H, W); all noisy copies are batched across images."""
    x = ctx.inputs
    n = len(x)
    if stdev is None:
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(1, -1, 1, 1, 1)
        sd = noise_level * span
    else:
        sd = torch.full((1, n, 1, 1, 1), float(stdev), device=x.device, dtype=x.dtype)
    noise = per_example(ctx.generators(23), lambda g: torch.randn((n_samples, *x.shape[1:]), generator=g,
                                                                  device=x.device, dtype=x.dtype)).transpose(0, 1)
    noisy = (x[None] + sd * noise).reshape(-1, *x.shape[1:])
    grads = ctx.target_gradient(noisy, ctx.target.repeat(n_samples)).view(n_samples, *x.shape)
    return MethodOutput(grads.abs().mean(0))

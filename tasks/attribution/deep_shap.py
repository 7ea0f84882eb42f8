"""DeepSHAP (Lundberg & Lee 2017, https://arxiv.org/abs/1705.07874; Captum's `DeepLiftShap`): DeepLIFT with the
rescale rule (deeplift.py) averaged over a distribution of baselines, so the attributions sum to
f(x) - mean f(b); the per-example `delta` is the mean residual."""
from __future__ import annotations

import torch

from ._registry import MethodOutput, register
from .deeplift import deeplift_pairs
from .integrated_gradients import make_baseline


@register("deep_shap", has_delta=True, paper="https://arxiv.org/abs/1705.07874", n_samples=8, baseline="uniform",
          blur_sigma=2.0, eps=1e-10)
def deep_shap(ctx, n_samples: int, baseline: str, blur_sigma: float, eps: float) -> MethodOutput:
    """Return DeepSHAP attributions: DeepLIFT averaged over `n_samples` baselines per example ('uniform':
    seeded noise over the image's range, different per sample; 'zeros'/'blur': one baseline, repeated), and
    the mean residual `delta` (sum(attributions) - (f(x) - mean f(b)))."""
    x = ctx.inputs
    bases = torch.stack([make_baseline(ctx, baseline, blur_sigma, salt=200 + i) for i in range(n_samples)])
    xs = x[None].expand(n_samples, *x.shape).reshape(-1, *x.shape[1:])
    attr, delta = deeplift_pairs(ctx, xs, bases.reshape(-1, *x.shape[1:]), ctx.target.repeat(n_samples), eps)
    return MethodOutput(attr.view(n_samples, *x.shape).mean(0), {"delta": delta.view(n_samples, -1).mean(0)})

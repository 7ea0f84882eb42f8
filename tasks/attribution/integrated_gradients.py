"""Integrated gradients: (x - b) * integral_0^1 d f(b + a (x - b)) / dx da (Sundararajan et al. 2017,
https://arxiv.org/abs/1703.01365). Completeness: sum(attributions) = f(x) - f(b); the per-example
`delta` extra is sum(attributions) - (f(x) - f(b))."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import XAuditError
from ._registry import MethodOutput, register
from .engine import per_example


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """Return (step weights, alphas) on [0, 1] for `method` (Captum's names and nodes).

    The weights always sum to 1. Captum's 'riemann_trapezoid' uses 1/n with halved ends (summing to
    (n-1)/n, which shrinks every attribution by that factor); here it is the trapezoid rule proper."""
    if n_steps < 1 or (method == "riemann_trapezoid" and n_steps < 2):
        raise XAuditError(f"integrated_gradients: 'n_steps' must be >= 2; got {n_steps}")
    n = n_steps
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return list(0.5 * w), list(0.5 * (x + 1))
    if method == "riemann_left":
        return [1 / n] * n, list(np.linspace(0, 1 - 1 / n, n))
    if method == "riemann_right":
        return [1 / n] * n, list(np.linspace(1 / n, 1, n))
    if method == "riemann_middle":
        return [1 / n] * n, list(np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n))
    if method == "riemann_trapezoid":
        return [1 / (2 * (n - 1))] + [1 / (n - 1)] * (n - 2) + [1 / (2 * (n - 1))], list(np.linspace(0, 1, n))
    raise XAuditError(f"integrated_gradients: 'method' must be one of gausslegendre, riemann_left, "
                      f"riemann_right, riemann_middle, riemann_trapezoid; got {method!r}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return `x` (N, C, H, W) blurred per channel by a separable Gaussian of std `sigma` pixels."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    pad = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(pad, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(ctx, kind: str, blur_sigma: float, salt: int) -> torch.Tensor:
    """Return a baseline batch: 'zeros', 'blur' (Gaussian-blurred input) or 'uniform' noise over each
    image's value range (seeded)."""
    x = ctx.inputs
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x, blur_sigma)
    if kind == "uniform":
        lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
        u = per_example(ctx.generators(salt), lambda g: torch.rand(x.shape[1:], generator=g, device=x.device,
                                                                   dtype=x.dtype))
        return lo + (hi - lo) * u
    raise XAuditError(f"integrated_gradients: 'baseline' must be 'zeros', 'blur' or 'uniform'; got {kind!r}")


@register("integrated_gradients", has_delta=True, paper="https://arxiv.org/abs/1703.01365",
          n_steps=32, method="gausslegendre", baseline="zeros", blur_sigma=2.0)
def integrated_gradients(ctx, n_steps: int, method: str, baseline: str, blur_sigma: float) -> MethodOutput:
    """Return IG attributions (N, C, H, W) and the completeness `delta` (N,) per example.

    All steps of all images are batched together (chunks of `max_batch` images)."""
    x = ctx.inputs
    b = make_baseline(ctx, baseline, blur_sigma, salt=11)
    weights, alphas = quadrature(method, n_steps)
    n = len(x)
    alpha = torch.tensor(alphas, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    w = torch.tensor(weights, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    diff = x - b
    total = torch.zeros_like(x)
    per_chunk = max(1, ctx.max_batch // max(1, n))          # steps per model call
    for s in range(0, n_steps, per_chunk):
        a = alpha[s:s + per_chunk]
        path = (b[None] + a * diff[None]).reshape(-1, *x.shape[1:])
        tgt = ctx.target.repeat(len(a))
        g = ctx.target_gradient(path, tgt).view(len(a), n, *x.shape[1:])
        total += (w[s:s + per_chunk] * g).sum(0)
    attr = diff * total
    fx = ctx.logits.gather(1, ctx.target[:, None])[:, 0].to(x.dtype)
    fb = ctx.target_output(b, ctx.target)
    delta = attr.flatten(1).sum(1) - (fx - fb)
    return MethodOutput(attr, {"delta": delta})

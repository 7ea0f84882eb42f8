"""Max-sensitivity (Yeh et al. 2019, https://arxiv.org/abs/1901.09392; Captum's `sensitivity_max`): the
largest relative change ||A(x + d) - A(x)||_F / ||A(x)||_F of the raw attributions over `samples` inputs
perturbed uniformly in an L-infinity ball of `radius`. Lower is more stable."""
from __future__ import annotations

import numpy as np
import torch

from ..attribution.engine import example_keys, per_example
from ._registry import register


def max_sensitivity(ctx, method: str, samples: int, radius: float, noise: torch.Tensor | None = None) -> np.ndarray:
    """Return (N,) max-sensitivity; `noise` (N * samples, C, H, W), ordered image-major, may be given."""
    return sensitivities(ctx, [method], samples, radius, noise)[method]


def sensitivities(ctx, methods: list[str], samples: int, radius: float, noise: torch.Tensor | None = None
                  ) -> dict[str, np.ndarray]:
    """Max-sensitivity of each of `methods` on the same perturbed inputs (the noise is drawn per example, not
    per method), explained in one call when the context can (`explain_all`)."""
    x = ctx.inputs
    n = len(x)
    if noise is None:
        noise = (per_example(ctx.generators(83), lambda g: torch.rand((samples, *x.shape[1:]), generator=g,
                                                                      device=x.device, dtype=x.dtype))
                 .flatten(0, 1) * 2 - 1) * radius
    perturbed = x.repeat_interleave(samples, 0) + noise
    keys = ctx.keys if ctx.keys is not None else range(n)
    copy_keys = example_keys([f"{k}:{j}" for k in keys for j in range(samples)])     # a key per noisy copy
    targets = ctx.target.repeat_interleave(samples)
    if ctx.explain_all is not None and len(methods) > 1:
        again = ctx.explain_all(methods, perturbed, targets, copy_keys)
    else:
        again = {m: ctx.explain(m, perturbed, targets, copy_keys) for m in methods}
    out = {}
    for m in methods:
        base = ctx.attributions[m].flatten(1).double()
        diff = (again[m].flatten(1).double() - base.repeat_interleave(samples, 0)).norm(dim=1).view(n, samples)
        scale = base.norm(dim=1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        out[m] = (diff / scale[:, None]).amax(1).cpu().numpy()
    return out


@register("stability", per_method=True, passes="samples x the methods' own passes (the gradient family's shared)",
          columns={"max_sensitivity": (False, "largest relative change of the attributions under small input noise")},
          samples=4, radius=0.02)
def stability(ctx, method: str, samples: int, radius: float) -> dict[str, np.ndarray]:
    key = ("stability", samples, radius)
    if key not in ctx.cache:            # every method at once, on the first call of the batch
        ctx.cache[key] = sensitivities(ctx, list(ctx.attributions), samples, radius)
    return {"max_sensitivity": ctx.cache[key][method]}

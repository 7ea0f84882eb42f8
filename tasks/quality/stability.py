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
    x = ctx.inputs
    n = len(x)
    if noise is None:
        noise = (per_example(ctx.generators(83), lambda g: torch.rand((samples, *x.shape[1:]), generator=g,
                                                                      device=x.device, dtype=x.dtype))
                 .flatten(0, 1) * 2 - 1) * radius
    perturbed = x.repeat_interleave(samples, 0) + noise
    base = ctx.attributions[method].flatten(1).double()
    keys = ctx.keys if ctx.keys is not None else range(n)
    copy_keys = example_keys([f"{k}:{j}" for k in keys for j in range(samples)])     # a key per noisy copy
    again = ctx.explain(method, perturbed, ctx.target.repeat_interleave(samples), copy_keys).flatten(1).double()
    diff = (again - base.repeat_interleave(samples, 0)).norm(dim=1).view(n, samples)
    scale = base.norm(dim=1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (diff / scale[:, None]).amax(1).cpu().numpy()


@register("stability", per_method=True, passes="samples x the method's own passes",
          columns={"max_sensitivity": (False, "largest relative change of the attributions under small input noise")},
          samples=4, radius=0.02)
def stability(ctx, method: str, samples: int, radius: float) -> dict[str, np.ndarray]:
    return {"max_sensitivity": max_sensitivity(ctx, method, samples, radius)}

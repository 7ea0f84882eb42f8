"""Deletion and insertion (Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421): remove (or insert) pixels
in the order the map ranks them, in `steps` equal steps, and record the target probability; the area under
the curve (trapezoid rule over the fraction of pixels). A faithful map has a low deletion AUC and a high
insertion AUC, and beats the same curves in a random pixel order (columns `*_random`)."""
from __future__ import annotations

import numpy as np
import torch

from ..attribution.engine import per_example
from ..attribution.integrated_gradients import gaussian_blur
from ._registry import register


def curves(ctx, order: torch.Tensor, steps: int, mode: str, baseline: torch.Tensor) -> torch.Tensor:
    """Return (N, steps + 1) target probabilities along the deletion or insertion path of `order` (N, HW):
    step k replaces the first k/steps of the ranked pixels (all channels), every step of every image batched."""
    x = ctx.inputs
    n, c, h, w = x.shape
    hw = h * w
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=x.device).expand(n, hw))          # position of each pixel
    cut = torch.round(torch.linspace(0, hw, steps + 1, device=x.device)).long()       # pixels changed per step
    changed = (rank[:, None, :] < cut[None, :, None]).to(x.dtype).view(n, steps + 1, 1, h, w)
    start, end = (x, baseline) if mode == "deletion" else (baseline, x)
    path = start[:, None] * (1 - changed) + end[:, None] * changed                   # (N, K+1, C, H, W)
    probs = ctx.probabilities(path.reshape(-1, c, h, w), ctx.target.repeat_interleave(steps + 1))
    return probs.view(n, steps + 1)


def auc(curve: torch.Tensor) -> np.ndarray:
    """Trapezoid area under (N, K+1) curves over [0, 1]."""
    k = curve.shape[1] - 1
    return ((curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * k)).double().cpu().numpy()


def _baselines(ctx, blur_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    # deletion removes towards a zero (mean-valued, after normalisation) image; insertion starts from a blur
    return torch.zeros_like(ctx.inputs), gaussian_blur(ctx.inputs, blur_sigma)


@register("faithfulness", per_method=True, passes="2 x (steps + 1) forwards",
          columns={"deletion_auc": (False, "area under the target probability as top-ranked pixels are removed"),
                   "insertion_auc": (True, "area under the target probability as top-ranked pixels are inserted")},
          steps=16, blur_sigma=4.0)
def faithfulness(ctx, method: str, steps: int, blur_sigma: float) -> dict[str, np.ndarray]:
    order = torch.sort(ctx.maps[method].flatten(1), dim=1, descending=True, stable=True).indices
    zero, blur = _baselines(ctx, blur_sigma)
    return {"deletion_auc": auc(curves(ctx, order, steps, "deletion", zero)),
            "insertion_auc": auc(curves(ctx, order, steps, "insertion", blur))}


@register("faithfulness_random", per_method=False, passes="2 x (steps + 1) forwards, shared by all methods",
          columns={"deletion_auc_random": (False, "deletion AUC in a random pixel order (reference)"),
                   "insertion_auc_random": (True, "insertion AUC in a random pixel order (reference)")},
          steps=16, blur_sigma=4.0)
def faithfulness_random(ctx, steps: int, blur_sigma: float) -> dict[str, np.ndarray]:
    n, _, h, w = ctx.inputs.shape
    order = per_example(ctx.generators(71), lambda g: torch.rand(h * w, generator=g, device=ctx.inputs.device)
                        ).argsort(1)
    zero, blur = _baselines(ctx, blur_sigma)
    return {"deletion_auc_random": auc(curves(ctx, order, steps, "deletion", zero)),
            "insertion_auc_random": auc(curves(ctx, order, steps, "insertion", blur))}

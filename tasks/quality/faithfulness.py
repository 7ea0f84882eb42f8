"""Deletion and insertion (Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421): remove (or insert) pixels
in the order the map ranks them, in `steps` equal steps, and record the target probability; the area under
the curve (trapezoid rule over the fraction of pixels). A faithful map has a low deletion AUC and a high
insertion AUC, and beats the same curves in a random pixel order (columns `*_random`).

Every curve starts or ends at the clean input (its probability comes from the batch's logits) and at the
deletion's zero image (one row for the batch: it is the same image for every example) or the insertion's
blurred image: those ends are the same for every method, so they are run once per batch (`endpoints`) and each
curve runs only its `steps - 1` inner steps."""
from __future__ import annotations

import numpy as np
import torch

from ..attribution.engine import per_example
from ..attribution.integrated_gradients import gaussian_blur
from ._registry import register


def curves(ctx, order: torch.Tensor, steps: int, mode: str, baseline: torch.Tensor,
           ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Return (N, steps + 1) target probabilities along the deletion or insertion path of `order` (N, HW):
    step k replaces the first k/steps of the ranked pixels (all channels), every step of every image batched.
    `ends`: the (N,) probabilities at step 0 and at step `steps` (the path's start and end), already known;
    then only the steps between are run."""
    x = ctx.inputs
    n, c, h, w = x.shape
    hw = h * w
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=x.device).expand(n, hw))          # position of each pixel
    cut = torch.round(torch.linspace(0, hw, steps + 1, device=x.device)).long()       # pixels changed per step
    if ends is not None:
        cut = cut[1:-1]
    k = len(cut)
    changed = (rank[:, None, :] < cut[None, :, None]).to(x.dtype).view(n, k, 1, h, w)
    start, end = (x, baseline) if mode == "deletion" else (baseline, x)
    path = start[:, None] * (1 - changed) + end[:, None] * changed                   # (N, K, C, H, W)
    probs = ctx.probabilities(path.reshape(-1, c, h, w), ctx.target.repeat_interleave(k)).view(n, k)
    if ends is None:
        return probs
    return torch.cat([ends[0].to(probs)[:, None], probs, ends[1].to(probs)[:, None]], 1)


def auc(curve: torch.Tensor) -> np.ndarray:
    """Trapezoid area under (N, K+1) curves over [0, 1]."""
    k = curve.shape[1] - 1
    return ((curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * k)).double().cpu().numpy()


def endpoints(ctx, blur_sigma: float) -> dict[str, torch.Tensor]:
    """The baselines and the curves' shared end probabilities of this batch, computed once (`ctx.cache`):
    deletion removes towards a zero (mean-valued, after normalisation) image, insertion starts from a blur."""
    key = ("faithfulness.endpoints", float(blur_sigma))
    if key not in ctx.cache:
        x, t = ctx.inputs, ctx.target
        zero, blur = torch.zeros_like(x), gaussian_blur(x, blur_sigma)
        with torch.inference_mode():
            if ctx.logits is not None:
                clean = torch.softmax(ctx.logits.float(), 1).gather(1, t[:, None])[:, 0]
            else:
                clean = ctx.probabilities(x, t)
            p_zero = torch.softmax(ctx.model(zero[:1]).float(), 1)[0][t]
        ctx.cache[key] = {"zero": zero, "blur": blur, "clean": clean, "zero_p": p_zero,
                          "blur_p": ctx.probabilities(blur, t)}
    return ctx.cache[key]


def _both(ctx, order: torch.Tensor, steps: int, blur_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    e = endpoints(ctx, blur_sigma)
    return (auc(curves(ctx, order, steps, "deletion", e["zero"], ends=(e["clean"], e["zero_p"]))),
            auc(curves(ctx, order, steps, "insertion", e["blur"], ends=(e["blur_p"], e["clean"]))))


@register("faithfulness", per_method=True, passes="2 x (steps - 1) forwards (the ends: once per batch)",
          columns={"deletion_auc": (False, "area under the target probability as top-ranked pixels are removed"),
                   "insertion_auc": (True, "area under the target probability as top-ranked pixels are inserted")},
          steps=16, blur_sigma=4.0)
def faithfulness(ctx, method: str, steps: int, blur_sigma: float) -> dict[str, np.ndarray]:
    order = torch.sort(ctx.maps[method].flatten(1), dim=1, descending=True, stable=True).indices
    deletion, insertion = _both(ctx, order, steps, blur_sigma)
    return {"deletion_auc": deletion, "insertion_auc": insertion}


@register("faithfulness_random", per_method=False,
          passes="2 x (steps - 1) forwards, shared by all methods (the ends: once per batch)",
          columns={"deletion_auc_random": (False, "deletion AUC in a random pixel order (reference)"),
                   "insertion_auc_random": (True, "insertion AUC in a random pixel order (reference)")},
          steps=16, blur_sigma=4.0)
def faithfulness_random(ctx, steps: int, blur_sigma: float) -> dict[str, np.ndarray]:
    n, _, h, w = ctx.inputs.shape
    order = per_example(ctx.generators(71), lambda g: torch.rand(h * w, generator=g, device=ctx.inputs.device)
                        ).argsort(1)
    deletion, insertion = _both(ctx, order, steps, blur_sigma)
    return {"deletion_auc_random": deletion, "insertion_auc_random": insertion}

"""Occlusion: for each window, the drop of the target logit when the window is replaced by a baseline,
spread over the window's pixels and averaged over the windows covering each pixel (Zeiler & Fergus 2014,
https://arxiv.org/abs/1311.2901; Captum's `Occlusion` over all channels)."""
from __future__ import annotations

import torch

from ..errors import XAuditError
from ._registry import MethodOutput, register


@register("occlusion", forward_only=True, resolution="window", paper="https://arxiv.org/abs/1311.2901", window=8, stride=4, baseline=0.0)
def occlusion(ctx, window: int, stride: int, baseline: float) -> MethodOutput:
    """Return the occlusion attributions (N, C, H, W); every window of every image is batched together.
    Windows start every `stride` pixels; the last one on each side is cut at the border. Pixels no window
    covers (stride > window) get 0."""
    x = ctx.inputs
    n, c, h, w = x.shape
    if not 1 <= window <= min(h, w):
        raise XAuditError(f"occlusion: 'window' must be from 1 to the input's shorter side {min(h, w)} "
                          f"(input_size {[h, w]}); got {window}")
    if stride < 1:
        raise XAuditError(f"occlusion: 'stride' must be at least 1; got {stride}")
    # as Captum: ceil((H - window) / stride) + 1 windows per side, so when the windows do not tile the image
    # (e.g. 299 px with the defaults) the last one is cut at the border instead of left out
    ys = [k * stride for k in range(-(-(h - window) // stride) + 1)]
    xs = [k * stride for k in range(-(-(w - window) // stride) + 1)]
    masks = torch.zeros(len(ys) * len(xs), 1, h, w, device=x.device, dtype=x.dtype)
    for i, (y0, x0) in enumerate((y0, x0) for y0 in ys for x0 in xs):
        masks[i, :, y0:y0 + window, x0:x0 + window] = 1
    fx = ctx.logits.gather(1, ctx.target[:, None])[:, 0].to(x.dtype)
    total = torch.zeros_like(x)
    per_call = max(1, ctx.max_batch // n)
    for s in range(0, len(masks), per_call):
        m = masks[s:s + per_call]                                    # (k, 1, H, W)
        occluded = (x[None] * (1 - m[:, None]) + baseline * m[:, None]).reshape(-1, c, h, w)
        drop = fx.repeat(len(m)) - ctx.target_output(occluded, ctx.target.repeat(len(m)))
        total += (drop.view(len(m), n, 1, 1, 1) * m[:, None]).sum(0)
    counts = masks.sum(0)                                            # (1, H, W)
    return MethodOutput(torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total)))

"""Shared machinery of the surrogate-model methods (LIME, KernelSHAP): feature masks, batched evaluation of
perturbations, and one batched weighted least-squares solve for all images.

A perturbation of image i is a binary vector z over its F features: feature f keeps the input where
z_f = 1 and takes the baseline where z_f = 0. The surrogate g(z) = c + sum_f phi_f z_f is fitted to the
target logit, weighted per sample; phi is spread back over each feature's pixels (Captum's convention).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import XAuditError, require_extra


def feature_masks(x: torch.Tensor, segments: str, n_segments: int) -> torch.Tensor:
    """Return (N, H, W) long feature ids: a regular grid of about `n_segments` cells, or SLIC superpixels
    (scikit-image) computed per image."""
    n, c, h, w = x.shape
    if segments == "grid":
        side = max(1, round(math.sqrt(n_segments)))
        rows = torch.div(torch.arange(h, device=x.device) * side, h, rounding_mode="floor")
        cols = torch.div(torch.arange(w, device=x.device) * side, w, rounding_mode="floor")
        return (rows[:, None] * side + cols[None, :]).expand(n, h, w).clone()
    if segments == "slic":
        require_extra("slic", "attribute: segments='slic' (use segments='grid' otherwise)")
        from skimage.segmentation import slic
        arr = x.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
        masks = [slic(a, n_segments=n_segments, compactness=0.1, start_label=0, channel_axis=-1) for a in arr]
        return torch.as_tensor(masks, dtype=torch.long, device=x.device)
    raise XAuditError(f"attribute: 'segments' must be 'grid' or 'slic'; got {segments!r}")


def compact(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Renumber each image's feature ids to 0..F_i-1; returns the masks and F = max_i F_i (unused ids of
    images with fewer features never vary, and get attribution 0)."""
    out = torch.empty_like(masks)
    n_features = 1
    for i in range(len(masks)):
        _, inv = torch.unique(masks[i], return_inverse=True)
        out[i] = inv
        n_features = max(n_features, int(inv.max()) + 1)
    return out, n_features


def feature_counts(masks: torch.Tensor) -> list[int]:
    """Return each example's number of features (its mask's largest id + 1) from compact (N, H, W) masks."""
    return [int(v) for v in (masks.flatten(1).amax(1) + 1).tolist()]


def draw_per_example(ctx, salt: int, masks: torch.Tensor, f: int,
                     draw: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor:
    """Return (N, S, f) coalitions: draw(generator, F_i) -> (S, F_i) from each example's own generator and
    feature count, zero-padded to the batch's f. A padded feature has no pixels and never varies, so its
    coefficient is 0 and the other coefficients are those the example gets alone."""
    parts = []
    for g, fi in zip(ctx.generators(salt), feature_counts(masks)):
        z = draw(g, fi)
        parts.append(torch.nn.functional.pad(z, (0, f - z.shape[1])))
    return torch.stack(parts)


def evaluate_perturbations(ctx, z: torch.Tensor, masks: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Return the target logit of every perturbation: z (N, S, F) binary -> (N, S), evaluated across images
    and samples together in chunks of `ctx.max_batch` model inputs."""
    x = ctx.inputs
    n, s, _ = z.shape
    c, h, w = x.shape[1:]
    flat_mask = masks.view(n, 1, h * w)
    out = torch.empty(n, s, device=x.device, dtype=ctx.logits.dtype)
    per_call = max(1, ctx.max_batch // n)
    for start in range(0, s, per_call):
        zc = z[:, start:start + per_call]                                   # (N, k, F)
        keep = torch.gather(zc.to(x.dtype), 2, flat_mask.expand(n, zc.shape[1], h * w))
        keep = keep.view(n, zc.shape[1], 1, h, w)
        pert = baseline[:, None] + (x - baseline)[:, None] * keep          # (N, k, C, H, W)
        tgt = ctx.target[:, None].expand(n, zc.shape[1]).reshape(-1)
        out[:, start:start + zc.shape[1]] = ctx.target_output(pert.reshape(-1, c, h, w), tgt).view(n, -1)
    return out


def weighted_least_squares(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float) -> torch.Tensor:
    """Return phi (N, F) of the surrogates y ~ c + z phi for all images in one batched solve (float64).

    ridge > 0: (Z1' W Z1 + ridge I) beta = Z1' W y, the intercept unregularised. ridge = 0: the
    minimum-norm least-squares solution of sqrt(W) Z1 beta = sqrt(W) y, which stays finite when there are
    fewer informative samples than features (paired coalitions, unused feature ids). A feature whose column
    is all zero (padding) gets 0 either way, and leaves the other coefficients as without it."""
    z = z.double()
    n, s, f = z.shape
    z1 = torch.cat([z, torch.ones(n, s, 1, dtype=z.dtype, device=z.device)], 2)
    if ridge == 0:
        sw = weights.double().sqrt()[..., None]
        a, b = (z1 * sw).cpu(), (y.double()[..., None] * sw).cpu()
        beta = torch.linalg.lstsq(a, b, driver="gelsd").solution            # gelsd: rank-revealing (CPU)
        return beta[:, :f, 0].to(z.device)
    wz = z1 * weights.double()[..., None]
    A = wz.transpose(1, 2) @ z1
    A = A + ridge * torch.diag(torch.cat([torch.ones(f), torch.zeros(1)])).to(A)
    b = wz.transpose(1, 2) @ y.double()[..., None]
    return torch.linalg.solve(A, b)[:, :f, 0]


def spread(phi: torch.Tensor, masks: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Return input-shaped (N, C, H, W) attributions: each feature's coefficient on each of its pixels."""
    n, h, w = masks.shape
    per_pixel = torch.gather(phi.to(dtype), 1, masks.view(n, -1)).view(n, 1, h, w)
    return per_pixel.expand(n, channels, h, w).contiguous()


def baseline_for(ctx, value: float) -> torch.Tensor:
    return torch.full_like(ctx.inputs, float(value))

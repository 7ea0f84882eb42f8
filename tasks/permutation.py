"""Permutation importance for images, per slice (from the TensorFlow seed, made for images): shuffle one
region of the image across the slice's examples and measure how much the slice's accuracy drops
(Breiman 2001; Fisher et al. 2019, https://arxiv.org/abs/1801.01489). One map of region importances per slice.

    importance(slice, r) = accuracy(slice) - mean_k accuracy(slice with region r permuted by pi_k)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .stopping import check as check_stop

COLUMNS = ["slice_key", "slice_value", "region", "row", "col", "importance", "accuracy", "n", "repeats"]


def grid_regions(h: int, w: int, grid: int, device=None) -> torch.Tensor:
    """Return (grid * grid, H, W) boolean masks of a regular grid, row-major."""
    rows = torch.div(torch.arange(h, device=device) * grid, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w, device=device) * grid, w, rounding_mode="floor")
    cell = rows[:, None] * grid + cols[None, :]
    return torch.stack([cell == r for r in range(grid * grid)])


def _accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, max_batch: int) -> torch.Tensor:
    """Return (N,) correctness of the model's predictions, in chunks, without autograd."""
    out = torch.empty(len(x), dtype=torch.bool, device=x.device)
    with torch.inference_mode():
        for s in range(0, len(x), max_batch):
            out[s:s + max_batch] = model(x[s:s + max_batch]).argmax(1) == labels[s:s + max_batch]
    return out


def permutation_importance(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                           groups: dict[tuple[str, str], np.ndarray], grid: int = 4, repeats: int = 3,
                           seed: int = 0, max_batch: int = 256) -> pd.DataFrame:
    """Return one row per (slice, region): the drop of the slice's accuracy when that region is shuffled
    across the slice's images, averaged over `repeats` permutations. `groups` maps (slice_key, slice_value)
    to row indices of `inputs`. All regions and repeats of a slice are evaluated in batched forwards; the
    permutations are drawn from one generator in (slice, region, repeat) order, so runs repeat."""
    n, c, h, w = inputs.shape
    regions = grid_regions(h, w, grid, inputs.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for (key, value), idx in groups.items():
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=inputs.device)
        m = len(idx_t)
        if m < 2:
            continue
        x, y = inputs[idx_t], labels[idx_t].to(inputs.device)
        base = _accuracy(model, x, y, max_batch).float().mean().item()
        perms = torch.stack([torch.randperm(m, generator=g) for _ in range(len(regions) * repeats)]).to(x.device)
        perms = perms.view(len(regions), repeats, m)
        drops = []
        for r, region in enumerate(regions):
            check_stop(f"permutation importance, {key}={value}, region {r + 1} of {len(regions)}")
            variants = torch.where(region, x[perms[r]], x[None])                    # (repeats, m, C, H, W)
            correct = _accuracy(model, variants.reshape(-1, c, h, w), y.repeat(repeats), max_batch)
            drops.append(base - correct.float().view(repeats, m).mean(1).mean().item())
        for r, drop in enumerate(drops):
            rows.append(dict(slice_key=key, slice_value=value, region=r, row=r // grid, col=r % grid,
                             importance=drop, accuracy=base, n=m, repeats=repeats))
    return pd.DataFrame(rows, columns=COLUMNS)

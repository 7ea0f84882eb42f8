"""Permutation importance per slice against a direct loop on a tiny case."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xaudit.tasks.permutation import grid_regions, permutation_importance


class TopLeft(nn.Module):
    """Class 1 when the top-left quarter is bright, else class 0: only region 0 matters."""
    def forward(self, x):
        s = x[:, :, :2, :2].mean((1, 2, 3))
        return torch.stack([-s, s], 1)


def test_permutation_importance_equals_a_direct_loop():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 4, 4)
    x[:3, :, :2, :2] += 3
    x[3:, :, :2, :2] -= 3
    model = TopLeft().eval()
    labels = model(x).argmax(1)                     # the model is right on every image
    groups = {("overall", "all"): np.arange(6), ("site", "A"): np.array([0, 1, 3, 4])}
    got = permutation_importance(model, x, labels, groups, grid=2, repeats=3, seed=5)
    # direct loop: the same permutations, drawn in (slice, region, repeat) order from the same generator
    g = torch.Generator().manual_seed(5)
    regions = grid_regions(4, 4, 2)
    for (key, value), idx in groups.items():
        idx = torch.as_tensor(idx)
        m = len(idx)
        perms = [torch.randperm(m, generator=g) for _ in range(4 * 3)]
        base = (model(x[idx]).argmax(1) == labels[idx]).float().mean().item()
        for r in range(4):
            accs = []
            for k in range(3):
                perm = perms[r * 3 + k]
                xs = x[idx].clone()
                for i in range(m):
                    xs[i][:, regions[r]] = x[idx][perm[i]][:, regions[r]]
                accs.append((model(xs).argmax(1) == labels[idx]).float().mean().item())
            row = got[(got.slice_value == value) & (got.region == r)].iloc[0]
            assert abs(row.importance - (base - np.mean(accs))) < 1e-6      # float32 means
    overall = got[got.slice_value == "all"].set_index("region").importance
    assert overall[0] > 0 and (overall[[1, 2, 3]] == 0).all()      # only the region the model reads matters

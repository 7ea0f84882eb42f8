"""Agreement between methods: per example, the Spearman rank correlation of each other method's map with
this method's map, averaged over the other methods (1 = same ranking of pixels)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ._registry import register


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Spearman correlation (average ranks for ties) of (N, P) arrays; NaN for constant rows."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), np.nan)


@register("agreement", per_method=True, passes="none",
          columns={"agreement": (True, "mean Spearman correlation of this map with the other methods' maps")})
def agreement(ctx, method: str) -> dict[str, np.ndarray]:
    others = [m for m in ctx.maps if m != method]
    mine = ctx.maps[method].flatten(1).double().cpu().numpy()
    if not others:
        return {"agreement": np.full(len(mine), np.nan)}
    rhos = np.stack([rank_correlation(mine, ctx.maps[o].flatten(1).double().cpu().numpy()) for o in others])
    defined = np.isfinite(rhos)
    count = defined.sum(0)
    # NaN where no other map has a defined correlation (a constant map), without numpy's empty-mean warning
    return {"agreement": np.where(count > 0, np.where(defined, rhos, 0).sum(0) / np.maximum(count, 1), np.nan)}

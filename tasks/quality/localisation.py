"""Localisation against a region-of-interest mask: the share of the map's mass inside it, and the pointing
game (Zhang et al. 2016, https://arxiv.org/abs/1608.00507): is the map's peak inside it."""
from __future__ import annotations

import numpy as np
import torch

from ._registry import register


@register("localisation", per_method=True, passes="none",
          columns={"roi_mass": (True, "share of the map's mass inside the region of interest"),
                   "pointing_game": (True, "1 if the map's peak lies inside the region of interest")})
def localisation(ctx, method: str) -> dict[str, np.ndarray]:
    """NaN without a ROI, or where the ROI or the map is empty."""
    heat = ctx.maps[method]
    n = len(heat)
    if ctx.roi is None:
        return {"roi_mass": np.full(n, np.nan), "pointing_game": np.full(n, np.nan)}
    h = heat.flatten(1).double()
    r = ctx.roi.flatten(1).to(h.device)
    total = h.sum(1)
    defined = (total > 0) & r.any(1)
    mass = torch.where(defined, (h * r).sum(1) / total.clamp_min(1e-12), torch.nan)
    peak = r.gather(1, h.argmax(1, keepdim=True))[:, 0].double()
    return {"roi_mass": mass.cpu().numpy(), "pointing_game": torch.where(defined, peak, torch.nan).cpu().numpy()}

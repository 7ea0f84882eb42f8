"""Model-randomisation sanity check (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292): re-initialise
the model's parameterised layers one by one from the output towards the input (cumulatively), recompute
each method's maps on a sample of images, and measure their similarity to the original maps (Spearman rank
correlation of |map| and SSIM). A method whose maps barely change with the model is not explaining it."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..stopping import check as check_stop
from .agreement import rank_correlation

INSENSITIVE = 0.5     # mean |Spearman| with the fully randomised model above this: flagged


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row global SSIM of maps scaled to [0, 1] (one window over the whole map; C1, C2 as Wang et al.)."""
    def unit(m):
        lo, hi = m.min(1, keepdims=True), m.max(1, keepdims=True)
        return (m - lo) / np.where(hi > lo, hi - lo, 1)
    a, b = unit(a), unit(b)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = a.mean(1), b.mean(1)
    va, vb = a.var(1), b.var(1)
    cov = ((a - ma[:, None]) * (b - mb[:, None])).mean(1)
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, from the output back to the input."""
    return [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))][::-1]


def randomisation_check(model: nn.Module, inputs: torch.Tensor, methods: list[str],
                        maps_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                        target: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Return one row per (method, step): `layer` randomised last (cumulative from the top), `spearman`,
    `ssim` (means over the images), and `insensitive` on the final step when the maps barely changed.
    `maps_of(model, inputs, target)` returns each method's (N, H, W) display maps."""
    original = {m: v.flatten(1).double().cpu().numpy() for m, v in maps_of(model, inputs, target).items()}
    randomised = copy.deepcopy(model)
    torch.manual_seed(seed)
    rows = []
    layers = parameter_layers(randomised)
    for step, name in enumerate(layers, 1):
        check_stop(f"randomisation check, layer {step} of {len(layers)}")
        module = randomised.get_submodule(name)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)
        now = maps_of(randomised, inputs, target)
        for m in methods:
            cur = now[m].flatten(1).double().cpu().numpy()
            with warnings.catch_warnings():      # all maps constant: NaN, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
                rows.append(dict(method=m, step=step, layer=name,
                                 spearman=float(np.nanmean(np.abs(rank_correlation(original[m], cur)))),
                                 ssim=float(np.nanmean(ssim(original[m], cur)))))
    table = pd.DataFrame(rows, columns=["method", "step", "layer", "spearman", "ssim"])
    last = table.step == len(layers)
    table["insensitive"] = last & (table.spearman > INSENSITIVE)
    return table

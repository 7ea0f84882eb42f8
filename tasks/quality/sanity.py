"""Model-randomisation sanity check (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292): re-initialise
the model's parameterised layers cumulatively from the output towards the input, recompute each method's maps
on a sample of images at a handful of depths of that cascade (after the top layer, then evenly spaced, last
after every layer, as the paper plots it by blocks), and measure their similarity to the original maps
(Spearman rank correlation of |map| and SSIM). A method whose maps barely change with the model is not
explaining it. The cost is (1 + depths) x the methods' cost on the sample, whatever the model's depth."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import progress
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


def cascade(layers: list[str], depths: int) -> list[list[str]]:
    """Split the cascade `layers` (output first) into the groups randomised before each measurement: the top
    layer alone, then evenly spaced groups, the last ending at the input; `depths` 0 (or at least the number of
    layers) measures after every layer."""
    n = len(layers)
    if depths <= 0 or depths >= n:
        return [[name] for name in layers]
    if depths == 1:
        return [layers]
    ends = [1] + [1 + round((n - 1) * i / (depths - 1)) for i in range(1, depths)]
    return [layers[a:b] for a, b in zip([0] + ends[:-1], ends)]


def randomise(module: nn.Module) -> None:
    """Re-initialise the parameters `module` owns directly."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for p in module.parameters(recurse=False):
            nn.init.normal_(p, std=0.02)


def randomisation_check(model: nn.Module, inputs: torch.Tensor, methods: list[str],
                        maps_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                        target: torch.Tensor, seed: int = 0, depths: int = 0) -> pd.DataFrame:
    """Return one row per (method, step): `layer` randomised last (cumulative from the top), `n_layers`
    randomised so far, `spearman`, `ssim` (means over the images), and `insensitive` on the final step when the
    maps barely changed. `maps_of(model, inputs, target)` returns each method's (N, H, W) display maps;
    `depths` is the number of measurements along the cascade (see `cascade`; 0: after every layer)."""
    original = {m: v.flatten(1).double().cpu().numpy() for m, v in maps_of(model, inputs, target).items()}
    progress.advance("randomisation check")
    randomised = copy.deepcopy(model)
    torch.manual_seed(seed)
    rows = []
    groups = cascade(parameter_layers(randomised), depths)
    done = 0
    for step, group in enumerate(groups, 1):
        check_stop(f"randomisation check, depth {step} of {len(groups)}")
        for name in group:
            randomise(randomised.get_submodule(name))
        done += len(group)
        now = maps_of(randomised, inputs, target)
        progress.advance("randomisation check")
        for m in methods:
            cur = now[m].flatten(1).double().cpu().numpy()
            with warnings.catch_warnings():      # all maps constant: NaN, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
                rows.append(dict(method=m, step=step, layer=group[-1], n_layers=done,
                                 spearman=float(np.nanmean(np.abs(rank_correlation(original[m], cur)))),
                                 ssim=float(np.nanmean(ssim(original[m], cur)))))
    table = pd.DataFrame(rows, columns=["method", "step", "layer", "n_layers", "spearman", "ssim"])
    last = table.step == len(groups)
    table["insensitive"] = last & (table.spearman > INSENSITIVE)
    return table

"""The registry of explanation-quality checks: each file registers a function that returns per-example
columns for one batch, so quality is sliced, bootstrapped and gated exactly like metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class QualityContext:
    """One batch: the model, normalised `inputs` (N, C, H, W), the explained `target` (N,), each method's raw
    `attributions` and full-resolution display `maps` (N, H, W), the ROI (N, H, W) bool or None, and
    `explain(method, x, target, keys)` to recompute a method's raw attributions on other inputs (`keys`: one
    per input, for the sampling methods' per-example draws; None: positions)."""

    model: torch.nn.Module
    inputs: torch.Tensor
    target: torch.Tensor
    attributions: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    roi: torch.Tensor | None
    explain: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
    max_batch: int = 256
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    keys: list[int] | None = None
    # explain_all(methods, x, target, keys) -> {method: raw attributions}: several methods on the same inputs in
    # one call (the gradient family then shares one pass); None: `explain` once per method
    explain_all: Callable[..., dict[str, torch.Tensor]] | None = None
    cache: dict[Any, Any] = field(default_factory=dict)     # results checks share within the batch
    logits: torch.Tensor | None = None      # the batch's clean logits (N, K), when the caller has them

    def generators(self, salt: int) -> list[torch.Generator]:
        """One generator per example (seed, salt, the example's key or position): checks draw per example,
        so an example's scores do not depend on the batch it was scored in."""
        from ..attribution.engine import example_generators
        keys = self.keys if self.keys is not None else range(len(self.inputs))
        return example_generators(self.seed, salt, keys, self.inputs.device)

    def probabilities(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return softmax(model(x))[i, target_i], in chunks of `max_batch`, without autograd."""
        out = torch.empty(len(x), device=x.device)
        with torch.inference_mode():
            for s in range(0, len(x), self.max_batch):
                p = torch.softmax(self.model(x[s:s + self.max_batch]).float(), 1)
                out[s:s + self.max_batch] = p.gather(1, target[s:s + self.max_batch, None])[:, 0]
        return out


@dataclass(frozen=True)
class Check:
    """A registered quality check. `fn(ctx, **params)` returns {column: (N,) numpy} for one method
    (`per_method=True`, called once per method with `method=`) or for the whole batch.
    `columns` maps each column to (higher_is_better, description)."""

    name: str
    fn: Callable[..., dict[str, np.ndarray]]
    per_method: bool
    columns: dict[str, tuple[bool, str]]
    defaults: dict[str, Any]
    passes: str          # the model passes it needs per image, for the cost table


CHECKS: dict[str, Check] = {}


def register(name: str, *, per_method: bool, columns: dict[str, tuple[bool, str]], passes: str, **defaults: Any):
    def wrap(fn):
        if name in CHECKS:
            raise RuntimeError(f"quality check {name!r} registered twice")
        CHECKS[name] = Check(name, fn, per_method, columns, dict(defaults), passes)
        return fn
    return wrap

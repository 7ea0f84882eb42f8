"""The registry of slice metrics. A metric maps replicate weights W (R, n) over a slice's examples to
R values (or R x K for per-class metrics); row 0 of W is all ones, the point estimate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import XAuditError


@dataclass(frozen=True)
class SliceData:
    """One slice's examples: `labels` (n,), `predictions` (n,), `probabilities` (n, K)."""

    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.probabilities.shape[1]

    def classes_present(self) -> np.ndarray:
        """Classes in labels or predictions (scikit-learn's `unique_labels`, the macro average's classes)."""
        return np.union1d(self.labels, self.predictions)


@dataclass(frozen=True)
class Metric:
    """A registered metric, with the metadata a report and a threshold need."""

    name: str
    fn: Callable[[SliceData, np.ndarray], np.ndarray]
    higher_is_better: bool
    bounds: tuple[float, float]
    per_class: bool
    description: str


METRICS: dict[str, Metric] = {}


def register(name: str, *, higher_is_better: bool, bounds: tuple[float, float] = (0.0, 1.0),
             per_class: bool = False, description: str = ""):
    """Register `fn(data, W) -> values` as metric `name`."""
    def wrap(fn):
        if name in METRICS:
            raise RuntimeError(f"metric {name!r} registered twice")
        METRICS[name] = Metric(name, fn, higher_is_better, bounds, per_class, description or (fn.__doc__ or "").strip())
        return fn
    return wrap


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise XAuditError(f"metrics: 'metrics' must name registered metrics {sorted(METRICS)}; got {name!r}")
    return METRICS[name]


def ratio(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """Return num / den, with `empty` where den == 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def weighted_mean(values: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Return the W-weighted mean of per-example `values` (n,) for each replicate (R,), computed in W's dtype
    (float64 for point estimates, float32 for bootstrap replicates, whose integer weights float32 holds exactly)."""
    return ratio(W @ values.astype(W.dtype), W.sum(1))


def one_hot(index: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    out = np.zeros((len(index), k), dtype=dtype)
    out[np.arange(len(index)), index] = 1.0
    return out

"""The registry of slice metrics. A metric maps replicate weights W (R, n) over a slice's examples to
R values (or R x K for per-class metrics); the point estimate is the replicate with all weights one.

Most metrics are functions of weighted sums of per-example statistics (counts, losses, bin contents). Such a
metric registers `columns(data) -> (n, s)` and `finish(sums (R, s), data) -> values`; `evaluate` then
computes the sums of every such metric of a slice in one matrix product over the replicate weights (metrics
that share a `columns` function share its columns). Any other metric registers `fn(data, W)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import XAuditError


@dataclass(frozen=True)
class SliceData:
    """One slice's examples: `labels` (n,), `predictions` (n,), `probabilities` (n, K). `cache` keeps work
    that depends only on the slice (a sort order, say) between the point estimate and the replicate chunks."""

    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray
    cache: dict = field(default_factory=dict, compare=False, repr=False)

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
    columns: Callable[[SliceData], np.ndarray] | None = None
    finish: Callable[[np.ndarray, SliceData], np.ndarray] | None = None


METRICS: dict[str, Metric] = {}


def register(name: str, *, higher_is_better: bool, bounds: tuple[float, float] = (0.0, 1.0),
             per_class: bool = False, description: str = "",
             columns: Callable[[SliceData], np.ndarray] | None = None):
    """Register `fn(data, W) -> values` as metric `name`; with `columns`, register `fn(sums, data) -> values`,
    a function of the weighted sums of `columns(data)` (an additive metric, computed by one matrix product)."""
    def wrap(fn):
        if name in METRICS:
            raise RuntimeError(f"metric {name!r} registered twice")
        doc = description or (fn.__doc__ or "").strip()
        if columns is None:
            METRICS[name] = Metric(name, fn, higher_is_better, bounds, per_class, doc)
        else:
            def direct(d: SliceData, W: np.ndarray, _fn=fn) -> np.ndarray:
                X = columns(d)
                return _fn(W @ X.reshape(len(X), -1).astype(W.dtype), d)
            METRICS[name] = Metric(name, direct, higher_is_better, bounds, per_class, doc, columns, fn)
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


def one_hot(index: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    out = np.zeros((len(index), k), dtype=dtype)
    out[np.arange(len(index)), index] = 1.0
    return out

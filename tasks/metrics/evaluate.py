"""Slice the examples, compute every metric per slice, and bootstrap intervals for all replicates at once.

Poisson bootstrap: replicate r gives example i the weight W[r, i] ~ Poisson(1), drawn once per example for
the whole dataset (so slices, and two models scored on the same examples, share replicates: a paired
bootstrap). Metrics are functions of W, so R replicates cost a few matrix products, not R Python loops.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import XAuditError
from ._registry import METRICS, SliceData, get_metric, weighted_mean

OVERALL = ("overall", "all")
COLUMNS = ["slice_key", "slice_value", "metric", "sub_key", "value", "ci_low", "ci_high", "n", "suppressed"]


@dataclass(frozen=True)
class ExampleStat:
    """A per-example statistic (NaN where undefined) aggregated per slice as a weighted mean."""

    values: np.ndarray
    higher_is_better: bool
    bounds: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Evaluation:
    """The long metrics table, the bootstrap settings, and every (slice, metric, sub_key)'s replicates."""

    table: pd.DataFrame
    method: str
    replicates: int
    seed: int
    level: float
    samples: dict[tuple[str, str, str, str], np.ndarray] = field(repr=False, default_factory=dict)
    directions: dict[str, bool] = field(default_factory=dict)


_BUCKETS = re.compile(r"^(?P<col>[^:=]+):(?:q(?P<q>\d+)|bins\((?P<edges>[^)]*)\))$")


def _term(metadata: pd.DataFrame, term: str) -> tuple[str, pd.Series, np.ndarray | None]:
    """Return (key, per-row label, row mask or None) for one term of a slice spec."""
    def column(name: str) -> pd.Series:
        if name not in metadata.columns:
            raise XAuditError(f"metrics: slice columns [{name!r}] are not metadata columns; "
                              f"available: {list(metadata.columns)}")
        return metadata[name]
    if "=" in term:                                            # value filter: site=C
        name, value = term.split("=", 1)
        col = column(name).astype("string").fillna("null")
        return name, col, (col == value).to_numpy()
    m = _BUCKETS.match(term)
    if m:                                                      # numeric buckets: confidence:q10, x:bins(0,0.5,1)
        col = pd.to_numeric(column(m["col"]), errors="coerce")
        if m["q"]:
            q = int(m["q"])
            if q < 2:
                raise XAuditError(f"metrics: slice term {term!r} needs at least 2 quantile buckets")
            edges = np.unique(np.nanquantile(col.to_numpy(dtype=float), np.linspace(0, 1, q + 1)))
        else:
            try:
                edges = np.array(sorted(float(e) for e in m["edges"].split(",")))
            except ValueError:
                raise XAuditError(f"metrics: slice term {term!r} must be 'col:bins(e0,e1,...)' with numbers") from None
        idx = np.clip(np.searchsorted(edges, col.to_numpy(dtype=float), side="right") - 1, 0, len(edges) - 2)
        labels = np.array([f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{']' if i == len(edges) - 2 else ')'}"
                           for i in range(len(edges) - 1)] or ["all"], dtype=object)
        out = pd.Series(labels[idx] if len(edges) > 1 else "all", index=metadata.index, dtype="string")
        return term, out.where(col.notna(), "null"), None
    return term, column(term).astype("string").fillna("null"), None


def slice_groups(metadata: pd.DataFrame, specs: Sequence[Sequence[str]]) -> list[tuple[str, str, np.ndarray]]:
    """Return (slice_key, slice_value, row indices) for every slice.

    Each spec is a list of terms crossed together; [] is overall. A term is a column (one slice per value;
    missing values form the slice 'null'), a value filter 'col=value' (only that value), or numeric buckets
    'col:q10' (quantile buckets) / 'col:bins(0,0.5,1)' (fixed edges). Keys and values of crosses are joined
    with '&'; a slice with no rows under a filter still gets its row (n = 0).
    """
    out: list[tuple[str, str, np.ndarray]] = []
    metadata = metadata.reset_index(drop=True)
    for spec in specs:
        spec = list(spec)
        if not spec:
            out.append((*OVERALL, np.arange(len(metadata))))
            continue
        terms = [_term(metadata, t) for t in spec]
        keep = np.ones(len(metadata), dtype=bool)
        for _, _, mask in terms:
            if mask is not None:
                keep &= mask
        key = "&".join(k for k, _, _ in terms)
        labels = pd.DataFrame({f"t{i}": lab for i, (_, lab, _) in enumerate(terms)})[keep]
        groups = labels.groupby(list(labels.columns), sort=True).indices if len(labels) else {}
        if not groups and all(mask is not None for _, _, mask in terms):
            value = "&".join(t.split("=", 1)[1] for t in spec)
            out.append((key, value, np.zeros(0, dtype=np.int64)))
        positions = np.flatnonzero(keep)
        for values, idx in groups.items():
            values = values if isinstance(values, tuple) else (values,)
            out.append((key, "&".join(map(str, values)), positions[np.asarray(idx)]))
    seen: set[tuple[str, str]] = set()
    unique = []
    for g in out:                      # 'site' and 'site=C' both give site=C: keep it once
        if g[:2] not in seen:
            seen.add(g[:2])
            unique.append(g)
    return unique


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < 2:
        return np.nan, np.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return float(lo), float(hi)


def evaluate(
    labels: np.ndarray,
    probabilities: np.ndarray,
    metadata: pd.DataFrame,
    slices: Sequence[Sequence[str]] = ((),),
    metrics: Sequence[str] | None = None,
    example_stats: dict[str, ExampleStat] | None = None,
    class_names: Sequence[str] | None = None,
    replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_slice_size: int = 1,
    weights_budget_bytes: int = 64 << 20,
) -> Evaluation:
    """Return every metric for every slice, with percentile Poisson-bootstrap intervals.

    `labels` (n,) int, `probabilities` (n, K); predictions are the arg-max. Per-class metrics give one row per
    class (`sub_key` = class name). A slice with fewer than `min_slice_size` examples keeps one row per metric
    with its `n`, `suppressed=True` and null values. Confusion counts are point estimates (`confusion`,
    sub_key 'true->pred').
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n, k = probabilities.shape if probabilities.ndim == 2 else (len(labels), 0)
    if probabilities.ndim != 2 or len(labels) != n or len(metadata) != n:
        raise XAuditError(f"evaluate: 'labels' (n,), 'probabilities' (n, K) and 'metadata' (n rows) must agree; "
                          f"got {labels.shape}, {probabilities.shape}, {len(metadata)} rows")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    chosen = [get_metric(m) for m in (metrics if metrics is not None else sorted(METRICS))]
    stats = example_stats or {}
    for name, st in stats.items():
        if len(st.values) != n:
            raise XAuditError(f"evaluate: example stat {name!r} has {len(st.values)} values for {n} examples")
    predictions = probabilities.argmax(1)
    groups = slice_groups(metadata.reset_index(drop=True), slices)

    rows: list[dict] = []
    samples: dict[tuple[str, str, str, str], list[np.ndarray]] = {}
    point: dict[tuple[str, str, str, str], float] = {}

    def run(W_full: np.ndarray | None, is_point: bool) -> None:
        """Compute every metric of every slice; W_full is (n, R) replicate weights, or None for the point."""
        for key, value, idx in groups:
            if len(idx) < min_slice_size:
                continue
            W = np.ones((1, len(idx))) if W_full is None else W_full[idx].T     # (R, n_slice) view
            d = SliceData(labels[idx], predictions[idx], probabilities[idx])
            results: list[tuple[str, str, np.ndarray]] = []
            for m in chosen:
                v = m.fn(d, W)
                if m.per_class:
                    results += [(m.name, names[c], v[:, c]) for c in np.unique(d.labels)]
                else:
                    results.append((m.name, "", v))
            for name, st in stats.items():
                vals = st.values[idx].astype(np.float64)
                ok = np.isfinite(vals)
                results.append((name, "", weighted_mean(np.where(ok, vals, 0.0), W * ok)))
            for name, sub, v in results:
                kk = (key, value, name, sub)
                if is_point:
                    point[kk] = float(v[0])
                else:
                    samples.setdefault(kk, []).append(v)

    run(None, True)
    if replicates > 0:
        rng = np.random.default_rng(seed)
        per_chunk = max(1, min(replicates, weights_budget_bytes // max(1, 4 * n)))
        for start in range(0, replicates, per_chunk):
            r = min(per_chunk, replicates - start)
            # Poisson weights are small integers: float32 holds them (and their sums below 2**24) exactly.
            # Stored example-major (n, r) so a slice's rows are contiguous; metrics see the (r, n) transpose.
            run(rng.poisson(1.0, size=(r, n)).astype(np.float32).T.copy(), False)
    stacked = {kk: np.concatenate(v) for kk, v in samples.items()}

    for key, value, idx in groups:
        if len(idx) < min_slice_size:
            for m in [*(c.name for c in chosen if not c.per_class), *stats]:
                rows.append(dict(slice_key=key, slice_value=value, metric=m, sub_key="", value=None,
                                 ci_low=None, ci_high=None, n=len(idx), suppressed=True))
            continue
        for (sk, sv, m, sub), v in point.items():
            if (sk, sv) != (key, value):
                continue
            lo, hi = _interval(stacked[(sk, sv, m, sub)], level) if stacked else (np.nan, np.nan)
            rows.append(dict(slice_key=key, slice_value=value, metric=m, sub_key=sub,
                             value=None if not np.isfinite(v) else v, ci_low=None if np.isnan(lo) else lo,
                             ci_high=None if np.isnan(hi) else hi, n=len(idx), suppressed=False))
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (labels[idx], predictions[idx]), 1)
        for t, p in zip(*np.nonzero(cm)):
            rows.append(dict(slice_key=key, slice_value=value, metric="confusion", sub_key=f"{names[t]}->{names[p]}",
                             value=float(cm[t, p]), ci_low=None, ci_high=None, n=len(idx), suppressed=False))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["n"] = table["n"].astype("int64")
    for c in ("value", "ci_low", "ci_high"):
        table[c] = table[c].astype("float64")
    directions = {m.name: m.higher_is_better for m in chosen} | {s: st.higher_is_better for s, st in stats.items()}
    return Evaluation(table, "poisson_bootstrap_percentile", replicates, seed, level, stacked, directions)

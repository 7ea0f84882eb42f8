"""Slice the examples, compute every metric per slice, and bootstrap intervals for all replicates at once.

Poisson bootstrap: replicate r gives example i the weight W[r, i] ~ Poisson(1), drawn once per example for
the whole dataset (so slices, and two models scored on the same examples, share replicates: a paired
bootstrap). Metrics are functions of W, so R replicates cost a few matrix products, not R Python loops.
"""
from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from math import exp, factorial
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import XAuditError
from ._registry import METRICS, SliceData, get_metric, ratio

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


@dataclass(frozen=True)
class Term:
    """One parsed slice term: `column`, `kind` ('column', 'value', 'quantiles', 'bins'), and the filter value,
    quantile count or bin edges."""

    column: str
    kind: str
    value: str | None = None
    quantiles: int | None = None
    edges: tuple[float, ...] = ()


def parse_term(term: str) -> Term:
    """Return the parsed slice term, or raise `XAuditError` naming what is wrong with it (no data needed)."""
    if not isinstance(term, str) or not term.strip():
        raise XAuditError(f"metrics: 'slices' terms must be non-empty text; got {term!r}")
    if "=" in term:                                            # value filter: site=C
        name, value = term.split("=", 1)
        return Term(name, "value", value=value)
    m = _BUCKETS.match(term)
    if m:
        if m["q"]:
            q = int(m["q"])
            if not 2 <= q <= 1000:
                raise XAuditError(f"metrics: slice term {term!r} needs 2 to 1000 quantile buckets")
            return Term(m["col"], "quantiles", quantiles=q)
        try:
            edges = tuple(float(e) for e in m["edges"].split(","))
        except ValueError:
            raise XAuditError(f"metrics: slice term {term!r} must be 'col:bins(e0,e1,...)' with numbers") from None
        if len(edges) < 2 or not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise XAuditError(f"metrics: slice term {term!r} needs at least two finite, strictly increasing "
                              f"bin edges")
        return Term(m["col"], "bins", edges=edges)
    if ":" in term and "(" in term:
        raise XAuditError(f"metrics: slice term {term!r} is neither 'col', 'col=value', 'col:qN' nor "
                          f"'col:bins(e0,e1,...)'")
    return Term(term, "column")


def _edge_labels(edges: np.ndarray) -> list[str]:
    """Return '[a, b)' labels for consecutive edges (the last one closed, '[a, b]'), with as many significant
    digits as it takes for every edge to print differently (so buckets never share a label)."""
    def fmt(e: float, digits: int) -> str:
        # positional, not '4e+04': a slice name a reader can read ('[40000, 70000)'); scientific only where
        # positional would be unreadable (beyond 1e15 or below 1e-6)
        if e == 0 or 1e-6 <= abs(e) < 1e15:
            return np.format_float_positional(e, precision=digits, unique=False, fractional=False, trim="-")
        return f"{e:.{digits}g}"
    for digits in range(4, 18):
        text = [fmt(float(e), digits) for e in edges]
        if len(set(text)) == len(text):
            break
    return [f"[{text[i]}, {text[i + 1]}{']' if i == len(edges) - 2 else ')'}" for i in range(len(edges) - 1)]


def _text_labels(column: pd.Series) -> pd.Series:
    """Each row's slice label: its value as text, 'null' where it is missing, and a value that is the text
    'null' itself quoted ('"null"'), so a literal "null" and a missing value never share one slice."""
    col = column.astype("string")
    col = col.mask((col == "null").fillna(False), '"null"')
    return col.fillna("null")


def _term(metadata: pd.DataFrame, term: str) -> tuple[str, pd.Series, np.ndarray | None]:
    """Return (key, per-row label, row mask or None) for one term of a slice spec.

    Buckets are half-open [a, b), the last one closed [a, b]. Fixed edges: values below the first edge form
    the slice '< a', values above the last '> b' (never folded into the end buckets); missing or non-numeric
    values form 'null'. Quantile edges are the distinct quantiles of the values, so ties can leave fewer
    buckets than asked for."""
    parsed = parse_term(term)
    if parsed.column not in metadata.columns:
        raise XAuditError(f"metrics: slice columns [{parsed.column!r}] are not metadata columns; "
                          f"available: {list(metadata.columns)}")
    column = metadata[parsed.column]
    if parsed.kind == "value":
        col = _text_labels(column)
        return parsed.column, col, (col == parsed.value).to_numpy()
    if parsed.kind == "column":
        return term, _text_labels(column), None
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(values)
    if parsed.kind == "quantiles":
        edges = np.unique(np.quantile(values[finite], np.linspace(0, 1, parsed.quantiles + 1))) \
            if finite.any() else np.zeros(0)
    else:
        edges = np.asarray(parsed.edges, dtype=float)
    out = np.full(len(values), "null", dtype=object)
    if len(edges) == 1:                                        # every value equal: one closed bucket
        out[finite] = f"[{edges[0]:.6g}]"
    elif len(edges) > 1:
        labels = np.array(_edge_labels(edges), dtype=object)
        idx = np.searchsorted(edges, values, side="right") - 1
        idx = np.where(values == edges[-1], len(edges) - 2, idx)    # the last bucket is closed
        inside = finite & (idx >= 0) & (idx <= len(edges) - 2)
        out[inside] = labels[idx[inside]]
        low, high = _edge_labels(edges[[0, -1]])[0][1:-1].split(", ")
        out[finite & (values < edges[0])] = f"< {low}"
        out[finite & (values > edges[-1])] = f"> {high}"
    return term, pd.Series(out, index=metadata.index, dtype="string"), None


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


def _atoms(n: int, slices: Sequence[np.ndarray]):
    """Split the n examples into atoms, the classes of examples that lie in the same slices. Return (atom id
    per example, the examples ordered by atom, the atoms' bounds in that order, each slice's atom ids), or
    None when there are no slices."""
    if not slices or n == 0:
        return None
    atom = np.zeros(n, dtype=np.int64)
    for idx in slices:
        member = np.zeros(n, dtype=np.int64)
        member[idx] = 1
        _, atom = np.unique(atom * 2 + member, return_inverse=True)
        atom = atom.reshape(-1).astype(np.int64)
    perm = np.argsort(atom, kind="stable")
    counts = np.bincount(atom)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    members = [np.unique(atom[idx]) for idx in slices]
    return atom, perm, bounds, members


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < 2:
        return np.nan, np.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return float(lo), float(hi)


# P(K <= k) of Poisson(1) on a 32-bit grid: a uniform draw u gives k = the number of thresholds <= u
_GRID = np.round(np.cumsum([exp(-1.0) / factorial(k) for k in range(30)]) * 2.0**32)
_POISSON_1_THRESHOLDS = _GRID[_GRID < 2.0**32].astype(np.uint32)


# float32 holds every integer below 2**24; up to 2**23 examples a replicate's total weight (n +- 6 sqrt(n))
# stays below it, so sums of weights (and of weights times small integers) are exact, in any order
_EXACT_32 = 2.0**24
_FLOAT32_EXAMPLES = 2**23


def weight_dtype(n: int) -> type:
    """The dtype of the replicate weights for n examples: float32 while every sum of them is exact in it."""
    return np.float32 if n <= _FLOAT32_EXAMPLES else np.float64


def _total_weight_bound(n: int) -> float:
    """An upper bound on one replicate's total weight (Poisson(n)): n + 10 sqrt(n) + 100."""
    return n + 10.0 * np.sqrt(n) + 100.0


def poisson_weights(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    """Return (n, r) Poisson(1) counts, example-major, in `weight_dtype(n)`: the inverse CDF of 32-bit uniform
    draws (each probability exact to 2**-32), drawn replicate by replicate, so chunking the replicates does
    not change them. Four comparisons settle the 98% of draws below 4; the rest are looked up."""
    u = rng.integers(0, 2**32, size=(r, n), dtype=np.uint32)
    T = _POISSON_1_THRESHOLDS
    k = np.greater_equal(u, T[0]).view(np.uint8)
    above = np.empty_like(k, dtype=np.bool_)
    for t in T[1:4]:
        np.greater_equal(u, t, out=above)
        k += above.view(np.uint8)
    tail = np.flatnonzero(above)
    k.reshape(-1)[tail] = np.searchsorted(T, u.reshape(-1)[tail], side="right")
    return np.ascontiguousarray(k.T, dtype=weight_dtype(n))


def replicate_weights(n: int, replicates: int, seed: int, budget_bytes: int = 512 << 20):
    """Yield the bootstrap weights as example-major (n, r) chunks of replicates (`poisson_weights`), r chosen
    so a chunk fits in `budget_bytes`; concatenated along axis 1 they are the (n, replicates) weights of
    `evaluate`, whatever the budget."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, min(replicates, budget_bytes // max(1, np.dtype(weight_dtype(n)).itemsize * n)))
    for start in range(0, replicates, per_chunk):
        yield poisson_weights(rng, n, min(per_chunk, replicates - start))


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
    weights_budget_bytes: int = 512 << 20,
    threads: int | None = None,
) -> Evaluation:
    """Return every metric for every slice, with percentile Poisson-bootstrap intervals.

    `labels` (n,) int, `probabilities` (n, K); predictions are the arg-max. Per-class metrics give one row per
    class (`sub_key` = class name). A slice with fewer than `min_slice_size` examples keeps one row per metric
    with its `n`, `suppressed=True` and null values. Confusion counts are point estimates (`confusion`,
    sub_key 'true->pred').

    Replicate weights are drawn once per example for the whole dataset (`replicate_weights`), at most
    `weights_budget_bytes` of them at a time. Per slice, the additive metrics (and the example statistics)
    take one matrix product of the slice's weights with their per-example columns; other metrics get the
    weights themselves. Slices are computed on `threads` threads (default: the cores, at most 4); the
    numbers do not depend on it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n, k = probabilities.shape if probabilities.ndim == 2 else (len(labels), 0)
    if probabilities.ndim != 2 or len(labels) != n or len(metadata) != n:
        raise XAuditError(f"evaluate: 'labels' (n,), 'probabilities' (n, K) and 'metadata' (n rows) must agree; "
                          f"got {labels.shape}, {probabilities.shape}, {len(metadata)} rows")
    if n and not np.isfinite(probabilities).all():
        bad = int(np.flatnonzero(~np.isfinite(probabilities).all(1))[0])
        raise XAuditError(f"evaluate: 'probabilities' must be finite; row {bad} holds {probabilities[bad].tolist()[:6]}")
    if n and (probabilities.min() < -1e-6 or probabilities.max() > 1 + 1e-6
              or np.abs(probabilities.sum(1) - 1).max() > 1e-4 * max(1, k)):
        bad = int(np.flatnonzero((probabilities < -1e-6).any(1) | (probabilities > 1 + 1e-6).any(1)
                                 | (np.abs(probabilities.sum(1) - 1) > 1e-4 * max(1, k)))[0])
        raise XAuditError(f"evaluate: 'probabilities' must lie in [0, 1] and sum to 1 per row; row {bad} holds "
                          f"{np.round(probabilities[bad], 6).tolist()[:6]} (sum {probabilities[bad].sum():.6g})")
    if n and ((labels < 0) | (labels >= k)).any():
        raise XAuditError(f"evaluate: 'labels' must be class indices in 0..{k - 1}; got {labels[(labels < 0) | (labels >= k)][:5].tolist()}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    chosen = [get_metric(m) for m in (metrics if metrics is not None else sorted(METRICS))]
    stats = example_stats or {}
    for name, st in stats.items():
        if len(st.values) != n:
            raise XAuditError(f"evaluate: example stat {name!r} has {len(st.values)} values for {n} examples")
    predictions = probabilities.argmax(1)
    groups = [g for g in slice_groups(metadata.reset_index(drop=True), slices)]
    live = [(key, value, idx) for key, value, idx in groups if len(idx) >= min_slice_size]

    # Every additive metric's per-example columns, computed once for all examples (shared `columns` once),
    # plus (value, defined) per example statistic; `spans` says which columns each one reads.
    everyone = SliceData(labels, predictions, probabilities)
    blocks: list[np.ndarray] = []
    spans: dict[object, slice] = {}
    for m in chosen:
        if m.columns is not None and m.columns not in spans:
            X = np.asarray(m.columns(everyone), dtype=np.float64).reshape(n, -1)
            spans[m.columns] = slice(sum(b.shape[1] for b in blocks), sum(b.shape[1] for b in blocks) + X.shape[1])
            blocks.append(X)
    for name, st in stats.items():
        vals = np.asarray(st.values, dtype=np.float64)
        ok = np.isfinite(vals)
        spans[name] = slice(sum(b.shape[1] for b in blocks), sum(b.shape[1] for b in blocks) + 2)
        blocks.append(np.stack([np.where(ok, vals, 0.0), ok], 1))
    X64 = np.concatenate(blocks, 1) if blocks else np.zeros((n, 0))
    # The replicates' sums must not depend on the CPU: BLAS sums in an order its kernels choose, and the
    # rounding of that order (float32: ~1e-7 relative) moved a printed interval bound between two hosts. So
    # every sum is made exact, and exact sums are the same in any order. Columns of small integers (counts,
    # indicators) are exact as they are in one float32 product with the (integer) weights; every other column
    # is scaled by a power of two and rounded to integers small enough that any float64 sum of their products
    # with the weights stays below 2**53 (a resolution of 2**-32, or ~1e-11 of the column's largest value at
    # 10**5 examples, ~1e-8 at 10**8), and summed in float64.
    bound = _total_weight_bound(n)
    small = weight_dtype(n) == np.float32
    exact = np.array([small and bool(np.all(c == np.round(c))) and float(np.abs(c).max(initial=0)) * bound < _EXACT_32
                      for c in X64.T], dtype=bool)
    X_exact = np.ascontiguousarray(X64[:, exact], dtype=np.float32)
    X_real = np.ascontiguousarray(X64[:, ~exact])
    top = np.abs(X_real).max(0, initial=0.0)
    # 2**e, a power of two so scaling and unscaling are exact, with e = floor(log2(2**52 / (top * bound))) (the
    # finest exact grid), capped at 32 - floor(log2(top)) for top < 1 and 32 otherwise: 2**-32 is far below
    # any printed digit, and two evaluations of the same examples (a review's baseline and candidate) then
    # share one grid unless their columns' ranges differ, so their paired differences on equal examples are 0.
    # (1 for a column of zeros or one holding an infinity, which no scale makes exact)
    usable = np.isfinite(top) & (top > 0)
    safe = np.where(usable, top, 1.0)
    finest = np.floor(np.log2(2.0**52 / (safe * bound)))
    cap = 32.0 + np.maximum(0.0, -np.floor(np.log2(safe)))
    scale = np.where(usable, np.exp2(np.clip(np.minimum(finest, cap), -1000, 1000)), 1.0)
    np.rint(X_real * scale, out=X_real)
    # float64 copies of ~2 MiB of weight rows at a time (cache-sized: 1.5x faster than 16 MiB blocks)
    real_rows = max(64, (2 << 20) // 8 // max(1, min(replicates, 1 << 20)))
    local = threading.local()          # each thread's scratch buffers

    def gathered(name: str, most: int, W: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """W[rows], gathered into this thread's buffer `name` (at most `most` rows, reused across calls)."""
        buffer = getattr(local, name, None)
        if buffer is None or buffer.shape != (most, W.shape[1]) or buffer.dtype != W.dtype:
            buffer = np.empty((most, W.shape[1]), W.dtype)
            setattr(local, name, buffer)
        out = buffer[:len(rows)]
        np.take(W, rows, axis=0, out=out)
        return out

    def weighted_sums(Wn: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """(r, columns) float64: Wn.T @ X64[idx], every entry an exact sum (see above)."""
        out = np.empty((Wn.shape[1], X64.shape[1]))
        if exact.any():
            out[:, exact] = Wn.T @ X_exact[idx]
        if not exact.all():
            if Wn.dtype == np.float64:
                acc = Wn.T @ X_real[idx]
            else:                          # float32 weights: through a float64 copy, a block of rows at a time
                acc = np.zeros((Wn.shape[1], X_real.shape[1]))
                cast = getattr(local, "cast", None)
                if cast is None or cast.shape != (real_rows, Wn.shape[1]):
                    cast = local.cast = np.empty((real_rows, Wn.shape[1]))
                for start in range(0, len(idx), real_rows):
                    rows = cast[:min(real_rows, len(idx) - start)]
                    np.copyto(rows, Wn[start:start + real_rows])
                    acc += rows.T @ X_real[idx[start:start + real_rows]]
            out[:, ~exact] = acc / scale
        return out

    data = [SliceData(labels[idx], predictions[idx], probabilities[idx]) for _, _, idx in live]

    samples: dict[tuple[str, str, str, str], list[np.ndarray]] = {}
    point: dict[tuple[str, str, str, str], float] = {}

    # Atoms: the sets of examples that lie in exactly the same slices. Where slices overlap (overall, site,
    # site x group, ...) every slice is a union of atoms, and because the sums are exact, a slice's sums are
    # exactly the sum of its atoms' sums: each example's weight row then enters one product, not one per
    # slice it lies in. Used where that is less work and the atoms' sums fit in memory.
    atoms = _atoms(n, [idx for _, _, idx in live]) if replicates > 0 and len(live) > 1 else None
    needs_weights = any(m.columns is None for m in chosen)     # a metric that reads the weights themselves

    def atom_plan(r: int):
        if atoms is None or X64.shape[1] == 0:
            return None
        atom, perm, bounds, members = atoms
        work = n + sum(len(a) for a in members)
        if work >= 0.8 * sum(len(idx) for _, _, idx in live) or len(bounds) * r * X64.shape[1] * 8 > 256 << 20:
            return None
        return atoms

    def atom_sums(W_full: np.ndarray, plan) -> np.ndarray:
        """(atoms, r, columns): each atom's exact weighted sums."""
        atom, perm, bounds, members = plan
        edges = list(zip(bounds[:-1], bounds[1:]))
        widest = int(np.diff(bounds).max())

        def one(a: int) -> np.ndarray:
            lo, hi = edges[a]
            return weighted_sums(gathered("atom_rows", widest, W_full, perm[lo:hi]), perm[lo:hi])
        if workers == 1 or len(edges) < 2:
            return np.stack([one(a) for a in range(len(edges))])
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(one, range(len(edges)))))

    current: dict[str, np.ndarray | None] = {"atoms": None}

    def one_slice(i: int, W_full: np.ndarray | None) -> list[tuple[tuple[str, str, str, str], np.ndarray]]:
        """Every metric of slice i under W_full ((n, r) replicate weights; None: the point estimate)."""
        (key, value, idx), d = live[i], data[i]
        by_atom = current["atoms"]
        Wn = None
        if W_full is None:
            Wn = np.ones((len(idx), 1))                                        # the point estimate, float64
            sums = X64[idx].sum(0, keepdims=True)
        else:
            if len(idx) == n:
                Wn = W_full
            elif by_atom is None or needs_weights:
                Wn = gathered("slice_rows", largest, W_full, idx)
            sums = by_atom[atoms[3][i]].sum(0) if by_atom is not None else weighted_sums(Wn, idx)
        results: list[tuple[str, str, np.ndarray]] = []
        for m in chosen:
            v = m.finish(sums[:, spans[m.columns]], d) if m.columns is not None else m.fn(d, Wn.T)
            if m.per_class:        # every class that occurs as a label or a prediction (scikit-learn's classes)
                results += [(m.name, names[c], v[:, c]) for c in d.classes_present()]
            else:
                results.append((m.name, "", v))
        for name in stats:
            part = sums[:, spans[name]]
            results.append((name, "", ratio(part[:, 0], part[:, 1])))
        return [((key, value, name, sub), v) for name, sub, v in results]

    largest = max((len(i) for _, _, i in live if len(i) < n), default=0)
    # Slices run on `threads` threads (numpy and torch release the GIL in the heavy parts), largest first.
    order = sorted(range(len(live)), key=lambda i: -len(live[i][2]))
    workers = max(1, min(threads or os.cpu_count() or 1, 4))

    def run(W_full: np.ndarray | None) -> None:
        if workers == 1 or len(live) < 2:
            outputs = [one_slice(i, W_full) for i in order]
        else:
            with ThreadPoolExecutor(workers) as pool:
                outputs = list(pool.map(lambda i: one_slice(i, W_full), order))
        for out in outputs:
            for kk, v in out:
                if W_full is None:
                    point[kk] = float(v[0])
                else:
                    samples.setdefault(kk, []).append(v)

    run(None)
    if replicates > 0:
        for W_chunk in replicate_weights(n, replicates, seed, weights_budget_bytes):
            plan = atom_plan(W_chunk.shape[1])
            current["atoms"] = atom_sums(W_chunk, plan) if plan is not None else None
            run(W_chunk)
            current["atoms"] = None
    stacked = {kk: np.concatenate(v) for kk, v in samples.items()}
    rows: list[dict] = []

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

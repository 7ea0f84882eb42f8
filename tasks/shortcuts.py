"""Shortcut detection that needs no region of interest and no knowledge of the artefact (no Prefect).

A model that is right for the wrong reason looks at the same small place on every image of a class: a tag, a
watermark, a ruler, a scanner mark. Per explained class (and per class within each slice value), the hotspot
scan slides a box over the stored maps and compares how much of the class's attribution mass falls inside
it with how much the *other* classes put in the same place:

    share(box)     = mean over the class's examples of (map mass inside box / map mass)
    reference(box) = the same mean over every example explained for another class
    lift(box)      = (share + u) / (reference + u),   u = box area / image area (a uniform map's share)

A legitimate class feature (the loop of a 9, a dog's ears) lies where other classes' maps also look (it is on
the object), so its lift stays small; a shortcut lies where the rest of the dataset looks at nothing, so its
lift is large. `u` keeps empty corners from dividing by ~0: a uniform map has lift 1 everywhere.

The box is chosen on the data (the position and size of the largest lift), so the interval redoes that
choice in every replicate: a Poisson bootstrap over examples of the maximum lift, percentile interval.
Only methods whose maps resolve the box are trusted to gate (pixel-level methods that the randomisation
check did not flag): Grad-CAM maps are upsampled from the CAM layer's few cells, and occlusion, LIME and
Kernel SHAP work on windows or segments, so a 3-pixel tag smears over their cells.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

GRID = 32                      # maps are area-pooled to at most this side before the scan
COLUMNS = ["method", "trusted", "trust", "kind", "class_name", "class_index", "slice_key", "slice_value", "n",
           "n_reference", "grid", "window", "row", "col", "height", "width", "share", "reference_share", "lift",
           "ci_low", "ci_high", "share_ci_low", "share_ci_high", "cells", "qualified", "peak_hit", "examples",
           "members"]


_TEXT = {"method", "trust", "kind", "class_name", "slice_key", "slice_value"}
_FLAGS = {"trusted", "qualified", "confirmed"}
_COUNTS = {"class_index", "n", "n_reference", "grid", "window", "row", "col", "height", "width", "region_cells",
           "n_targets"}
_LISTS = {"cells": "int", "examples": "text", "members": "text"}


def schema():
    """The Arrow schema of shortcuts.parquet, COLUMNS then CONFIRM_COLUMNS (typed even when it has no rows: a
    scan that could not run); a column not named in a type set above is a float."""
    import pyarrow as pa

    def arrow(c: str):
        if c in _LISTS:
            return pa.list_(pa.int64() if _LISTS[c] == "int" else pa.string())
        return (pa.string() if c in _TEXT else pa.bool_() if c in _FLAGS else pa.int64() if c in _COUNTS
                else pa.float64())
    return pa.schema([(c, arrow(c)) for c in [*COLUMNS, *CONFIRM_COLUMNS]])


def not_run_check(classes: dict[str, np.ndarray], min_examples: int):
    """The check that says the scan could not run, and why (a visible state, never an empty table read as
    'no shortcut found'): WARN, like any check that has nothing to decide on."""
    from .metrics.thresholds import Check
    largest = max((int(np.unique(c, return_counts=True)[1].max()) for c in classes.values() if len(c)), default=0)
    return Check("overall", "all", "shortcut_scan", "", "hotspot", None, None, None, float(min_examples),
                 "estimate", "warn", "not run", "WARN",
                 f"the shortcut scan did not run: it needs a class with at least {min_examples} explained examples "
                 f"(shortcuts.min_examples) and the largest has {largest}; no shortcut was looked for, so none is "
                 f"reported. Audit more images of each class, or lower shortcuts.min_examples")


@dataclass(frozen=True)
class Group:
    """Examples of one explained class, overall (`slice_key` 'overall') or within one slice value."""

    class_index: int
    slice_key: str
    slice_value: str
    rows: np.ndarray


def pool_maps(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Return (N, g, g) mass maps (non-negative, each summing to 1; an all-zero map stays zero) area-pooled
    from (N, H, W) maps to g = min(H, grid) cells per side (H must equal W, or be pooled to the smaller side)."""
    m = np.clip(np.asarray(maps, dtype=np.float64), 0, None)
    n, h, w = m.shape
    g = min(h, w, grid)
    if (h, w) != (g, g):
        rows = (np.arange(h) * g) // h
        cols = (np.arange(w) * g) // w
        pooled = np.zeros((n, g, g))
        np.add.at(pooled, (slice(None), rows[:, None], cols[None, :]), m)
        m = pooled
    total = m.sum((1, 2), keepdims=True)
    return np.divide(m, total, out=np.zeros_like(m), where=total > 0)


def box_shares(mass: np.ndarray, side: int) -> np.ndarray:
    """Return (N, P) shares of each map's mass inside every side x side box that fits (row-major positions)."""
    n, g, _ = mass.shape
    c = np.zeros((n, g + 1, g + 1))
    c[:, 1:, 1:] = mass.cumsum(1).cumsum(2)
    k = g - side + 1
    s = c[:, side:, side:] - c[:, :k, side:] - c[:, side:, :k] + c[:, :k, :k]
    return s.reshape(n, k * k)


def window_sides(grid: int, fractions: Sequence[float]) -> list[int]:
    """Box sides in cells for the given fractions of the map's side (distinct, at least 1, below the side)."""
    return sorted({min(grid - 1, max(1, int(round(f * grid)))) for f in fractions}) if grid > 1 else [1]


def scan(mass: np.ndarray, classes: np.ndarray, groups: Sequence[Group], fractions: Sequence[float],
         min_share: float = 0.0, replicates: int = 500, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Return one row per group: the box of largest lift (over positions and sizes) among the boxes holding at
    least `min_share` of the group's mass (the largest lift of any box when none does; `qualified` says
    which), its share, reference share, lift with a percentile interval of the maximum qualified lift (the
    choice redone per replicate), and `peak_hit`, the share of the group's maps whose peak lies in the box.
    `mass` is (N, g, g) from `pool_maps`; `classes` (N,) the explained class of each map."""
    n, g, _ = mass.shape
    defined = mass.reshape(n, -1).sum(1) > 0
    rng = np.random.default_rng(seed)
    weights = rng.poisson(1.0, size=(replicates, n)).astype(np.float64)
    weights[:, ~defined] = 0
    prow, pcol = np.divmod(mass.reshape(n, -1).argmax(1), g)
    sides = window_sides(g, fractions)
    boxes = {b: box_shares(mass, b) for b in sides}
    totals = {b: (boxes[b][defined].sum(0), weights @ boxes[b]) for b in sides}
    own_sums: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    alpha = (1 - level) / 2
    rows = []
    for grp in groups:
        idx = grp.rows[defined[grp.rows]]
        ref = np.flatnonzero(defined & (classes != grp.class_index))
        if len(idx) == 0 or len(ref) == 0:
            continue
        own = np.flatnonzero(defined & (classes == grp.class_index))
        w_g, w_ref = weights[:, idx], weights[:, ref].sum(1)
        best, rep_max = None, np.zeros(replicates)
        for b in sides:
            u = b * b / (g * g)
            if (grp.class_index, b) not in own_sums:
                own_sums[(grp.class_index, b)] = (boxes[b][own].sum(0), weights[:, own] @ boxes[b][own])
            own_point, own_rep = own_sums[(grp.class_index, b)]
            share = boxes[b][idx].mean(0)
            ref_share = (totals[b][0] - own_point) / len(ref)
            lift = (share + u) / (ref_share + u)
            ok = share >= min_share
            j = int(np.where(ok, lift, -np.inf).argmax()) if ok.any() else int(lift.argmax())
            cand = (bool(ok.any()), float(lift[j]), b, j, float(share[j]), float(ref_share[j]))
            if best is None or cand[:2] > best[:2]:
                best = cand
            if replicates:
                rep_share = (w_g @ boxes[b][idx]) / np.maximum(w_g.sum(1), 1)[:, None]
                rep_ref = (totals[b][1] - own_rep) / np.maximum(w_ref, 1)[:, None]
                rep_lift = np.where(rep_share >= min_share, (rep_share + u) / (rep_ref + u), 0.0)
                rep_max = np.maximum(rep_max, rep_lift.max(1))
        qualified, lift, b, j, share, ref_share = best
        r0, c0 = divmod(j, g - b + 1)
        inside = (prow[idx] >= r0) & (prow[idx] < r0 + b) & (pcol[idx] >= c0) & (pcol[idx] < c0 + b)
        lo, hi = np.quantile(rep_max, [alpha, 1 - alpha]) if replicates else (np.nan, np.nan)
        order = np.argsort(-boxes[b][idx, j], kind="stable")
        rows.append(dict(kind="box", class_index=grp.class_index, slice_key=grp.slice_key, slice_value=grp.slice_value,
                         n=len(idx), n_reference=len(ref), grid=g, window=b, row=r0, col=c0, height=b, width=b,
                         share=share, reference_share=ref_share, lift=lift, ci_low=float(lo), ci_high=float(hi),
                         share_ci_low=np.nan, share_ci_high=np.nan, cells=[],
                         qualified=qualified, peak_hit=float(inside.mean()), examples=idx[order]))
    return pd.DataFrame(rows)


def _cell_lift(share: np.ndarray, reference: np.ndarray, g: int) -> np.ndarray:
    """Per-cell lift (share + u) / (reference + u), u one cell of a (g, g) map (any leading axes)."""
    u = 1.0 / (g * g)
    return (share + u) / (reference + u)


def _hot_cells(share: np.ndarray, ref_share: np.ndarray, g: int, cell_lift: float, min_share: float
               ) -> tuple[np.ndarray, dict]:
    """Return (the flat indices of the hot cells, the scan-row fields they give: bounding box, shares, the
    set's lift, `cells`, `qualified`) for the (g*g,) mean maps of a group and of every other class."""
    hot = _cell_lift(share, ref_share, g) >= cell_lift
    cells = np.flatnonzero(hot.ravel())
    s, r = float(share[hot].sum()), float(ref_share[hot].sum())
    rr, cc = np.divmod(cells, g) if len(cells) else (np.zeros(1, int), np.zeros(1, int))
    area = len(cells) / (g * g)
    return cells, dict(grid=g, window=0, row=int(rr.min()), col=int(cc.min()), height=int(rr.max() - rr.min() + 1),
                       width=int(cc.max() - cc.min() + 1), share=s, reference_share=r,
                       lift=(s + area) / (r + area) if len(cells) else 1.0, ci_low=np.nan, ci_high=np.nan,
                       cells=[int(c) for c in cells], qualified=bool(len(cells) and s >= min_share))


def cell_scan(mass: np.ndarray, classes: np.ndarray, groups: Sequence[Group], cell_lift: float, min_share: float,
              replicates: int = 500, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Return one row per group for the shape-free scan: the *hot cells*, every cell of the (g, g) map where the
    class's share of mass is at least `cell_lift` times the other classes' (per-cell lift, u = one cell), in
    any shape or number of places (a frame, a tag that moves between corners, a scattered pattern), and the
    class's share of mass in them (`share`, with a percentile interval that redoes the choice of cells per
    replicate) against the other classes' (`reference_share`). `qualified`: the share reaches `min_share`.
    `row`..`width` give the cells' bounding box; `cells` their flat indices."""
    n, g, _ = mass.shape
    flat = mass.reshape(n, g * g)
    defined = flat.sum(1) > 0
    rng = np.random.default_rng(seed + 1)
    weights = rng.poisson(1.0, size=(replicates, n)).astype(np.float64)
    weights[:, ~defined] = 0
    total, total_rep = flat[defined].sum(0), weights @ flat
    peak = flat.argmax(1)
    alpha = (1 - level) / 2
    rows = []
    for grp in groups:
        idx = grp.rows[defined[grp.rows]]
        own = np.flatnonzero(defined & (classes == grp.class_index))
        ref = np.flatnonzero(defined & (classes != grp.class_index))
        if len(idx) == 0 or len(ref) == 0:
            continue
        ref_share = (total - flat[own].sum(0)) / len(ref)
        cells, fields = _hot_cells(flat[idx].mean(0), ref_share, g, cell_lift, min_share)
        if replicates:
            w_g, w_own, w_ref = weights[:, idx], weights[:, own], weights[:, ref].sum(1)
            rep_share = (w_g @ flat[idx]) / np.maximum(w_g.sum(1), 1)[:, None]
            rep_ref = (total_rep - w_own @ flat[own]) / np.maximum(w_ref, 1)[:, None]
            rep = np.where(_cell_lift(rep_share, rep_ref, g) >= cell_lift, rep_share, 0.0).sum(1)
            lo, hi = (float(v) for v in np.quantile(rep, [alpha, 1 - alpha]))
        else:
            lo = hi = np.nan
        order = np.argsort(-flat[idx][:, cells].sum(1), kind="stable")
        rows.append(dict(kind="cells", class_index=grp.class_index, slice_key=grp.slice_key,
                         slice_value=grp.slice_value, n=len(idx), n_reference=len(ref), **fields,
                         share_ci_low=lo, share_ci_high=hi, peak_hit=float(np.isin(peak[idx], cells).mean()),
                         examples=idx[order]))
    return pd.DataFrame(rows)


def _kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Return cluster labels of the rows of `x` by k-means with k-means++ seeding (a fixed seed)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    centres = np.array(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return labels


def cluster_scan(mass: np.ndarray, classes: np.ndarray, cell_lift: float, min_share: float, clusters: int = 4,
                 min_members: int = 10, seed: int = 0) -> pd.DataFrame:
    """Return the hot cells of clusters of each class's maps (after SpRAy, Lapuschkin et al. 2019,
    https://doi.org/10.1038/s41467-019-08987-4): a class's maps are clustered by where their mass lies
    (k-means on the square roots of 8x8-pooled maps), and each cluster's hot cells are found against every
    other class as `cell_scan` does for a whole class. A strategy used by part of a class, or at varying
    places (a tag in one of four corners), is diluted in the class's mean map and whole in its cluster's.
    `members` lists the cluster's rows."""
    n, g, _ = mass.shape
    flat = mass.reshape(n, g * g)
    defined = flat.sum(1) > 0
    f = max(1, g // 8)
    coarse = np.sqrt(mass[:, :g // f * f, :g // f * f].reshape(n, g // f, f, g // f, f).sum((2, 4)).reshape(n, -1))
    total = flat[defined].sum(0)
    rows = []
    for c in np.unique(classes[defined]):
        own = np.flatnonzero(defined & (classes == c))
        ref = np.flatnonzero(defined & (classes != c))
        k = min(clusters, len(own) // min_members)
        if k < 2 or len(ref) == 0:
            continue
        ref_share = (total - flat[own].sum(0)) / len(ref)
        labels = _kmeans(coarse[own], k, seed + int(c))
        for j in range(k):
            members = own[labels == j]
            if len(members) < min_members:
                continue
            cells, fields = _hot_cells(flat[members].mean(0), ref_share, g, cell_lift, min_share)
            order = np.argsort(-flat[members][:, cells].sum(1), kind="stable")
            rows.append(dict(kind="cluster", class_index=int(c), slice_key="overall", slice_value="",
                             n=len(members), n_reference=len(ref), **fields, share_ci_low=np.nan,
                             share_ci_high=np.nan, peak_hit=float(np.isin(flat[members].argmax(1), cells).mean()),
                             examples=members[order], members=members))
    return pd.DataFrame(rows)


def class_groups(classes: np.ndarray, slices: Sequence[tuple[str, str, np.ndarray]], min_examples: int,
                 valid: np.ndarray | None = None) -> list[Group]:
    """Every explained class overall and within each slice value, with at least `min_examples` examples
    (of those `valid`: maps that are not all zero)."""
    out = []
    valid = np.ones(len(classes), dtype=bool) if valid is None else valid
    for c in np.unique(classes[valid]):
        mine = (classes == c) & valid
        for key, value, idx in [("overall", "", np.arange(len(classes))), *slices]:
            rows = np.asarray(idx, dtype=np.int64)
            rows = rows[mine[rows]]
            if len(rows) >= min_examples:
                out.append(Group(int(c), key, value, rows))
    return out


def detect(maps: dict[str, np.ndarray], classes: dict[str, np.ndarray], example_ids: dict[str, np.ndarray],
           class_names: Sequence[str], slices: dict[str, list[tuple[str, str, np.ndarray]]],
           trusted: set[str] | dict[str, str], fractions: Sequence[float], min_share: float, min_examples: int,
           replicates: int, level: float, seed: int, max_examples: int = 12, cell_lift: float | None = None
           ) -> pd.DataFrame:
    """Scan every method's maps; returns one row per (method, class, slice) with COLUMNS. `trusted`: the
    methods that gate, or {method: reason} from `trusted_methods` (reasons of trusted ones start 'trusted').
    `slices[method]`
    lists (slice_key, slice_value, rows) over that method's rows; `examples` keeps the ids of the group's
    `max_examples` maps with the most mass in the box."""
    why = trusted if isinstance(trusted, dict) else \
        {m: "trusted" if m in trusted else "not gated" for m in maps}
    frames = []
    for method in sorted(maps):
        mass = pool_maps(maps[method])
        groups = class_groups(classes[method], slices.get(method, []), min_examples,
                              mass.reshape(len(mass), -1).sum(1) > 0)
        t = scan(mass, classes[method], groups, fractions, min_share, replicates, level, seed)
        if cell_lift is not None and not t.empty:
            parts = [t, cell_scan(mass, classes[method], groups, cell_lift, min_share, replicates, level, seed),
                     cluster_scan(mass, classes[method], cell_lift, min_share, seed=seed,
                                  min_members=max(10, min_examples // 2))]
            t = pd.concat([p for p in parts if not p.empty], ignore_index=True)
        if t.empty:
            continue
        t.insert(0, "method", method)
        t.insert(1, "trusted", why.get(method, "").startswith("trusted"))
        t.insert(2, "trust", why.get(method, "not gated"))
        t.insert(3, "class_name", [str(class_names[c]) for c in t.class_index])
        t["examples"] = [[str(e) for e in example_ids[method][ix[:max_examples]]] for ix in t.examples]
        t["members"] = [[str(e) for e in example_ids[method][ix]] if isinstance(ix, np.ndarray) else []
                        for ix in (t["members"] if "members" in t.columns else [None] * len(t))]
        frames.append(t)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(frames, ignore_index=True)[COLUMNS]
    return out.sort_values(["method", "kind", "class_name", "slice_key", "slice_value"], kind="stable",
                           ignore_index=True)


def box_words(row, grid: int, height: int, width: int) -> str:
    """'rows 26-30, columns 1-5 (2.4% of the image)' in image pixels (1-based), for a scan row."""
    sy, sx = height / grid, width / grid
    r0, r1 = int(row.row * sy) + 1, int(np.ceil((row.row + row.height) * sy))
    c0, c1 = int(row.col * sx) + 1, int(np.ceil((row.col + row.width) * sx))
    return f"rows {r0}–{r1}, columns {c0}–{c1} ({row.height * row.width / grid ** 2:.1%} of the image)"


def trusted_methods(methods: Sequence[str], chosen: Sequence[str] | None, insensitive: set[str] | None
                    ) -> dict[str, str]:
    """Return {method: why it is or is not trusted to gate}; trusted ones say 'trusted: ...'. `insensitive`:
    the methods the randomisation check flagged (None: the check did not run)."""
    from .attribution import METHODS
    out = {}
    for m in methods:
        res = METHODS[m].resolution if m in METHODS else "pixel"
        if chosen is not None:
            out[m] = "trusted: named in shortcuts.methods" if m in chosen else "not gated: not in shortcuts.methods"
        elif m in (insensitive or set()):
            out[m] = "not gated: the randomisation check found its maps insensitive to the model"
        elif res != "pixel":
            out[m] = f"not gated: its maps resolve {res}s, too coarse for a small artefact"
        else:
            out[m] = "trusted: pixel-level and passed the randomisation check" if insensitive is not None \
                else "trusted: pixel-level (the randomisation check did not run)"
    return out


def _one_sided(violated: bool, lo: float, bound: float, gate_on: str, severity: str) -> tuple[str, str]:
    """(outcome, status) of a check that flags a value above `bound`: fail when the whole interval is above
    it (or, gate_on 'estimate', the estimate), inconclusive when only the estimate is; warn-severity checks
    never FAIL."""
    outcome = "pass" if not violated else "fail" if gate_on == "estimate" or lo > bound else "inconclusive"
    status = "PASS" if outcome == "pass" else "WARN" if outcome == "inconclusive" or severity == "warn" else "FAIL"
    return outcome, status


def _class_slice(name: str, slice_key: str, slice_value: str) -> tuple[str, str, str]:
    """(words, check slice_key, check slice_value) of a class overall or within one slice value."""
    if slice_key == "overall":
        return f"class {name}", "class", name
    return f"class {name} in {slice_key}={slice_value}", f"class&{slice_key}", f"{name}&{slice_value}"


def _strongest_per_class(t: pd.DataFrame, value: str, lo: str, cls: str, hot: pd.Series, gate_on: str
                         ) -> tuple[pd.DataFrame, list]:
    """(the rows flagged by `hot`, the one with the strongest evidence per class `cls`, strongest first, or the
    row of largest evidence when none is flagged); evidence is the interval's lower end `lo` (else `value`)
    under gate_on 'interval', the estimate `value` otherwise."""
    t = t.assign(evidence=t[lo].fillna(t[value]) if gate_on == "interval" else t[value])
    t = t.sort_values(["evidence", value], ascending=False, kind="stable")
    flagged = t[hot.reindex(t.index)]
    picks = [g.iloc[0] for _, g in flagged.groupby(cls, sort=True)] or [t.iloc[0]]
    picks.sort(key=lambda r: -r.evidence)
    return flagged, picks


def strongest(table: pd.DataFrame, max_lift: float, gate_on: str) -> dict[str, tuple[pd.DataFrame, list]]:
    """Per trusted method: (its shortcut candidates, i.e. qualified rows with lift above `max_lift`; the row
    with the strongest evidence per class, strongest first, or the method's largest lift when none)."""
    out = {}
    if table.empty:
        return out
    if "kind" in table.columns:
        table = table[table.kind == "box"]
    for method, t in table[table.trusted.astype(bool)].groupby("method", sort=True):
        out[method] = _strongest_per_class(t, "lift", "ci_low", "class_name",
                                           t.qualified.astype(bool) & (t.lift > max_lift), gate_on)
    return out


def hotspot_checks(table: pd.DataFrame, max_lift: float, gate_on: str, severity: str, level: float,
                   image_size: tuple[int, int]) -> list:
    """Return the scan's checks: per trusted method, one check per class whose lift exceeds `max_lift` in a
    box holding at least the scan's `min_share` of its mass (the slice with the strongest evidence; the others named),
    or one passing check for the method's largest lift. One-sided: a lift above the bound fails when the
    whole interval is above it (gate_on 'interval') and warns when only the estimate is."""
    from .metrics.thresholds import Check
    checks = []
    if not table.empty and not table.trusted.astype(bool).any():
        # the scan ran but nothing may gate it: say so, rather than let a shortcut pass unseen
        why = "; ".join(f"{m}: {w}" for m, w in table.groupby("method").trust.first().items())
        return [Check("overall", "all", "hotspot_lift", "", "hotspot", None, None, None, float(max_lift), gate_on,
                      severity, "missing", "WARN",
                      f"the shortcut scan has no method fit to gate it ({why}); add a pixel-level method such as "
                      f"saliency or integrated_gradients to 'attribution.methods', or name one in "
                      f"'shortcuts.methods'")]
    for method, (hot, picks) in strongest(table, max_lift, gate_on).items():
        for r in picks:
            violated = bool(r.qualified and r.lift > max_lift)
            outcome, status = _one_sided(violated, r.ci_low, max_lift, gate_on, severity)
            confirmed = _confirmed(r) if violated else None
            if confirmed is not None:   # the intervention decides: the model depends on the box, or it does not
                outcome = "fail" if confirmed else "unconfirmed"
                status = ("FAIL" if severity == "fail" else "WARN") if confirmed else "WARN"
            also = [f"{k}={v}" if k != "overall" else "overall" for k, v in
                    zip(hot[hot.class_name == r.class_name].slice_key, hot[hot.class_name == r.class_name].slice_value)
                    if (k, v) != (r.slice_key, r.slice_value)]
            where, key, value = _class_slice(r.class_name, r.slice_key, r.slice_value)
            msg = (f"{where}: {r.share:.0%} of the {method} attribution mass lies in one box at "
                   f"{box_words(r, int(r.grid), *image_size)}, where the other classes put {r.reference_share:.1%}: "
                   f"lift {r.lift:.3g} ({level:.0%} CI [{r.ci_low:.3g}, {r.ci_high:.3g}], n={r.n}); "
                   f"{'a shortcut candidate' if violated else 'no shortcut candidate'} (bound {max_lift:g}): {outcome}"
                   + (f"; also {', '.join(also)}" if also else "") + (confirmation_words(r) if violated else ""))
            checks.append(Check(key, value, f"{method}.hotspot_lift", "", "hotspot", float(r.lift),
                                float(r.ci_low), float(r.ci_high), float(max_lift), gate_on, severity, outcome,
                                status, msg))
    return checks


def strongest_cells(table: pd.DataFrame, every_method: bool = False) -> dict[str, tuple[pd.DataFrame, list]]:
    """Per method: (its shape-free candidates, i.e. qualified hot-cell rows; the one with the largest share
    per class, largest first, or the method's largest share when none). Only trusted methods, unless
    `every_method`: when an intervention decides, any method's maps may nominate (the map only points; the
    model's answer to the paste is the evidence, so a method the randomisation check found insensitive can
    still say where to look)."""
    from .attribution import METHODS
    out = {}
    if table.empty or "kind" not in table.columns:
        return out
    # nominators: the trusted methods, or with `every_method` every method whose maps resolve pixels (a
    # Grad-CAM map upsampled from a few cells, or LIME's segments, would nominate blobs, not an artefact)
    pixel = table.method.map(lambda m: METHODS[m].resolution == "pixel" if m in METHODS else True)
    cells = table[table.kind.isin(["cells", "cluster"]) & (table.trusted.astype(bool) | (every_method & pixel))]
    for method, t in cells.groupby("method", sort=True):
        out[method] = _strongest_per_class(t, "share", "share_ci_low", "class_name", t.qualified.astype(bool),
                                           "estimate")
    return out


def cell_candidates(table: pd.DataFrame, every_method: bool = True, limit: int | None = None) -> list:
    """The hot-cell rows the intervention tests: per method and class, the class overall (all of its places
    together: a tag that moves between corners is in all of them), its slice of largest share and its
    clusters, when they qualify; at most `limit`, the largest shares first."""
    out = []
    for method, (hot, picks) in strongest_cells(table, every_method).items():
        for cls, g in hot.groupby("class_name", sort=True):
            cells = g[g.kind == "cells"]
            chosen = [cells[cells.slice_key == "overall"], cells.sort_values("share", ascending=False,
                                                                              kind="stable").head(1),
                      g[g.kind == "cluster"]]
            seen = set()
            for part in chosen:
                for _, r in part.iterrows():
                    if r.name not in seen:
                        seen.add(r.name)
                        out.append(r)
    # every class's strongest candidate before any class's second: a class is tested before another is
    # tested twice, so a budget that runs out leaves the weakest nominations untested
    order = lambda r: (-float(r.share), str(r.method), str(r.class_name), str(r.kind), str(r.slice_value))  # noqa: E731
    out.sort(key=order)
    first, rest, seen_class = [], [], set()
    for r in out:
        (rest if (r.method, r.class_name) in seen_class else first).append(r)
        seen_class.add((r.method, r.class_name))
    out = first + rest
    return out if limit is None else out[:limit]


def _confirmed(r) -> bool | None:
    """True/False when the intervention ran for the row, None when it did not (or could not)."""
    if "confirmed" not in r.index or pd.isna(r.confirmed) or ("effect" in r.index and pd.isna(r.effect)):
        return None
    return bool(r.confirmed)


def _best_tested(rows: pd.DataFrame, fallback):
    """Among a class's candidate rows, the confirmed one of largest effect, else the tested one of largest
    share (the class was tried on the model), else `fallback`."""
    if "confirmed" not in rows.columns or rows.empty:
        return fallback
    ok = rows[rows.confirmed.fillna(False).astype(bool)]
    if len(ok):
        return ok.sort_values("effect", ascending=False, kind="stable").iloc[0]
    tried = rows[rows.n_targets.notna() & rows.effect.notna()] if "n_targets" in rows.columns else rows.iloc[:0]
    return tried.sort_values("share", ascending=False, kind="stable").iloc[0] if len(tried) else fallback


def cell_checks(table: pd.DataFrame, cell_lift: float, min_share: float, severity: str, level: float,
                image_size: tuple[int, int], confirm: bool = True) -> list:
    """Return the shape-free scan's checks: per trusted method, one check per class whose hot cells (lift at
    least `cell_lift` each) hold at least `min_share` of its mass. The map statistic only nominates: a
    candidate FAILs when the intervention confirms the model depends on those cells, PASSes (saying so) when
    it does not (a clean model's class-specific looks, which pasting does not turn into the class), and WARNs
    when no intervention could run. Without candidates, one passing check with the method's largest share."""
    from .metrics.thresholds import Check
    checks = []
    for method, (hot, picks) in strongest_cells(table, every_method=confirm).items():
        # a class whose candidates were tested is reported by its confirmed one (largest effect) if any
        picks = [_best_tested(hot[hot.class_name == r.class_name], r) for r in picks]
        for r in picks:
            candidate = bool(r.qualified)
            confirmed = _confirmed(r) if candidate else None
            if not candidate:
                outcome, status = "pass", "PASS"
            elif confirmed is None:
                outcome, status = "untested", "WARN"
            else:
                outcome, status = ("fail", "FAIL" if severity == "fail" else "WARN") if confirmed else ("pass", "PASS")
            where, key, value = _class_slice(r.class_name, r.slice_key, r.slice_value)
            ci = "" if not np.isfinite(r.share_ci_low) else \
                f"{level:.0%} CI [{r.share_ci_low:.0%}, {r.share_ci_high:.0%}], "
            where += f" (a cluster of {r.n} of its maps alike in where they look)" if r.kind == "cluster" else ""
            msg = (f"{where}: {r.share:.0%} of the {method} attribution mass ({ci}n={r.n}) lies in {len(r.cells)} cells of the {int(r.grid)}x{int(r.grid)} "
                   f"map where this class's share is at least {cell_lift:g} times the other classes' (they put "
                   f"{r.reference_share:.1%} there), within {box_words(r, int(r.grid), *image_size)}; "
                   + ("a shape-free shortcut candidate" if candidate else
                      f"no shape-free shortcut candidate (at least {min_share:.0%} of the mass needed)")
                   + (confirmation_words(r, f"those {len(r.cells)} cells") if candidate else "") + f": {outcome}")
            checks.append(Check(key, value, f"{method}.hotspot_cells", "", "hotspot_cells", float(r.share),
                                float(r.share_ci_low), float(r.share_ci_high), float(min_share), "estimate",
                                severity, outcome, status, msg))
    return checks


def region_lift(mass: np.ndarray, classes: np.ndarray, rows: np.ndarray, class_index: int, region: np.ndarray,
                weights: np.ndarray) -> tuple[float, np.ndarray]:
    """Return the lift of one fixed region ((g, g) bool cells: a box, or hot cells of any shape) for the maps
    `rows` against the maps of every other class, and its value under each row of bootstrap `weights` (R, N):
    the review's paired comparison of two models where one of them concentrates."""
    n, g, _ = mass.shape
    share = (mass * region[None]).sum((1, 2))
    defined = mass.reshape(n, -1).sum(1) > 0
    rows = rows[defined[rows]]
    ref = np.flatnonzero(defined & (classes != class_index))
    u = float(region.sum()) / (g * g)
    if len(rows) == 0 or len(ref) == 0:
        return float("nan"), np.full(len(weights), np.nan)
    point = (share[rows].mean() + u) / (share[ref].mean() + u)
    w_g, w_r = weights[:, rows], weights[:, ref]
    rep = ((w_g @ share[rows]) / np.maximum(w_g.sum(1), 1) + u) / ((w_r @ share[ref]) / np.maximum(w_r.sum(1), 1) + u)
    return float(point), rep


def box_lift(mass: np.ndarray, classes: np.ndarray, rows: np.ndarray, class_index: int, box: tuple[int, int, int],
             weights: np.ndarray) -> tuple[float, np.ndarray]:
    """`region_lift` of the box (row, col, side)."""
    r0, c0, b = box
    g = mass.shape[1]
    region = np.zeros((g, g), dtype=bool)
    region[r0:r0 + b, c0:c0 + b] = True
    return region_lift(mass, classes, rows, class_index, region, weights)


def confirmed_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The confirmed hot-cell and cluster candidates, the largest effect per method and class: what a review
    compares between the two models."""
    if table.empty or "confirmed" not in table.columns:
        return table.iloc[:0]
    t = table[table.kind.isin(["cells", "cluster"]) & table.confirmed.fillna(False).astype(bool)]
    return t.sort_values("effect", ascending=False, kind="stable").drop_duplicates(["method", "class_index"])


def change_checks(flagged: pd.DataFrame, base: dict[str, tuple[np.ndarray, np.ndarray]],
                  cand: dict[str, tuple[np.ndarray, np.ndarray]], rows_of, max_ratio: float, severity: str,
                  level: float, replicates: int, seed: int, image_size: tuple[int, int]) -> list:
    """Return the review's checks on the candidate's shortcut candidates: in each flagged box, the ratio of
    the candidate's lift to the baseline's on the same examples (paired bootstrap), which fails when the
    whole interval is above `max_ratio` (the candidate learnt a hotspot the baseline did not have).
    `base`/`cand` map a method to its (mass maps, explained classes) over the same N aligned examples;
    `rows_of(row)` gives a flagged row's examples as positions."""
    from .metrics.thresholds import Check
    rng = np.random.default_rng(seed)
    checks = []
    alpha = (1 - level) / 2
    for r in flagged.itertuples():
        if r.method not in base or r.method not in cand:
            continue
        rows = rows_of(r)
        ci = int(r.class_index)
        weights = rng.poisson(1.0, size=(replicates, len(cand[r.method][0]))).astype(np.float64)
        g = cand[r.method][0].shape[1]
        cells = getattr(r, "kind", "box") in ("cells", "cluster")
        if cells:
            region = np.isin(np.arange(g * g), np.asarray(r.cells, dtype=np.int64)).reshape(g, g)
            place = f"its {int(region.sum())} hot cells within {box_words(r, int(r.grid), *image_size)}"
        else:
            region = np.zeros((g, g), dtype=bool)
            region[int(r.row):int(r.row) + int(r.window), int(r.col):int(r.col) + int(r.window)] = True
            place = f"the box at {box_words(r, int(r.grid), *image_size)}"
        lc, rc = region_lift(*cand[r.method], rows, ci, region, weights)
        lb, rb = region_lift(*base[r.method], rows, ci, region, weights)
        ratio = lc / lb
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = rc / rb
        finite = dist[np.isfinite(dist)]
        lo, hi = (np.quantile(finite, [alpha, 1 - alpha]) if finite.size else (np.nan, np.nan))
        outcome, status = _one_sided(bool(ratio > max_ratio), lo, max_ratio, "interval", severity)
        where, key, value = _class_slice(r.class_name, r.slice_key, r.slice_value)
        msg = (f"{where}: the candidate's {r.method} lift in {place} "
               f"is {lc:.3g}, the baseline's on the same examples {lb:.3g}: ratio {ratio:.3g} ({level:.0%} CI "
               f"[{lo:.3g}, {hi:.3g}], n={len(rows)}); required at most {max_ratio:g}: {outcome}")
        metric = f"{r.method}.hotspot_cells_ratio" if cells else f"{r.method}.hotspot_lift_ratio"
        checks.append(Check(key, value, metric, "", "upper", float(ratio), float(lo),
                            float(hi), float(max_ratio), "interval", severity, outcome, status, msg))
    return checks


def roi_gap_checks(roi_mass: dict[str, np.ndarray], classes: dict[str, np.ndarray], class_names: Sequence[str],
                   slices: dict[str, list[tuple[str, str, np.ndarray]]], trusted: dict[str, str], max_gap: float,
                   min_examples: int, replicates: int, level: float, seed: int, gate_on: str, severity: str) -> list:
    """Per-class localisation against the dataset's own other classes, where ROI masks exist: per gating
    method and explained class (overall and within each slice value), `gap` = the other classes' mean ROI
    mass minus the class's (within the same slice, so a slice that lowers every class's ROI mass cancels),
    with a Poisson-bootstrap percentile interval. One check per class whose gap exceeds `max_gap` (the slice
    with the strongest evidence), or one passing check with the method's largest gap. One-sided like the
    hotspot checks: FAIL when the whole interval is above the bound, WARN when only the estimate is."""
    from .metrics.thresholds import Check
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    checks = []
    for method in sorted(roi_mass):
        if not trusted.get(method, "").startswith("trusted"):
            continue
        values, cls = np.asarray(roi_mass[method], dtype=np.float64), classes[method]
        ok = np.isfinite(values)
        if ok.sum() < min_examples:
            continue
        weights = rng.poisson(1.0, size=(replicates, len(values))).astype(np.float64)
        weights[:, ~ok] = 0
        v = np.where(ok, values, 0.0)
        rows = []
        for key, value, idx in [("overall", "", np.arange(len(values))), *slices.get(method, [])]:
            inside = np.zeros(len(values), dtype=bool)
            inside[np.asarray(idx, dtype=np.int64)] = True
            for c in np.unique(cls[inside & ok]):
                mine, rest = inside & ok & (cls == c), inside & ok & (cls != c)
                if mine.sum() < min_examples or rest.sum() < min_examples:
                    continue
                gap = v[rest].mean() - v[mine].mean()
                if replicates:
                    wm, wr = weights[:, mine], weights[:, rest]
                    dist = (wr @ v[rest]) / np.maximum(wr.sum(1), 1) - (wm @ v[mine]) / np.maximum(wm.sum(1), 1)
                    lo, hi = np.quantile(dist, [alpha, 1 - alpha])
                else:
                    lo = hi = np.nan
                rows.append(dict(c=int(c), key=key, value=value, gap=float(gap), lo=float(lo), hi=float(hi),
                                 own=float(v[mine].mean()), other=float(v[rest].mean()), n=int(mine.sum())))
        if not rows:
            continue
        t = pd.DataFrame(rows)
        _, picks = _strongest_per_class(t, "gap", "lo", "c", t.gap > max_gap, gate_on)
        for r in picks:
            outcome, status = _one_sided(bool(r.gap > max_gap), r.lo, max_gap, gate_on, severity)
            where, key, value = _class_slice(str(class_names[r.c]), r.key, r.value)
            msg = (f"{where}: {r.own:.0%} of the {method} attribution mass lies inside the region of interest, "
                   f"against {r.other:.0%} for the other classes{'' if r.key == 'overall' else ' there'}: gap "
                   f"{r.gap:.3g} ({level:.0%} CI [{r.lo:.3g}, {r.hi:.3g}], n={r.n}); required at most "
                   f"{max_gap:g}: {outcome}")
            checks.append(Check(key, value, f"{method}.roi_mass_gap", "", "roi_gap", r.gap, r.lo, r.hi,
                                float(max_gap), gate_on, severity, outcome, status, msg))
    return checks


# --- confirmation by intervention --------------------------------------------------------------------------
#
# A map statistic says where a class's explanations look that others' do not; it cannot say the model *needs*
# what is there (a clean model's spatial priors can look alike). The intervention asks the model: paste the
# candidate region of the class's own images onto images of other classes and count how many flip to the
# class, against the same paste taken from other-class images (the control: what any paste there does); and
# take the region away from the class's images (replaced by another class's pixels) and count how many leave
# the class. The verdict gates on the paired difference of flip rates, with a Poisson-bootstrap interval.

CONFIRM_COLUMNS = ["region_cells", "n_targets", "flip_rate", "control_flip_rate", "effect", "effect_ci_low",
                   "effect_ci_high", "removal_drop", "consistency", "confirmed"]


def _seeded_order(ids: Sequence[str], seed: int, salt: str) -> list[str]:
    import hashlib
    return sorted(ids, key=lambda e: hashlib.sha256(f"{seed}\0{salt}\0{e}".encode()).hexdigest())


def intervention_sets(labels: np.ndarray, predictions: np.ndarray, ids: Sequence[str], class_index: int,
                      max_examples: int, seed: int) -> tuple[list[str], list[str]]:
    """Return (targets, donors): up to `max_examples` ids of examples neither labelled nor predicted as the
    class, and of examples labelled and predicted as it, each in an order fixed by the seed and the ids alone
    (not by shard or position)."""
    ids = np.asarray(ids, dtype=object)
    other = ids[(labels != class_index) & (predictions != class_index)]
    own = ids[(labels == class_index) & (predictions == class_index)]
    return (_seeded_order(list(other), seed, f"targets-{class_index}")[:max_examples],
            _seeded_order(list(own), seed, f"donors-{class_index}")[:max_examples])


def confirm(predict, targets, donors, region, class_index: int, replicates: int, level: float, seed: int,
            min_effect: float, min_consistency: float = 0.75, core=None) -> dict:
    """Return the intervention's figures for one candidate region (`region`: (H, W) bool) of class
    `class_index`: `targets` (T, C, H, W) are other-class inputs, `donors` (D, C, H, W) the class's own; all
    normalised model inputs. `predict(x) -> (N,) predicted classes`.

    flip_rate          share of targets predicted as the class after pasting a donor's region onto them
    control_flip_rate  the same with the region taken from another target (any paste there, no class content)
    effect             flip_rate - control_flip_rate (paired per target), with a percentile interval
    removal_drop       share of donors no longer predicted as the class once the region holds a target's pixels
    consistency        how alike the region (`core`, when given: the box that nominated a grown region) is
                       across the class's images (`consistency`)
    confirmed          the whole interval of `effect` above `min_effect` (the estimate, without replicates), and
                       a consistent pattern (at least `min_consistency`), not the class's own object
    """
    import torch
    t, d = len(targets), len(donors)
    if t < 2 or d < 1:
        return {**paired_effect(None, None, None, replicates, level, seed, min_effect), "n_targets": t,
                "consistency": float("nan")}
    mask = torch.as_tensor(region, device=targets.device)[None, None]
    paired = donors[torch.arange(t) % d]
    controls = targets.roll(1, 0)
    flips = (predict(torch.where(mask, paired, targets)) == class_index).double().cpu().numpy()
    ctrl = (predict(torch.where(mask, controls, targets)) == class_index).double().cpu().numpy()
    stays = (predict(torch.where(mask, targets[torch.arange(d) % t], donors)) == class_index).double().cpu().numpy()
    got = paired_effect(flips, ctrl, stays, replicates, level, seed, min_effect)
    got["consistency"] = consistency(donors, targets, region if core is None else core)
    got["confirmed"] = bool(got["confirmed"] and np.isfinite(got["consistency"])
                            and got["consistency"] >= min_consistency)
    return got


def consistency(donors, targets, region, share: float = 0.05) -> float:
    """Whether the region holds a pattern alike on the class's images: per pixel, the spread of the class's
    images (donors) over the spread of other classes' (targets) there; the region's most alike `share` of
    pixels decides: 1 - that quantile of the ratio. A tag, stamp, frame or ruler is the same pattern on every
    image of the class, so at least its own pixels are near 0 (near 1 here) even when the region is much
    larger than it (cells of a coarse grid around a small tag, a cluster's cells around a tag that moves); the class's own object, wherever a cluster of its
    images holds it, varies in colour, size and background like anything else there (well below 1): pasting
    an object turns images into its class, which says nothing about a shortcut."""
    import torch
    where = torch.as_tensor(region, device=donors.device)
    if len(donors) < 2 or len(targets) < 2 or not bool(where.any()):
        return float("nan")
    spread_d = donors[:, :, where].double().std(0).mean(0)            # per pixel, averaged over channels
    spread_t = targets[:, :, where].double().std(0).mean(0)
    ok = spread_t > 1e-9
    if not bool(ok.any()):
        return float("nan")
    ratio = (spread_d[ok] / spread_t[ok]).cpu().numpy()
    return float(1 - np.quantile(ratio, share))


def paired_effect(flips, ctrl, stays, replicates: int, level: float, seed: int, min_effect: float) -> dict:
    """The figures of one intervention from its outcomes per image (1 = predicted as the class): `flips` and
    `ctrl` paired per target (the change and its control), `stays` per donor. effect = mean(flips - ctrl)
    with a Poisson-bootstrap percentile interval; confirmed when the interval (without replicates, the
    estimate) lies above `min_effect`. All None: the intervention could not run (NaN figures, not confirmed)."""
    if flips is None:
        return dict(n_targets=0, flip_rate=np.nan, control_flip_rate=np.nan, effect=np.nan, effect_ci_low=np.nan,
                    effect_ci_high=np.nan, removal_drop=np.nan, confirmed=False)
    t = len(flips)
    diff = flips - ctrl
    effect = float(diff.mean())
    if replicates:
        w = np.random.default_rng(seed).poisson(1.0, size=(replicates, t)).astype(np.float64)
        rep = (w @ diff) / np.maximum(w.sum(1), 1)
        lo, hi = (float(v) for v in np.quantile(rep, [(1 - level) / 2, 1 - (1 - level) / 2]))
    else:
        lo = hi = np.nan
    return dict(n_targets=t, flip_rate=float(flips.mean()), control_flip_rate=float(ctrl.mean()), effect=effect,
                effect_ci_low=lo, effect_ci_high=hi, removal_drop=float(1 - stays.mean()),
                confirmed=bool((lo if replicates else effect) > min_effect))


def confirmation_words(r, what: str | None = None) -> str:
    """'; confirmed by intervention: pasting ...' for a scan row with the CONFIRM_COLUMNS filled."""
    if "confirmed" not in r.index:
        return ""
    if _confirmed(r) is None:
        if "n_targets" in r.index and pd.isna(r.n_targets):
            return ("; not tested on the model: only the strongest candidates are (shortcuts.max_candidates), "
                    "so this one is a WARN until it is")
        return "; intervention not possible (too few examples of the class or of the others)"
    what = what or f"the box (grown to {int(r.region_cells)} cells where this class's lift stays high)"
    pattern = ""
    if "consistency" in r.index and pd.notna(r.consistency):
        pattern = (f"; what is there is alike on the class's images (consistency {r.consistency:.2f}): a pattern"
                   if r.confirmed or r.consistency >= 0.75 else
                   f"; but what is there varies across the class's images as it does across other classes' "
                   f"(consistency {r.consistency:.2f}): the class's own object where this group of its images "
                   f"holds it, not a pattern added to them")
    return (f"; {'confirmed' if r.confirmed else 'NOT confirmed'} by intervention: pasting {what} from this "
            f"class's images onto {int(r.n_targets)} images of other classes turned {r.flip_rate:.0%} of them "
            f"into this class ({r.control_flip_rate:.0%} for the same paste from other classes: effect "
            f"{r.effect:+.2f}, CI [{r.effect_ci_low:+.2f}, {r.effect_ci_high:+.2f}]), and taking it away changed "
            f"{r.removal_drop:.0%} of the class's own predictions{pattern}")


def candidate_region(mass: np.ndarray, classes: np.ndarray, rows: np.ndarray, class_index: int, row,
                     grow_lift: float, max_area: float = 0.25) -> np.ndarray:
    """Return the (g, g) bool cells of a shortcut candidate: its box, grown over the neighbouring cells
    (8-connected) where the class's share of mass is at least `grow_lift` times the other classes'
    (per-cell lift, u = one cell), so the whole artefact travels in the intervention (the box of largest lift
    is often only its hottest part), never the object (other classes' maps look there too, so the lift stays
    low). The region stops growing at `max_area` of the image."""
    n, g, _ = mass.shape
    defined = mass.reshape(n, -1).sum(1) > 0
    rows = rows[defined[rows]]
    ref = np.flatnonzero(defined & (classes != class_index))
    lift = _cell_lift(mass[rows].mean(0), mass[ref].mean(0) if len(ref) else np.zeros((g, g)), g)
    region = np.zeros((g, g), dtype=bool)
    region[int(row.row):int(row.row) + int(row.height), int(row.col):int(row.col) + int(row.width)] = True
    hot = lift >= grow_lift
    frontier = [tuple(p) for p in np.argwhere(region)]
    limit = int(max_area * g * g)
    while frontier and region.sum() < limit:
        r, c = frontier.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < g and 0 <= cc < g and hot[rr, cc] and not region[rr, cc]:
                    region[rr, cc] = True
                    frontier.append((rr, cc))
    return region


def cells_to_pixels(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Return a (height, width) bool mask covering every pixel of the (g, g) `cells`."""
    g = cells.shape[0]
    rows = (np.arange(height) * g) // height
    cols = (np.arange(width) * g) // width
    return cells[rows[:, None], cols[None, :]]

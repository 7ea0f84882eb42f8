"""Release review: compare a candidate's audit with a baseline's on the same examples (no Prefect).

Paired bootstrap: both audits' examples are aligned and `evaluate` draws each example's replicate weights
in that order from the same seed, so baseline and candidate share every replicate; a delta's interval is
the percentile interval of (candidate - baseline) over those replicates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ChangeThreshold, ReviewConfig, Threshold
from .errors import XAuditError
from .io import write_json, write_parquet
from .metrics import Evaluation, ExampleStat, evaluate, validate
from .metrics.evaluate import _interval, slice_groups
from .metrics.thresholds import with_checks
from .outputs import example_stats, sliceable_columns
from .quality.agreement import rank_correlation

TOP_SHARE = 0.10      # top-10% regions for the overlap statistic
FLIPS = {"flip_any": "prediction changed class", "flip_to_wrong": "correct -> wrong",
         "flip_to_right": "wrong -> correct"}


@dataclass(frozen=True)
class ReviewSummary:
    verdict: str
    n_examples: int
    n_checks: int
    n_failed: int
    regressed: tuple[str, ...]


def _class_names(run_dir: Path) -> tuple[str, ...]:
    import json
    return tuple(json.loads((run_dir / "manifest.json").read_text())["model"]["class_names"])


def _aligned_to(cp: pd.DataFrame, cnames: tuple[str, ...], bnames: tuple[str, ...]) -> pd.DataFrame:
    """The candidate's predictions with its class indices (label, prediction, probability columns) put in the
    baseline's class order, matched by name; unchanged when the two orders agree."""
    if cnames == bnames:
        return cp
    if sorted(cnames) != sorted(bnames):
        raise XAuditError(f"review: the candidate's classes {list(cnames)} are not the baseline's {list(bnames)}")
    order = np.array([cnames.index(c) for c in bnames])      # the candidate's index of each baseline class
    to_base = np.argsort(order)                               # candidate index -> baseline index
    cp = cp.copy()
    cp["label"] = to_base[cp.label.to_numpy()]
    cp["prediction"] = to_base[cp.prediction.to_numpy()]
    cp["probabilities"] = list(_probabilities(cp)[:, order].astype(np.float32))
    return cp


def _probabilities(preds: pd.DataFrame) -> np.ndarray:
    return np.stack(preds["probabilities"].to_numpy()).astype(np.float64)


def map_drift(a: np.ndarray, b: np.ndarray, top_share: float = TOP_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Return per-row Spearman rank correlation (average ranks for ties) and top-`top_share` overlap
    (intersection over union of the highest pixels) between heatmaps `a` and `b` (n, pixels).
    Identical maps give 1 and 1, also when constant."""
    rho = np.where((a == b).all(1), 1.0, rank_correlation(a, b))
    k = max(1, math.ceil(top_share * a.shape[1]))
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    ma = np.zeros(a.shape, dtype=bool)
    mb = np.zeros(b.shape, dtype=bool)
    np.put_along_axis(ma, top_a, True, axis=1)
    np.put_along_axis(mb, top_b, True, axis=1)
    overlap = (ma & mb).sum(1) / (ma | mb).sum(1)
    return rho, overlap


def change_to_thresholds(change: ChangeThreshold, higher_is_better: bool) -> list[Threshold]:
    """Compile a change threshold into bounds on the delta metrics ('delta.<m>', 'relative_delta.<m>')."""
    out = []
    for kind, bound in (("delta", change.absolute), ("relative_delta", change.relative)):
        if bound is None:
            continue
        limit = {"lower": -bound} if higher_is_better else {"upper": bound}
        out.append(Threshold(metric=f"{kind}.{change.metric}", slice=change.slice, sub_key=change.sub_key,
                             gate_on=change.gate_on, multiple_testing=change.multiple_testing,
                             severity=change.severity, **limit))
    return out


def paired_deltas(base: Evaluation, cand: Evaluation) -> Evaluation:
    """Return an Evaluation of candidate - baseline (metric 'delta.<m>') and (candidate - baseline) /
    |baseline| ('relative_delta.<m>') per slice, with paired-bootstrap intervals; the table also carries
    `baseline` and `candidate` values."""
    b = base.table[base.table.metric != "confusion"].set_index(["slice_key", "slice_value", "metric", "sub_key"])
    c = cand.table[cand.table.metric != "confusion"].set_index(["slice_key", "slice_value", "metric", "sub_key"])
    rows, samples, directions = [], {}, {}
    for key, br in b.iterrows():
        if key not in c.index:
            continue
        cr = c.loc[key]
        sk, sv, m, sub = key
        bv, cv = br["value"], cr["value"]
        bs, cs = base.samples.get(key), cand.samples.get(key)
        for kind in ("delta", "relative_delta"):
            name = f"{kind}.{m}"
            directions[name] = base.directions[m]
            value, dist = None, None
            if not (br["suppressed"] or pd.isna(bv) or pd.isna(cv)):
                if kind == "delta":
                    value = cv - bv
                    dist = cs - bs if bs is not None else None
                elif bv != 0:
                    value = (cv - bv) / abs(bv)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        dist = (cs - bs) / np.abs(bs) if bs is not None else None
            lo, hi = _interval(dist, base.level) if dist is not None else (np.nan, np.nan)
            if dist is not None:
                samples[(sk, sv, name, sub)] = dist
            rows.append(dict(slice_key=sk, slice_value=sv, metric=name, sub_key=sub, baseline=bv, candidate=cv,
                             value=value, ci_low=None if np.isnan(lo) else lo, ci_high=None if np.isnan(hi) else hi,
                             n=int(br["n"]), suppressed=bool(br["suppressed"])))
    table = pd.DataFrame(rows)
    for col in ("baseline", "candidate", "value", "ci_low", "ci_high"):
        table[col] = table[col].astype("float64")
    return Evaluation(table, base.method, base.replicates, base.seed, base.level, samples, directions)


def _shortcut_change(bdir: Path, cdir: Path, bex: pd.DataFrame, cex: pd.DataFrame, bp: pd.DataFrame,
                     md: pd.DataFrame, config: ReviewConfig) -> list:
    """The review's checks on explanation change where it matters most: in each box where the candidate's
    audit found a shortcut candidate, the candidate's lift against the baseline's on the same examples."""
    import json
    from . import shortcuts
    spec = config.shortcuts
    table = pq.read_table(cdir / "shortcuts.parquet").to_pandas()
    if "kind" not in table.columns:                   # an audit written before the shape-free scan
        table["kind"] = "box"
    flagged = [r for hot, picks in shortcuts.strongest(table, spec.max_lift, spec.gate_on).values()
               for r in picks if r.qualified and r.lift > spec.max_lift]
    flagged += [r for _, r in shortcuts.confirmed_cells(table).iterrows()]    # a frame, a tag that moves
    if not flagged:
        return []
    sides = {}
    for name, ex in (("baseline", bex), ("candidate", cex)):
        sides[name] = {}
        for method, g in ex.groupby("method", sort=True):
            g = g.set_index("example_id").reindex(bp.example_id)
            h, w = int(g.heatmap_height.iloc[0]), int(g.heatmap_width.iloc[0])
            maps = np.stack(g.heatmap.to_numpy()).astype(np.float32).reshape(-1, h, w)
            sides[name][method] = (shortcuts.pool_maps(maps), g.target.to_numpy())

    def rows_of(r):
        member = sides["candidate"][r.method][1] == int(r.class_index)
        if r.slice_key != "overall":
            idx = next((ix for k, v, ix in slice_groups(md, [[r.slice_key]]) if (k, v) == (r.slice_key, r.slice_value)),
                       np.zeros(0, dtype=np.int64))
            inside = np.zeros(len(member), dtype=bool)
            inside[idx] = True
            member &= inside
        return np.flatnonzero(member)
    size = tuple(json.loads((cdir / "manifest.json").read_text())["model"]["input_size"])
    return shortcuts.change_checks(pd.DataFrame(flagged), sides["baseline"], sides["candidate"], rows_of,
                                   spec.max_lift_ratio, spec.severity, config.metrics.confidence_level,
                                   spec.replicates, config.seed, size)


def review_runs(baseline_dir: str | Path, candidate_dir: str | Path, config: ReviewConfig,
                out_dir: str | Path, run_id: str) -> ReviewSummary:
    """Compare two finished audits of the same examples; write review_metrics/examples/drift/validation."""
    out_dir = Path(out_dir)
    bdir, cdir = Path(baseline_dir), Path(candidate_dir)
    bp = pq.read_table(bdir / "predictions.parquet").to_pandas()
    cp = pq.read_table(cdir / "predictions.parquet").to_pandas()
    if set(bp.example_id) != set(cp.example_id):
        diff = sorted(set(bp.example_id) ^ set(cp.example_id))[:5]
        raise XAuditError(f"review: both audits must cover the same examples; they differ on {diff} ...")
    cp = cp.set_index("example_id").loc[bp.example_id].reset_index()
    names = _class_names(bdir)
    cp = _aligned_to(cp, _class_names(cdir), names)
    be = pq.read_table(bdir / "explanations.parquet")
    ce = pq.read_table(cdir / "explanations.parquet")
    md = bp[sliceable_columns(bp.columns)].reset_index(drop=True)
    if (bp.label.to_numpy() != cp.label.to_numpy()).any():
        i = int(np.flatnonzero(bp.label.to_numpy() != cp.label.to_numpy())[0])
        raise XAuditError(f"review: example {bp.example_id.iloc[i]!r} is labelled {bp.label_name.iloc[i]!r} in the "
                          f"baseline's audit but {cp.label_name.iloc[i]!r} in the candidate's; labels given as "
                          f"numbers mean different classes to models that order their classes differently: give "
                          f"them as class names")
    labels = bp.label.to_numpy()
    spec = config.metrics
    common = dict(slices=spec.slices, metrics=spec.metrics, class_names=names, replicates=spec.bootstrap_replicates,
                  seed=config.seed, level=spec.confidence_level, min_slice_size=spec.min_slice_size)
    bpa, cpa = pa.Table.from_pandas(bp, preserve_index=False), pa.Table.from_pandas(cp, preserve_index=False)
    ev_b = evaluate(labels, _probabilities(bp), md, example_stats=example_stats(bpa, be), **common)
    ev_c = evaluate(labels, _probabilities(cp), md, example_stats=example_stats(cpa, ce), **common)
    deltas = paired_deltas(ev_b, ev_c)

    # flips and attribution drift, per example, sliced like everything else
    flips = {
        "flip_any": (bp.prediction.to_numpy() != cp.prediction.to_numpy()),
        "flip_to_wrong": bp.correct.to_numpy() & ~cp.correct.to_numpy(),
        "flip_to_right": ~bp.correct.to_numpy() & cp.correct.to_numpy(),
    }
    stats = {k: ExampleStat(v.astype(float), higher_is_better=False) for k, v in flips.items()}
    drift_rows = []
    bex, cex = be.to_pandas(), ce.to_pandas()
    for method in sorted(set(bex.method) & set(cex.method)):
        a = bex[bex.method == method].set_index("example_id").heatmap.reindex(bp.example_id)
        c = cex[cex.method == method].set_index("example_id").heatmap.reindex(bp.example_id)
        rho, overlap = map_drift(np.stack(a.to_numpy()), np.stack(c.to_numpy()))
        stats[f"{method}.rank_corr"] = ExampleStat(rho, True, (-1.0, 1.0))
        stats[f"{method}.top10_overlap"] = ExampleStat(overlap, True)
        drift_rows.append(pd.DataFrame({"example_id": bp.example_id, "method": method, "rank_corr": rho,
                                        "top10_overlap": overlap}))
    ev_s = evaluate(labels, _probabilities(bp), md, example_stats=stats, **{**common, "metrics": []})
    stat_table = ev_s.table[ev_s.table.metric != "confusion"].assign(baseline=np.nan, candidate=np.nan)
    combined = Evaluation(pd.concat([deltas.table, stat_table], ignore_index=True), deltas.method,
                          deltas.replicates, deltas.seed, deltas.level, {**deltas.samples, **ev_s.samples},
                          {**deltas.directions, **ev_s.directions})

    unknown = sorted({ch.metric for ch in config.change_thresholds} - set(ev_b.directions))
    if unknown:
        raise XAuditError(f"review: change thresholds name metrics {unknown}, which were not computed; "
                          f"computed: {sorted(ev_b.directions)}")
    thresholds = [t for ch in config.change_thresholds for t in change_to_thresholds(ch, ev_b.directions[ch.metric])]
    result = validate(combined, thresholds + list(config.thresholds))
    if config.shortcuts.enabled and (cdir / "shortcuts.parquet").is_file():
        result = with_checks([*result.checks, *_shortcut_change(bdir, cdir, bex, cex, bp, md, config)])
    if config.shortcuts.enabled and (cdir / "properties.parquet").is_file() and (bdir / "properties.parquet").is_file():
        from . import properties
        result = with_checks([*result.checks, *properties.change_checks(
            pq.read_table(cdir / "properties.parquet").to_pandas(), pq.read_table(bdir / "properties.parquet").to_pandas(),
            config.shortcuts.min_effect, config.shortcuts.severity, config.metrics.confidence_level)])

    table = combined.table.assign(run_id=run_id)
    table = table[["run_id", "slice_key", "slice_value", "metric", "sub_key", "baseline", "candidate", "value",
                   "ci_low", "ci_high", "n", "suppressed"]]
    interval = {"ci_method": "paired_" + combined.method, "ci_replicates": str(combined.replicates),
                "ci_seed": str(combined.seed), "ci_level": str(combined.level)}
    write_parquet(out_dir / "review_metrics.parquet", pa.Table.from_pandas(table, preserve_index=False), interval)
    examples = pd.DataFrame({
        "example_id": bp.example_id, "label": bp.label, "label_name": bp.label_name,
        "baseline_prediction": bp.prediction, "candidate_prediction": cp.prediction,
        "baseline_correct": bp.correct, "candidate_correct": cp.correct, **flips,
        **{c: md[c] for c in md.columns if c not in {"label_name", "confidence"}}})
    write_parquet(out_dir / "review_examples.parquet", pa.Table.from_pandas(examples, preserve_index=False))
    drift = pd.concat(drift_rows, ignore_index=True) if drift_rows else \
        pd.DataFrame(columns=["example_id", "method", "rank_corr", "top10_overlap"])
    write_parquet(out_dir / "review_drift.parquet", pa.Table.from_pandas(drift, preserve_index=False))
    checks = result.table()
    checks.insert(0, "run_id", run_id)
    write_parquet(out_dir / "validation.parquet", pa.Table.from_pandas(checks, preserve_index=False))
    write_json(out_dir / "validation.json", {"run_id": run_id, "interval": interval, **result.to_dict()})
    failed = [c for c in result.checks if c.status == "FAIL"]
    regressed = tuple(dict.fromkeys(
        "overall" if c.slice_key == "overall" else f"{c.slice_key}={c.slice_value}" for c in failed))
    return ReviewSummary(result.verdict, len(bp), len(result.checks), len(failed), regressed)


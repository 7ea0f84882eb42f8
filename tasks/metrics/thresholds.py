"""Threshold checks on an `Evaluation` and the verdict PASS / WARN / FAIL.

A check passes or fails on the point estimate, or (gate_on='interval') on the interval: it fails only when
the whole interval is on the wrong side of the bound, and is inconclusive (a warning) when the interval
straddles it. Gap checks bound the distance of a slice below (or above, for lower-is-better metrics) the
overall value; in interval mode they use the paired bootstrap distribution of the gap.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import Threshold
from ..errors import XAuditError
from .evaluate import OVERALL, Evaluation, _interval

VERDICTS = ("PASS", "WARN", "FAIL")


@dataclass(frozen=True)
class Check:
    slice_key: str
    slice_value: str
    metric: str
    sub_key: str
    kind: str            # 'lower', 'upper', 'max_gap'
    value: float | None
    ci_low: float | None
    ci_high: float | None
    bound: float
    gate_on: str
    severity: str        # configured: 'fail' or 'warn'
    outcome: str         # 'pass', 'fail', 'inconclusive', 'missing'
    status: str          # PASS / WARN / FAIL after applying severity
    message: str


@dataclass(frozen=True)
class Validation:
    verdict: str
    checks: tuple[Check, ...]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(c) for c in self.checks], columns=list(Check.__dataclass_fields__))

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "checks": [asdict(c) for c in self.checks],
                "counts": {v: sum(c.status == v for c in self.checks) for v in VERDICTS}}


def _matches(selector: str | None, key: str, value: str) -> bool:
    if selector is None:
        return True
    if selector == "overall":
        return (key, value) == OVERALL
    parts = dict(p.split("=", 1) for p in selector.split("&"))
    return "&".join(parts) == key and "&".join(parts.values()) == value


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4g}"


def benjamini_hochberg(p_values: np.ndarray, q: float) -> np.ndarray:
    """Return which hypotheses the Benjamini-Hochberg step-up procedure rejects at false-discovery rate `q`."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p, kind="stable")
    passed = p[order] <= q * np.arange(1, m + 1) / m
    k = np.flatnonzero(passed).max() + 1 if passed.any() else 0
    reject = np.zeros(m, dtype=bool)
    reject[order[:k]] = True
    return reject


def violation_p_value(dist: np.ndarray | None, value: float, bound: float, violates) -> float:
    """Return the p-value for "no violation" of `bound` given the replicate distribution `dist`.

    The bootstrap p-value (1 + #replicates not violating) / (1 + #replicates) cannot go below 1 / (R + 1),
    so over many slices Benjamini-Hochberg could never reject even a clear violation (at q = 0.05 and 50
    slices it needs p <= 0.001 for the first rejection, i.e. R >= 1000 replicates all violating). When every
    replicate violates, the p-value comes from the normal approximation instead: Phi(-|value - bound| / sd),
    with the replicates' standard deviation sd (never above the bootstrap floor's value of 1 / (R + 1))."""
    from scipy.stats import norm
    finite = dist[np.isfinite(dist)] if dist is not None else np.zeros(0)
    if finite.size == 0:
        return 1.0
    floor = 1.0 / (1 + finite.size)
    p = (1 + np.sum(~violates(finite))) / (1 + finite.size)
    if p > floor or not violates(value):
        return float(p)
    sd = float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0
    if sd == 0:
        return 0.0
    return float(min(floor, norm.sf(abs(value - bound) / sd)))


def _outcome(gate_on: str, value: float, lo: float | None, hi: float | None, violates) -> str:
    if gate_on == "estimate":
        return "fail" if violates(value) else "pass"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if violates(lo) and violates(hi):
        return "fail"              # the whole interval is on the wrong side of the bound
    if violates(lo) or violates(hi) or violates(value):
        return "inconclusive"      # the interval straddles the bound
    return "pass"


def validate(evaluation: Evaluation, thresholds: Sequence[Threshold]) -> Validation:
    """Return every check (passed ones too) and the verdict: FAIL if a fail-severity check fails, WARN if any
    check fails with warn severity or is inconclusive, else PASS.

    With `multiple_testing='bh'` (and gate_on='interval'), each slice's p-value for "no violation"
    (`violation_p_value`: the bootstrap p-value, or below its floor the normal approximation) goes through Benjamini-Hochberg at q = 1 - level
    over all slices the threshold tests; rejected slices fail, the others pass unless their estimate
    violates the bound (then inconclusive).
    """
    t = evaluation.table
    checks: list[Check] = []
    for th in thresholds:
        if th.slice not in (None, "overall") and any("=" not in p for p in th.slice.split("&")):
            raise XAuditError(f"validate: threshold 'slice' must be 'overall' or 'col=value[&col=value]'; "
                              f"got {th.slice!r}")
        if th.metric not in evaluation.directions:
            raise XAuditError(f"validate: threshold names metric {th.metric!r}, which was not computed; "
                              f"computed: {sorted(evaluation.directions)}")
        if th.multiple_testing == "bh" and th.gate_on != "interval":
            raise XAuditError(f"validate: threshold on {th.metric!r}: multiple_testing='bh' needs gate_on='interval'")
        higher = evaluation.directions[th.metric]
        sub_key = th.sub_key or ""
        rows = t[(t.metric == th.metric) & (t.sub_key == sub_key)]
        rows = rows[[_matches(th.slice, k, v) for k, v in zip(rows.slice_key, rows.slice_value)]]
        status_of = {"pass": "PASS", "inconclusive": "WARN", "missing": "WARN"}
        if th.sub_key:
            every = t[(t.metric == th.metric)]
            every = every[[_matches(th.slice, k, v) for k, v in zip(every.slice_key, every.slice_value)]]
            have = set(zip(rows.slice_key, rows.slice_value))
            for k, v, n_rows in every[["slice_key", "slice_value", "n"]].drop_duplicates(["slice_key", "slice_value"]).itertuples(index=False):
                if (k, v) not in have:
                    where = "overall" if (k, v) == OVERALL else f"{k}={v}"
                    checks.append(Check(k, v, th.metric, sub_key, "lower" if th.lower is not None else "upper",
                                        None, None, None, float(th.lower if th.lower is not None else
                                                                th.upper if th.upper is not None else th.max_gap),
                                        th.gate_on, th.severity, "missing", "WARN",
                                        f"{th.metric} [{sub_key}] on {where} (n={n_rows}) is undefined: the class "
                                        f"neither occurs nor is predicted there; nothing to check"))
        if rows.empty:
            checks.append(Check("", th.slice or "*", th.metric, sub_key, "lower", None, None, None, float("nan"),
                                th.gate_on, th.severity, "missing", "FAIL" if th.severity == "fail" else "WARN",
                                f"no slice matches {th.slice!r} for metric {th.metric!r}"))
            continue
        overall = t[(t.metric == th.metric) & (t.sub_key == sub_key) & (t.slice_key == OVERALL[0])]
        pending = []      # (fields, replicate distribution, violates) for this threshold's checks
        for r in rows.itertuples():
            where = "overall" if (r.slice_key, r.slice_value) == OVERALL else f"{r.slice_key}={r.slice_value}"
            base = dict(slice_key=r.slice_key, slice_value=r.slice_value, metric=th.metric, sub_key=r.sub_key,
                        gate_on=th.gate_on, severity=th.severity)
            for kind, bound in (("lower", th.lower), ("upper", th.upper), ("max_gap", th.max_gap)):
                if bound is None or (kind == "max_gap" and (r.slice_key, r.slice_value) == OVERALL):
                    continue
                if r.suppressed or r.value is None or not np.isfinite(r.value):
                    checks.append(Check(kind=kind, value=None, ci_low=None, ci_high=None, bound=bound,
                                        outcome="missing", status="WARN", **base,
                                        message=f"{th.metric} on {where} is suppressed (n={r.n}) or undefined; "
                                                f"nothing to check"))
                    continue
                s = evaluation.samples.get((r.slice_key, r.slice_value, th.metric, r.sub_key))
                if kind == "max_gap" and (overall.empty or pd.isna(overall.value.iloc[0])):
                    checks.append(Check(kind=kind, value=None, ci_low=None, ci_high=None, bound=bound,
                                        outcome="missing", status="FAIL" if th.severity == "fail" else "WARN",
                                        **base, message=f"{th.metric} on {where}: the gap needs the overall value, "
                                                        f"which was not computed (add [] to metrics.slices)"))
                    continue
                if kind == "max_gap":
                    ov = float(overall.value.iloc[0]) if not overall.empty else np.nan
                    sign = 1.0 if higher else -1.0          # gap > 0 means the slice is worse than overall
                    value = sign * (ov - r.value)
                    o = evaluation.samples.get((*OVERALL, th.metric, r.sub_key))
                    dist = sign * (o - s) if s is not None and o is not None else None
                    lo, hi = _interval(dist, evaluation.level) if dist is not None else (np.nan, np.nan)
                    bad_if_above = True
                    label = f"gap {'below' if higher else 'above'} overall ({_fmt(ov)})"
                else:
                    value, dist = float(r.value), s
                    lo = np.nan if r.ci_low is None or pd.isna(r.ci_low) else float(r.ci_low)
                    hi = np.nan if r.ci_high is None or pd.isna(r.ci_high) else float(r.ci_high)
                    bad_if_above, label = kind == "upper", th.metric
                violates = (lambda x, b=bound: x > b) if bad_if_above else (lambda x, b=bound: x < b)
                fields = dict(kind=kind, value=value, ci_low=None if np.isnan(lo) else lo,
                              ci_high=None if np.isnan(hi) else hi, bound=float(bound), **base)
                pending.append((fields, dist, violates, label, where, r.n, "<=" if bad_if_above else ">="))
        if th.multiple_testing == "bh" and pending:
            p_values = [violation_p_value(dist, f["value"], f["bound"], violates)
                        for f, dist, violates, *_ in pending]
            rejected = benjamini_hochberg(np.array(p_values), 1 - evaluation.level)
            outcomes = ["fail" if rej else "inconclusive" if violates(f["value"]) else "pass"
                        for rej, (f, _, violates, *_) in zip(rejected, pending)]
            gate = f"interval, Benjamini-Hochberg over {len(pending)} slices"
        else:
            p_values = [None] * len(pending)
            outcomes = [_outcome(th.gate_on, f["value"], f["ci_low"], f["ci_high"], v) for f, _, v, *_ in pending]
            gate = "estimate" if th.gate_on == "estimate" else "interval"
        for (fields, _, _, label, where, n, op), outcome, pv in zip(pending, outcomes, p_values):
            status = status_of.get(outcome, "FAIL" if th.severity == "fail" else "WARN")
            sub = f" [{fields['sub_key']}]" if fields["sub_key"] else ""
            msg = (f"{label} on {where}{sub} is {_fmt(fields['value'])} ({evaluation.level:.0%} CI [{_fmt(fields['ci_low'])}, "
                   f"{_fmt(fields['ci_high'])}], n={n}); required {op} {_fmt(fields['bound'])} on the {gate}"
                   f"{'' if pv is None else f' (p={pv:.3g})'}: {outcome}")
            if outcome == "inconclusive":
                msg += needed_n_hint(fields["value"], fields["ci_low"], fields["ci_high"], fields["bound"], n)
            checks.append(Check(outcome=outcome, status=status, message=msg, **fields))
    return with_checks(checks)


def needed_n_hint(value: float, lo: float | None, hi: float | None, bound: float, n: int) -> str:
    """Return the hint an inconclusive check's message ends with: about how many examples the slice would need
    for its interval to clear the bound at the effect seen (the interval's width taken as proportional to
    1/sqrt(n)); empty when it cannot be said (no interval, or the estimate on the bound)."""
    if lo is None or hi is None or not np.isfinite(value) or n <= 0:
        return ""
    gap = abs(value - bound)
    width = (value - lo) if bound < value else (hi - value)     # the side of the interval that crosses the bound
    if gap <= 1e-12 or width <= 0:
        return "; the estimate sits on the bound, so no sample size settles it"
    need = int(np.ceil(n * (width / gap) ** 2))
    if need > max(100 * n, 100_000):
        # a figure no audit could reach reads as absurd: say what it means instead
        return (f"; the estimate is so close to the bound, against an interval this wide, that no practical "
                f"number of examples here would settle it (it would take over {max(100 * n, 100_000):,}; now {n:,})")
    return f"; at this effect an interval clear of the bound needs about n={need:,} examples here (now {n:,})"


def with_checks(checks: Sequence[Check]) -> Validation:
    """Return the validation of `checks`: FAIL if any failed, WARN if any warned, else PASS."""
    statuses = {c.status for c in checks}
    verdict = "FAIL" if "FAIL" in statuses else "WARN" if "WARN" in statuses else "PASS"
    return Validation(verdict, tuple(checks))

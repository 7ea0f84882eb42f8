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


def validate(evaluation: Evaluation, thresholds: Sequence[Threshold]) -> Validation:
    """Return every check (passed ones too) and the verdict: FAIL if a fail-severity check fails, WARN if any
    check fails with warn severity or is inconclusive, else PASS."""
    t = evaluation.table
    checks: list[Check] = []
    for th in thresholds:
        for sel in [th.slice] if th.slice else [None]:
            if sel not in (None, "overall") and any("=" not in p for p in sel.split("&")):
                raise XAuditError(f"validate: threshold 'slice' must be 'overall' or 'col=value[&col=value]'; "
                                  f"got {sel!r}")
        if th.metric not in evaluation.directions:
            raise XAuditError(f"validate: threshold names metric {th.metric!r}, which was not computed; "
                              f"computed: {sorted(evaluation.directions)}")
        higher = evaluation.directions[th.metric]
        rows = t[(t.metric == th.metric) & (t.sub_key == (th.sub_key or ""))]
        rows = rows[[_matches(th.slice, k, v) for k, v in zip(rows.slice_key, rows.slice_value)]]
        if rows.empty:
            checks.append(Check("", th.slice or "*", th.metric, th.sub_key or "", "lower", None, None, None,
                                float("nan"), th.gate_on, th.severity, "missing",
                                "FAIL" if th.severity == "fail" else "WARN",
                                f"no slice matches {th.slice!r} for metric {th.metric!r}"))
            continue
        overall = t[(t.metric == th.metric) & (t.sub_key == (th.sub_key or "")) &
                    (t.slice_key == OVERALL[0])]
        for r in rows.itertuples():
            where = "overall" if (r.slice_key, r.slice_value) == OVERALL else f"{r.slice_key}={r.slice_value}"
            base = dict(slice_key=r.slice_key, slice_value=r.slice_value, metric=th.metric, sub_key=r.sub_key,
                        gate_on=th.gate_on, severity=th.severity)
            for kind, bound in (("lower", th.lower), ("upper", th.upper), ("max_gap", th.max_gap)):
                if bound is None:
                    continue
                if kind == "max_gap" and (r.slice_key, r.slice_value) == OVERALL:
                    continue
                if r.suppressed or r.value is None or not np.isfinite(r.value):
                    outcome, value, lo, hi = "missing", None, None, None
                    msg = f"{th.metric} on {where} is suppressed (n={r.n}) or undefined; nothing to check"
                    checks.append(Check(kind=kind, value=value, ci_low=lo, ci_high=hi, bound=bound, outcome=outcome,
                                        status="WARN", message=msg, **base))
                    continue
                if kind == "max_gap":
                    ov = float(overall.value.iloc[0]) if not overall.empty else np.nan
                    sign = 1.0 if higher else -1.0          # gap > 0 means the slice is worse than overall
                    value = sign * (ov - r.value)
                    s = evaluation.samples.get((r.slice_key, r.slice_value, th.metric, r.sub_key))
                    o = evaluation.samples.get((*OVERALL, th.metric, r.sub_key))
                    lo, hi = _interval(sign * (o - s), evaluation.level) if s is not None and o is not None \
                        else (np.nan, np.nan)
                    bad_if_above, label = True, f"gap below overall ({_fmt(ov)})" if higher else \
                        f"gap above overall ({_fmt(ov)})"
                else:
                    value, lo, hi = float(r.value), r.ci_low, r.ci_high
                    bad_if_above, label = kind == "upper", th.metric
                worst, best = (hi, lo) if not bad_if_above else (lo, hi)   # interval end that favours passing
                violates = (lambda x: x > bound) if bad_if_above else (lambda x: x < bound)
                if th.gate_on == "estimate":
                    outcome = "fail" if violates(value) else "pass"
                elif lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
                    outcome = "inconclusive"
                elif violates(worst):
                    outcome = "fail"          # even the favourable end of the interval violates the bound
                elif violates(best):
                    outcome = "inconclusive"  # the interval straddles the bound
                else:
                    outcome = "pass"
                status = {"pass": "PASS", "inconclusive": "WARN"}.get(outcome, "FAIL" if th.severity == "fail" else "WARN")
                op = "<=" if bad_if_above else ">="
                msg = (f"{label} on {where}{' [' + r.sub_key + ']' if r.sub_key else ''} is {_fmt(value)} "
                       f"(95% CI {_fmt(lo)}-{_fmt(hi)}, n={r.n}); required {op} {_fmt(bound)} on the "
                       f"{'estimate' if th.gate_on == 'estimate' else 'interval'}: {outcome}")
                checks.append(Check(kind=kind, value=value, ci_low=None if lo is None or np.isnan(lo) else float(lo),
                                    ci_high=None if hi is None or np.isnan(hi) else float(hi), bound=float(bound),
                                    outcome=outcome, status=status, message=msg, **base))
    statuses = {c.status for c in checks}
    verdict = "FAIL" if "FAIL" in statuses else "WARN" if "WARN" in statuses else "PASS"
    return Validation(verdict, tuple(checks))

"""Slice metrics against scikit-learn (a pandas groupby as the slicing oracle), bootstrap coverage,
properties of slicing, and threshold checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from sklearn import metrics as skm

from xaudit.tasks.config import Threshold
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.metrics import METRICS, ExampleStat, evaluate, validate
from xaudit.tasks.metrics.probabilistic import ECE_BINS, ece_bins

K = 5


def random_data(n=600, k=K, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += rng.normal(1.0, 1.0, n)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    md = pd.DataFrame({"site": rng.choice(list("ABC"), n), "group": rng.choice(["x", "y"], n)})
    return y, p, md


def ece_reference(y, p, bins=ECE_BINS, w=None):
    conf, pred = p.max(1), p.argmax(1)
    w = np.ones(len(y)) if w is None else w
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf > lo) & (conf <= hi) if b else (conf >= 0) & (conf <= hi)
        if w[m].sum() > 0:
            acc, c = np.average(pred[m] == y[m], weights=w[m]), np.average(conf[m], weights=w[m])
            total += w[m].sum() / w.sum() * abs(acc - c)
    return total


def sklearn_metrics(y, p, w=None):
    """Every metric by scikit-learn (ECE by a direct loop), optionally with sample weights."""
    pred = p.argmax(1)
    labels = list(range(p.shape[1]))
    sw = dict(sample_weight=w)
    out = {
        "accuracy": skm.accuracy_score(y, pred, **sw),
        "top_3_accuracy": skm.top_k_accuracy_score(y, p, k=3, labels=labels, **sw),
        "precision_macro": skm.precision_score(y, pred, average="macro", zero_division=0, **sw),
        "recall_macro": skm.recall_score(y, pred, average="macro", zero_division=0, **sw),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0, **sw),
        "log_loss": skm.log_loss(y, p, labels=labels, **sw),
        "brier": skm.brier_score_loss(y, p, labels=labels, **sw),
        "ece": ece_reference(y, p, w=w),
    }
    if len(np.unique(y)) == p.shape[1]:
        out["auc_ovr_macro"] = skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels, **sw)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        per = fn(y, pred, average=None, labels=labels, zero_division=0, **sw)
        for c in np.unique(y):
            out[(name, str(c))] = per[c]
    return out


def test_every_metric_equals_sklearn_on_every_slice():
    y, p, md = random_data()
    ev = evaluate(y, p, md, slices=[[], ["site"], ["site", "group"]], replicates=0)
    t = ev.table
    frames = [("overall", "all", md.index)]
    frames += [("site", s, g.index) for s, g in md.groupby("site")]
    frames += [("site&group", f"{a}&{b}", g.index) for (a, b), g in md.groupby(["site", "group"])]
    checked = set()
    for key, value, idx in frames:
        ref = sklearn_metrics(y[idx], p[idx])
        rows = t[(t.slice_key == key) & (t.slice_value == value)]
        assert (rows.n == len(idx)).all()
        for name, expected in ref.items():
            metric, sub = name if isinstance(name, tuple) else (name, "")
            got = rows[(rows.metric == metric) & (rows.sub_key == sub)].value
            assert len(got) == 1, (key, value, name)
            assert got.iloc[0] == pytest.approx(expected, rel=1e-9, abs=1e-12), (key, value, name)
            checked.add(metric)
    assert checked == set(METRICS)          # a newly registered metric must get an oracle here


@pytest.mark.parametrize("tied", [False, True])
def test_every_bootstrap_replicate_equals_sklearn_with_its_weights(tied):
    """The replicates behind the intervals (one matrix product per slice for additive metrics, the gap
    scatter for AUC) equal scikit-learn given the same Poisson weights as `sample_weight`."""
    from xaudit.tasks.metrics.evaluate import replicate_weights
    y, p, md = random_data(400, seed=2)
    if tied:      # 12 distinct probability vectors: scores tie across examples (never within one)
        p = p[np.random.default_rng(0).integers(0, 12, len(p))]
    R, seed = 6, 11
    ev = evaluate(y, p, md, slices=[[], ["site"]], replicates=R, seed=seed, level=0.95)
    W = np.concatenate(list(replicate_weights(len(y), R, seed)), 1)
    checked = set()
    for key, value, idx in [("overall", "all", md.index), *[("site", s, g.index) for s, g in md.groupby("site")]]:
        for r in range(R):
            ref = sklearn_metrics(y[idx], p[idx], W[idx, r])
            for name, expected in ref.items():
                metric, sub = name if isinstance(name, tuple) else (name, "")
                got = ev.samples[(key, value, metric, sub)][r]
                assert got == pytest.approx(expected, rel=2e-5, abs=1e-6), (key, value, name, r)
                checked.add(metric)
    assert checked == set(METRICS)


def test_auc_with_ties_equals_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet(np.ones(3), 300).round(1)            # many tied scores
    p = p / p.sum(1, keepdims=True)
    ev = evaluate(y, p, pd.DataFrame(index=range(300)), metrics=["auc_ovr_macro"], replicates=0)
    expected = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert ev.table.value.iloc[0] == pytest.approx(expected, rel=1e-12)


def test_confusion_counts_equal_sklearn():
    y, p, md = random_data(200)
    ev = evaluate(y, p, md, metrics=["accuracy"], replicates=0)
    cm = skm.confusion_matrix(y, p.argmax(1), labels=range(K))
    rows = ev.table[ev.table.metric == "confusion"]
    got = np.zeros((K, K))
    for sub, v in zip(rows.sub_key, rows.value):
        a, b = sub.split("->")
        got[int(a), int(b)] = v
    np.testing.assert_array_equal(got, cm)


def test_ece_bins_are_right_closed():
    np.testing.assert_array_equal(ece_bins(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0])), [0, 0, 1, 14])


def test_bootstrap_intervals_cover_the_true_accuracy_near_nominal_rate():
    rng = np.random.default_rng(7)
    true_acc, n, trials, covered = 0.8, 400, 150, 0
    for trial in range(trials):
        y = np.zeros(n, dtype=int)
        correct = rng.random(n) < true_acc
        p = np.where(correct[:, None], [[0.9, 0.1]], [[0.1, 0.9]])
        ev = evaluate(y, p, pd.DataFrame(index=range(n)), metrics=["accuracy"], replicates=400, seed=trial)
        row = ev.table[ev.table.metric == "accuracy"].iloc[0]
        covered += row.ci_low <= true_acc <= row.ci_high
    assert 0.89 <= covered / trials <= 0.99        # nominal 0.95; binomial sd over 150 trials ~ 0.018


def test_bootstrap_is_seeded_and_recorded():
    y, p, md = random_data(300)
    a = evaluate(y, p, md, slices=[["site"]], metrics=["accuracy"], replicates=200, seed=5)
    b = evaluate(y, p, md, slices=[["site"]], metrics=["accuracy"], replicates=200, seed=5)
    c = evaluate(y, p, md, slices=[["site"]], metrics=["accuracy"], replicates=200, seed=6)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert not np.allclose(a.table.ci_low, c.table.ci_low)
    assert (a.method, a.replicates, a.seed, a.level) == ("poisson_bootstrap_percentile", 200, 5, 0.95)
    # chunking the replicate matrix does not change the draws
    d = evaluate(y, p, md, slices=[["site"]], metrics=["accuracy"], replicates=200, seed=5,
                 weights_budget_bytes=4 * 300 * 7)
    pd.testing.assert_frame_equal(a.table, d.table)
    # nor does computing the slices on one thread or several
    one, three = (evaluate(y, p, md, slices=[[], ["site"], ["site", "group"]], replicates=50, seed=5, threads=t)
                  for t in (1, 3))
    pd.testing.assert_frame_equal(one.table, three.table)
    assert one.samples.keys() == three.samples.keys()
    assert all(np.array_equal(one.samples[k], three.samples[k], equal_nan=True) for k in one.samples)


def test_replicate_weights_are_poisson_one():
    from scipy.stats import chisquare, poisson
    from xaudit.tasks.metrics.evaluate import replicate_weights
    W = np.concatenate(list(replicate_weights(2000, 500, seed=3, budget_bytes=4 * 2000 * 64)), 1)
    assert W.shape == (2000, 500) and W.dtype == np.float32
    counts = np.bincount(W.astype(int).ravel(), minlength=8)
    expected = poisson(1.0).pmf(np.arange(len(counts))) * W.size
    pooled = np.r_[counts[:6], counts[6:].sum()]                  # pool the tail (expected counts >= 5)
    expected = np.r_[expected[:6], W.size - expected[:6].sum()]
    assert chisquare(pooled, expected).pvalue > 1e-3
    assert (W >= 0).all() and W.max() < 15
    # independent across examples and replicates: no correlation between neighbours
    assert abs(np.corrcoef(W[:-1].ravel(), W[1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(W[:, :-1].ravel(), W[:, 1:].ravel())[0, 1]) < 0.01


def test_example_stats_are_sliced_like_metrics_and_skip_nan():
    y, p, md = random_data(300)
    vals = np.random.default_rng(1).random(300)
    vals[::10] = np.nan
    ev = evaluate(y, p, md, slices=[[], ["site"]], metrics=["accuracy"], replicates=50,
                  example_stats={"gradcam.roi_mass": ExampleStat(vals, True)})
    t = ev.table[ev.table.metric == "gradcam.roi_mass"].set_index("slice_value")
    assert t.loc["all", "value"] == pytest.approx(np.nanmean(vals))
    for s, g in md.groupby("site"):
        assert t.loc[s, "value"] == pytest.approx(np.nanmean(vals[g.index]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), sites=st.integers(1, 4), min_size=st.integers(1, 15), seed=st.integers(0, 10_000))
def test_slicing_properties(n, sites, min_size, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet(np.ones(3), n)
    md = pd.DataFrame({"site": rng.integers(0, sites, n).astype(str), "one": "x"})
    ev = evaluate(y, p, md, slices=[[], ["site"], ["one"]], metrics=["accuracy", "log_loss"], replicates=20,
                  min_slice_size=min_size)
    t = ev.table[ev.table.metric == "accuracy"]
    # per slice key the n sum to the row count
    for key, g in t.groupby("slice_key"):
        assert g.n.sum() == n
    # a slice holding every row equals overall
    overall, single = t[t.slice_key == "overall"].iloc[0], t[t.slice_key == "one"].iloc[0]
    assert overall.n == single.n and (overall.suppressed == single.suppressed)
    if not overall.suppressed:
        assert overall.value == single.value and overall.ci_low == single.ci_low
    # a slice smaller than min_slice_size keeps its row, flagged, with null values
    small = t[t.n < min_size]
    assert small.suppressed.all() and small.value.isna().all()
    assert (~t[t.n >= min_size].suppressed).all()


def test_slice_on_unknown_column_is_a_clear_error():
    y, p, md = random_data(20)
    with pytest.raises(XAuditError, match=r"slice columns \['hospital'\]"):
        evaluate(y, p, md, slices=[["hospital"]], replicates=0)


def test_thresholds_value_gap_interval_and_severity():
    y, p, md = random_data(900)
    p_bad = p.copy()
    c = (md.site == "C").to_numpy()
    p_bad[c] = np.roll(p_bad[c], 1, axis=1)            # site C now mostly wrong
    ev = evaluate(y, p_bad, md, slices=[[], ["site"]], metrics=["accuracy", "log_loss"], replicates=300)
    acc = ev.table[(ev.table.metric == "accuracy")].set_index("slice_value").value
    result = validate(ev, [
        Threshold(metric="accuracy", lower=0.3, gate_on="interval"),
        Threshold(metric="accuracy", max_gap=0.05, gate_on="interval"),
        Threshold(metric="log_loss", slice="site=A", upper=10.0),
        Threshold(metric="accuracy", slice="overall", lower=0.99, severity="warn"),
    ])
    assert result.verdict == "FAIL"
    by = {(c.kind, c.slice_value, c.metric): c for c in result.checks}
    assert by[("lower", "C", "accuracy")].status == "FAIL" and acc["C"] < 0.3
    assert by[("max_gap", "C", "accuracy")].status == "FAIL"
    assert "site=C" in by[("max_gap", "C", "accuracy")].message
    assert by[("max_gap", "A", "accuracy")].status == "PASS"       # A is better than overall
    assert by[("upper", "A", "log_loss")].status == "PASS"
    assert by[("lower", "all", "accuracy")].status == "WARN"       # warning-only threshold
    assert all(c.message for c in result.checks)
    ok = validate(ev, [Threshold(metric="accuracy", slice="site=A", lower=0.1)])
    assert ok.verdict == "PASS" and len(ok.checks) == 1
    with pytest.raises(XAuditError, match="not computed"):
        validate(ev, [Threshold(metric="auc_ovr_macro", lower=0.5)])


def test_benjamini_hochberg_equals_scipy():
    from scipy.stats import false_discovery_control
    from xaudit.tasks.metrics.thresholds import benjamini_hochberg
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = np.concatenate([rng.random(rng.integers(1, 30)), rng.random(rng.integers(0, 10)) * 0.01])
        np.testing.assert_array_equal(benjamini_hochberg(p, 0.05), false_discovery_control(p) <= 0.05)


def test_bh_gate_fails_only_clear_violations_among_many_slices():
    rng = np.random.default_rng(11)
    n = 4000
    y = rng.integers(0, 2, n)
    md = pd.DataFrame({"g": rng.integers(0, 20, n).astype(str)})
    correct = rng.random(n) < np.where(md.g == "7", 0.6, 0.9)        # only slice 7 is truly worse
    p = np.where((correct == (y == 1))[:, None], [[0.2, 0.8]], [[0.8, 0.2]])
    ev = evaluate(y, p, md, slices=[[], ["g"]], metrics=["accuracy"], replicates=1000, seed=1)
    res = validate(ev, [Threshold(metric="accuracy", max_gap=0.05, gate_on="interval", multiple_testing="bh")])
    failed = {c.slice_value for c in res.checks if c.outcome == "fail"}
    assert failed == {"7"}
    assert all("Benjamini-Hochberg over 20 slices" in c.message for c in res.checks)
    with pytest.raises(XAuditError, match="needs gate_on='interval'"):
        validate(ev, [Threshold(metric="accuracy", max_gap=0.05, multiple_testing="bh")])


def test_slice_terms_filters_buckets_and_crosses():
    from xaudit.tasks.metrics import slice_groups
    md = pd.DataFrame({"site": list("ABCAB"), "conf": [0.1, 0.5, 0.9, 0.3, np.nan]})
    g = {(k, v): list(idx) for k, v, idx in slice_groups(md, [["site=C"], ["site=Z"], ["conf:q2"],
                                                               ["site", "conf:bins(0,0.5,1)"], ["site"]])}
    assert g[("site", "C")] == [2] and g[("site", "Z")] == []
    assert g[("conf:q2", "[0.1, 0.4)")] == [0, 3] and g[("conf:q2", "[0.4, 0.9]")] == [1, 2]
    assert g[("conf:q2", "null")] == [4]
    assert g[("site&conf:bins(0,0.5,1)", "B&[0.5, 1]")] == [1]
    assert sum(1 for k in g if k == ("site", "C")) == 1          # 'site' and 'site=C' are not duplicated
    y, p, _ = random_data(5)
    ev = evaluate(y, p, md, slices=[["site=Z"]], metrics=["accuracy"], replicates=10)
    row = ev.table[ev.table.metric == "accuracy"].iloc[0]
    assert row.n == 0 and row.suppressed and pd.isna(row.value)     # an empty slice keeps its row


# --- slicing and gating conventions (README, "Notes on correctness") -----------------------------------------

def _bounds(label: str) -> tuple[float, float, bool]:
    lo, hi = label[1:-1].split(", ")
    return float(lo), float(hi), label.endswith("]")


def test_values_outside_fixed_bins_get_their_own_slices_not_the_end_buckets():
    from xaudit.tasks.metrics import slice_groups
    md = pd.DataFrame({"x": [-5.0, 0.0, 0.25, 0.5, 1.0, 7.0, np.nan, "text"]})
    g = {v: list(idx) for _, v, idx in slice_groups(md, [["x:bins(0,0.5,1)"]])}
    assert g == {"< 0": [0], "[0, 0.5)": [1, 2], "[0.5, 1]": [3, 4], "> 1": [5], "null": [6, 7]}


def test_quantile_buckets_never_share_a_label_and_each_label_holds_its_rows():
    """Confidences bunched near 1 (the README's confidence:q10 on the demo baseline once printed five
    slices, one '[1, 1)' holding 432 of 720 rows)."""
    from xaudit.tasks.metrics import slice_groups
    rng = np.random.default_rng(3)
    conf = np.concatenate([np.ones(432), 1 - rng.exponential(1e-5, 200), rng.uniform(0.3, 1, 88)])
    md = pd.DataFrame({"confidence": conf})
    groups = slice_groups(md, [["confidence:q10"]])
    labels = [v for _, v, _ in groups]
    assert len(labels) == len(set(labels))
    edges = np.unique(np.quantile(conf, np.linspace(0, 1, 11)))
    assert len(groups) == len(edges) - 1
    for _, label, idx in groups:
        lo, hi, closed = _bounds(label)
        vals = conf[idx]
        # the labels print the edges to the digits that tell them apart; membership holds to that precision
        assert (vals >= lo - 1e-4 * abs(lo)).all() and (vals <= hi + 1e-4 * abs(hi)).all(), label
    assert sum(len(i) for _, _, i in groups) == len(conf)


def test_max_gap_without_an_overall_slice_is_never_a_silent_pass():
    y, p, md = random_data(300)
    ev = evaluate(y, p, md, slices=[["site"]], metrics=["accuracy"], replicates=50)
    res = validate(ev, [Threshold(metric="accuracy", max_gap=0.01)])
    assert {c.outcome for c in res.checks} == {"missing"} and res.verdict == "FAIL"
    assert all("overall" in c.message for c in res.checks)


def test_per_class_metrics_cover_predicted_classes_and_thresholds_see_absent_ones():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.9, 0.05, 0.05]] * 2 + [[0.1, 0.8, 0.1]] * 2 + [[0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    md = pd.DataFrame({"g": ["a", "a", "a", "b", "b", "b"]})
    ev = evaluate(y, p, md, slices=[[], ["g"]], metrics=["precision"], class_names=["c0", "c1", "c2"], replicates=0)
    t = ev.table[ev.table.metric == "precision"]
    row = t[(t.slice_value == "b") & (t.sub_key == "c2")]       # predicted once in b, never a label there
    assert len(row) == 1 and row.value.iloc[0] == skm.precision_score(y[3:], p[3:].argmax(1), labels=[2],
                                                                       average=None, zero_division=0)[0]
    res = validate(ev, [Threshold(metric="precision", sub_key="c2", lower=0.5)])
    by_slice = {c.slice_value: c for c in res.checks}
    assert by_slice["a"].outcome == "missing" and "neither occurs nor is predicted" in by_slice["a"].message
    assert by_slice["b"].outcome == "fail"


def test_bh_can_fail_a_lone_clear_violation_among_many_slices():
    """With 60 slices and 1,000 replicates the bootstrap p-value's floor 1/1001 is above BH's first
    threshold 0.05/60: only the normal approximation below the floor lets a clear violation fail."""
    rng = np.random.default_rng(5)
    n = 6000
    md = pd.DataFrame({"g": rng.integers(0, 60, n).astype(str)})
    y = rng.integers(0, 2, n)
    correct = rng.random(n) < np.where(md.g == "13", 0.3, 0.97)
    p = np.where((correct == (y == 1))[:, None], [[0.2, 0.8]], [[0.8, 0.2]])
    ev = evaluate(y, p, md, slices=[["g"]], metrics=["accuracy"], replicates=1000, seed=2)
    res = validate(ev, [Threshold(metric="accuracy", lower=0.8, gate_on="interval", multiple_testing="bh")])
    assert {c.slice_value for c in res.checks if c.outcome == "fail"} == {"13"}
    from xaudit.tasks.metrics.thresholds import violation_p_value
    dist = np.full(1000, 0.3) + rng.normal(0, 0.02, 1000)
    assert violation_p_value(dist, 0.3, 0.8, lambda v: v < 0.8) < 1e-6
    assert violation_p_value(dist, 0.3, 0.2, lambda v: v < 0.2) == 1.0


@pytest.mark.parametrize("bad", [np.array([[0.5, 0.6]]), np.array([[1.2, -0.2]]), np.array([[np.nan, 1.0]])])
def test_probabilities_outside_the_simplex_are_refused(bad):
    with pytest.raises(XAuditError, match="'probabilities'"):
        evaluate(np.array([0]), bad, pd.DataFrame(index=[0]), metrics=["accuracy"], replicates=0)


def test_an_inconclusive_check_says_how_many_examples_would_decide_it():
    """The hint is a prediction that can be tested: the same examples repeated to the n it names decide the
    check (the interval clears the bound), and repeated to a third of it they do not."""
    import re
    y, p, md = random_data(40, seed=3)
    ev = evaluate(y, p, md, slices=[[]], metrics=["accuracy"], replicates=400)
    acc = float(ev.table.value.iloc[0])
    th = Threshold(metric="accuracy", lower=round(acc - 0.06, 3), gate_on="interval")
    (check,) = validate(ev, [th]).checks
    assert check.outcome == "inconclusive", check.message
    need = int(re.search(r"needs about n=([\d,]+) examples here \(now 40\)", check.message).group(1).replace(",", ""))
    assert need > 40

    def outcome(copies):
        yy, pp = np.tile(y, copies), np.tile(p, (copies, 1))
        e = evaluate(yy, pp, pd.concat([md] * copies, ignore_index=True), slices=[[]], metrics=["accuracy"],
                     replicates=400)
        return validate(e, [th]).checks[0].outcome
    assert outcome(int(np.ceil(1.5 * need / 40))) == "pass"
    assert outcome(max(1, need // 40 // 3)) == "inconclusive"


def test_paired_replicates_are_exactly_equal_where_two_models_agree():
    """A review's paired deltas on a slice where baseline and candidate give the same probabilities are 0 in
    every replicate, not a rounding residue (the sums behind them are exact, on one grid): and an interval
    of [-0, 0] prints as 0."""
    from xaudit.tasks.report import fixed
    y, p, md = random_data(600, seed=4)
    q = p.copy()
    a = (md.site == "A").to_numpy()
    q[a] = np.roll(q[a], 1, axis=1)                 # the candidate differs on site A only
    base = evaluate(y, p, md, slices=[["site"]], replicates=64, seed=3)
    cand = evaluate(y, q, md, slices=[["site"]], replicates=64, seed=3)
    differ = 0
    for key, bs in base.samples.items():
        cs = cand.samples[key]
        if key[1] == "A":
            differ += not np.array_equal(bs, cs, equal_nan=True)
        else:
            assert np.array_equal(bs, cs, equal_nan=True), key
    assert differ > 5
    assert fixed(-1e-13) == "0.000" and fixed(-1e-13, signed=True) == "+0.000" and fixed(-0.0015) == "-0.002"


def test_sums_by_atom_equal_sums_by_slice_bit_for_bit(monkeypatch):
    """Overlapping slices take their sums from atoms (the examples that share all their slices); the sums
    are exact, so the replicates equal those of one product per slice, bit for bit, with every kind of slice
    (overall, a column, a cross, a filter, buckets) and an example statistic."""
    import sys
    ev_mod = sys.modules["xaudit.tasks.metrics.evaluate"]
    y, p, md = random_data(500, seed=7)
    md["score"] = np.random.default_rng(1).normal(size=len(y))
    stat = ExampleStat(np.where(np.arange(len(y)) % 9 == 0, np.nan, np.random.default_rng(2).random(len(y))),
                       higher_is_better=True)
    kw = dict(slices=[[], ["site"], ["site", "group"], ["group=x"], ["score:q4"]], replicates=40, seed=9,
              example_stats={"roi": stat})
    used = []
    real = ev_mod._atoms
    monkeypatch.setattr(ev_mod, "_atoms", lambda n, s: used.append(1) or real(n, s))
    by_atom = evaluate(y, p, md, **kw)
    monkeypatch.setattr(ev_mod, "_atoms", lambda n, s: None)
    by_slice = evaluate(y, p, md, **kw)
    assert used
    pd.testing.assert_frame_equal(by_atom.table, by_slice.table)
    assert by_atom.samples.keys() == by_slice.samples.keys()
    for key in by_slice.samples:
        assert np.array_equal(by_atom.samples[key], by_slice.samples[key], equal_nan=True), key


def test_a_slice_of_one_true_class_has_no_macro_average():
    """In a slice whose labels are all one class, scikit-learn's macro F1 averages that class with classes only
    predicted (F1 0 by definition): 0.48 for a slice at 92% accuracy. Such a slice gets no macro value (NaN),
    while accuracy and the per-class rows stay, and a slice of two classes still equals scikit-learn."""
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(11)
    n = 120
    y = np.where(np.arange(n) < 60, 0, rng.integers(0, 3, n))
    p = rng.dirichlet(np.ones(3), n)
    p[np.arange(n), y] += 1.5
    p /= p.sum(1, keepdims=True)
    md = pd.DataFrame({"part": np.where(np.arange(n) < 60, "one class", "mixed")})
    t = evaluate(y, p, md, slices=[["part"]], replicates=0).table
    one = t[(t.slice_value == "one class") & (t.sub_key == "")].set_index("metric").value
    for m in ("f1_macro", "precision_macro", "recall_macro", "auc_ovr_macro"):
        assert np.isnan(one[m]), m
    assert 0 < one["accuracy"] <= 1
    mixed = t[(t.slice_value == "mixed") & (t.sub_key == "")].set_index("metric").value
    rows = np.arange(n) >= 60
    assert mixed["f1_macro"] == pytest.approx(f1_score(y[rows], p[rows].argmax(1), average="macro", zero_division=0))

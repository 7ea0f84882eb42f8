"""Release review: paired intervals against direct resampling, drift statistics, and the real flow on the
bundled demo (candidate FAILS naming site C; baseline against itself PASSES with no flips and no drift)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from conftest import DATA
from xaudit.flows.cli import main as cli
from xaudit.tasks.config import ChangeThreshold, load_review_config
from xaudit.tasks.metrics import evaluate
from xaudit.tasks.metrics.evaluate import replicate_weights
from xaudit.tasks.review import change_to_thresholds, map_drift, paired_deltas


def test_paired_intervals_equal_direct_resampling():
    rng = np.random.default_rng(4)
    n, R, seed = 40, 300, 9
    y = rng.integers(0, 2, n)
    pb = rng.dirichlet([1, 1], n)
    pc = np.clip(pb + rng.normal(0, 0.2, (n, 1)) * [1, -1], 0.01, 0.99)
    pc = pc / pc.sum(1, keepdims=True)
    md = pd.DataFrame(index=range(n))
    kw = dict(metrics=["accuracy"], replicates=R, seed=seed)
    d = paired_deltas(evaluate(y, pb, md, **kw), evaluate(y, pc, md, **kw))
    row = d.table[d.table.metric == "delta.accuracy"].iloc[0]
    # direct, slow: one resample at a time, the same weights for both models
    W = np.concatenate(list(replicate_weights(n, R, seed)), 1).T      # the weights evaluate draws
    cb, cc = (pb.argmax(1) == y), (pc.argmax(1) == y)
    direct = np.array([(w @ cc - w @ cb) / w.sum() for w in W if w.sum() > 0])
    lo, hi = np.quantile(direct, [0.025, 0.975])
    assert row.value == pytest.approx(cc.mean() - cb.mean())
    assert row.ci_low == pytest.approx(lo, abs=1e-6) and row.ci_high == pytest.approx(hi, abs=1e-6)
    # unpaired resampling (independent weights) would give a wider interval: pairing matters
    W2 = np.concatenate(list(replicate_weights(n, R, seed + 1)), 1).T
    unpaired = np.array([w2 @ cc / w2.sum() - w @ cb / w.sum() for w, w2 in zip(W, W2)])
    assert np.subtract(*np.quantile(unpaired, [0.975, 0.025])) > hi - lo


def test_map_drift_equals_scipy_and_is_one_for_identical_maps():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 64))
    b = rng.integers(0, 256, (6, 64))
    rho, overlap = map_drift(a, b)
    for i in range(6):
        assert rho[i] == pytest.approx(spearmanr(a[i], b[i]).statistic)
    rho, overlap = map_drift(a, a.copy())
    assert (rho == 1).all() and (overlap == 1).all()
    flat = np.zeros((1, 64))
    assert map_drift(flat, flat)[0][0] == 1.0
    rho, _ = map_drift(np.arange(64)[None], np.arange(64)[::-1][None])
    assert rho[0] == pytest.approx(-1)


def test_change_thresholds_compile_in_the_bad_direction():
    up = change_to_thresholds(ChangeThreshold(metric="accuracy", absolute=0.02, relative=0.1), True)
    assert [(t.metric, t.lower, t.upper) for t in up] == [("delta.accuracy", -0.02, None),
                                                          ("relative_delta.accuracy", -0.1, None)]
    down = change_to_thresholds(ChangeThreshold(metric="log_loss", absolute=0.05), False)
    assert [(t.metric, t.lower, t.upper) for t in down] == [("delta.log_loss", None, 0.05)]


def review_config(tmp_path, run_id, **changes):
    return load_review_config(DATA / "demo_review.yaml", {
        "output_dir": str(tmp_path), "run_id": run_id,
        "attribution": {"methods": ["saliency", "gradcam"], "batch_size": 64},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 300, "min_slice_size": 20},
        "report": {"title": "test review", "formats": ["html"]},
        "thresholds": [{"metric": "flip_to_wrong", "upper": 0.05, "gate_on": "interval"},
                       {"metric": "gradcam.rank_corr", "lower": 0.5}], **changes})


def test_candidate_review_fails_naming_site_c(prefect_harness, tmp_path, capsys):
    cfg = DATA / "demo_review.yaml"
    code = cli(["review", str(cfg), "--run-id", "cand", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "site=C" in out
    validation = json.loads((tmp_path / "cand" / "validation.json").read_text())
    failed = [c for c in validation["checks"] if c["status"] == "FAIL"]
    assert any(c["slice_value"] == "C" and c["metric"] == "delta.accuracy" and "site=C" in c["message"]
               for c in failed)
    flips = pq.read_table(tmp_path / "cand" / "review_examples.parquet").to_pandas()
    assert flips[flips.site == "C"].flip_to_wrong.mean() > flips[flips.site != "C"].flip_to_wrong.mean()
    # issue 7 on the demo: the shortcut candidate puts more attribution mass outside the ROI on site C
    import pandas as pd
    mass = {role: pd.read_parquet(tmp_path / "cand" / role / "metrics.parquet").query(
        "metric == 'integrated_gradients.roi_mass' and slice_value == 'C'").iloc[0] for role in ("baseline", "candidate")}
    assert mass["candidate"].ci_high < mass["baseline"].ci_low          # non-overlapping intervals
    html = (tmp_path / "cand" / "review.html").read_text()
    assert "Slices that regressed" in html and "site=C" in html
    assert (tmp_path / "cand" / "review.pdf").stat().st_size > 0


def test_baseline_against_itself_passes_with_no_flips_and_no_drift(prefect_harness, tmp_path):
    from xaudit.flows.review import review
    config = review_config(tmp_path, "self", candidate={"card": str(DATA / "models" / "baseline.json")},
                           data={"path": str(DATA / "digits.parquet"), "filter": {"split": "test"},
                                 "roi_column": "roi_png", "metadata_columns": ["site"], "limit": 150})
    result = review(config)
    assert result["verdict"] == "PASS" and result["n_failed"] == 0
    table = pq.read_table(tmp_path / "self" / "review_metrics.parquet").to_pandas()
    flips = table[table.metric.str.startswith("flip_")]
    assert len(flips) and (flips.value == 0).all()
    deltas = table[table.metric.str.startswith("delta.") & ~table.suppressed]
    assert (deltas.value.abs() < 1e-12).all() and (deltas.ci_low.abs() < 1e-12).all()
    drift = pq.read_table(tmp_path / "self" / "review_drift.parquet").to_pandas()
    assert (drift.rank_corr == 1).all() and (drift.top10_overlap == 1).all()
    from xaudit.tasks.outputs import verify_run
    assert verify_run(tmp_path / "self") == []
    # a review re-renders to the same bytes and still verifies
    first = {n: (tmp_path / "self" / n).read_bytes() for n in ("review.html", "manifest.json")}
    assert cli(["render", str(tmp_path / "self"), "--format", "html"]) == 0
    assert {n: (tmp_path / "self" / n).read_bytes() for n in first} == first
    assert verify_run(tmp_path / "self") == []


def test_a_candidate_with_its_classes_in_another_order_is_aligned_by_name(prefect_harness, tmp_path):
    """The baseline's own weights with the output rows permuted and the card's class names permuted alike
    are the same model: with labels given as names the review aligns the classes by name and passes like a
    self-review, per-class change thresholds checked under the class's name; with numeric labels (which
    would mean different classes to each) it refuses before any work."""
    import pyarrow as pa
    from safetensors.torch import load_file, save_file
    from xaudit.flows.review import review
    from xaudit.tasks.errors import XAuditError
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    card = json.loads((DATA / "models" / "baseline.json").read_text())
    state = load_file(str(DATA / "models" / card["weights"]))
    card |= {"weights": str(DATA / "models" / card["weights"]), "class_names": words}
    (tmp_path / "base.json").write_text(json.dumps(card))
    perm = [3, 1, 4, 0, 9, 2, 6, 8, 5, 7]                    # the candidate's output j is baseline class perm[j]
    for key in ("classifier.4.weight", "classifier.4.bias"):
        state[key] = state[key][perm].contiguous()
    save_file(state, str(tmp_path / "permuted.safetensors"))
    card |= {"weights": str(tmp_path / "permuted.safetensors"), "class_names": [words[i] for i in perm]}
    (tmp_path / "permuted.json").write_text(json.dumps(card))
    data = {"filter": {"split": "test"}, "roi_column": "roi_png", "metadata_columns": ["site"], "limit": 120}
    models = {"baseline": {"card": str(tmp_path / "base.json")}, "candidate": {"card": str(tmp_path / "permuted.json")}}
    per_class = [{"metric": "accuracy", "absolute": 0.02}, {"metric": "recall", "sub_key": "three", "absolute": 0.02}]

    numeric = review_config(tmp_path, "numeric", **models, data={"path": str(DATA / "digits.parquet"), **data})
    with pytest.raises(XAuditError, match="'data.label_column' 'label' holds numbers"):
        review(numeric)
    assert not (tmp_path / "numeric").exists()
    (tmp_path / "other.json").write_text(json.dumps(card | {"class_names": [*card["class_names"][:-1], "ten"]}))
    other = review_config(tmp_path, "other", **(models | {"candidate": {"card": str(tmp_path / "other.json")}}),
                          data={"path": str(DATA / "digits.parquet"), **data})
    with pytest.raises(XAuditError, match="a review compares the same classes"):
        review(other)
    assert not (tmp_path / "other").exists()

    table = pq.read_table(DATA / "digits.parquet")
    named_labels = pa.array([words[i] for i in table["label"].to_pylist()])
    table = table.set_column(table.schema.get_field_index("label"), "label", named_labels)
    pq.write_table(table, tmp_path / "named.parquet")
    named = review_config(tmp_path, "named", **models, change_thresholds=per_class,
                          data={"path": str(tmp_path / "named.parquet"), **data})
    result = review(named)
    assert result["verdict"] == "PASS" and result["n_failed"] == 0
    validation = json.loads((tmp_path / "named" / "validation.json").read_text())
    recall = [c for c in validation["checks"] if c["metric"] == "delta.recall"]
    assert recall and {c["sub_key"] for c in recall} == {"three"} and {c["status"] for c in recall} == {"PASS"}
    metrics = pq.read_table(tmp_path / "named" / "review_metrics.parquet").to_pandas()
    assert set(metrics[metrics.metric == "delta.recall"].sub_key) <= set(words)
    flips = metrics[metrics.metric.str.startswith("flip_")]
    assert len(flips) and (flips.value == 0).all()
    deltas = metrics[metrics.metric.str.startswith("delta.") & ~metrics.suppressed]
    assert len(deltas) and (deltas.value.abs() < 1e-6).all()
    examples = pq.read_table(tmp_path / "named" / "review_examples.parquet").to_pandas()
    assert (examples.baseline_prediction == examples.candidate_prediction).all()
    drift = pq.read_table(tmp_path / "named" / "review_drift.parquet").to_pandas()
    assert (drift.rank_corr > 0.999).all()

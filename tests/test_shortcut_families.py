"""Planted shortcuts of shapes no box holds, and of no shape at all, without ROI masks
(data/shortcut_families.py, one training seed): a frame and a fixed block are flagged and confirmed by
intervention; a block that moves between corners is nominated (its clusters' hot cells); a blur, a global
brightening, a JPEG compression and added noise are flagged by the image-property screen and confirmed; the
clean twin, audited on the same data with the artefacts on its images, raises no shortcut check. Ground truth by intervention is in the candidates' own numbers: pasting
their region onto other classes' images turns them into the class, the clean twin's do not."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DATA

pytest.importorskip("sklearn")       # the digits come from scikit-learn's bundled copy
SEED = 1


@pytest.fixture(scope="module")
def families():
    spec = importlib.util.spec_from_file_location("shortcut_families", DATA / "shortcut_families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def audited(prefect_harness, families, tmp_path_factory):
    from xaudit.flows.audit import audit
    from xaudit.tasks.config import AuditConfig
    work = tmp_path_factory.mktemp("families")
    out = {}
    for family in families.FAMILIES:
        made = families.make(work / "models", family, SEED)
        for role in ("candidate", "clean"):
            cfg = AuditConfig.model_validate(families.audit_config(made[role], made["data"], work / "runs",
                                                                   f"{family}-{role}"))
            out[(family, role)] = Path(audit(cfg)["run_dir"])
    return out


def _checks(run_dir: Path) -> list[dict]:
    return [c for c in json.loads((run_dir / "validation.json").read_text())["checks"]
            if c["kind"] in ("hotspot", "hotspot_cells", "property")]


@pytest.mark.parametrize("family", ["frame", "fixed_block"])
def test_a_planted_shortcut_is_flagged_and_confirmed_without_masks(audited, families, family):
    failed = [c for c in _checks(audited[(family, "candidate")]) if c["status"] == "FAIL"]
    assert failed, _checks(audited[(family, "candidate")])
    assert all(c["slice_value"].split("&")[0] == str(families.CLASS) for c in failed)
    assert all("confirmed by intervention" in c["message"] and "NOT confirmed" not in c["message"] for c in failed)
    t = pq.read_table(audited[(family, "candidate")] / "shortcuts.parquet").to_pandas()
    confirmed = t[t.confirmed.fillna(False).astype(bool)]
    assert (confirmed.class_name == str(families.CLASS)).all() and (confirmed.effect_ci_low > 0.05).all()


@pytest.mark.parametrize("family", ["frame", "moving_block", "fixed_block", "blur", "brighter", "jpeg", "noise"])
def test_the_clean_twin_raises_no_shortcut_check_on_the_same_data(audited, family):
    assert [c for c in _checks(audited[(family, "clean")]) if c["status"] != "PASS"] == []


def test_a_block_that_moves_between_corners_is_nominated_by_its_clusters(audited, families):
    t = pq.read_table(audited[("moving_block", "candidate")] / "shortcuts.parquet").to_pandas()
    mine = t[(t.class_name == str(families.CLASS)) & t.kind.isin(["cells", "cluster"]) & t.qualified]
    assert len(mine) and mine.n_targets.notna().any()              # nominated and tested on the model
    clusters = mine[mine.kind == "cluster"]
    assert len(clusters) >= 2                                      # the corners separate
    tested = mine[mine.n_targets.notna()]
    assert (tested.flip_rate >= tested.control_flip_rate).all()


@pytest.mark.parametrize("family", ["blur", "brighter", "jpeg", "noise"])
def test_an_artefact_no_map_shows_is_flagged_by_a_property_and_confirmed(audited, families, family):
    run = audited[(family, "candidate")]
    failed = [c for c in _checks(run) if c["status"] == "FAIL" and c["kind"] == "property"]
    assert failed, _checks(run)
    assert all(c["slice_value"].split("&")[0] == str(families.CLASS) for c in failed)
    assert all("confirmed by intervention" in c["message"] and "NOT confirmed" not in c["message"] for c in failed)
    t = pq.read_table(run / "properties.parquet").to_pandas()
    confirmed = t[t.confirmed.fillna(False).astype(bool)]
    assert set(confirmed.class_name) == {str(families.CLASS)} and (confirmed.effect_ci_low > 0.05).all()
    # the ground truth agrees: the artefact itself turns other digits into the class for the candidate only
    made = run.parent.parent / "models"
    assert families.ground_truth(made / f"{family}_candidate_{SEED}.json", family) > 0.1
    assert families.ground_truth(made / f"clean_{SEED}.json", family) < 0.02


@pytest.mark.parametrize("family", ["fixed_block", "moving_block", "frame", "blur", "brighter", "jpeg", "noise"])
def test_the_review_against_the_clean_twin_fails_on_the_explanation_or_intervention_change(audited, families,
                                                                                           family, tmp_path):
    """The review step on the two audits of the same data: where the candidate's audit found (and confirmed) a
    shortcut the clean twin does not have, the review FAILS on the change: the lift in the candidate's box or
    hot cells against the twin's maps there, or the property intervention's effect against the twin's."""
    from xaudit.tasks.config import ReviewConfig
    from xaudit.tasks.review import review_runs
    run = audited[(family, "candidate")]
    models = run.parent.parent / "models"
    cfg = families.audit_config(models / f"{family}_candidate_{SEED}.json", models / f"{family}.parquet", tmp_path,
                                f"review-{family}")
    for k in ("model", "history"):
        cfg.pop(k)
    cfg["baseline"] = {"card": str(models / f"clean_{SEED}.json")}
    cfg["candidate"] = {"card": str(models / f"{family}_candidate_{SEED}.json")}
    review_runs(audited[(family, "clean")], run, ReviewConfig.model_validate(cfg), tmp_path, f"review-{family}")
    checks = json.loads((tmp_path / "validation.json").read_text())["checks"]
    changed = [c for c in checks if c["metric"].endswith(("_ratio", ".effect_change")) and c["status"] == "FAIL"]
    assert any(c["slice_value"].split("&")[0] == str(families.CLASS) for c in changed), \
        [c for c in checks if c["metric"].endswith(("_ratio", ".effect_change"))]

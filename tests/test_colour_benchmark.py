"""The colour benchmark (data/colour_benchmark.py) at a small size, one seed: a colour cast on every image of one
class, which no map shows, is flagged by the property screen and confirmed by intervention on the candidate
that relies on it; its clean twin, audited on the same data (the cast on its images too), raises no shortcut
check, though the data carry natural priors (discs warm and high, squares low)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DATA

SIZE, SEED, FAMILY = 64, 1, "tint"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("colour_benchmark", DATA / "colour_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def audited(prefect_harness, bench, tmp_path_factory):
    from xaudit.flows.audit import audit
    from xaudit.tasks.config import AuditConfig
    work = tmp_path_factory.mktemp("colour")
    made = bench.make(work / "models", FAMILY, SEED, SIZE)
    runs = {role: Path(audit(AuditConfig.model_validate(bench.audit_config(made[role], made["data"], work / "runs",
                                                                            f"{FAMILY}-{role}")))["run_dir"])
            for role in ("candidate", "clean")}
    return made, runs


def _checks(run_dir: Path) -> list[dict]:
    return [c for c in json.loads((run_dir / "validation.json").read_text())["checks"]
            if c["kind"] in ("hotspot", "hotspot_cells", "property")]


def test_the_benchmark_candidate_relies_on_the_cast_and_its_twin_does_not(audited, bench):
    made, _ = audited
    assert bench.ground_truth(made["candidate"], FAMILY, SIZE) > 0.2
    assert bench.ground_truth(made["clean"], FAMILY, SIZE) < 0.02


def test_a_colour_cast_is_flagged_by_a_colour_property_and_confirmed(audited, bench):
    _, runs = audited
    failed = [c for c in _checks(runs["candidate"]) if c["status"] == "FAIL" and c["kind"] == "property"]
    assert failed, _checks(runs["candidate"])
    assert all(c["slice_value"].split("&")[0] == bench.CLASSES[bench.CLASS] for c in failed)
    assert any(c["metric"] in ("property.red_tint", "property.blue_tint") for c in failed)
    t = pq.read_table(runs["candidate"] / "properties.parquet").to_pandas()
    assert {"red_tint", "green_tint", "blue_tint"} <= set(t.property)           # colour images: the casts
    confirmed = t[t.confirmed.fillna(False).astype(bool)]
    assert set(confirmed.class_name) == {bench.CLASSES[bench.CLASS]}


def test_the_clean_twin_raises_no_shortcut_check(audited):
    _, runs = audited
    assert [c for c in _checks(runs["clean"]) if c["status"] != "PASS"] == []

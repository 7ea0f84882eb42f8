"""Cost said before it is spent (tasks/estimate.py): the estimate is made on the run's own model and settings
before any run directory, scales with what the configuration asks for, is logged and recorded in the manifest,
and a budget refuses work estimated beyond it, up front, with the estimate in its one-line message."""
from __future__ import annotations

import json

import torch

from conftest import DATA
from test_hostile import assert_input_error, base_config, run_cli, write_config
from xaudit.tasks.config import AuditConfig
from xaudit.tasks.estimate import estimate_cost
from xaudit.tasks.models import build_model


def _config(tmp_path, **extra) -> AuditConfig:
    return AuditConfig.model_validate(base_config(DATA / "digits.parquet", tmp_path / "runs", **extra))


def test_the_estimate_counts_what_the_configuration_asks_for(tmp_path, demo_card):
    model = build_model(demo_card, torch.device("cpu"))
    plain = estimate_cost(model, demo_card, torch.device("cpu"), _config(tmp_path), 100)
    assert plain.scoring_s > 0 and plain.total_s >= plain.scoring_s
    assert estimate_cost(model, demo_card, torch.device("cpu"), _config(tmp_path), 100) is plain   # measured once
    heavy = estimate_cost(model, demo_card, torch.device("cpu"), _config(
        tmp_path, attribution={"methods": ["saliency", "gradcam", "integrated_gradients"],
                               "params": {"integrated_gradients": {"n_steps": 64}}},
        quality={"checks": ["faithfulness", "stability"], "sanity_images": 8}), 100)
    assert heavy.checks_s > 0 and plain.checks_s >= 0 and heavy.sanity_s > 0 and plain.sanity_s == 0
    line = heavy.line()
    assert line.startswith("estimate for 100 images on cpu:") and "quality checks" in line and "in all" in line


def test_a_budget_refuses_before_any_run_directory(capsys, tmp_path):
    out = tmp_path / "runs"
    path = write_config(tmp_path, base_config(DATA / "digits.parquet", out))
    rc, _, err = run_cli(capsys, ["run", str(path), "--max-minutes", "0.0001"])
    assert_input_error(rc, err, out, "max_minutes", "estimated at about", "estimate for")


def test_the_estimate_is_logged_and_recorded_in_the_manifest(capsys, tmp_path):
    out = tmp_path / "runs"
    path = write_config(tmp_path, base_config(DATA / "digits.parquet", out, max_minutes=60,
                                              data={"filter": {"split": "test"}}))
    rc, _, err = run_cli(capsys, ["run", str(path), "--no-progress"])
    assert rc in (0, 1), err
    assert "estimate for" in err
    manifest = json.loads(next(out.glob("*/manifest.json")).read_text())
    est = manifest["estimate"]
    assert est["n_images"] >= 1 and est["total_s"] > 0 and est["device"] == "cpu"
    assert manifest["config"]["max_minutes"] == 60

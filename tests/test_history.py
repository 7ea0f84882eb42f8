"""Run history: three audits of the demo with a changed model in the middle (baseline, the site-C-regressed
candidate, baseline again). The history holds three runs, each report's "Since the last audit" names the
slice that moved, `xaudit history` prints the trend, and re-rendering the last run gives the same bytes."""
from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from conftest import DATA
from xaudit.flows.audit import audit
from xaudit.flows.cli import main as cli
from xaudit.tasks.config import load_config
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.history import read_history
from xaudit.tasks.outputs import verify_run

NAME = "nightly digits audit"


def _config(tmp_path, card, run_id):
    return load_config(DATA / "demo_audit.yaml", {
        "model": {"card": str(DATA / "models" / card)},
        "data": {"path": str(DATA / "digits.parquet"), "filter": {"split": "test"}, "roi_column": "roi_png",
                 "metadata_columns": ["site"], "limit": 300},
        "attribution": {"methods": ["saliency"], "batch_size": 64},
        "quality": {"checks": ["localisation"], "sanity_images": 0},
        "shortcuts": {"enabled": False},
        "permutation": {"enabled": False},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 300, "min_slice_size": 20,
                    "thresholds": [{"metric": "accuracy", "lower": 0.5}]},
        "report": {"title": "Digits audit", "formats": ["html"]},
        "history": {"name": NAME},
        "output_dir": str(tmp_path), "run_id": run_id,
    })


def _since(html: str) -> str:
    return html[html.index('<section id="since">'):html.index("</section>", html.index('<section id="since">'))]


def test_three_audits_with_a_changed_model_in_the_middle(prefect_harness, tmp_path, capsys):
    runs = [("r1-baseline", "baseline.json"), ("r2-candidate", "candidate.json"), ("r3-baseline", "baseline.json")]
    for run_id, card in runs:
        audit(_config(tmp_path, card, run_id))
    history = read_history(tmp_path / "_history", NAME)
    assert list(dict.fromkeys(history.column("run_id").to_pylist())) == [r for r, _ in runs]
    assert len({*history.column("weights_sha256").to_pylist()}) == 2
    assert len({*history.column("data_fingerprint").to_pylist()}) == 1

    first = _since((tmp_path / "r1-baseline" / "report.html").read_text())
    assert "first run of the audit" in first
    second = _since((tmp_path / "r2-candidate" / "report.html").read_text())
    third = _since((tmp_path / "r3-baseline" / "report.html").read_text())
    for text, prev in ((second, "r1-baseline"), (third, "r2-candidate")):
        assert f"Previous run: <span class=\"mono\">{prev}</span>" in text and "different weights" in text
        assert "identical (same fingerprint)" in text
        changed = text[text.index("Changed beyond both intervals"):text.index("</ul>")]
        assert "accuracy on <strong>site=C</strong>" in changed, changed     # the slice the candidate broke
    # the candidate's drop on site C and the baseline's recovery, with the signs the right way round
    m = re.search(r"accuracy on <strong>site=C</strong>: ([\d.]+) → ([\d.]+) \(([+-][\d.]+)\)", second)
    assert m and float(m.group(3)) < -0.05
    m = re.search(r"accuracy on <strong>site=C</strong>: ([\d.]+) → ([\d.]+) \(([+-][\d.]+)\)", third)
    assert m and float(m.group(3)) > 0.05
    assert "<polyline" in third                                        # the trend chart over the three runs

    # the history on the command line
    assert cli(["history", NAME, "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("site=C"))
    values = [float(v) for v in row.split()[1:4]]
    assert values[1] < values[0] - 0.05 and values[2] > values[1] + 0.05 and row.split()[-1].startswith("+")
    assert cli(["history", "--output-dir", str(tmp_path)]) == 0
    assert f"3 runs  {NAME}" in capsys.readouterr().out
    assert cli(["history", "no such audit", "--output-dir", str(tmp_path)]) == 2

    # the snapshot is part of the run: re-rendering the archived run gives the same bytes and verifies
    last = tmp_path / "r3-baseline"
    assert pq.read_table(last / "history.parquet").num_rows == history.num_rows
    before = (last / "report.html").read_bytes()
    assert cli(["render", str(last), "--format", "html"]) == 0
    assert (last / "report.html").read_bytes() == before and verify_run(last) == []

    # a rerun of the same run id replaces its own history file, it does not add a run
    audit(_config(tmp_path, "baseline.json", "r3-baseline"))
    assert len(set(read_history(tmp_path / "_history", NAME).column("run_id").to_pylist())) == 3


def test_a_history_folder_holding_other_files_is_refused_before_the_run(tmp_path):
    from xaudit.tasks.preflight import check_history
    (tmp_path / "_history").mkdir()
    (tmp_path / "_history" / "notes.parquet").write_bytes(b"not parquet")
    with pytest.raises(XAuditError, match="notes.parquet is not a Parquet file"):
        check_history(_config(tmp_path, "baseline.json", "x"))


def test_xaudit_history_prints_whole_model_names_and_one_run_in_the_singular(tmp_path, capsys):
    """'resnet18-skphotos-seed1 0.1.' was cut at 28 characters, and one run was '1 runs'."""
    import pyarrow as pa

    from xaudit.tasks.history import SCHEMA, append
    row = {"run_id": "r1", "audit": "photos", "created_utc": "2026-12-01T00:00:00+00:00",
           "model_name": "resnet18-skphotos-seed1-with-a-long-name", "model_version": "0.1.0-rc.2",
           "weights_sha256": "0" * 64, "data_fingerprint": "f" * 64, "verdict": "PASS", "slice_key": "overall",
           "slice_value": "", "metric": "accuracy", "value": 0.9, "ci_low": 0.8, "ci_high": 0.95, "n": 48,
           "suppressed": False}
    append(tmp_path / "h", pa.Table.from_pylist([row], schema=SCHEMA))
    assert cli(["history", "--history", str(tmp_path / "h")]) == 0
    assert "    1 run   photos" in capsys.readouterr().out
    assert cli(["history", "photos", "--history", str(tmp_path / "h")]) == 0
    assert "resnet18-skphotos-seed1-with-a-long-name 0.1.0-rc.2" in capsys.readouterr().out

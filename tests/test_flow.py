"""The real audit flow under Prefect (temporary API server), on a small slice of the bundled demo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA
from xaudit.flows.audit import audit
from xaudit.flows.cli import main as cli
from xaudit.tasks.config import load_config
from xaudit.tasks.outputs import verify_run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """40 test-split rows of the demo, one with corrupt image bytes."""
    table = pq.read_table(DATA / "digits.parquet").to_pandas()
    table = table[table.split == "test"].head(40).reset_index(drop=True)
    table.loc[5, "image_png"] = b"corrupt"
    path = tmp_path_factory.mktemp("data") / "small.parquet"
    table.to_parquet(path)
    return path


def config_for(small_data, tmp_path, **extra):
    return load_config(DATA / "demo_audit.yaml", {
        "data": {"path": str(small_data), "roi_column": "roi_png", "metadata_columns": ["site", "split"]},
        "output_dir": str(tmp_path), "shard_size": 16, "run_id": "flow-test",
        "attribution": {"methods": ["saliency", "gradcam"], "batch_size": 8},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 100, "min_slice_size": 5,
                    "thresholds": [{"metric": "accuracy", "lower": 0.5}]},
        **extra,
    })


def test_audit_flow_end_to_end_and_resume(prefect_harness, small_data, tmp_path, capsys):
    config = config_for(small_data, tmp_path)
    result = audit(config)
    run_dir = tmp_path / "flow-test"
    assert result["run_dir"] == str(run_dir) and result["verdict"] in {"PASS", "WARN"}
    assert result["scored"] == 39 and result["rejected"] == 1 and result["cached_shards"] == 0
    for name in ("predictions.parquet", "metrics.parquet", "explanations.parquet", "rejects.parquet",
                 "validation.json", "validation.parquet", "manifest.json", "report.html", "report.pdf"):
        assert (run_dir / name).is_file(), name
    preds = pq.read_table(run_dir / "predictions.parquet").to_pandas()
    assert len(preds) == 39 and preds.example_id.is_unique
    assert np.allclose(np.stack(preds.probabilities).sum(1), 1, atol=1e-5)
    expl = pq.read_table(run_dir / "explanations.parquet").to_pandas()
    assert len(expl) == 78 and set(expl.method) == {"saliency", "gradcam"}
    assert expl.roi_mass.between(0, 1).all()
    rejects = pq.read_table(run_dir / "rejects.parquet").to_pylist()
    assert len(rejects) == 1 and rejects[0]["reason"].startswith("corrupt image")
    metrics = pq.read_table(run_dir / "metrics.parquet")
    assert metrics.schema.metadata[b"ci_replicates"] == b"100"
    m = metrics.to_pandas()
    acc = m[(m.metric == "accuracy")].set_index("slice_value")
    assert acc.loc["all", "n"] == 39 and acc.drop("all").n.sum() == 39
    assert acc.loc["all", "value"] == pytest.approx(preds.correct.mean())
    _duckdb_reads_the_tables_as_pandas_does(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["prefect_flow_run_id"] and manifest["run_id"] == "flow-test"
    assert manifest["model"]["weights_sha256"] and len(manifest["data"]["fingerprint"]) == 64
    assert {"report.pdf", "report.html", "metrics.parquet"} <= set(manifest["artifacts"])
    assert verify_run(run_dir) == []
    html = (run_dir / "report.html").read_text()
    assert "1 rejected" in html and "corrupt image" in html

    # re-rendering an archived run gives the same bytes (dated by the manifest, embedding the manifest as it
    # was before the reports), so 'xaudit render' then 'xaudit verify' holds
    first = {n: (run_dir / n).read_bytes() for n in ("report.html", "report.pdf", "manifest.json")}
    assert cli(["render", str(run_dir)]) == 0
    assert "byte-identical" in capsys.readouterr().out
    assert {n: (run_dir / n).read_bytes() for n in first} == first
    assert verify_run(run_dir) == []

    # a rerun with the same run id reuses every shard and produces identical tables
    before = {n: pq.read_table(run_dir / n) for n in ("predictions.parquet", "explanations.parquet",
                                                       "metrics.parquet")}
    again = audit(config)
    assert again["cached_shards"] == 3
    for name, table in before.items():
        assert pq.read_table(run_dir / name).equals(table), name
    # ...but not after the quality checks or the model card changed: their outputs depend on them
    other = audit(config.model_copy(update={"quality": config.quality.model_copy(update={"checks": ["localisation"]})}))
    assert other["cached_shards"] == 0
    card = config.model.model_copy(update={"std": [0.5]})
    assert audit(config.model_copy(update={"model": card}))["cached_shards"] == 0
    assert audit(config)["cached_shards"] == 0          # the parts now hold the last config's outputs

    # tampering is detected
    (run_dir / "metrics.parquet").write_bytes(b"tampered")
    assert verify_run(run_dir) == ["metrics.parquet: sha256 differs from the manifest (modified after the run)",
                                   "metrics.parquet: differs from the copy embedded in report.pdf"]
    # ...and a re-rendering will not vouch for the edited table
    report = (run_dir / "report.html").read_bytes()
    assert cli(["render", str(run_dir)]) == 2
    assert "no longer matches its manifest" in capsys.readouterr().err
    assert (run_dir / "report.html").read_bytes() == report


def _duckdb_reads_the_tables_as_pandas_does(run_dir):
    """The README's promise: DuckDB reads the outputs with no project code, and sees what pandas sees."""
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    for name in ("metrics.parquet", "validation.parquet", "predictions.parquet", "rejects.parquet"):
        path = str(run_dir / name).replace("'", "''")
        ours = pd.read_parquet(run_dir / name)
        theirs = con.execute(f"select * from read_parquet('{path}')").fetch_df()
        assert list(theirs.columns) == list(ours.columns) and len(theirs) == len(ours), name
    path = str(run_dir / "metrics.parquet").replace("'", "''")
    acc = con.execute(f"select value, ci_low, ci_high, n from read_parquet('{path}') "
                      "where metric = 'accuracy' and slice_key = 'overall'").fetchall()
    m = pd.read_parquet(run_dir / "metrics.parquet")
    row = m[(m.metric == "accuracy") & (m.slice_key == "overall")].iloc[0]
    assert acc == [(pytest.approx(row.value), pytest.approx(row.ci_low), pytest.approx(row.ci_high), row.n)]


def test_cli_bad_input_exit_code_and_message(prefect_harness, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {card: nowhere.json}\ndata: {path: nowhere.parquet}\n")
    assert cli(["run", str(bad), "--output-dir", str(tmp_path / "runs")]) == 2
    assert "'data.path' must be a Parquet file or folder, an ImageFolder directory or a manifest" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()          # nothing half-made is left behind


def test_too_many_rejects_fail_the_run_after_keeping_them(prefect_harness, small_data, tmp_path):
    config = config_for(small_data, tmp_path, max_reject_fraction=0.0)
    with pytest.raises(Exception, match="more than 'max_reject_fraction'"):
        audit(config)
    assert len(pq.read_table(tmp_path / "flow-test" / "rejects.parquet")) == 1


def test_input_errors_are_not_retried(prefect_harness, small_data, tmp_path):
    import asyncio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort
    from xaudit.tasks.errors import XAuditError
    config = config_for(small_data, tmp_path, run_id="bad-filter")
    config = config.model_copy(update={"data": config.data.model_copy(update={"filter": {"hospital": "X"}})})
    with pytest.raises(XAuditError, match="'data.filter' names column 'hospital'"):
        audit(config)

    async def ingest_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(), sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=1,
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="preflight")))
    (last,) = asyncio.run(ingest_runs())
    assert last.state.is_failed() and last.run_count == 1      # failed once, not retried


def test_failing_verdict_can_fail_the_flow_run_after_writing_everything(prefect_harness, small_data, tmp_path,
                                                                         capsys):
    """flow_run_fails_on: FAIL ends the Prefect flow run Failed (for schedules and automations) once every
    output is written and sealed; the CLI reports it like any FAIL and gates on it."""
    import asyncio
    import uuid
    from prefect.client.orchestration import get_client
    from xaudit.tasks.errors import VerdictFailed
    strict = {"metrics": {"slices": [[]], "bootstrap_replicates": 50,
                          "thresholds": [{"metric": "accuracy", "lower": 0.9999}]}}
    config = config_for(small_data, tmp_path, run_id="strict", flow_run_fails_on="FAIL", **strict)
    with pytest.raises(VerdictFailed, match="verdict FAIL: 1 check") as raised:
        audit(config)
    result = raised.value.result
    assert result["verdict"] == "FAIL" and result["failed_checks"] == 1 and result["scored"] == 39
    run_dir = tmp_path / "strict"
    assert verify_run(run_dir) == [] and (run_dir / "report.pdf").is_file()
    flow_run_id = json.loads((run_dir / "manifest.json").read_text())["prefect_flow_run_id"]

    async def state_of(run_id):
        async with get_client() as client:
            return (await client.read_flow_run(uuid.UUID(run_id))).state
    state = asyncio.run(state_of(flow_run_id))
    assert state.is_failed() and "verdict FAIL" in state.message

    # the CLI: same outputs (shards reused), exit 1 under --gate, and 0 without it
    path = tmp_path / "strict.json"
    path.write_text(config.model_dump_json())
    assert cli(["run", str(path), "--gate"]) == 1
    assert cli(["run", str(path)]) == 0
    assert "FAIL" in capsys.readouterr().out
    # a WARN-level policy does not fail a passing run
    lenient = config_for(small_data, tmp_path, run_id="lenient", flow_run_fails_on="WARN",
                         metrics={"slices": [[]], "bootstrap_replicates": 50,
                                  "thresholds": [{"metric": "accuracy", "lower": 0.5}]},
                         shortcuts={"enabled": False})     # 40 rows: the scan could not run, itself a WARN
    assert audit(lenient)["verdict"] == "PASS"


def test_a_shortcut_scan_that_cannot_run_says_so(prefect_harness, small_data, tmp_path):  # noqa: F811
    """Classes of 4 examples (below shortcuts.min_examples 20): not an empty table read as 'no shortcut found',
    but a WARN check saying the scan did not run and why, in validation.json, the report's banner counts and
    its scan section; shortcuts.parquet is typed, with no rows."""
    result = audit(config_for(small_data, tmp_path, run_id="small-scan"))
    run_dir = Path(result["run_dir"])
    checks = json.loads((run_dir / "validation.json").read_text())["checks"]
    scan = [c for c in checks if c["metric"] == "shortcut_scan"]
    assert len(scan) == 1 and scan[0]["status"] == "WARN" and scan[0]["outcome"] == "not run"
    assert "at least 20 explained examples" in scan[0]["message"] and result["verdict"] in ("WARN", "FAIL")
    html = (run_dir / "report.html").read_text()
    assert "NOT RUN" in html and "the shortcut scan did not run" in html
    table = pq.read_table(run_dir / "shortcuts.parquet")
    assert table.num_rows == 0 and table.schema.field("lift").type == pa.float64()

"""Models from an MLflow model registry: a real MLflow server (sqlite backend, artifacts served by it) started
here as a process on 127.0.0.1 and stopped by its process id; the audit names `models:/digits@champion`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DATA
from services import free_port, stop, wait_http
from xaudit.flows.audit import audit
from xaudit.tasks.config import ModelSpec
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.models import resolve_card
from test_flow import config_for, small_data  # noqa: F401  (the same 40-row slice as the flow tests)

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("wb")
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", proc, root / "server.log", "the MLflow server", timeout=120)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "XAUDIT_CACHE")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, XAUDIT_CACHE=str(root / "cache"))
    mlflow.set_tracking_uri(uri)
    try:
        yield _register(root)
    finally:
        stop([proc])
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _register(root: Path) -> dict:
    """Register the demo baseline (xaudit card + safetensors) as digits v1 @champion, and a pickled pytorch-
    flavour module as digits-pickled v1."""
    from mlflow import MlflowClient
    card = json.loads((DATA / "models" / "baseline.json").read_text())
    model = root / "model"
    model.mkdir()
    (model / "xaudit_card.json").write_text(json.dumps(card))
    shutil.copy(DATA / "models" / "baseline.safetensors", model / card["weights"])
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model), artifact_path="model")
    client.create_registered_model("digits")
    v = client.create_model_version("digits", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("digits", "champion", v.version)
    pickled = root / "pickled"
    (pickled / "data").mkdir(parents=True)
    (pickled / "MLmodel").write_text("flavors: {pytorch: {model_data: data}}\n")
    (pickled / "data" / "model.pth").write_bytes(b"\x80\x04not really a pickle")
    with mlflow.start_run() as run2:
        mlflow.log_artifacts(str(pickled), artifact_path="model")
    client.create_registered_model("digits-pickled")
    client.create_model_version("digits-pickled", source=f"runs:/{run2.info.run_id}/model", run_id=run2.info.run_id)
    return dict(run_id=run.info.run_id, version=str(v.version))


def test_an_audit_of_a_registered_model_equals_the_local_cards_and_records_the_registry(
        prefect_harness, registry, small_data, tmp_path):  # noqa: F811
    local = audit(config_for(small_data, tmp_path / "local", run_id="reg-test"))
    base = config_for(small_data, tmp_path / "reg", run_id="reg-test")
    remote = audit(base.model_copy(update={"model": ModelSpec(mlflow="models:/digits@champion")}))
    for name in ("predictions.parquet", "explanations.parquet", "metrics.parquet"):
        assert (Path(remote["run_dir"]) / name).read_bytes() == (Path(local["run_dir"]) / name).read_bytes(), name
    manifest = json.loads((Path(remote["run_dir"]) / "manifest.json").read_text())
    reg = manifest["model"]["extra"]["registry"]
    assert (reg["name"], reg["version"], reg["alias"], reg["run_id"]) == ("digits", registry["version"], "champion",
                                                                          registry["run_id"])
    assert reg["registry"] == os.environ["MLFLOW_TRACKING_URI"]
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(
        (DATA / "models" / "baseline.safetensors").read_bytes()).hexdigest()
    assert pq.read_table(Path(remote["run_dir"]) / "metrics.parquet").column("model")[0].as_py() == \
        pq.read_table(Path(local["run_dir"]) / "metrics.parquet").column("model")[0].as_py()


def test_the_audit_is_logged_back_to_the_registered_versions_run(prefect_harness, registry, small_data, tmp_path):  # noqa: F811
    from mlflow import MlflowClient
    base = config_for(small_data, tmp_path, run_id="reg-log")
    result = audit(base.model_copy(update={"model": ModelSpec(mlflow="models:/digits/1"), "log_to_mlflow": True}))
    run = MlflowClient().get_run(registry["run_id"])
    assert run.data.tags["xaudit.verdict"] == result["verdict"] and run.data.tags["xaudit.run_id"] == "reg-log"
    m = pq.read_table(Path(result["run_dir"]) / "metrics.parquet").to_pandas()
    acc = m[(m.slice_key == "overall") & (m.metric == "accuracy")].value.item()
    assert run.data.metrics["xaudit.accuracy"] == pytest.approx(acc)
    names = {a.path for a in MlflowClient().list_artifacts(registry["run_id"], "xaudit/reg-log")}
    assert names == {"xaudit/reg-log/report.html", "xaudit/reg-log/report.pdf", "xaudit/reg-log/validation.json"}


@pytest.mark.parametrize("ref, message", [
    ("models:/digits/7", "is not in the registry"),
    ("models:/nobody@champion", "is not in the registry"),
    ("models:/digits-pickled/1", "holds a pickled module"),
])
def test_registry_references_that_cannot_be_audited_are_refused(registry, ref, message):
    with pytest.raises(XAuditError, match=message):
        resolve_card(ModelSpec(mlflow=ref))


def test_a_malformed_reference_or_one_with_a_card_is_a_config_error():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="models:/<name>/<version>"):
        ModelSpec(mlflow="runs:/abc/model")
    with pytest.raises(ValidationError, match="not both"):
        ModelSpec(mlflow="models:/digits/1", card=DATA / "models" / "baseline.json")
    from xaudit.tasks.config import parse_config
    with pytest.raises(XAuditError, match="'log_to_mlflow' needs a registered model"):
        parse_config({"model": {"card": str(DATA / "models" / "baseline.json")}, "data": {"path": "x.parquet"},
                      "log_to_mlflow": True})


def test_the_registry_going_away_while_logging_ends_resumable_and_the_rerun_logs(prefect_harness, registry, small_data,
                                                                                 tmp_path, capsys, monkeypatch):  # noqa: F811
    """The MLflow server behind the fault proxy (tests/fault_proxy.py): connections are reset from the first
    request of log_to_mlflow on (its first tag). The run's outputs are complete, the command ends with exit 3 and the
    --run-id; with the registry back, the rerun with that id logs the verdict, metrics and reports."""
    import time as _time

    from mlflow import MlflowClient
    from xaudit.flows.cli import main as cli
    from xaudit.tasks import storage
    upstream = os.environ["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]
    mode, port_file = tmp_path / "mode", tmp_path / "port"
    mode.write_text("drop-after 1 POST /api/2.0/mlflow/runs/set-tag")
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fault_proxy.py"), upstream, str(mode),
                              str(port_file)])
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            _time.sleep(0.05)
        direct = os.environ["MLFLOW_TRACKING_URI"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port_file.read_text()}")
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])     # the fixture set it for the process
        monkeypatch.setattr(storage, "RETRY_DELAYS", (0.2,))
        cfg = config_for(small_data, tmp_path, run_id="reg-away").model_dump(mode="json")
        cfg["model"] = {"mlflow": "models:/digits/1"}
        cfg["log_to_mlflow"] = True
        path = tmp_path / "away.json"
        path.write_text(json.dumps(cfg))
        rc = cli(["run", str(path), "--no-progress"])
        out, err = capsys.readouterr()
        assert rc == 3 and "--run-id reg-away" in err and "Traceback" not in err, out + err
        assert (tmp_path / "reg-away" / "report.pdf").is_file()          # the audit itself is complete
        mode.write_text("pass")
        rc = cli(["run", str(path), "--run-id", "reg-away", "--no-progress"])
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        run = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_run(registry["run_id"])
        assert run.data.tags["xaudit.run_id"] == "reg-away"
        names = {a.path for a in MlflowClient().list_artifacts(registry["run_id"], "xaudit/reg-away")}
        assert "xaudit/reg-away/report.pdf" in names
    finally:
        mlflow.set_tracking_uri(direct if 'direct' in locals() else mlflow.get_tracking_uri())
        stop([proxy])

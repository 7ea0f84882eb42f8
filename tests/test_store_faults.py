"""Fault injection against real processes: moto's S3 server behind a TCP proxy of our own on 127.0.0.1
(tests/fault_proxy.py) that answers 503 for a while, resets connections mid-publish, and the S3 server itself
killed and restarted (an empty store) mid-publish. Each outcome has its exit code: a blip is retried and the
run completes; a store that stays down ends the run with exit 3 and its --run-id, with no manifest.json in the
bucket (a half-published run is never taken as complete); the rerun with that id completes, and its tables
are byte for byte those of an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from services import free_port, stop, wait_http
from xaudit.flows.cli import main as cli
from xaudit.tasks import storage
from test_flow import config_for, small_data  # noqa: F401  (the same 40-row slice as the flow tests)

pytest.importorskip("s3fs")
pytest.importorskip("moto")
BUCKET = "xaudit-faults"
TABLES = ("predictions.parquet", "explanations.parquet", "metrics.parquet", "rejects.parquet", "validation.json")


def _moto(port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, "moto's S3 server", timeout=60)
    return proc


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """moto on one port, the fault proxy in front of it; AWS_ENDPOINT_URL points at the proxy."""
    where = tmp_path_factory.mktemp("faults")
    moto_port = free_port()
    procs = {"moto": _moto(moto_port, where / "moto.log")}
    mode, port_file = where / "mode", where / "port"
    mode.write_text("pass")
    procs["proxy"] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_proxy.py"), str(moto_port),
                                       str(mode), str(port_file)])
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            break
        time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port_file.read_text()}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "XAUDIT_CACHE", "AWS_MAX_ATTEMPTS")}
    os.environ.update(AWS_ACCESS_KEY_ID="AKIAFAULTS", AWS_SECRET_ACCESS_KEY="faults-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_MAX_ATTEMPTS="2",
                      XAUDIT_CACHE=str(where / "cache"))
    import fsspec
    fsspec.filesystem("s3").clear_instance_cache()
    state = {"mode": mode, "procs": procs, "moto_port": moto_port, "where": where}
    try:
        yield state
    finally:
        stop(list(procs.values()))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fs():
    import fsspec
    return fsspec.filesystem("s3", skip_instance_cache=True)


def _fill(small_data) -> None:  # noqa: F811
    fs = _fs()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put_file(str(small_data), f"{BUCKET}/data/small.parquet")


@pytest.fixture(scope="module")
def reference(prefect_harness, small_data, tmp_path_factory):  # noqa: F811
    """The same audit written to a local folder, uninterrupted."""
    from xaudit.flows.audit import audit
    out = tmp_path_factory.mktemp("reference")
    return Path(audit(config_for(small_data, out, run_id="faults"))["run_dir"])


def _config(small_data, tmp_path, run_id="faults") -> Path:  # noqa: F811
    cfg = config_for(small_data, tmp_path, run_id=run_id).model_dump(mode="json")
    cfg["data"]["path"] = f"s3://{BUCKET}/data/small.parquet"
    cfg["output_dir"] = f"s3://{BUCKET}/runs-{tmp_path.name}"
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(cfg))
    return path


def _same_tables(url: str, reference: Path) -> None:
    fs = _fs()
    for name in TABLES:
        assert fs.cat_file(f"{url}/{name}") == (reference / name).read_bytes(), name


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.2, 0.5, 1.0))


def test_a_store_answering_503_for_a_while_is_retried_and_the_run_completes(store, reference, small_data, tmp_path,
                                                                           capsys):  # noqa: F811
    store["mode"].write_text("pass")
    _fill(small_data)
    store["mode"].write_text("503")
    threading.Timer(2.5, lambda: store["mode"].write_text("pass")).start()
    rc = cli(["run", str(_config(small_data, tmp_path)), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    _same_tables(f"{BUCKET}/runs-{tmp_path.name}/faults", reference)


def _cut_mid_publish(store, small_data, tmp_path, capsys, after_puts: int) -> Path:  # noqa: F811
    """Run the audit with the proxy resetting every connection from the `after_puts`-th upload of the run on;
    assert it ends with exit 3 naming the --run-id that resumes, without a traceback; return its config."""
    store["mode"].write_text("pass")
    _fill(small_data)
    store["mode"].write_text(f"drop-after-puts {after_puts} /{BUCKET}/runs-{tmp_path.name}/faults/")
    config = _config(small_data, tmp_path)
    rc = cli(["run", str(config), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 3 and "Traceback" not in err and "--run-id faults" in err, out + err
    return config


def test_connections_reset_mid_publish_end_in_exit_3_and_the_rerun_completes(store, reference, small_data, tmp_path,
                                                                            capsys):  # noqa: F811
    config = _cut_mid_publish(store, small_data, tmp_path, capsys, after_puts=3)
    store["mode"].write_text("pass")
    fs = _fs()
    run_url = f"{BUCKET}/runs-{tmp_path.name}/faults"
    assert fs.exists(run_url) and not fs.exists(f"{run_url}/manifest.json")   # half-published: not complete
    assert cli(["verify", f"s3://{run_url}"]) == 2                              # "holds no finished run"
    capsys.readouterr()
    rc = cli(["run", str(config), "--run-id", "faults", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert fs.exists(f"{run_url}/manifest.json")
    _same_tables(run_url, reference)
    assert cli(["verify", f"s3://{run_url}"]) == 0


def test_the_store_killed_and_restarted_mid_publish(store, reference, small_data, tmp_path, capsys):  # noqa: F811
    config = _cut_mid_publish(store, small_data, tmp_path, capsys, after_puts=2)
    # the S3 server dies and comes back empty (moto keeps its objects in memory); the operator restores the bucket
    stop([store["procs"]["moto"]])
    store["procs"]["moto"] = _moto(store["moto_port"], store["where"] / "moto.log")
    store["mode"].write_text("pass")
    _fill(small_data)
    rc = cli(["run", str(config), "--run-id", "faults", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    _same_tables(f"{BUCKET}/runs-{tmp_path.name}/faults", reference)

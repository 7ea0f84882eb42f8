"""Inputs and outputs in an object store: a real S3 HTTP API (moto's server, started here as a process on
127.0.0.1 and stopped by its process id), reached through s3fs exactly as a user's bucket would be."""
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
from xaudit.flows.cli import main as cli
from xaudit.tasks import storage
from xaudit.tasks.config import load_config
from xaudit.tasks.errors import XAuditError
from test_flow import config_for, small_data  # noqa: F401  (the same 40-row slice as the flow tests)

pytest.importorskip("s3fs")
pytest.importorskip("moto")
BUCKET = "xaudit-test"
KEY_ID, SECRET = "AKIAXAUDITTESTKEY01", "xaudit-secret-never-in-a-manifest"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Start moto's S3 server, point the standard AWS environment at it, create the bucket; yield its fs."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", proc, log, "moto's S3 server", timeout=60)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "XAUDIT_CACHE")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, XAUDIT_CACHE=str(tmp_path_factory.mktemp("cache")))
    import fsspec
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        stop([proc])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def uploaded(s3, small_data):  # noqa: F811
    """The 40-row slice and the demo's baseline card (weights next to it, relative) in the bucket."""
    s3.put_file(str(small_data), f"{BUCKET}/data/small.parquet")
    s3.put_file(str(DATA / "models" / "baseline.json"), f"{BUCKET}/models/baseline.json")
    s3.put_file(str(DATA / "models" / "baseline.safetensors"), f"{BUCKET}/models/baseline.safetensors")
    return dict(data=f"s3://{BUCKET}/data/small.parquet", card=f"s3://{BUCKET}/models/baseline.json",
                out=f"s3://{BUCKET}/runs")


def _remote_config(uploaded, small_data, tmp_path, **extra):  # noqa: F811
    base = config_for(small_data, tmp_path, run_id="s3-test", **extra)
    return base.model_copy(update={
        "data": base.data.model_copy(update={"path": uploaded["data"]}),
        "model": base.model.model_copy(update={"card": uploaded["card"]}),
        "output_dir": uploaded["out"]})


def test_audit_from_and_to_s3_equals_the_local_audit_and_verifies_renders_and_resumes_there(
        prefect_harness, s3, uploaded, small_data, tmp_path, capsys):  # noqa: F811
    local = audit(config_for(small_data, tmp_path / "local", run_id="s3-test"))
    remote = audit(_remote_config(uploaded, small_data, tmp_path))
    url = f"{uploaded['out']}/s3-test"
    assert remote["run_dir"] == url and remote["verdict"] == local["verdict"]
    # the tables in the bucket are byte for byte the local run's
    for name in ("predictions.parquet", "explanations.parquet", "metrics.parquet", "rejects.parquet",
                 "validation.json"):
        assert s3.cat_file(f"{BUCKET}/runs/s3-test/{name}") == (Path(local["run_dir"]) / name).read_bytes(), name
    # the manifest names each input's URL, ETag and sha256, and where the run was published; no credentials
    manifest = json.loads(s3.cat_file(f"{BUCKET}/runs/s3-test/manifest.json"))
    inputs = {i["url"]: i for i in manifest["remote_inputs"]}
    assert set(inputs) == {uploaded["data"], uploaded["card"], f"s3://{BUCKET}/models/baseline.safetensors"}
    assert inputs[uploaded["data"]]["sha256"] == hashlib.sha256(small_data.read_bytes()).hexdigest()
    weights = inputs[f"s3://{BUCKET}/models/baseline.safetensors"]
    assert weights["sha256"] == manifest["model"]["weights_sha256"] and weights["etag"]
    assert manifest["published_to"] == url and KEY_ID not in json.dumps(manifest) and SECRET not in json.dumps(manifest)
    # the staged copy is gone once published
    assert not (storage.staging_dir(uploaded["out"]) / "s3-test").exists()

    # verify and render work on the run in the bucket; a re-rendering is byte-identical and verifies
    capsys.readouterr()
    assert cli(["verify", url]) == 0 and "verified" in capsys.readouterr().out
    before = s3.cat_file(f"{BUCKET}/runs/s3-test/report.pdf")
    assert cli(["render", url]) == 0 and "byte-identical" in capsys.readouterr().out
    assert s3.cat_file(f"{BUCKET}/runs/s3-test/report.pdf") == before
    # a rerun with the same run id pulls the published run and reuses every shard
    again = audit(_remote_config(uploaded, small_data, tmp_path))
    assert again["cached_shards"] == 3 and s3.cat_file(f"{BUCKET}/runs/s3-test/metrics.parquet") == \
        (Path(local["run_dir"]) / "metrics.parquet").read_bytes()
    # tampering in the bucket is found
    s3.pipe_file(f"{BUCKET}/runs/s3-test/metrics.parquet", b"tampered")
    assert cli(["verify", url]) == 1
    assert "metrics.parquet: sha256 differs from the manifest" in capsys.readouterr().out


def test_the_parquet_filter_is_pushed_down_to_the_store(s3, uploaded):
    from xaudit.tasks.data import inspect_source
    from xaudit.tasks.config import DataSpec
    info = inspect_source(DataSpec(path=uploaded["data"], filter={"site": "A"}, roi_column="roi_png",
                                   metadata_columns=["site", "split"]))
    table = pq.read_table(s3.open(f"{BUCKET}/data/small.parquet"))
    assert info.format == "parquet" and info.n_rows == sum(v == "A" for v in table.column("site").to_pylist()) > 0


@pytest.mark.parametrize("where, value, message", [
    ("output_dir", "s3://no-such-bucket-xaudit/runs", "its bucket does not exist"),
    ("output_dir", "ftp://example.com/runs", "the scheme ftp:// is not supported"),
    ("output_dir", "https://example.com/runs", "not supported for outputs"),
    ("data", "s3://xaudit-test/data/missing.parquet", "does not exist"),
    ("data", "gs://bucket/data.parquet", "needs the package gcsfs"),
    ("card", "s3://xaudit-test/models/missing.json", "does not exist"),
])
def test_bad_store_locations_are_refused_before_any_work(s3, uploaded, tmp_path, capsys, where, value, message):
    if where == "data" and value.startswith("gs://") and shutil.which("true") and _has("gcsfs"):
        pytest.skip("gcsfs is installed here")
    cfg = tmp_path / "c.yaml"
    text = (DATA / "demo_audit.yaml").read_text()
    cfg.write_text(text)
    args = ["run", str(cfg), "--run-id", "bad-store"]
    overrides = {"output_dir": value} if where == "output_dir" else {}
    if where == "output_dir":
        args += ["--output-dir", value]
    elif where == "data":
        cfg.write_text(text.replace("path: digits.parquet", f"path: {value}"))
    else:
        cfg.write_text(text.replace("card: models/baseline.json", f"card: {value}"))
    for name in ("digits.parquet", "models"):
        src = DATA / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    assert cli(args) == 2, overrides
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_urls_stay_urls_in_the_config_and_local_paths_stay_paths(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {card: s3://b-x/models/m.json}\ndata: {path: s3://b-x/d.parquet}\noutput_dir: s3://b-x/runs\n")
    c = load_config(cfg)
    assert (c.model.card, c.data.path, c.output_dir) == ("s3://b-x/models/m.json", "s3://b-x/d.parquet", "s3://b-x/runs")
    cfg.write_text("model: {card: models/m.json}\ndata: {path: d.parquet}\noutput_dir: runs\n")
    c = load_config(cfg)
    assert c.model.card == tmp_path / "models" / "m.json" and c.data.path == tmp_path / "d.parquet"
    with pytest.raises(XAuditError, match="not supported"):
        storage.check_url("ftp://x/y", "data.path")


def test_data_and_weights_read_over_plain_http(small_data, tmp_path):  # noqa: F811
    """An https:// (here http:// on 127.0.0.1: Python's own http.server, a real HTTP server) source is read
    through fsspec like any store: the Parquet's rows and filter, the card's weights next to it."""
    from services import free_port, stop, wait_http
    from xaudit.tasks.config import DataSpec, ModelSpec
    from xaudit.tasks.data import inspect_source
    from xaudit.tasks.models import resolve_card
    site = tmp_path / "site"
    (site / "models").mkdir(parents=True)
    shutil.copy(small_data, site / "small.parquet")
    for name in ("baseline.json", "baseline.safetensors"):
        shutil.copy(DATA / "models" / name, site / "models" / name)
    port = free_port()
    log = tmp_path / "http.log"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=site,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/small.parquet", proc, log, "the HTTP server", timeout=30)
        table = pq.read_table(small_data)
        info = inspect_source(DataSpec(path=f"{url}/small.parquet", filter={"site": "B"},
                                       metadata_columns=["site"]))
        assert info.n_rows == table.column("site").to_pylist().count("B") > 0
        card = resolve_card(ModelSpec(card=f"{url}/models/baseline.json"))
        assert card.weights == f"{url}/models/baseline.safetensors"
        assert card.weights_sha256 == hashlib.sha256((DATA / "models" / "baseline.safetensors").read_bytes()).hexdigest()
    finally:
        stop([proc])


@pytest.mark.parametrize("url", ["https://user:secret@example.com/d.parquet", "s3://AKIA:secret@bucket/d.parquet",
                                 "https://token@example.com/d.parquet"])
def test_urls_holding_credentials_are_refused_before_they_reach_a_manifest(url):
    from xaudit.tasks.config import parse_config
    with pytest.raises(XAuditError, match="must not hold credentials") as exc:
        parse_config({"model": {"card": "m.json"}, "data": {"path": url}})
    assert "secret" not in str(exc.value)

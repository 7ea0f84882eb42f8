"""The doors added after the first hostile corpus — URLs and object stores, manifests of paths, WebDataset
shards, the MLflow registry, run history, signing inputs — hold the same promise: exit 2 and one line naming
the field for what the user can fix, no traceback, no run directory after an input error, no credential in any
message or table, scored + rejected = input rows, and a store that does not answer is retried and then exit 3
(never called bad input). Network faults come from a real server process on 127.0.0.1 (tests/fault_server.py).
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, ROOT, demo_test_rows
from xaudit.flows.cli import main as cli
from xaudit.tasks import storage
from xaudit.tasks.config import DataSpec
from xaudit.tasks.data import ingest, inspect_source
from xaudit.tasks.errors import StoreUnavailable, XAuditError

CARD = DATA / "models" / "baseline.json"
SECRET = "s3cr3tPW"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return demo_test_rows(12, tmp_path_factory.mktemp("rows"))


def config(tmp_path: Path, data: dict, **extra) -> Path:
    cfg = {"model": {"card": str(CARD)}, "data": data,
           "attribution": {"methods": ["saliency"], "batch_size": 8},
           "quality": {"checks": [], "sanity_images": 0},
           "metrics": {"slices": [[]], "bootstrap_replicates": 0, "min_slice_size": 1},
           "report": {"formats": ["html"]}, "output_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(capsys, argv, code: int, *needles: str, out_dir: Path | None = None) -> str:
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err and err.count("xaudit: error:") == 1, err
    for n in needles:
        assert n in err.strip().splitlines()[0], (n, err)
    assert SECRET not in out + err
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir())
    return err


# --- 1. credentials in config URLs are refused before any work, and never echoed ------------------------

@pytest.mark.parametrize("field, value", [
    ("data.path", f"http://user:{SECRET}@127.0.0.1:9/x.parquet"),
    ("data.path", f"https://example.org/x.parquet?X-Amz-Signature={SECRET}&X-Amz-Date=1"),
    ("data.path", f"https://{SECRET}@example.org/x.parquet"),
    ("output_dir", f"s3://key:{SECRET}@bucket/runs"),
    ("model.card", f"https://tok:{SECRET}@example.org/card.json"),
    ("data.metadata_file", f"https://example.org/meta.csv?sig={SECRET}"),
    ("signing.tsa_url", f"http://u:{SECRET}@tsa.example.org/"),
])
def test_credentials_in_a_config_url_are_refused_and_never_printed(capsys, tmp_path, rows, field, value):
    data = {"path": str(rows[1])}
    extra = {}
    if field == "data.path":
        data["path"] = value
    elif field == "data.metadata_file":
        data["metadata_file"] = value
    elif field == "output_dir":
        extra["output_dir"] = value
    elif field == "model.card":
        extra["model"] = {"card": value}
    elif field == "signing.tsa_url":
        extra["signing"] = {"key": "k.pem", "cert": "c.pem", "tsa_url": value}
    refused(capsys, ["run", config(tmp_path, data, **extra)], 2, "credentials", out_dir=tmp_path / "runs")


# --- 2. a path-like field takes what output_dir takes, or is refused (never a local 's3:' folder) ----------

@pytest.mark.parametrize("extra, needle", [
    ({"history": {"path": "s3://bucket/h"}}, "history.path"),
    ({"signing": {"key": "s3://bucket/k.pem", "cert": "c.pem"}}, "signing.key"),
    ({"signing": {"pkcs12": "https://example.org/x.p12"}}, "signing.pkcs12"),
    ({"signing": {"key": "k.pem", "cert": "gs://b/c.pem"}}, "signing.cert"),
])
def test_a_url_where_only_a_local_path_works_is_refused(capsys, tmp_path, rows, extra, needle):
    refused(capsys, ["run", config(tmp_path, {"path": str(rows[1])}, **extra)], 2, needle, "local path",
            out_dir=tmp_path / "runs")
    assert not (Path.cwd() / "s3:").exists() and not (tmp_path / "s3:").exists()


def test_history_with_a_url_history_folder_is_refused(capsys, tmp_path):
    refused(capsys, ["history", "--history", "s3://bucket/h"], 2, "--history")


# --- 3. manifest members: stay under the manifest's folder; credentials never written ---------------------

def _manifest(tmp_path: Path, rows, paths: list[str]) -> Path:
    t, _ = rows
    folder = tmp_path / "m"
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for e, b in zip(t.example_id, t.image_png):
        (folder / "imgs" / f"{e}.png").write_bytes(b)
    n = len(paths)
    pd.DataFrame({"example_id": t.example_id[:n], "path": paths, "label": t.label[:n]}).to_csv(folder / "m.csv", index=False)
    return folder / "m.csv"


def _ingested(spec: DataSpec, out: Path) -> tuple[list[dict], pa.Table, int]:
    result = ingest(spec, out, 64)
    rejects = pq.read_table(out / "ingest-rejects.parquet").to_pylist() if (out / "ingest-rejects.parquet").exists() else []
    shards = pa.concat_tables([pq.read_table(s) for s in result.shards]) if result.shards else None
    return rejects, shards, inspect_source(spec).n_rows


@pytest.mark.parametrize("member, allow, why", [
    (f"http://user:{SECRET}@127.0.0.1:9/x.png", False, "leaves the manifest's folder"),
    (f"http://user:{SECRET}@127.0.0.1:9/x.png", True, "cannot be read"),
    (f"https://h.example/x.png?sig={SECRET}", False, "leaves the manifest's folder"),
    ("/etc/hostname", False, "leaves the manifest's folder"),
    ("imgs/../../outside.png", False, "leaves the manifest's folder"),
    ("link_out.png", False, "leaves the manifest's folder"),
    ("imgs/missing.png", False, "cannot be read"),
])
def test_a_bad_member_is_a_reject_with_a_redacted_reason_and_rows_add_up(tmp_path, rows, member, allow, why):
    (tmp_path / "outside.png").write_bytes(rows[0].image_png[0])
    path = _manifest(tmp_path, rows, [f"imgs/{e}.png" for e in rows[0].example_id[:5]] + [member])
    os.symlink(tmp_path / "outside.png", path.parent / "link_out.png")
    spec = DataSpec(path=path, allow_outside_members=allow)
    rejects, shards, n = _ingested(spec, tmp_path / "out")
    assert len(rejects) == 1 and why in rejects[0]["reason"], rejects
    assert (0 if shards is None else len(shards)) + len(rejects) == n == 6
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert SECRET.encode() not in written


def test_a_symlink_inside_the_folder_is_read(tmp_path, rows):
    path = _manifest(tmp_path, rows, ["inside.png"])
    os.symlink(path.parent / "imgs" / f"{rows[0].example_id[0]}.png", path.parent / "inside.png")
    rejects, shards, n = _ingested(DataSpec(path=path), tmp_path / "out")
    assert rejects == [] and len(shards) == n == 1


@pytest.mark.parametrize("member", ["%2e%2e/secret.png", "%252e%252e/secret.png", "..%2fsecret.png",
                                   "sub/%2E%2E/%2e%2e/secret.png", "..\\secret.png", "http://127.0.0.1:9/other/x.png"])
def test_an_escaping_member_of_a_url_manifest_is_a_reject(tmp_path, rows, member):
    import fsspec
    mem = fsspec.filesystem("memory")
    base = f"/xaudit-doors-{abs(hash(member))}"
    mem.pipe(f"{base}/secret.png", rows[0].image_png[0])
    mem.pipe(f"{base}/m/ok.png", rows[0].image_png[1])
    mem.pipe(f"{base}/m/m.csv", pd.DataFrame({"example_id": ["a", "b"], "path": ["ok.png", member],
                                              "label": ["1", "2"]}).to_csv(index=False).encode())
    rejects, shards, n = _ingested(DataSpec(path=f"memory://{base}/m/m.csv"), tmp_path / "out")
    assert [r["example_id"] for r in rejects] == ["b"] and "leaves the manifest's folder" in rejects[0]["reason"]
    assert len(shards) == 1 and n == 2


# --- 4. WebDataset: a shard its reader can tell is incomplete is an error naming it ----------------------

def _tar(samples: list[tuple[str, bytes, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, img, label in samples:
            for ext, data in (("png", img), ("cls", label.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member_starts(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [m.offset for m in t.getmembers()]


@pytest.mark.parametrize("where", ["header boundary", "inside a header", "inside data", "before end marker"])
def test_a_truncated_webdataset_shard_is_refused_naming_it(capsys, tmp_path, rows, where):
    t, _ = rows
    data = _tar([(e, b, str(l)) for e, b, l in zip(t.example_id, t.image_png, t.label)])
    starts = _member_starts(data)
    cut = {"header boundary": starts[7], "inside a header": starts[7] + 100, "inside data": starts[7] + 600,
           "before end marker": starts[-1] + 512 + ((len(t.label.iloc[-1].encode()) if isinstance(t.label.iloc[-1], str) else 1) + 511) // 512 * 512}[where]
    shard = tmp_path / "wds" / "shard-0001.tar"
    shard.parent.mkdir()
    (tmp_path / "wds" / "shard-0000.tar").write_bytes(data)
    shard.write_bytes(data[:cut])
    refused(capsys, ["run", config(tmp_path, {"path": str(tmp_path / "wds")})], 2, "shard-0001.tar",
            out_dir=tmp_path / "runs")


def test_a_complete_webdataset_reads_every_sample(tmp_path, rows):
    t, _ = rows
    (tmp_path / "s.tar").write_bytes(_tar([(e, b, str(l)) for e, b, l in zip(t.example_id, t.image_png, t.label)]))
    spec = DataSpec(path=tmp_path / "s.tar")
    rejects, shards, n = _ingested(spec, tmp_path / "out")
    assert n == len(t) and len(shards) + len(rejects) == n


# --- 5. history: mistyped or corrupt files are input errors, before any work -------------------------------

def _history_file(folder: Path, bad: str) -> None:
    from xaudit.tasks.history import SCHEMA
    folder.mkdir(parents=True, exist_ok=True)
    if bad == "garbage":
        (folder / "r1.parquet").write_bytes(b"PAR1 not really")
        return
    cols = {f.name: pa.array([None], f.type) for f in SCHEMA}
    if bad == "types":
        cols["value"] = pa.array(["high"], pa.string())
        cols["n"] = pa.array(["12"], pa.string())
    pq.write_table(pa.table(cols), folder / "r1.parquet")


@pytest.mark.parametrize("bad", ["types", "garbage"])
def test_a_bad_history_file_stops_the_audit_before_it_runs(capsys, tmp_path, rows, bad):
    _history_file(tmp_path / "runs" / "_history", bad)
    rc = cli(["run", str(config(tmp_path, {"path": str(rows[1])}))])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err and "history" in err.splitlines()[0], err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["_history"]


@pytest.mark.parametrize("bad", ["types", "garbage"])
def test_xaudit_history_on_a_bad_history_file_is_one_line(capsys, tmp_path, bad):
    _history_file(tmp_path / "h", bad)
    refused(capsys, ["history", "--history", tmp_path / "h"], 2, "history")


def test_a_literal_null_and_a_missing_value_are_different_slices():
    from xaudit.tasks.metrics.evaluate import slice_groups
    meta = pd.DataFrame({"site": ["null", None, "A", "null", None]})
    groups = {(k, v): list(i) for k, v, i in slice_groups(meta, [["site"]])}
    assert groups[("site", "null")] == [1, 4] and groups[("site", '"null"')] == [0, 3]


# --- 6. transient faults: retried; when they persist, exit 3, never "bad input" ---------------------------

@pytest.mark.parametrize("exc, expected", [
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (TimeoutError("timed out"), True),
    (OSError(errno.EIO, "An error occurred (SlowDown) when calling PutObject: 503 Slow Down"), True),
    (OSError(errno.EIO, "An error occurred (503) when calling the PutObject operation"), True),
    (OSError(errno.EIO, "the object part-15030 is damaged"), False),
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError("Access Denied"), False),
    (XAuditError("bad"), False),
    (ValueError("not parquet"), False),
])
def test_what_counts_as_transient(exc, expected):
    assert storage.transient(exc) is expected


def test_a_botocore_503_and_an_aiohttp_500_are_transient_and_a_404_is_not():
    from aiohttp import ClientResponseError, RequestInfo
    from botocore.exceptions import ClientError
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL
    err = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert storage.transient(err)
    info = RequestInfo(URL("http://h/x"), "GET", CIMultiDictProxy(CIMultiDict()), URL("http://h/x"))
    assert storage.transient(ClientResponseError(info, (), status=500))
    assert not storage.transient(ClientResponseError(info, (), status=404))


@pytest.fixture(scope="module")
def server(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("served")
    pq.write_table(pa.Table.from_pandas(rows[0]), root / "rows.parquet")
    (root / "not.parquet").write_text("<html>hello</html>")
    port_file = root / "port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"), str(root), str(port_file)])
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_file.read_text()}"
    proc.terminate()
    proc.wait(10)


def test_a_store_that_answers_503_a_few_times_is_retried(tmp_path, server, monkeypatch):
    monkeypatch.setenv("XAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.05, 0.05, 0.05))
    local = storage.fetch(f"{server}/flaky/2/rows.parquet", "data.path")
    assert pq.read_table(local).num_rows == 12


def test_a_store_that_stays_down_is_exit_3_not_bad_input(capsys, tmp_path, rows, server, monkeypatch):
    monkeypatch.setenv("XAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.05, 0.05, 0.05))
    with pytest.raises(StoreUnavailable):
        storage.fetch(f"{server}/down/rows.parquet", "data.path")
    refused(capsys, ["run", config(tmp_path, {"path": f"{server}/down/rows.parquet"})], 3, "could not be reached",
            out_dir=tmp_path / "runs")


def test_a_connection_refused_is_exit_3(capsys, tmp_path, monkeypatch):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there now
    monkeypatch.setenv("XAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.05,))
    refused(capsys, ["run", config(tmp_path, {"path": f"http://127.0.0.1:{port}/files/rows.parquet"})], 3,
            out_dir=tmp_path / "runs")


def test_an_http_path_that_is_not_parquet_is_one_line(capsys, tmp_path, server, monkeypatch):
    monkeypatch.setenv("XAUDIT_CACHE", str(tmp_path / "cache"))
    refused(capsys, ["run", config(tmp_path, {"path": f"{server}/files/not.parquet"})], 2, "data.path",
            out_dir=tmp_path / "runs")


# --- 7. the registry and signing say what is wrong without leaking --------------------------------------

def test_an_unreachable_mlflow_registry_with_a_password_is_not_echoed(capsys, tmp_path, rows, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SECRET}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    rc = cli(["run", str(config(tmp_path, {"path": str(rows[1])}, model={"mlflow": "models:/digits/1"}))])
    out, err = capsys.readouterr()
    assert rc in (2, 3) and "Traceback" not in err and SECRET not in out + err, err


def test_the_passphrase_hint_names_the_configured_variable(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from xaudit.tasks.signing import load_credentials
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.BestAvailableEncryption(b"pw")))
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(XAuditError, match="MY_SIGNING_PASS"):
        load_credentials(tmp_path / "k.pem", tmp_path / "c.pem", passphrase_env="MY_SIGNING_PASS")


def test_verify_of_an_unsigned_run_needs_no_signing_extra(tmp_path):
    """A plain install has no pyHanko: verify of an unsigned run must still verify (exit 0)."""
    run = tmp_path / "r"
    run.mkdir()
    code = ("import sys; sys.modules['pyhanko'] = None; sys.modules['asn1crypto'] = None; "
            "from xaudit.tasks.signing import verify_signatures; "
            f"lines, problems = verify_signatures({str(run)!r}); print(lines, problems); "
            "sys.exit(1 if problems or 'not signed' not in lines[0] else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_redaction_covers_userinfo_and_secret_query_parameters():
    text = f"cannot read 'https://u:{SECRET}@h/x.png?sig={SECRET}&v=1' or s3://b/k?X-Amz-Credential={SECRET}"
    shown = storage.redact(text)
    assert SECRET not in shown and "v=1" in shown and "s3://b/k" in shown

"""Where inputs and outputs live: local paths, or URLs read and written through fsspec (`s3://` with s3fs;
`gs://`, `az://`/`abfs://` where their packages are installed; `https://` read-only).

- **Inputs** given as URLs: Parquet data is read through `pyarrow.dataset` over the fsspec filesystem, so
  column projection and the row filter push down to the store; model cards and weights are copied once into
  a content cache (`XAUDIT_CACHE`, default `~/.cache/xaudit`), the copy's sha256 checked against the store's
  object, and recorded with the URL and the store's ETag / version id (`remote_inputs`).
- **Outputs** under a URL: a run is staged in a local folder (the same layout as a local run), pulled from
  the store first when it already exists there (so a rerun with the same run id resumes), and published when
  it ends: every file uploaded, `manifest.json` last, so a run whose manifest is present in the store is
  complete; an interrupted upload leaves no manifest and the run is resumed by rerunning it.

Credentials come from the standard environment and configuration files of each store (for S3:
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, AWS_ENDPOINT_URL for a private endpoint); they
are never written to a config, a manifest or a report. Nothing here imports Prefect.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import XAuditError

URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
WRITABLE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "file")
READABLE = WRITABLE + ("http", "https")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}
MANIFEST = "manifest.json"

# what this process fetched: URL -> {url, etag, version_id, sha256, bytes}; written to the manifest
FETCHED: dict[str, dict[str, Any]] = {}


# query parameters that carry credentials: presigned S3/GCS URLs, Azure SAS, OAuth tokens, API keys
_SECRET_QUERY = re.compile(
    r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|sig|signature|se|sp|sv|"
    r"skoid|sktid|token|access_token|id_token|auth|authorization|key|api_key|apikey|password|passwd|pwd|secret|"
    r"client_secret|code)$")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"]*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")
REDACTED = "***"


def credentials_in(url: str) -> str | None:
    """Return what kind of credential `url` holds ('user:password@', 'the query parameter sig'), or None."""
    m = _USERINFO.search(url)
    if m:
        return "user:password@" if ":" in m["userinfo"] else "a user name or token before '@'"
    for q in _QUERY_PARAM.finditer(url):
        if _SECRET_QUERY.match(q["name"]) and q["value"]:
            return f"the query parameter {q['name']}"
    return None


def redact(text: Any) -> str:
    """Return `text` with the credentials of every URL in it replaced by '***': the user information before
    '@' and the values of query parameters that carry secrets (presigned signatures, SAS, tokens, keys). What
    xaudit writes or prints about a URL goes through this (tables, reports, messages)."""
    text = str(text)
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_PARAM.sub(lambda m: f"{m['sep']}{m['name']}={REDACTED}" if _SECRET_QUERY.match(m["name"])
                            else m[0], text)


def is_url(value: Any) -> bool:
    """True for a string with a scheme (`s3://...`); a Windows drive letter is not one."""
    return isinstance(value, str) and bool(URL.match(value)) and len(URL.match(value)["scheme"]) > 1


def scheme(url: str) -> str:
    return URL.match(url)["scheme"].lower()


def check_url(url: str, field: str, write: bool = False) -> None:
    """Raise unless `url`'s scheme is supported (for writing, when `write`) and its package is installed."""
    s = scheme(url)
    allowed = WRITABLE if write else READABLE
    if s not in allowed:
        raise XAuditError(f"'{field}' {redact(url)!r}: the scheme {s}:// is not supported{' for outputs' if write else ''}; "
                          f"use a local path or one of {', '.join(x + '://' for x in allowed if x != 'file')}")
    try:
        import fsspec
        fsspec.get_filesystem_class(s)
    except (ImportError, ValueError):
        package = PACKAGES.get(s, "its fsspec backend")
        how = "pip install 'xaudit[s3]'" if package == "s3fs" else f"pip install {package}"
        raise XAuditError(f"'{field}' {redact(url)!r} needs the package {package}: {how}") from None


def filesystem(url: str, field: str):
    """Return (fsspec filesystem, path inside it) for `url`."""
    check_url(url, field)
    from fsspec.core import url_to_fs
    try:
        return url_to_fs(url)
    except Exception as exc:                       # a bad bucket name, missing credentials, ...
        raise store_error(field, url, "cannot be opened", exc) from None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {redact(str(exc).strip()[:200])}"


# --- transient faults ------------------------------------------------------------------------------------

_TRANSIENT_NAMES = {
    "ServerDisconnectedError", "ClientConnectionError", "ClientConnectorError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "ConnectionClosedError", "ProxyConnectionError", "ResponseStreamingError",
    "IncompleteReadError", "RemoteDisconnected", "ProtocolError", "ChunkedEncodingError", "ReadTimeout",
    "ConnectTimeout", "IncompleteRead",
}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "ServiceUnavailable", "InternalError", "RequestLimitExceeded", "TooManyRequests", "503", "500",
                    "502", "504", "429"}
_TRANSIENT_TEXT = re.compile(r"(?i)\b(50[0-4]|429)\b|service unavailable|slow ?down|throttl|timed? ?out|"
                             r"connection (reset|refused|aborted|closed)|server disconnected|broken pipe|"
                             r"temporarily unavailable|too many requests|remote end closed")
# MLflow's client wraps a refused connection in its own exception, saying so only in its text
_MLFLOW_TEXT = re.compile(r"(?i)max retries exceeded|failed to establish|connection")


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        v = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def transient(exc: BaseException) -> bool:
    """Whether `exc` (or any exception it was raised from) is a fault that may pass: a connection reset or
    refused, a timeout, a 5xx or 429 answer, throttling. A missing object, a refused permission or bad data
    is not (the user has to fix those)."""
    import asyncio
    import errno
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, XAuditError):
            return False
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            # fsspec's HTTP answers FileNotFoundError for any failed request: what it was raised from decides
            todo += [e.__cause__, None if e.__suppress_context__ else e.__context__]
            continue
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT,
                                                  errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN):
            return True
        status = _status(e)
        if status is not None and (status >= 500 or status == 429):
            return True
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code") \
            if isinstance(getattr(e, "response", None), dict) else None
        if code in _TRANSIENT_CODES:
            return True
        # s3fs turns a botocore error it gave up retrying into a bare OSError; MLflow's client reports a refused
        # connection or a 5xx in its text
        name, text = type(e).__name__, str(e)
        if (isinstance(e, OSError) or name in ("MlflowException", "RestException")) and _TRANSIENT_TEXT.search(text) \
                or name == "MlflowException" and _MLFLOW_TEXT.search(text):
            return True
        todo += [e.__cause__, None if e.__suppress_context__ else e.__context__]
    return False


def store_error(field: str, url: str, what: str, exc: BaseException) -> Exception:
    """Return the error to raise for a failed store operation: `StoreUnavailable` for a transient fault
    (retried by the tasks, exit 3 when it persists), else `XAuditError` (the user's to fix, exit 2)."""
    from .errors import StoreUnavailable
    if transient(exc):
        return StoreUnavailable(f"'{field}' {redact(url)!r}: {what}: the store could not be reached "
                                f"({_reason(exc)})")
    return XAuditError(f"'{field}' {redact(url)!r} {what}: {_reason(exc)}")


RETRY_DELAYS = (0.5, 2.0, 5.0)        # seconds before the 2nd, 3rd and 4th attempt of one store operation


def retrying(call, *args, **kwargs):
    """Return call(*args, **kwargs), trying again after RETRY_DELAYS while it fails with a transient fault."""
    import time
    for delay in (*RETRY_DELAYS, None):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if delay is None or not transient(exc):
                raise
            time.sleep(delay)


def info(url: str, field: str) -> dict[str, Any]:
    """Return the store's facts about the object at `url` (size, ETag, version id); raise when it is absent."""
    fs, path = filesystem(url, field)
    try:
        meta = retrying(fs.info, path)
    except FileNotFoundError as exc:
        if transient(exc):
            raise store_error(field, url, "cannot be read", exc) from None
        raise XAuditError(f"'{field}' {redact(url)!r} does not exist") from None
    except Exception as exc:
        raise store_error(field, url, "cannot be read", exc) from None
    etag = meta.get("ETag") or meta.get("etag")
    return dict(type=meta.get("type", "file"), size=meta.get("size"), etag=etag.strip('"') if isinstance(etag, str) else etag,
                version_id=meta.get("VersionId") or meta.get("version_id") or meta.get("generation"))


def cache_root() -> Path:
    return Path(os.environ.get("XAUDIT_CACHE") or Path.home() / ".cache" / "xaudit")


def fetch(url: str, field: str) -> Path:
    """Return a local copy of the file at `url`, downloaded once into the content cache (keyed by the URL and
    the object's ETag/version, so a changed object is fetched again), written atomically; record it."""
    from .io import sha256_file
    facts = info(url, field)
    if facts["type"] == "directory":
        raise XAuditError(f"'{field}' {redact(url)!r} is a folder; it must name a file")
    key = hashlib.sha256(f"{url}\0{facts['etag']}\0{facts['version_id']}\0{facts['size']}".encode()).hexdigest()[:32]
    target = cache_root() / "fetch" / key / (posixpath.basename(url.rstrip("/")) or "object")
    known = FETCHED.get(url) or {}
    same = (known.get("etag"), known.get("version_id"), known.get("bytes")) == (facts["etag"], facts["version_id"],
                                                                                  facts["size"])
    if target.is_file() and known.get("sha256") and same:
        return target                    # fetched and hashed by this process already; the object is unchanged
    if not target.is_file():
        fs, path = filesystem(url, field)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".part-{os.getpid()}")
        try:
            retrying(fs.get_file, path, str(tmp))
            os.replace(tmp, target)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise store_error(field, url, "could not be downloaded", exc) from None
    if facts["size"] is not None and target.stat().st_size != facts["size"]:
        target.unlink(missing_ok=True)
        raise XAuditError(f"'{field}' {redact(url)!r}: the copy has {target.stat().st_size} bytes, the store says "
                          f"{facts['size']}; run again")
    FETCHED[url] = dict(url=url, etag=facts["etag"], version_id=facts["version_id"], sha256=sha256_file(target),
                        bytes=target.stat().st_size)
    return target


def local(value: str | Path, field: str) -> Path:
    """Return `value` as a local path: itself, or for a URL its cached copy."""
    return fetch(value, field) if is_url(value) else Path(value)


def join(base: str, *parts: str) -> str:
    """Join URL path parts (`s3://b/runs` + `id` -> `s3://b/runs/id`)."""
    return posixpath.join(base.rstrip("/"), *parts)


def parquet_dataset(url: str, field: str):
    """Return a `pyarrow.dataset` over the Parquet file or folder at `url`, read through fsspec (filters and
    column selection push down: only the row groups and columns needed are fetched)."""
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    if scheme(url) in ("http", "https"):
        # a web server may not serve byte ranges (Parquet reads its footer first): take the file whole, once
        local_copy = fetch(url, field)
        try:
            return ds.dataset(str(local_copy), format="parquet")
        except Exception as exc:
            raise XAuditError(f"'{field}' {redact(url)!r} is not readable Parquet: {_reason(exc)}") from None
    fs, path = filesystem(url, field)
    facts = info(url, field)
    try:
        dataset = ds.dataset(path, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    except Exception as exc:
        raise store_error(field, url, "is not readable Parquet", exc) from None
    if facts["type"] != "directory":
        FETCHED.setdefault(url, dict(url=url, etag=facts["etag"], version_id=facts["version_id"], sha256=None,
                                     bytes=facts["size"]))
    return dataset


# --- outputs under a URL ---------------------------------------------------------------------------------

def staging_dir(output_url: str) -> Path:
    """Return the local folder where runs under `output_url` are staged (one per URL, under the cache)."""
    return cache_root() / "staging" / hashlib.sha256(output_url.rstrip("/").encode()).hexdigest()[:24]


def check_output_url(url: str, run_id: str | None) -> None:
    """Raise unless `url` is a writable store location this process can list (checked before any work)."""
    check_url(url, "output_dir", write=True)
    fs, path = filesystem(url, "output_dir")
    try:
        if fs.isfile(path):
            raise XAuditError(f"preflight: 'output_dir' {redact(url)!r} must be a folder; it is a file")
        fs.ls(path.split("/", 1)[0]) if scheme(url) != "file" else None
    except XAuditError:
        raise
    except FileNotFoundError:
        raise XAuditError(f"preflight: 'output_dir' {redact(url)!r}: its bucket does not exist") from None
    except Exception as exc:
        raise store_error("output_dir", url, "cannot be reached", exc) from None
    if run_id and fs.isfile(f"{path.rstrip('/')}/{run_id}"):
        raise XAuditError(f"preflight: 'output_dir' {redact(url)!r}: {run_id!r} there is a file, not a run folder")


def pull(url: str, local_dir: Path, field: str = "output_dir") -> int:
    """Copy every file under `url` into `local_dir` (those missing here or differing: size, or the store's
    MD5 ETag); returns how many."""
    fs, path = filesystem(url, field)
    try:
        if not retrying(fs.exists, path):
            return 0
        found = retrying(fs.find, path, detail=True)
    except Exception as exc:
        raise store_error(field, url, "cannot be listed", exc) from None
    n = 0
    root = path.rstrip("/")
    for name, meta in sorted(found.items()):
        rel = name[len(root):].lstrip("/")
        if not rel or meta.get("type") == "directory":
            continue
        n += _download(fs, name, meta, local_dir / rel)
    return n


def _download(fs, name: str, meta: dict[str, Any], target: Path) -> int:
    """Copy the store's object `name` to `target` (written whole, then renamed) unless `target` already holds
    it (same size and, where the store gives one, the same MD5 ETag); returns 1 if copied, else 0."""
    if target.is_file() and target.stat().st_size == meta.get("size") and not _changed(meta, target):
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        retrying(fs.get_file, name, str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise store_error("output_dir", name, "could not be downloaded", exc) from None
    os.replace(tmp, target)
    return 1


def publish(local_dir: Path, url: str, field: str = "output_dir") -> int:
    """Upload every file of `local_dir` to `url` whose size or content differs there, `manifest.json` last
    (the run's completion marker); returns how many were uploaded."""
    fs, path = filesystem(url, field)
    root = path.rstrip("/")
    try:
        remote = {name[len(root):].lstrip("/"): meta for name, meta in retrying(fs.find, root, detail=True).items()} \
            if retrying(fs.exists, root) else {}
    except Exception as exc:
        raise store_error(field, url, "cannot be listed", exc) from None
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and ".part-" not in p.name)
    files.sort(key=lambda p: p.relative_to(local_dir).as_posix() == MANIFEST)      # the manifest last
    n = 0
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        there = remote.get(rel)
        if there is not None and there.get("size") == p.stat().st_size and rel != MANIFEST and not _changed(there, p):
            continue
        try:
            retrying(fs.put_file, str(p), f"{root}/{rel}")
        except Exception as exc:
            raise store_error(field, url, f"uploading {rel} failed (the run is complete in {local_dir}; "
                                          f"rerun with the same --run-id to publish it)", exc) from None
        n += 1
    return n


def _changed(meta: dict[str, Any], path: Path) -> bool:
    """True when the store's single-part ETag (an MD5) says the object differs from the local file."""
    etag = str(meta.get("ETag") or meta.get("etag") or "").strip('"')
    if not re.fullmatch(r"[0-9a-f]{32}", etag):
        return True                      # multipart or unknown: upload again rather than guess
    h = hashlib.md5(usedforsecurity=False)          # the store's checksum, not a security measure
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest() != etag


def remove_local(local_dir: Path) -> None:
    shutil.rmtree(local_dir, ignore_errors=True)


HISTORY = "_history"


def local_output_dir(output_dir: str | Path) -> Path:
    """Return the local folder runs are written to: `output_dir` itself, or the staging folder of a URL."""
    return staging_dir(output_dir) if is_url(output_dir) else Path(output_dir)


def stage_run(output_url: str, run_id: str | None, history: bool) -> Path:
    """Prepare the staging folder of `output_url` and return it. The audit history is pulled fresh from the
    store. The run `run_id` (when named) resumes from its staged copy where a run here stopped before it was
    published (a published run's staged copy is removed), else from what the store holds."""
    local_root = staging_dir(output_url)
    local_root.mkdir(parents=True, exist_ok=True)
    if history:
        remove_local(local_root / HISTORY)
        pull(join(output_url, HISTORY), local_root / HISTORY)
    if run_id and not (local_root / run_id).is_dir():
        pull(join(output_url, run_id), local_root / run_id)
    return local_root


def publish_run(output_url: str, run_id: str, history: bool) -> str:
    """Upload the staged run (manifest last) and the history to `output_url`, then drop the staged run;
    returns the run's URL."""
    local_root = staging_dir(output_url)
    if history and (local_root / HISTORY).is_dir():
        publish(local_root / HISTORY, join(output_url, HISTORY))
    publish(local_root / run_id, join(output_url, run_id))
    remove_local(local_root / run_id)
    return join(output_url, run_id)


def remote_identity(url: str, field: str, content: bool = True) -> dict[str, Any]:
    """Return {url, etag, version_id, bytes, sha256} of the object at `url` (sha256 of its content when
    `content`: from the cached copy where there is one, else read once through)."""
    facts = info(url, field)
    digest = (FETCHED.get(url) or {}).get("sha256")
    if digest is None and content and facts["type"] != "directory":
        fs, path = filesystem(url, field)
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
    return dict(url=url, etag=facts["etag"], version_id=facts["version_id"], bytes=facts["size"], sha256=digest)


def open_binary(ref: str | Path, field: str):
    """Open a local path or a URL for reading bytes (a context manager)."""
    if is_url(ref):
        fs, path = filesystem(str(ref), field)
        return fs.open(path, "rb")
    return open(ref, "rb")


def pull_matching(url_dir: str, local_dir: Path, prefix: str, field: str = "output_dir") -> int:
    """Copy the files directly under `url_dir` whose names start with `prefix` into `local_dir` (those missing
    here or differing: size, or the store's MD5 ETag); returns how many."""
    fs, path = filesystem(url_dir, field)
    try:
        found = retrying(fs.ls, path, detail=True) if retrying(fs.exists, path) else []
    except FileNotFoundError:
        return 0
    except Exception as exc:
        raise store_error(field, url_dir, "cannot be listed", exc) from None
    n = 0
    for meta in found:
        name = meta["name"].rstrip("/").rsplit("/", 1)[-1]
        if meta.get("type") == "directory" or not name.startswith(prefix):
            continue
        n += _download(fs, meta["name"], meta, local_dir / name)
    return n


def push_files(files: list[Path], url_dir: str, field: str = "output_dir") -> None:
    """Upload `files` into `url_dir` under their names (a shard's parts, from the worker that scored it)."""
    fs, path = filesystem(url_dir, field)
    for f in files:
        try:
            retrying(fs.put_file, str(f), f"{path.rstrip('/')}/{f.name}")
        except Exception as exc:
            raise store_error(field, url_dir, f"uploading {f.name} failed", exc) from None


PART_KEYS = ("predictions", "explanations", "rejects")


def pull_shard(output_url: str, run_dir: str, shard: str) -> tuple[str, str]:
    """On a worker: copy an input shard of the run `run_dir` (the flow's path; only its name is used) and any
    earlier parts of it from the store into this machine's staging folder; returns (shard, run folder) here."""
    name = Path(run_dir).name
    run_url, here = join(output_url, name), staging_dir(output_url) / name
    (here / "parts").mkdir(parents=True, exist_ok=True)
    pull_matching(join(run_url, "inputs"), here / "inputs", Path(shard).name)
    pull_matching(join(run_url, "parts"), here / "parts", f"{Path(shard).stem}.")
    return str(here / "inputs" / Path(shard).name), str(here)


def push_parts(output_url: str, here_run: str, run_dir: str, out: dict[str, Any]) -> dict[str, str]:
    """On a worker: upload a scored shard's parts and key file to the store; returns their paths in the flow's
    run folder `run_dir` (where the flow collects them)."""
    names = {k: Path(out[k]).name for k in PART_KEYS}
    stem = names["predictions"].split(".", 1)[0]
    push_files([Path(here_run) / "parts" / n for n in (*names.values(), f"{stem}.key.json")],
               join(output_url, Path(run_dir).name, "parts"))
    return {k: str(Path(run_dir) / "parts" / n) for k, n in names.items()}


def pull_run_files(output_url: str, run_dir: str, names: list[str]) -> str:
    """On a worker: copy these files of the run (e.g. predictions.parquet) from the store into this machine's
    staging folder; returns that run folder."""
    here = staging_dir(output_url) / Path(run_dir).name
    here.mkdir(parents=True, exist_ok=True)
    for n in names:
        pull_matching(join(output_url, Path(run_dir).name), here, n)
    return str(here)


def push_run_files(output_url: str, here_run: str, run_dir: str, names: list[str]) -> None:
    """On a worker: upload these files of the run folder here into the run's folder in the store."""
    push_files([Path(here_run) / n for n in names], join(output_url, Path(run_dir).name))

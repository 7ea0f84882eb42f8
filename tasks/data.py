"""Dataset ingest: filter the source into Parquet input shards, fingerprint it, decode shards to tensors.

Bad rows are never silently dropped: each becomes a reject (example id, stage, reason). Errors about the
dataset as a whole (missing path, unknown column) raise `XAuditError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import tarfile
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFile

from . import storage
from .config import MAX_PIXELS, DataSpec
from .errors import XAuditError
from .io import write_parquet
from .models import ModelCard

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
REJECT_SCHEMA = pa.schema([("example_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
# Images (and masks) above MAX_PIXELS are refused from their header, before any pixel is decoded; Pillow's own
# guard (an error at twice its limit, a warning at it) stays as a second line, its warning silenced because
# the check here already decides.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Columns xaudit writes into predictions.parquet itself: a metadata column may not take one of these names.
RESERVED_COLUMNS = ("example_id", "label", "label_name", "prediction", "prediction_name", "confidence",
                    "correct", "probabilities", "shard")
_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class IngestResult:
    """What `ingest` wrote: the input shards (in order), counts, and the data identity."""

    shards: tuple[str, ...]
    n_rows: int
    n_rejected: int
    fingerprint: str
    source: str
    source_format: str
    metadata_columns: tuple[str, ...]


@dataclass(frozen=True)
class DecodedShard:
    """One shard as tensors. `inputs` are normalised (N, C, H, W); `roi` is (N, H, W) bool or None."""

    example_ids: list[str]
    inputs: torch.Tensor
    labels: torch.Tensor
    roi: torch.Tensor | None
    metadata: pa.Table
    rejects: list[dict[str, str]]


def _imagefolder_files(root: Path) -> list[tuple[str, Path]]:
    """Return (class folder, file) for every image under an ImageFolder root, in a stable order."""
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise XAuditError(f"ingest: 'data.path' {str(root)!r} cannot be listed: {exc.strerror}") from None
    if not classes:
        raise XAuditError(f"ingest: ImageFolder {str(root)!r} must contain one folder per class; found none")
    files = [(cls, f) for cls in classes for f in sorted((root / cls).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise XAuditError(f"ingest: ImageFolder {str(root)!r} holds no images ({sorted(IMAGE_EXTENSIONS)})")
    return files


def _read_table(ref: Path | str, field: str, what: str) -> pa.Table:
    """Return a CSV (by its .csv name) or Parquet table from a path or URL; unreadable is an error naming `field`."""
    import pyarrow.csv as pacsv
    csv = str(ref).lower().endswith(".csv")
    try:
        with storage.open_binary(ref, field) as f:
            return pacsv.read_csv(f) if csv else pq.read_table(f)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise XAuditError(f"ingest: '{field}' {str(ref)!r} is not a readable {'CSV' if csv else 'Parquet'} {what}: "
                          f"{_reason(exc)}") from None


def _sidecar(spec: DataSpec) -> tuple[dict[str, dict[str, Any]], list[pa.Field]]:
    """Return an ImageFolder's metadata file (CSV or Parquet, keyed by `id_column`: each image's path under the
    folder) as {id: row} and its other columns' fields; ({}, []) without one."""
    if spec.metadata_file is None:
        return {}, []
    ref = spec.metadata_file
    table = _read_table(ref, "data.metadata_file", "file")
    if spec.id_column not in table.column_names:
        raise XAuditError(f"ingest: 'data.metadata_file' {str(ref)!r} must have the id column {spec.id_column!r} "
                          f"(each image's path under the folder, e.g. 'cat/0001.jpg'); columns are {table.column_names}")
    taken = {spec.id_column, spec.image_column, spec.label_column, "folder"}
    clash = [c for c in table.column_names if c in taken - {spec.id_column}]
    if clash:
        raise XAuditError(f"ingest: 'data.metadata_file' {str(ref)!r} has column(s) {clash}, which the ImageFolder "
                          f"already gives; rename them")
    ids = [str(v) for v in table.column(spec.id_column).to_pylist()]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise XAuditError(f"ingest: 'data.metadata_file' {str(ref)!r} repeats ids {dup}; one row per image")
    fields = [f for f in table.schema if f.name != spec.id_column]
    rows = table.drop_columns([spec.id_column]).to_pylist()
    return dict(zip(ids, rows)), fields


def _imagefolder_batches(root: Path, spec: DataSpec, with_bytes: bool = True) -> Iterator[pa.RecordBatch]:
    rows: list[dict[str, Any]] = []
    side, extra = _sidecar(spec)
    schema = pa.schema([(spec.id_column, pa.string()), (spec.image_column, pa.binary()),
                        (spec.label_column, pa.string()), ("folder", pa.string()), *extra])
    empty = {f.name: None for f in extra}
    for cls, f in _imagefolder_files(root):
        rid = f.relative_to(root).as_posix()
        try:
            data = f.read_bytes() if with_bytes else b""
        except OSError:
            data = None            # unreadable file: a reject at decode ("missing or empty")
        rows.append({spec.id_column: rid.encode("utf-8", "backslashreplace").decode("utf-8")
                     if any(unicodedata.category(c) == "Cs" for c in rid) else rid,
                     spec.image_column: data, spec.label_column: cls, "folder": cls, **side.get(rid, empty)})
        if len(rows) == 256:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


READ_ERROR = "__xaudit_read_error"      # a row whose image could not be read: why (then an ingest reject)
MAX_IMAGE_BYTES = 256 * 2**20            # an encoded image larger than this is not read at all


def _manifest_table(path: Path | str, spec: DataSpec) -> pa.Table:
    """Return a manifest (CSV, or Parquet) as a table, checked: id, path and label columns present, and no
    image column of its own (the images are the files it names)."""
    where = str(path)
    table = _read_table(path, "data.path", "manifest")
    names = table.column_names
    for role in ("id_column", "path_column", "label_column"):
        col = getattr(spec, role)
        if col not in names:
            raise XAuditError(f"ingest: 'data.{role}' is {col!r}, which the manifest does not have; columns are {names}")
    _distinct_roles(spec, ("id_column", "path_column", "label_column"), names)
    if spec.image_column in names:
        raise XAuditError(f"ingest: the manifest {where!r} names its images in 'data.path_column' {spec.path_column!r}; "
                          f"it must not also have the image column {spec.image_column!r}")
    if spec.roi_column:
        raise XAuditError("ingest: 'data.roi_column' cannot be read from a manifest; give masks in a Parquet file")
    if not (pa.types.is_string(table.schema.field(spec.path_column).type)
            or pa.types.is_large_string(table.schema.field(spec.path_column).type)):
        raise XAuditError(f"ingest: 'data.path_column' {spec.path_column!r} must hold text (paths or URLs); it "
                          f"holds {table.schema.field(spec.path_column).type}")
    # ids are text in every other format: a CSV of numeric ids is read as integers, so cast them
    i = names.index(spec.id_column)
    if not pa.types.is_string(table.schema.field(i).type):
        table = table.set_column(i, spec.id_column, pc.cast(table.column(i), pa.string()))
    return table


def _unquoted(path: str) -> str:
    """`path` percent-decoded until it no longer changes (a server may decode '%252e' twice)."""
    from urllib.parse import unquote
    for _ in range(5):
        nxt = unquote(path)
        if nxt == path:
            break
        path = nxt
    return path.replace("\\", "/")


def _under(url: str, base: str) -> bool:
    """Whether URL `url` lies under the folder URL `base` once both are decoded and normalised."""
    from urllib.parse import urlsplit
    u, b = urlsplit(url), urlsplit(base)
    if (u.scheme.lower(), u.netloc) != (b.scheme.lower(), b.netloc):
        return False
    parts = _unquoted(u.path).split("/")
    if ".." in parts:
        return False
    inner, folder = posixpath.normpath("/" + "/".join(parts)), posixpath.normpath("/" + _unquoted(b.path))
    return inner.startswith(folder.rstrip("/") + "/")


def _read_member(ref: str | None, base: Path | str, anywhere: bool = False) -> tuple[bytes | None, str | None]:
    """Return (the bytes of the image a manifest row names, None) or (None, why it cannot be read).

    The rule (docs/configuration-guide.md, manifests): a member resolves under the manifest's folder, checked after percent-decoding
    (URLs) and after following symlinks (local files); a member elsewhere (an absolute path, a URL of another
    folder or host, a symlink out of the folder) is a reject unless `data.allow_outside_members` is set by the
    operator. What a reason quotes of a member is redacted (no credentials in any table)."""
    if ref is None or not str(ref).strip():
        return None, "missing image path"
    ref = str(ref)
    shown = storage.redact(ref)
    outside = (f"image path {shown!r} leaves the manifest's folder (members must lie under it unless "
               f"'data.allow_outside_members' is true)")
    try:
        if storage.is_url(ref) or storage.is_url(base):
            if storage.is_url(ref):
                url = ref
            elif Path(ref).is_absolute():
                return None, outside
            else:
                url = storage.join(str(base), ref)
            if ".." in _unquoted(url.split("://", 1)[1]).split("/"):
                return None, outside
            if not anywhere and not (storage.is_url(base) and _under(url, str(base))):
                return None, outside
            fs, inner = storage.filesystem(url, "data.path")
            size = fs.size(inner)
            if size is not None and size > MAX_IMAGE_BYTES:
                return None, f"image {shown!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB"
            return fs.cat_file(inner), None
        p = Path(ref)
        if not p.is_absolute():
            if ".." in p.parts:
                return None, outside
            p = Path(base) / p
        if not anywhere and not p.resolve().is_relative_to(Path(base).resolve()):
            return None, outside                    # an absolute path elsewhere, or a symlink out of the folder
        if p.stat().st_size > MAX_IMAGE_BYTES:
            return None, f"image {shown!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB"
        return p.read_bytes(), None
    except XAuditError as exc:
        return None, storage.redact(str(exc)[:200])
    except (OSError, ValueError) as exc:
        return None, f"image {shown!r} cannot be read: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - a transport error of the store (fsspec's own types) for one row
        if storage.transient(exc):
            raise
        return None, f"image {shown!r} cannot be read: {type(exc).__name__}"


def _manifest_batches(table: pa.Table, base: Path | str, spec: DataSpec, batch_size: int = 64
                      ) -> Iterator[pa.RecordBatch]:
    """Yield the manifest's rows with the image bytes of each (read in threads) and why a row's could not be."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=8) as pool:
        for batch in table.to_batches(max_chunksize=batch_size):
            refs = batch.column(spec.path_column).to_pylist()
            got = list(pool.map(lambda r: _read_member(r, base, spec.allow_outside_members), refs))
            # a member's URL may carry credentials: they were used to read it, and are never written
            i = batch.schema.get_field_index(spec.path_column)
            batch = batch.set_column(i, batch.schema.field(i), pa.array(
                [None if r is None else storage.redact(r) for r in refs], batch.schema.field(i).type))
            batch = batch.append_column(pa.field(spec.image_column, pa.binary()), pa.array([g[0] for g in got], pa.binary()))
            yield batch.append_column(pa.field(READ_ERROR, pa.string()), pa.array([g[1] for g in got], pa.string()))


def _webdataset_shards(path: Path | str) -> list[Path | str]:
    """Return the .tar shards of a WebDataset: the file (or URL) itself, or a folder's .tar files in order."""
    if storage.is_url(path) or Path(path).is_file():
        return [path]
    shards = sorted(Path(path).glob("*.tar"))
    if not shards:
        raise XAuditError(f"ingest: WebDataset folder {str(path)!r} holds no .tar shards")
    return shards


class _EndMarkedTarInfo(tarfile.TarInfo):
    """A TarInfo that notes when the archive's end-of-archive marker (a zero block) is read. Python's tarfile
    ends its iteration silently at the end of the data too, so a shard cut at a member boundary would read as
    complete; a shard without the marker is truncated."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.xaudit_end_marker = True
            raise


def _webdataset_samples(path: Path | str, spec: DataSpec, with_bytes: bool = True) -> Iterator[dict[str, Any]]:
    """Yield one dict per sample of a WebDataset (members grouped by key: the member's path up to the first '.'
    of its name): id, image bytes (the first image member), label (from .cls, else the JSON's label_column)
    and the JSON's other scalar fields. A shard that cannot be read is a data error naming it."""
    import json
    for shard in _webdataset_shards(path):
        current: dict[str, Any] | None = None
        try:
            with storage.open_binary(shard, "data.path") as raw, \
                    tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndMarkedTarInfo) as tar:
                tar.xaudit_end_marker = False
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if not dot or stem.startswith("_"):
                        continue                                    # no extension, or a hidden/meta file
                    key = f"{folder}/{stem}" if folder else stem
                    if current is None or current["key"] != key:
                        if current is not None:
                            yield current
                        current = {"key": key, "image": None, "label": None, "json": {}, "has_image": False}
                    ext = ext.lower()
                    if f".{ext}" in IMAGE_EXTENSIONS and not current["has_image"]:
                        current["has_image"] = True
                        if member.size > MAX_IMAGE_BYTES:
                            current["error"] = f"image member {member.name!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB"
                        else:
                            current["image"] = tar.extractfile(member).read() if with_bytes else b""
                    elif ext == "cls":
                        current["label"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    elif ext == "json":
                        try:
                            value = json.loads(tar.extractfile(member).read())
                        except (ValueError, UnicodeDecodeError):
                            value = {}
                            current["bad_json"] = True
                        current["json"] = value if isinstance(value, dict) else {}
                if not tar.xaudit_end_marker:
                    raise tarfile.ReadError(f"the archive ends after {tar.offset:,} bytes without its end marker "
                                            f"(a truncated or partly written shard)")
            if current is not None:
                yield current
        except (tarfile.TarError, OSError, EOFError) as exc:
            if storage.transient(exc):
                raise storage.store_error("data.path", str(shard), "could not be read to the end", exc) from None
            raise XAuditError(f"ingest: WebDataset shard {storage.redact(shard)!r} could not be read to the end: "
                              f"{_reason(exc)}") from None


def _webdataset_rows(path: Path | str, spec: DataSpec, with_bytes: bool) -> Iterator[dict[str, Any]]:
    """Yield a WebDataset's samples as rows: id, image, label (as text) and the JSON's scalar fields."""
    for s in _webdataset_samples(path, spec, with_bytes):
        label = s["label"] if s["label"] is not None else s["json"].get(spec.label_column)
        meta = {k: v for k, v in s["json"].items() if k not in (spec.label_column, spec.id_column, spec.image_column)
                and (v is None or isinstance(v, (str, int, float, bool)))}
        yield {spec.id_column: s["key"], spec.image_column: s["image"],
               spec.label_column: None if label is None else str(label), **meta, READ_ERROR: s.get("error")}


def _webdataset_schema(path: Path | str, spec: DataSpec) -> tuple[pa.Schema, int]:
    """Return the schema of a WebDataset's rows (a first pass over the members, images not kept) and its number
    of samples. A JSON field whose values have several types is text (int and float: float)."""
    kinds: dict[str, set[str]] = {}
    n = 0
    for row in _webdataset_rows(path, spec, with_bytes=False):
        n += 1
        for k, v in row.items():
            if k in (spec.id_column, spec.image_column, spec.label_column, READ_ERROR):
                continue
            kinds.setdefault(k, set())
            if v is not None:
                kinds[k].add(type(v).__name__)
    if n == 0:
        raise XAuditError(f"ingest: WebDataset {str(path)!r} holds no samples")
    one = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    fields = [pa.field(spec.id_column, pa.string()), pa.field(spec.image_column, pa.binary()),
              pa.field(spec.label_column, pa.string())]
    for k, types in kinds.items():
        fields.append(pa.field(k, one[next(iter(types))] if len(types) == 1 else
                               pa.float64() if types <= {"int", "float"} else pa.string()))
    return pa.schema([*fields, pa.field(READ_ERROR, pa.string())]), n


def _webdataset_batches(path: Path | str, spec: DataSpec, schema: pa.Schema, size: int = 256,
                        with_bytes: bool = True) -> Iterator[pa.RecordBatch]:
    """Stream a WebDataset as record batches of `schema` (a second pass; images read as they come, or not
    at all without `with_bytes`, for counting)."""
    text = {f.name for f in schema if f.type == pa.string()}
    floats = {f.name for f in schema if f.type == pa.float64()}
    rows: list[dict[str, Any]] = []
    for row in _webdataset_rows(path, spec, with_bytes=with_bytes):
        for k, v in row.items():
            if v is not None and k in text and not isinstance(v, str):
                row[k] = str(v)
            elif v is not None and k in floats:
                row[k] = float(v)
        rows.append(row)
        if len(rows) == size:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


def _manifest_base(path: Path | str) -> Path | str:
    return str(path).rsplit("/", 1)[0] if storage.is_url(path) else Path(path).resolve().parent


def _filter_expression(spec: DataSpec, schema: pa.Schema):
    expr = None
    for col, want in spec.filter.items():
        if col not in schema.names:
            raise XAuditError(f"ingest: 'data.filter' names column {col!r}, which the dataset does not have; "
                              f"columns are {schema.names}")
        values = want if isinstance(want, list) else [want]
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise XAuditError(f"ingest: 'data.filter.{col}' must be a value or a non-empty list of values; got {want!r}")
        try:
            term = ds.field(col).isin(pa.array(values).cast(schema.field(col).type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
            raise XAuditError(f"ingest: 'data.filter.{col}' values {values!r} do not fit the column's type "
                              f"{schema.field(col).type}") from None
        expr = term if expr is None else expr & term
    return expr


def _source_format(spec: DataSpec) -> tuple[Path | str, str]:
    if storage.is_url(spec.path):
        if spec.format == "imagefolder":
            raise XAuditError(f"ingest: 'data.format' imagefolder needs a local directory; {spec.path!r} is a URL "
                              f"(store the images as Parquet there, or list them in a manifest)")
        storage.info(spec.path, "data.path")          # exists, reachable, with credentials
        if spec.format != "auto":
            return spec.path, spec.format
        return spec.path, {".csv": "manifest", ".tar": "webdataset"}.get(Path(spec.path).suffix.lower(), "parquet")
    path = Path(spec.path)
    if not path.exists():
        raise XAuditError(f"ingest: 'data.path' must be a Parquet file or folder, an ImageFolder directory or a "
                          f"manifest; {str(path)!r} does not exist")
    fmt = spec.format
    if fmt == "auto":
        if path.is_dir():
            fmt = "parquet" if any(path.glob("*.parquet")) else "webdataset" if any(path.glob("*.tar")) \
                else "imagefolder"
        else:
            fmt = {".csv": "manifest", ".tar": "webdataset"}.get(path.suffix.lower(), "parquet")
    if fmt == "manifest" and path.is_dir():
        raise XAuditError(f"ingest: 'data.format' manifest needs a CSV or Parquet file; {str(path)!r} is a directory")
    if fmt == "imagefolder" and not path.is_dir():
        raise XAuditError(f"ingest: 'data.format' imagefolder needs a directory; {str(path)!r} is a file")
    return path, fmt


def _parquet_dataset(path: Path | str) -> ds.Dataset:
    if storage.is_url(path):
        return storage.parquet_dataset(path, "data.path")
    try:
        return ds.dataset(str(path), format="parquet")
    except (pa.ArrowException, OSError) as exc:
        raise XAuditError(f"ingest: 'data.path' {str(path)!r} is not readable Parquet: {_reason(exc)}") from None


def _distinct_roles(spec: DataSpec, roles: tuple[str, ...], names: list[str]) -> None:
    """Raise if two of the data's roles (id, image, label, ...) name the same column."""
    given = [(r, getattr(spec, r)) for r in roles if getattr(spec, r)]
    for i, (role, col) in enumerate(given):
        for other, col2 in given[i + 1:]:
            if col == col2:
                raise XAuditError(f"ingest: 'data.{role}' and 'data.{other}' are both {col!r}; each role needs its "
                                  f"own column; columns are {names}")


def _check_columns(spec: DataSpec, schema: pa.Schema) -> None:
    names = schema.names
    for role in ("id_column", "image_column", "label_column"):
        col = getattr(spec, role)
        if col not in names:
            raise XAuditError(f"ingest: 'data.{role}' is {col!r}, which the dataset does not have; columns are {names}")
    if spec.roi_column and spec.roi_column not in names:
        raise XAuditError(f"ingest: 'data.roi_column' is {spec.roi_column!r}, which the dataset does not have; "
                          f"columns are {names}")
    _distinct_roles(spec, ("id_column", "image_column", "label_column", "roi_column"), names)
    label_type = schema.field(spec.label_column).type
    if pa.types.is_dictionary(label_type):
        label_type = label_type.value_type
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type) or pa.types.is_boolean(label_type)
            or pa.types.is_string(label_type) or pa.types.is_large_string(label_type) or pa.types.is_null(label_type)):
        raise XAuditError(f"ingest: 'data.label_column' {spec.label_column!r} must hold class names or class indices "
                          f"(text or whole numbers); it holds {schema.field(spec.label_column).type}")
    for role in ("image_column", "roi_column"):
        col = getattr(spec, role)
        if col and not (_is_binary(schema.field(col).type) or _image_struct(schema.field(col).type)):
            raise XAuditError(f"ingest: 'data.{role}' {col!r} must hold encoded image bytes (binary, or a Hugging "
                              f"Face image struct {{bytes, path}}); it holds {schema.field(col).type}")


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_struct(t: pa.DataType) -> bool:
    """True for the Hugging Face `datasets` Image feature as Parquet stores it: struct<bytes: binary, path: string>."""
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _image_bytes(batches: Iterator[pa.RecordBatch], spec: DataSpec) -> Iterator[pa.RecordBatch]:
    """Yield `batches` with a Hugging Face image struct column replaced by its `bytes` (an image given only by
    its `path` has no bytes in the file: its row is rejected as an empty image, with that reason)."""
    for batch in batches:
        for col in (spec.image_column, spec.roi_column):
            if col and col in batch.schema.names and _image_struct(batch.schema.field(col).type):
                i = batch.schema.get_field_index(col)
                batch = batch.set_column(i, col, pc.struct_field(batch.column(i), "bytes"))
        yield batch


@dataclass(frozen=True)
class SourceInfo:
    """What the data source holds before any row is read: its format, schema, metadata columns, and the rows
    the filter (and limit) keep."""

    format: str
    schema: pa.Schema
    metadata_columns: tuple[str, ...]
    n_rows: int
    n_distinct_ids: int | None = None       # Parquet and manifests: distinct non-null ids among those rows


def inspect_source(spec: DataSpec) -> SourceInfo:
    """Return the source's format, schema, metadata columns and filtered row count; raise `XAuditError` for
    everything about the dataset as a whole that is wrong (path, format, columns, filter, no rows left)."""
    path, fmt = _source_format(spec)
    if fmt == "imagefolder":
        table = pa.Table.from_batches(list(_imagefolder_batches(path, spec, with_bytes=False)))
        schema = table.schema
        if spec.roi_column:
            raise XAuditError(f"ingest: 'data.roi_column' {spec.roi_column!r} cannot be read from an ImageFolder "
                              f"(it has only {schema.names}); convert the data to Parquet to give masks")
        expr = _filter_expression(spec, schema)
        n = (table.filter(expr) if expr is not None else table).num_rows
    elif fmt == "webdataset":
        if spec.roi_column:
            raise XAuditError("ingest: 'data.roi_column' cannot be read from a WebDataset; give masks in Parquet")
        schema, n = _webdataset_schema(path, spec)
        expr = _filter_expression(spec, schema)
        if expr is not None:
            n = sum(b.filter(expr).num_rows for b in _webdataset_batches(path, spec, schema, with_bytes=False))
    elif fmt == "manifest":
        table = _manifest_table(path, spec)
        schema = table.schema.append(pa.field(spec.image_column, pa.binary()))
        expr = _filter_expression(spec, table.schema)
        ids = (table.filter(expr) if expr is not None else table).column(spec.id_column)
        n = len(ids)
    else:
        dataset = _parquet_dataset(path)
        schema = dataset.schema
        _check_columns(spec, schema)
        expr = _filter_expression(spec, schema)
        try:        # the id column alone: whether ids identify rows is known before any image is read
            ids = dataset.to_table(columns=[spec.id_column], filter=expr).column(spec.id_column)
            n = len(ids)
        except (pa.ArrowException, OSError, ValueError) as exc:       # ValueError: from a store's fsspec layer
            raise XAuditError(f"ingest: 'data.path' {str(path)!r} could not be read: {_reason(exc)}") from None
    meta = metadata_columns(schema, spec)
    n = min(n, spec.limit) if spec.limit is not None else n
    if n == 0:
        raise XAuditError(f"ingest: no rows left in {str(spec.path)!r} after 'data.filter' {spec.filter}")
    distinct = None
    if fmt in ("manifest", "parquet"):
        distinct = int(pc.count_distinct(ids.slice(0, n), mode="only_valid").as_py())
    return SourceInfo(fmt, schema, tuple(meta), n, distinct)


def _source_batches(spec: DataSpec) -> tuple[Iterator[pa.RecordBatch], str, list[str]]:
    path, fmt = _source_format(spec)
    if fmt == "imagefolder":
        batches = _imagefolder_batches(path, spec)
        first = next(batches)
        schema = first.schema

        def chained():
            yield first
            yield from batches
        expr = _filter_expression(spec, schema)
        source = chained() if expr is None else (b.filter(expr) for b in chained())
        return source, fmt, schema.names
    if fmt == "webdataset":
        schema, _ = _webdataset_schema(path, spec)
        expr = _filter_expression(spec, schema)
        batches = _webdataset_batches(path, spec, schema)
        return (batches if expr is None else (b.filter(expr) for b in batches)), fmt, schema.names
    if fmt == "manifest":
        table = _manifest_table(path, spec)
        expr = _filter_expression(spec, table.schema)
        table = table.filter(expr) if expr is not None else table
        return _manifest_batches(table, _manifest_base(path), spec), fmt, [*table.column_names, spec.image_column]
    dataset = _parquet_dataset(path)
    _check_columns(spec, dataset.schema)
    expr = _filter_expression(spec, dataset.schema)
    return _image_bytes(dataset.to_batches(filter=expr, batch_size=256), spec), fmt, dataset.schema.names


_SCALAR = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
           pa.types.is_boolean, pa.types.is_dictionary, pa.types.is_date, pa.types.is_timestamp)


def metadata_columns(schema: pa.Schema, spec: DataSpec) -> list[str]:
    """Return the metadata columns: those configured, else every scalar column that is not id/image/label/roi.

    A metadata column may not be named like a column xaudit adds to predictions.parquet (`RESERVED_COLUMNS`),
    and a configured one must be a scalar column."""
    reserved = {spec.id_column, spec.image_column, spec.label_column, spec.roi_column, READ_ERROR}
    if spec.metadata_columns is not None:
        missing = [c for c in spec.metadata_columns if c not in schema.names]
        if missing:
            raise XAuditError(f"ingest: 'data.metadata_columns' names {missing}, which the dataset does not have; "
                              f"columns are {schema.names}")
        own = [c for c in spec.metadata_columns if c in reserved]
        if own:
            raise XAuditError(f"ingest: 'data.metadata_columns' names {own}, which the config already uses as the "
                              f"id, image, label or ROI column")
        nested = [c for c in spec.metadata_columns if not any(t(schema.field(c).type) for t in _SCALAR)]
        if nested:
            raise XAuditError(f"ingest: 'data.metadata_columns' must name scalar columns; {nested} hold "
                              f"{[str(schema.field(c).type) for c in nested]}")
        chosen = list(dict.fromkeys(spec.metadata_columns))
        where = "'data.metadata_columns' names"
    else:
        chosen = [f.name for f in schema if f.name not in reserved and any(t(f.type) for t in _SCALAR)]
        where = "the dataset has metadata column(s)"
    clash = [c for c in chosen if c in RESERVED_COLUMNS]
    if clash:
        raise XAuditError(f"ingest: {where} {clash}, named like column(s) xaudit adds to predictions.parquet "
                          f"{list(RESERVED_COLUMNS)}; rename them in the data, or list the metadata to keep in "
                          f"'data.metadata_columns' without them")
    return chosen


def _row_digest(row: dict[str, Any]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(row):
        value = row[key]
        h.update(key.encode())
        h.update(value if isinstance(value, bytes) else json.dumps(value, default=str).encode())
    return h.digest()


def _reason(exc: BaseException) -> str:
    """Return 'Type: message' for an exception, without object addresses (reasons must be the same in
    every run) and cut to one line of at most 300 characters."""
    text = _ADDRESS.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _shown(value: Any, limit: int = 60) -> str:
    """Return a value as safe, one-line text for a reason: control characters escaped, cut to `limit`."""
    text = ascii(value) if isinstance(value, str) else repr(value)
    text = text if isinstance(value, str) else text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _example_id(value: Any, column: str) -> tuple[str | None, str | None]:
    """Return (id as text, None), or (a printable form or None, the reason it cannot identify a row)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None, f"missing '{column}'"
    if isinstance(value, (bytes, bytearray, list, dict)):
        return None, f"'{column}' must be text or a number; got {type(value).__name__}"
    text = str(value)
    if text.strip() == "":
        return None, f"missing '{column}' (empty or blank)"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        return ascii(text)[1:-1][:200], f"'{column}' holds control characters: {_shown(text)}"
    if len(text) > 1024:
        return text[:60] + "...", f"'{column}' is longer than 1024 characters ({len(text)})"
    return text, None


def _reading(batches: Iterator[pa.RecordBatch], spec: DataSpec) -> Iterator[pa.RecordBatch]:
    """Yield the source's batches; a read error part-way (a truncated or corrupt file) is a data error."""
    try:
        yield from batches
    except (pa.ArrowException, OSError, ValueError) as exc:          # ValueError: from a store's fsspec layer
        raise XAuditError(f"ingest: 'data.path' {str(spec.path)!r} could not be read to the end: {_reason(exc)}") from None


def ingest(spec: DataSpec, out_dir: str | Path, shard_size: int) -> IngestResult:
    """Stream the filtered source into Parquet shards `out_dir/shard-NNNNN.parquet` of `shard_size` rows.

    The fingerprint is the sha256 over the per-row digests (every column, in source order), so it
    identifies the audited content whatever file it came from. Rows with a missing or repeated id cannot
    be told apart later: they go to `out_dir/ingest-rejects.parquet` with their reason.
    """
    out_dir = Path(out_dir)
    batches, fmt, _ = _source_batches(spec)
    fingerprint = hashlib.sha256()
    shards: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = n_rows = 0
    seen: set[str] = set()
    rejects: list[dict[str, str]] = []
    meta_cols: list[str] | None = None
    columns: list[str] | None = None

    def flush(final: bool = False) -> None:
        nonlocal pending, pending_rows
        while pending_rows >= shard_size or (final and pending_rows):
            table = pa.Table.from_batches(pending)
            head, tail = table.slice(0, shard_size), table.slice(shard_size)
            path = out_dir / f"shard-{len(shards):05d}.parquet"
            write_parquet(path, head)
            shards.append(str(path))
            pending, pending_rows = tail.to_batches(), tail.num_rows

    for batch in _reading(batches, spec):
        if meta_cols is None:
            meta_cols = metadata_columns(batch.schema, spec)
            columns = [c for c in dict.fromkeys([spec.id_column, spec.image_column, spec.label_column,
                                                 spec.roi_column, *meta_cols]) if c]
        unreadable = batch.column(READ_ERROR).to_pylist() if READ_ERROR in batch.schema.names else None
        batch = batch.select(columns)
        if spec.limit is not None:
            batch = batch.slice(0, max(0, spec.limit - n_rows))
        keep = []
        for i, row in enumerate(batch.to_pylist()):
            fingerprint.update(_row_digest(row))
            eid, problem = _example_id(row[spec.id_column], spec.id_column)
            if not problem and unreadable is not None and unreadable[i]:
                problem = unreadable[i]
                seen.add(eid)            # a later row with the same id is still a duplicate
            if problem:
                rejects.append({"example_id": eid or f"<row {n_rows + i}>", "stage": "ingest", "reason": problem})
            elif eid in seen:
                rejects.append({"example_id": eid, "stage": "ingest",
                                "reason": f"duplicate '{spec.id_column}' (first occurrence kept)"})
            else:
                seen.add(eid)
                keep.append(i)
        n_rows += batch.num_rows
        if len(keep) < batch.num_rows:
            batch = batch.take(pa.array(keep, type=pa.int64()))
        pending.append(batch)
        pending_rows += batch.num_rows
        flush()
        if spec.limit is not None and n_rows >= spec.limit:
            break
    flush(final=True)
    if n_rows == 0:
        raise XAuditError(f"ingest: no rows left in {str(spec.path)!r} after 'data.filter' {spec.filter}")
    write_parquet(out_dir / "ingest-rejects.parquet", rejects_table(rejects))
    return IngestResult(tuple(shards), n_rows, len(rejects), fingerprint.hexdigest(), str(spec.path), fmt,
                        tuple(meta_cols or ()))


class _Refused(ValueError):
    """A row's image or mask that is refused before decoding (too large, empty)."""


_INT_TEXT = re.compile(r"^[+-]?[0-9]+$")
_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def label_index(value: Any, class_names: tuple[str, ...], column: str = "label") -> tuple[int | None, str | None]:
    """Return (class index, None) for a label, or (None, the reason it is refused).

    A label is a class name, a whole number (int, a float with no fraction, or ASCII digits as text) in
    0..K-1, or a boolean (0/1). NaN, inf, fractions, other text and other types are refused."""
    k = len(class_names)
    if value is None:
        return None, f"missing '{column}'"
    if isinstance(value, str):
        if value in class_names:
            return class_names.index(value), None
        if not _INT_TEXT.match(value):
            return None, f"label {_shown(value)} is not one of the model's classes {_shown(list(class_names), 120)}"
        index = int(value)
    elif isinstance(value, (bool, np.bool_)):
        index = int(value)
    elif isinstance(value, (int, np.integer)):
        index = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None, f"label {value!r} is not a finite number"
        if value != int(value):
            return None, f"label {value!r} is not a whole class index"
        index = int(value)
    else:
        return None, f"label must be a class name or index; got {type(value).__name__} {_shown(value)}"
    if not 0 <= index < k:
        return None, f"label {_shown(value)} out of range: the model has {k} classes (0..{k - 1})"
    return index, None


def _open_checked(data: bytes, what: str) -> Image.Image:
    """Open encoded image bytes lazily and refuse, from the header alone, images above MAX_PIXELS."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:       # above twice the limit: Pillow refuses from the header
        raise _Refused(f"{what} is above the {MAX_PIXELS / 1e6:.0f} MP limit (refused before decoding: "
                       f"{_reason(exc)})") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise _Refused(f"{what} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise _Refused(f"{what} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the {MAX_PIXELS / 1e6:.0f} MP "
                       f"limit (refused before decoding)")
    return im


def _high_depth_array(im: Image.Image) -> np.ndarray:
    """Return a 16-bit or 32-bit greyscale image as floats in [0, 1]: 16-bit modes by 65535; 'I' by 255 when
    every value fits 8 bits, else by 65535; 'F' as is when within [0, 1], else like 'I'. Clipped to [0, 1]."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        scale = 65535.0
    else:
        top = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 1.0 if im.mode == "F" and top <= 1.0 else 255.0 if top <= 255 else 65535.0
    return np.clip(np.nan_to_num(arr / scale), 0.0, 1.0).astype(np.float32)


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX}


def fit_to_input(im: Image.Image, card: ModelCard, mask: bool = False) -> Image.Image:
    """Return `im` brought to the card's input size by its preprocessing policy (`card.preprocess`):
    'stretch' resizes to input_size; 'shorter_side' resizes the shorter side to resize_size keeping the
    aspect (the longer side truncated, as torchvision's Resize) and crops the centre (torchvision's
    CenterCrop: offsets rounded, zero padding where the image is smaller). Masks use nearest resampling so
    they stay aligned with their images."""
    h, w = card.input_size
    p = card.preprocess
    resample = Image.NEAREST if mask else _RESAMPLE[p.get("interpolation", "bilinear")]
    if p.get("resize", "stretch") == "stretch":
        return im if im.size == (w, h) else im.resize((w, h), resample)
    iw, ih = im.size
    short = int(p["resize_size"])
    nw, nh = (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
    if (nw, nh) != (iw, ih):
        im = im.resize((nw, nh), resample)
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    return im.crop((left, top, left + w, top + h))


def _decode_image(data: bytes, card: ModelCard) -> np.ndarray:
    """Return the image as (C, H, W) float32 in [0, 1] at the card's size (`fit_to_input`)."""
    with _open_checked(data, "image") as im:
        if im.mode in _HIGH_DEPTH:         # 16-bit PNG/TIFF: scale to [0, 1] instead of clipping to 8 bits
            grey = fit_to_input(Image.fromarray(_high_depth_array(im), mode="F"), card)
            arr = np.asarray(grey, dtype=np.float32)[None]
            return np.repeat(arr, card.channels, 0) if card.channels != 1 else arr
        im = fit_to_input(im.convert({1: "L", 3: "RGB", 4: "RGBA"}[card.channels]), card)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_mask(data: bytes, card: ModelCard) -> np.ndarray:
    with _open_checked(data, "region-of-interest mask") as im:
        if im.mode in _HIGH_DEPTH:
            im = Image.fromarray((np.asarray(im) != 0).astype(np.uint8) * 255, mode="L")
        return np.asarray(fit_to_input(im.convert("L"), card, mask=True)) > 0


def _decode_rows(cols: dict[str, list | None], rows: range, card: ModelCard, spec: DataSpec
                 ) -> tuple[list[tuple[int, str, np.ndarray, int, np.ndarray | None]], list[dict[str, str]]]:
    """Decode the raw rows `rows` of a shard's columns; return (row, id, image, label, mask) per good row and a
    reject per bad row. Runs in decoding threads (Pillow releases the GIL while it decodes)."""
    good, rejects = [], []
    roi_col = cols["roi"]
    for i in rows:
        eid, img, lab = cols["id"][i], cols["image"][i], cols["label"][i]
        rid = str(eid)

        def reject(reason: str) -> None:
            rejects.append({"example_id": rid, "stage": "decode", "reason": reason})
        label, problem = label_index(lab, card.class_names, spec.label_column)
        if problem:
            reject(problem)
            continue
        if not isinstance(img, (bytes, bytearray)) or not img:
            reject(f"missing or empty '{spec.image_column}'")
            continue
        try:
            arr = _decode_image(img, card)
        except _Refused as exc:
            reject(str(exc))
            continue
        except Exception as exc:  # Pillow raises many types on hostile bytes; a bad row never ends the audit
            reject(f"corrupt image: {_reason(exc)}")
            continue
        mask = None
        if roi_col is not None:
            if roi_col[i] is None:
                mask = np.zeros(card.input_size, dtype=bool)
            else:
                try:
                    if not isinstance(roi_col[i], (bytes, bytearray)):
                        raise _Refused(f"region-of-interest mask must be encoded image bytes; got "
                                       f"{type(roi_col[i]).__name__}")
                    mask = _decode_mask(roi_col[i], card)
                except _Refused as exc:
                    reject(str(exc))
                    continue
                except Exception as exc:  # as for images: a bad mask is a bad row
                    reject(f"corrupt region-of-interest mask: {_reason(exc)}")
                    continue
        good.append((i, rid, arr, label, mask))
    return good, rejects


def _open_shard(path: str | Path, spec: DataSpec) -> tuple[pa.Table, dict[str, list | None]]:
    # WeasyPrint sets Pillow's process-wide LOAD_TRUNCATED_IMAGES on import (for its own leniency), which
    # would make a truncated image decode as grey padding once a report has been rendered in this process
    # (the second config of `xaudit run A B`): a truncated image is a bad row here, always.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    table = pq.read_table(path)
    cols = {"id": table[spec.id_column].to_pylist(), "image": table[spec.image_column].to_pylist(),
            "label": table[spec.label_column].to_pylist(),
            "roi": table[spec.roi_column].to_pylist() if spec.roi_column else None}
    return table, cols


def _assemble(table: pa.Table, good: list, rejects: list[dict[str, str]], card: ModelCard, spec: DataSpec,
              pin: bool = False) -> DecodedShard:
    c, (h, w) = card.channels, card.input_size
    x = torch.from_numpy(np.stack([g[2] for g in good])) if good else torch.empty(0, c, h, w)
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    meta_cols = [n for n in table.column_names if n not in
                 {spec.id_column, spec.image_column, spec.label_column, spec.roi_column}]
    roi = None
    if spec.roi_column:
        roi = torch.from_numpy(np.stack([g[4] for g in good])) if good else torch.zeros(0, h, w, dtype=torch.bool)
    return DecodedShard(
        example_ids=[g[1] for g in good],
        inputs=x.pin_memory() if pin else x,
        labels=torch.tensor([g[3] for g in good], dtype=torch.long),
        roi=roi,
        metadata=table.select(meta_cols).take(pa.array([g[0] for g in good], type=pa.int64())),
        rejects=rejects,
    )


def decode_shard(path: str | Path, card: ModelCard, spec: DataSpec) -> DecodedShard:
    """Return the shard's good rows as normalised tensors, and a reject (with its reason) for every bad row."""
    table, cols = _open_shard(path, spec)
    good, rejects = _decode_rows(cols, range(table.num_rows), card, spec)
    return _assemble(table, good, rejects, card, spec)


def shard_rows(path: str | Path) -> int:
    """Rows of a shard, from its Parquet footer."""
    return pq.ParquetFile(path).metadata.num_rows


def decode_batches(path: str | Path, card: ModelCard, spec: DataSpec, batch_size: int, prefetch: int = 2,
                   workers: int = 2, pin: bool = False) -> Iterator[DecodedShard]:
    """Yield the shard's good rows in batches of exactly `batch_size` (the last one shorter), each carrying the
    rejects of the rows decoded since the previous one; at least one batch, possibly empty, is yielded.

    `workers` threads decode chunks of `batch_size` raw rows up to `prefetch` chunks ahead of the consumer,
    so batch k + 1 is decoded while batch k is explained, and decoded pixels in memory are bounded by about
    (prefetch + 2) x batch_size images, not by the shard. `pin` puts the batches in pinned memory (CUDA:
    the copy to the device can then be asynchronous). The batches equal `decode_shard`'s rows, in order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    table, cols = _open_shard(path, spec)
    n = table.num_rows
    chunks = iter(range(a, min(n, a + batch_size)) for a in range(0, n, batch_size))
    good: list = []
    rejects: list[dict[str, str]] = []
    yielded = False
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="xaudit-decode") as pool:
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < max(1, prefetch) and (chunk := next(chunks, None)) is not None:
                pending.append(pool.submit(_decode_rows, cols, chunk, card, spec))
        fill()
        try:
            while pending:
                more, bad = pending.popleft().result()
                fill()
                good += more
                rejects += bad
                while len(good) >= batch_size:
                    batch, good = good[:batch_size], good[batch_size:]
                    yield _assemble(table, batch, rejects, card, spec, pin)
                    rejects, yielded = [], True
            if good or rejects or not yielded:
                yield _assemble(table, good, rejects, card, spec, pin)
        finally:
            for f in pending:
                f.cancel()


def rejects_table(rows: list[dict[str, str]]) -> pa.Table:
    """Return rejects as an Arrow table with the `example_id, stage, reason` schema (possibly empty)."""
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)

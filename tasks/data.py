"""Dataset ingest: filter the source into Parquet input shards, fingerprint it, decode shards to tensors.

Bad rows are never silently dropped: each becomes a reject (example id, stage, reason). Errors about the
dataset as a whole (missing path, unknown column) raise `XAuditError`.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from .config import DataSpec
from .errors import XAuditError
from .io import write_parquet
from .models import ModelCard

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
REJECT_SCHEMA = pa.schema([("example_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
# Decoded images bigger than this are refused (decompression bombs).
Image.MAX_IMAGE_PIXELS = 64_000_000


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


def _imagefolder_batches(root: Path, spec: DataSpec) -> Iterator[pa.RecordBatch]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise XAuditError(f"ingest: ImageFolder {str(root)!r} must contain one folder per class; found none")
    rows: list[dict[str, Any]] = []
    for cls in classes:
        for f in sorted((root / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({spec.id_column: f.relative_to(root).as_posix(), spec.image_column: f.read_bytes(),
                             spec.label_column: cls, "folder": cls})
                if len(rows) == 256:
                    yield pa.RecordBatch.from_pylist(rows)
                    rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows)


def _filter_expression(spec: DataSpec, names: list[str]):
    expr = None
    for col, want in spec.filter.items():
        if col not in names:
            raise XAuditError(f"ingest: 'data.filter' names column {col!r}, which the dataset does not have; "
                              f"columns are {names}")
        values = want if isinstance(want, list) else [want]
        term = ds.field(col).isin(values)
        expr = term if expr is None else expr & term
    return expr


def _source_batches(spec: DataSpec) -> tuple[Iterator[pa.RecordBatch], str, list[str]]:
    path = Path(spec.path)
    if not path.exists():
        raise XAuditError(f"ingest: 'data.path' must be a Parquet file or an ImageFolder directory; "
                          f"{str(path)!r} does not exist")
    fmt = spec.format
    if fmt == "auto":
        fmt = "imagefolder" if path.is_dir() and not any(path.glob("*.parquet")) else "parquet"
    if fmt == "imagefolder":
        batches = _imagefolder_batches(path, spec)
        first = next(batches, None)
        if first is None:
            raise XAuditError(f"ingest: ImageFolder {str(path)!r} holds no images ({sorted(IMAGE_EXTENSIONS)})")
        names = first.schema.names

        def chained():
            yield first
            yield from batches
        expr = _filter_expression(spec, names)
        source = chained() if expr is None else (b.filter(expr) for b in chained())
        return source, fmt, names
    try:
        dataset = ds.dataset(str(path), format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise XAuditError(f"ingest: 'data.path' {str(path)!r} is not readable Parquet: {exc}") from None
    names = dataset.schema.names
    for role in ("id_column", "image_column", "label_column"):
        col = getattr(spec, role)
        if col not in names:
            raise XAuditError(f"ingest: 'data.{role}' is {col!r}, which the dataset does not have; columns are {names}")
    if spec.roi_column and spec.roi_column not in names:
        raise XAuditError(f"ingest: 'data.roi_column' is {spec.roi_column!r}, which the dataset does not have; "
                          f"columns are {names}")
    expr = _filter_expression(spec, names)
    return dataset.to_batches(filter=expr, batch_size=256), fmt, names


def metadata_columns(schema: pa.Schema, spec: DataSpec) -> list[str]:
    """Return the metadata columns: those configured, else every scalar column that is not id/image/label/roi."""
    reserved = {spec.id_column, spec.image_column, spec.label_column, spec.roi_column}
    if spec.metadata_columns is not None:
        missing = [c for c in spec.metadata_columns if c not in schema.names]
        if missing:
            raise XAuditError(f"ingest: 'data.metadata_columns' names {missing}, which the dataset does not have; "
                              f"columns are {schema.names}")
        return list(spec.metadata_columns)
    scalar = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
              pa.types.is_boolean, pa.types.is_dictionary)
    return [f.name for f in schema if f.name not in reserved and any(t(f.type) for t in scalar)]


def _row_digest(row: dict[str, Any]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(row):
        value = row[key]
        h.update(key.encode())
        h.update(value if isinstance(value, bytes) else json.dumps(value, default=str).encode())
    return h.digest()


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

    for batch in batches:
        if meta_cols is None:
            meta_cols = metadata_columns(batch.schema, spec)
            columns = [c for c in dict.fromkeys([spec.id_column, spec.image_column, spec.label_column,
                                                 spec.roi_column, *meta_cols]) if c]
        batch = batch.select(columns)
        if spec.limit is not None:
            batch = batch.slice(0, max(0, spec.limit - n_rows))
        keep = []
        for i, row in enumerate(batch.to_pylist()):
            fingerprint.update(_row_digest(row))
            eid = row[spec.id_column]
            if eid is None or str(eid) == "":
                rejects.append({"example_id": f"<row {n_rows + i}>", "stage": "ingest",
                                "reason": f"missing '{spec.id_column}'"})
            elif str(eid) in seen:
                rejects.append({"example_id": str(eid), "stage": "ingest",
                                "reason": f"duplicate '{spec.id_column}' (first occurrence kept)"})
            else:
                seen.add(str(eid))
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


def _decode_image(data: bytes, card: ModelCard) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if card.channels == 1 else "RGB")
        h, w = card.input_size
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        h, w = size
        if im.size != (w, h):
            im = im.resize((w, h), Image.NEAREST)
        return np.asarray(im) > 0


def decode_shard(path: str | Path, card: ModelCard, spec: DataSpec) -> DecodedShard:
    """Return the shard's good rows as normalised tensors, and a reject (with its reason) for every bad row."""
    table = pq.read_table(path)
    name_to_index = {n: i for i, n in enumerate(card.class_names)}
    ids, images, labels, masks, keep, rejects = [], [], [], [], [], []
    id_col = table[spec.id_column].to_pylist()
    img_col = table[spec.image_column].to_pylist()
    lab_col = table[spec.label_column].to_pylist()
    roi_col = table[spec.roi_column].to_pylist() if spec.roi_column else None
    for i, (eid, img, lab) in enumerate(zip(id_col, img_col, lab_col)):
        rid = str(eid)

        def reject(reason: str) -> None:
            rejects.append({"example_id": rid, "stage": "decode", "reason": reason})
        if lab is None:
            reject(f"missing '{spec.label_column}'")
            continue
        if isinstance(lab, str):
            if lab in name_to_index:
                label = name_to_index[lab]
            elif lab.lstrip("-").isdigit():
                label = int(lab)
            else:
                reject(f"label {lab!r} is not one of the model's classes {list(card.class_names)}")
                continue
        else:
            label = int(lab)
        if not 0 <= label < card.num_classes:
            reject(f"label {lab!r} out of range: the model has {card.num_classes} classes (0..{card.num_classes - 1})")
            continue
        if not isinstance(img, (bytes, bytearray)) or not img:
            reject(f"missing or empty '{spec.image_column}'")
            continue
        try:
            arr = _decode_image(img, card)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            reject(f"corrupt image: {type(exc).__name__}: {exc}")
            continue
        if roi_col is not None:
            if roi_col[i] is None:
                mask = np.zeros(card.input_size, dtype=bool)
            else:
                try:
                    mask = _decode_mask(roi_col[i], card.input_size)
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    reject(f"corrupt region-of-interest mask: {type(exc).__name__}: {exc}")
                    continue
            masks.append(mask)
        ids.append(rid)
        images.append(arr)
        labels.append(label)
        keep.append(i)
    c, (h, w) = card.channels, card.input_size
    x = torch.from_numpy(np.stack(images)) if images else torch.empty(0, c, h, w)
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    meta_cols = [n for n in table.column_names if n not in
                 {spec.id_column, spec.image_column, spec.label_column, spec.roi_column}]
    return DecodedShard(
        example_ids=ids,
        inputs=(x - mean) / std,
        labels=torch.tensor(labels, dtype=torch.long),
        roi=torch.from_numpy(np.stack(masks)) if roi_col is not None and masks else
        (torch.zeros(0, h, w, dtype=torch.bool) if roi_col is not None else None),
        metadata=table.select(meta_cols).take(pa.array(keep, type=pa.int64())),
        rejects=rejects,
    )


def rejects_table(rows: list[dict[str, str]]) -> pa.Table:
    """Return rejects as an Arrow table with the `example_id, stage, reason` schema (possibly empty)."""
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)

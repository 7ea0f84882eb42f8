"""Dataset layouts users have besides xaudit's own Parquet: the Hugging Face `datasets` Parquet layout, whose
Image feature is a struct {bytes, path}. The same rows must decode to the same tensors as in the plain
layout, and an image given only by a path (no bytes in the file) is a reject with its reason."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DATA
from tasks.config import DataSpec, ModelSpec
from tasks.data import decode_shard, ingest, inspect_source
from tasks.errors import XAuditError
from tasks.models import resolve_card

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def rows():
    t = pq.read_table(DATA / "digits.parquet").to_pandas()
    return t[t.split == "test"].head(12).reset_index(drop=True)


def test_hugging_face_image_structs_decode_as_the_plain_bytes_do(rows, tmp_path):
    card = resolve_card(ModelSpec(card=DATA / "models" / "baseline.json"))
    images = [{"bytes": b, "path": f"train/{i}.png"} for i, b in enumerate(rows.image_png)]
    images[3] = {"bytes": None, "path": "elsewhere/3.png"}          # stored by path only
    hf = tmp_path / "hf" / "data"
    hf.mkdir(parents=True)
    pq.write_table(pa.table({"example_id": rows.example_id, "image": pa.array(images, IMAGE), "label": rows.label,
                             "site": rows.site}), hf / "test-00000-of-00001.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"example_id": rows.example_id, "image": rows.image_png, "label": rows.label,
                             "site": rows.site}), plain)
    spec = DataSpec(path=hf, image_column="image")
    info = inspect_source(spec)
    assert info.n_rows == 12 and info.metadata_columns == ("site",)       # the struct is not metadata
    got = decode_shard(ingest(spec, tmp_path / "a", 64).shards[0], card, spec)
    want = decode_shard(ingest(DataSpec(path=plain, image_column="image"), tmp_path / "b", 64).shards[0], card,
                        DataSpec(path=plain, image_column="image"))
    assert got.rejects == [{"example_id": rows.example_id[3], "stage": "decode", "reason": "missing or empty 'image'"}]
    keep = [i for i, e in enumerate(want.example_ids) if e != rows.example_id[3]]
    assert got.example_ids == [want.example_ids[i] for i in keep]
    assert torch.equal(got.inputs, want.inputs[keep]) and torch.equal(got.labels, want.labels[keep])


def test_a_struct_without_bytes_is_refused_by_name(rows, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"example_id": rows.example_id, "label": rows.label,
                             "image": pa.array([{"path": "x"}] * len(rows), pa.struct([("path", pa.string())]))}), path)
    with pytest.raises(XAuditError, match=r"'data.image_column' 'image' must hold encoded image bytes"):
        inspect_source(DataSpec(path=path, image_column="image"))

"""Dataset layouts users have besides xaudit's own Parquet: the Hugging Face `datasets` Parquet layout, whose
Image feature is a struct {bytes, path}. The same rows must decode to the same tensors as in the plain
layout, and an image given only by a path (no bytes in the file) is a reject with its reason."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DATA
from xaudit.tasks.config import DataSpec, ModelSpec
from xaudit.tasks.data import decode_shard, ingest, inspect_source
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.models import resolve_card

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


def _write_images(rows, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for e, b in zip(rows.example_id, rows.image_png):
        (folder / f"{e}.png").write_bytes(b)


def test_a_manifest_of_image_paths_and_urls_decodes_as_the_images_do_and_bad_members_are_rejects(rows, tmp_path):
    import fsspec
    import pandas as pd
    card = resolve_card(ModelSpec(card=DATA / "models" / "baseline.json"))
    _write_images(rows, tmp_path / "imgs")
    mem = fsspec.filesystem("memory")
    mem.pipe("/xaudit-formats/remote.png", rows.image_png[1])
    paths = [f"imgs/{e}.png" for e in rows.example_id]
    paths[1] = "memory://xaudit-formats/remote.png"                   # a URL member
    paths[2] = "imgs/missing.png"                                      # no such file
    paths[4] = "../outside.png"                                        # leaves the manifest's folder
    paths[6] = ""                                                      # no path
    manifest = pd.DataFrame({"example_id": rows.example_id, "path": paths, "label": rows.label, "site": rows.site})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    spec = DataSpec(path=tmp_path / "manifest.csv", allow_outside_members=True)     # the URL member
    info = inspect_source(spec)
    assert info.format == "manifest" and info.n_rows == 12 and set(info.metadata_columns) == {"path", "site"}
    result = ingest(spec, tmp_path / "a", 64)
    rejects = pq.read_table(tmp_path / "a" / "ingest-rejects.parquet").to_pylist()
    assert [(r["example_id"], r["reason"]) for r in rejects] == [
        (rows.example_id[2], "image 'imgs/missing.png' cannot be read: FileNotFoundError"),
        (rows.example_id[4], "image path '../outside.png' leaves the manifest's folder (members must lie under "
                             "it unless 'data.allow_outside_members' is true)"),
        (rows.example_id[6], "missing image path")]
    got = decode_shard(result.shards[0], card, spec)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"example_id": rows.example_id, "image_png": rows.image_png, "label": rows.label}), plain)
    want = decode_shard(ingest(DataSpec(path=plain), tmp_path / "b", 64).shards[0], card, DataSpec(path=plain))
    keep = [i for i in range(12) if i not in (2, 4, 6)]
    assert got.example_ids == [want.example_ids[i] for i in keep] and got.rejects == []
    assert torch.equal(got.inputs, want.inputs[keep])
    assert got.metadata.column("site").to_pylist() == [rows.site[i] for i in keep]


def test_a_manifest_missing_its_path_column_is_refused_by_name(rows, tmp_path):
    import pandas as pd
    pd.DataFrame({"example_id": rows.example_id, "file": "x.png", "label": rows.label}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(XAuditError, match=r"'data.path_column' is 'path', which the manifest does not have"):
        inspect_source(DataSpec(path=tmp_path / "m.csv"))


def test_a_manifest_whose_roles_share_a_column_is_refused_by_name(rows, tmp_path):
    import pandas as pd
    pd.DataFrame({"example_id": rows.example_id, "path": "x.png", "label": rows.label}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(XAuditError, match=r"'data.id_column' and 'data.label_column' are both 'label'"):
        inspect_source(DataSpec(path=tmp_path / "m.csv", id_column="label"))


def test_an_imagefolder_takes_its_metadata_from_a_sidecar_keyed_by_path(rows, tmp_path):
    import pandas as pd
    for i, (e, b) in enumerate(zip(rows.example_id, rows.image_png)):
        folder = tmp_path / "folder" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{e}.png").write_bytes(b)
    ids = [f"{'even' if i % 2 == 0 else 'odd'}/{e}.png" for i, e in enumerate(rows.example_id)]
    side = pd.DataFrame({"example_id": ids[:-1], "camera": [f"cam{i % 3}" for i in range(11)]})  # last one absent
    side.to_csv(tmp_path / "meta.csv", index=False)
    spec = DataSpec(path=tmp_path / "folder", metadata_file=tmp_path / "meta.csv")
    info = inspect_source(spec)
    assert info.format == "imagefolder" and "camera" in info.metadata_columns
    ingest(spec, tmp_path / "out", 64)
    shard = pq.read_table(tmp_path / "out" / "shard-00000.parquet").to_pandas().set_index("example_id")
    assert shard.loc[ids[0], "camera"] == "cam0" and shard.loc[ids[10], "camera"] == "cam1"
    assert pd.isna(shard.loc[ids[11], "camera"]) and shard.loc[ids[1], "folder"] == "odd"
    side.assign(folder="x").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(XAuditError, match=r"'data.metadata_file' .* has column\(s\) \['folder'\]"):
        inspect_source(DataSpec(path=tmp_path / "folder", metadata_file=tmp_path / "bad.csv"))


def _tar(path, members):
    import io
    import tarfile
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_decode_as_the_images_do_and_bad_samples_are_rejects(rows, tmp_path):
    import json
    card = resolve_card(ModelSpec(card=DATA / "models" / "baseline.json"))
    folder = tmp_path / "wds"
    folder.mkdir()
    members = []
    for i, (e, b, y, site) in enumerate(zip(rows.example_id, rows.image_png, rows.label, rows.site)):
        if i == 3:
            members.append((f"{e}.cls", str(y).encode()))                     # no image member
            continue
        members.append((f"{e}.png", b))
        if i == 5:
            continue                                                           # no label
        if i % 2:
            members.append((f"{e}.json", json.dumps({"label": int(y), "site": site, "score": i / 2}).encode()))
        else:
            members.append((f"{e}.cls", str(y).encode()))
            members.append((f"{e}.json", json.dumps({"site": site, "score": i}).encode()))   # int and float: float
    cut = next(i for i, (name, _) in enumerate(members) if name.startswith(rows.example_id[6]))   # samples 0-5 | 6-11
    _tar(folder / "shard-000000.tar", members[:cut])
    _tar(folder / "shard-000001.tar", members[cut:])
    spec = DataSpec(path=folder)
    info = inspect_source(spec)
    assert info.format == "webdataset" and info.n_rows == 12 and set(info.metadata_columns) == {"site", "score"}
    result = ingest(spec, tmp_path / "a", 64)
    got = decode_shard(result.shards[0], card, spec)
    assert {(r["example_id"], r["reason"]) for r in got.rejects} == {
        (rows.example_id[3], "missing or empty 'image_png'"), (rows.example_id[5], "missing 'label'")}
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"example_id": rows.example_id, "image_png": rows.image_png, "label": rows.label}), plain)
    want = decode_shard(ingest(DataSpec(path=plain), tmp_path / "b", 64).shards[0], card, DataSpec(path=plain))
    keep = [i for i in range(12) if i not in (3, 5)]
    assert got.example_ids == [want.example_ids[i] for i in keep]
    assert torch.equal(got.inputs, want.inputs[keep]) and torch.equal(got.labels, want.labels[keep])
    assert got.metadata.column("site").to_pylist() == [rows.site[i] for i in keep]
    assert inspect_source(DataSpec(path=folder, filter={"site": "A"})).n_rows == int((rows.site == "A").sum())
    # a truncated shard is a data error naming it, not a crash
    data = (folder / "shard-000001.tar").read_bytes()
    (folder / "shard-000001.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(XAuditError, match=r"WebDataset shard .*shard-000001.tar.* could not be read to the end"):
        ingest(spec, tmp_path / "c", 64)


def test_oversized_members_are_not_read_and_are_rejects_with_their_reason(rows, tmp_path, monkeypatch):
    """A tar or manifest member above the size cap (a decompression- or memory-bomb) is never read into memory."""
    import pandas as pd
    import xaudit.tasks.data as data
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 100)
    big = next(i for i, b in enumerate(rows.image_png) if len(b) > 100)
    _write_images(rows, tmp_path / "imgs")
    pd.DataFrame({"example_id": rows.example_id, "path": [f"imgs/{e}.png" for e in rows.example_id],
                  "label": rows.label}).to_csv(tmp_path / "m.csv", index=False)
    ingest(DataSpec(path=tmp_path / "m.csv"), tmp_path / "a", 64)
    reasons = {r["example_id"]: r["reason"] for r in pq.read_table(tmp_path / "a" / "ingest-rejects.parquet").to_pylist()}
    assert reasons[rows.example_id[big]] == f"image 'imgs/{rows.example_id[big]}.png' is larger than 0 MiB"
    _tar(tmp_path / "w.tar", [m for e, b in zip(rows.example_id, rows.image_png) for m in ((f"{e}.png", b), (f"{e}.cls", b"1"))])
    ingest(DataSpec(path=tmp_path / "w.tar"), tmp_path / "b", 64)
    reasons = {r["example_id"]: r["reason"] for r in pq.read_table(tmp_path / "b" / "ingest-rejects.parquet").to_pylist()}
    assert reasons[rows.example_id[big]].startswith(f"image member '{rows.example_id[big]}.png' is larger than")

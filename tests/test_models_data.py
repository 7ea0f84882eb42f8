"""Model loading (safe weights only) and data ingest (filters, fingerprints, rejects)."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import DATA, png, write_rows
from xaudit.tasks.config import DataSpec, ModelSpec
from xaudit.tasks.data import decode_shard, ingest
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.models import build_model, read_state_dict, resolve_card
from xaudit.tasks.nets import DemoCNN


def test_demo_card_resolves_and_hashes_weights(demo_card):
    assert demo_card.name == "digits-baseline" and demo_card.num_classes == 10
    assert len(demo_card.weights_sha256) == 64
    model = build_model(demo_card)
    assert not model.training
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(DemoCNN(), path)                    # a whole pickled module, not a state dict
    with pytest.raises(XAuditError, match="must be a safetensors or state-dict file"):
        read_state_dict(path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(XAuditError, match="weights_only"):
        read_state_dict(evil)


def test_weights_only_state_dict_loads(tmp_path, demo_card):
    path = tmp_path / "w.pt"
    torch.save(build_model(demo_card).state_dict(), path)
    card = resolve_card(ModelSpec(card=DATA / "models" / "baseline.json", weights=path))
    assert card.weights == str(path)
    build_model(card)


@pytest.mark.parametrize("spec, match", [
    (dict(card="nope.json"), "'model.card' must be an existing JSON model card"),
    (dict(card=str(DATA / "models" / "baseline.json"), weights="missing.safetensors"), "'weights' must be an existing"),
    (dict(card=str(DATA / "models" / "baseline.json"), factory="torchvision.models:no_such_net"), "could not import"),
    (dict(card=str(DATA / "models" / "baseline.json"), kwargs={"num_classes": 7}), "do not fit"),
])
def test_bad_model_specs_are_clear_errors(spec, match):
    with pytest.raises(XAuditError, match=match):
        build_model(resolve_card(ModelSpec(**spec)))


def test_ingest_filters_shards_and_fingerprints(tmp_path):
    spec = DataSpec(path=DATA / "digits.parquet", filter={"split": "test", "site": ["A", "C"]},
                    roi_column="roi_png")
    res = ingest(spec, tmp_path / "a", shard_size=100)
    src = pq.read_table(DATA / "digits.parquet").to_pandas()
    expected = src[(src.split == "test") & src.site.isin(["A", "C"])]
    assert res.n_rows == len(expected) and res.n_rejected == 0
    assert len(res.shards) == -(-len(expected) // 100)
    got = pq.read_table(res.shards[0])
    assert got["example_id"].to_pylist() == expected.example_id[:100].tolist()
    assert ingest(spec, tmp_path / "b", shard_size=37).fingerprint == res.fingerprint   # not the sharding
    other = DataSpec(path=DATA / "digits.parquet", filter={"split": "test", "site": ["A"]})
    assert ingest(other, tmp_path / "c", shard_size=100).fingerprint != res.fingerprint


def test_unknown_filter_column_and_missing_path_are_clear_errors(tmp_path):
    with pytest.raises(XAuditError, match="'data.filter' names column 'hospital'"):
        ingest(DataSpec(path=DATA / "digits.parquet", filter={"hospital": "X"}), tmp_path, 10)
    with pytest.raises(XAuditError, match="does not exist"):
        ingest(DataSpec(path=tmp_path / "nothing.parquet"), tmp_path, 10)
    with pytest.raises(XAuditError, match="no rows left"):
        ingest(DataSpec(path=DATA / "digits.parquet", filter={"site": "Z"}), tmp_path, 10)


def test_bad_rows_become_rejects_with_reasons(tmp_path, demo_card):
    good = png(np.full((32, 32), 128))
    rows = [
        {"example_id": "ok", "image_png": good, "label": 3, "site": "A"},
        {"example_id": "corrupt", "image_png": b"\x89PNG not really", "label": 1, "site": "A"},
        {"example_id": "range", "image_png": good, "label": 12, "site": "B"},
        {"example_id": "named", "image_png": good, "label": "7", "site": "B"},
        {"example_id": "ok", "image_png": good, "label": 2, "site": "C"},          # duplicate id
        {"example_id": None, "image_png": good, "label": 2, "site": "C"},
        {"example_id": "nolabel", "image_png": good, "label": None, "site": "C"},
    ]
    rows = [{**r, "label": None if r["label"] is None else str(r["label"])} for r in rows]
    path = write_rows(tmp_path / "bad.parquet", rows)
    spec = DataSpec(path=path)
    res = ingest(spec, tmp_path / "inputs", 100)
    assert res.n_rows == 7 and res.n_rejected == 2
    ingest_rejects = pq.read_table(tmp_path / "inputs" / "ingest-rejects.parquet").to_pylist()
    assert {r["reason"].split(" ")[0] for r in ingest_rejects} == {"duplicate", "missing"}
    shard = decode_shard(res.shards[0], demo_card, spec)
    assert shard.example_ids == ["ok", "named"]
    assert shard.labels.tolist() == [3, 7]
    reasons = {r["example_id"]: r["reason"] for r in shard.rejects}
    assert reasons["corrupt"].startswith("corrupt image")
    assert "out of range" in reasons["range"] and "10 classes" in reasons["range"]
    assert reasons["nolabel"] == "missing 'label'"
    assert shard.inputs.shape == (2, 1, 32, 32)
    assert shard.metadata["site"].to_pylist() == ["A", "B"]


def test_decode_batches_equal_the_whole_shard_in_exact_batches_with_bounded_read_ahead(tmp_path, demo_card,
                                                                                     monkeypatch):
    import threading
    import time as _time

    import xaudit.tasks.data as data
    from xaudit.tasks.data import decode_batches
    rng = np.random.default_rng(0)
    rows = []
    for i in range(23):
        bad = i in (2, 3, 11, 20)        # rejects spread over several chunks
        rows.append({"example_id": f"e{i:02d}", "image_png": b"not an image" if bad else
                     png(rng.integers(0, 255, (40, 40)).astype(np.uint8)), "label": str(i % 10), "site": "AB"[i % 2]})
    spec = DataSpec(path=write_rows(tmp_path / "rows.parquet", rows))
    shard = ingest(spec, tmp_path / "inputs", 100).shards[0]
    whole = decode_shard(shard, demo_card, spec)
    for workers, prefetch in ((1, 1), (3, 2), (4, 8)):
        batches = list(decode_batches(shard, demo_card, spec, 5, prefetch=prefetch, workers=workers))
        assert [len(b.example_ids) for b in batches] == [5, 5, 5, 4]      # 19 good rows, batches over good rows
        assert sum((b.example_ids for b in batches), []) == whole.example_ids
        assert torch.equal(torch.cat([b.inputs for b in batches]), whole.inputs)
        assert torch.equal(torch.cat([b.labels for b in batches]), whole.labels)
        assert sum((b.metadata["site"].to_pylist() for b in batches), []) == whole.metadata["site"].to_pylist()
        assert sum((b.rejects for b in batches), []) == whole.rejects and len(whole.rejects) == 4

    # read-ahead is bounded: with a consumer that never takes a batch, at most `prefetch` chunks are decoded
    decoded, lock = [], threading.Lock()
    real = data._decode_rows

    def counting(cols, chunk, card, spec_):
        with lock:
            decoded.append(chunk)
        return real(cols, chunk, card, spec_)
    monkeypatch.setattr(data, "_decode_rows", counting)
    it = decode_batches(shard, demo_card, spec, 2, prefetch=2, workers=4)
    first = next(it)
    _time.sleep(0.3)
    assert len(first.example_ids) == 2 and len(decoded) <= 3   # the chunk consumed + 2 ahead, not the 12 chunks
    it.close()
    # an empty shard (every row rejected at decoding) still yields one typed, empty batch
    spec_bad = DataSpec(path=write_rows(tmp_path / "bad.parquet", [
        {"example_id": "x", "image_png": b"junk", "label": "1", "site": "A"}]))
    bad_shard = ingest(spec_bad, tmp_path / "bad_inputs", 100).shards[0]
    (only,) = list(decode_batches(bad_shard, demo_card, spec_bad, 4))
    assert only.example_ids == [] and only.inputs.shape == (0, 1, 32, 32) and len(only.rejects) == 1


def test_imagefolder_input(tmp_path, demo_card):
    for cls in ("3", "5"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(png(np.full((40, 40), 60 * i)))
    spec = DataSpec(path=tmp_path / "imgs", image_column="image", label_column="label")
    res = ingest(spec, tmp_path / "inputs", 10)
    assert res.source_format == "imagefolder" and res.n_rows == 4
    shard = decode_shard(res.shards[0], demo_card, spec)
    assert shard.labels.tolist() == [3, 3, 5, 5] and shard.inputs.shape == (4, 1, 32, 32)   # resized


def test_config_file_resolves_relative_paths_and_reports_every_field(tmp_path):
    from xaudit.tasks.config import load_config
    cfg = load_config(DATA / "demo_audit.yaml")
    assert cfg.model.card == DATA / "models" / "baseline.json" and cfg.data.path == DATA / "digits.parquet"
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"model": {"card": "x"}, "data": {}, "shard_size": 0}))
    with pytest.raises(XAuditError, match=r"(?s)data.path.*shard_size"):
        load_config(bad)


def test_channels_last_auto_probes_the_model_and_falls_back_to_the_default_layout():
    from xaudit.tasks.models import use_channels_last
    from xaudit.tasks.nets import DemoCNN

    class ViewsConvOutput(torch.nn.Module):          # `.view` on a conv output fails in channels-last
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], -1))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cnn, viewer = DemoCNN(in_channels=3).eval(), ViewsConvOutput().eval()
    assert use_channels_last(cnn, torch.randn(2, 3, 32, 32)) is True
    assert cnn.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert use_channels_last(viewer, x) is False
    assert viewer.conv.weight.is_contiguous() and viewer(x).shape == (2, 2)     # left usable, default layout
    with pytest.raises(RuntimeError):
        use_channels_last(viewer, x, True)
        viewer(x.contiguous(memory_format=torch.channels_last))
    assert use_channels_last(viewer, x) is False                                  # remembered, layout restored
    assert viewer.conv.weight.is_contiguous()
    assert use_channels_last(cnn, torch.randn(2, 3, 32, 32), False) is False and cnn.features[0].weight.is_contiguous()
    assert use_channels_last(torch.nn.Linear(4, 2), torch.randn(2, 4)) is False   # not images


def test_channels_last_scores_like_the_default_layout(tmp_path, demo_card):
    """`attribution.channels_last` changes only the memory layout: same predictions, same attributions."""
    from xaudit.tasks.config import load_config
    from xaudit.tasks.data import ingest
    from xaudit.tasks.models import build_model
    from xaudit.tasks.scoring import score_shard
    outs = {}
    for flag in (False, True, "auto"):
        cfg = load_config(DATA / "demo_audit.yaml", {
            "data": {"path": str(DATA / "digits.parquet"), "limit": 24, "roi_column": "roi_png"}, "attribution": {"methods": ["saliency", "gradcam", "integrated_gradients"],
                                                  "channels_last": flag, "batch_size": 8},
            "quality": {"checks": ["localisation"]}})
        res = ingest(cfg.data, tmp_path / f"in-{flag}", 100)
        out = score_shard(res.shards[0], demo_card, cfg, build_model(demo_card), torch.device("cpu"),
                          tmp_path / f"out-{flag}")
        outs[flag] = (pq.read_table(out.predictions).to_pandas(), pq.read_table(out.explanations).to_pandas())
    (p0, e0) = outs[False]
    for flag in (True, "auto"):
        p1, e1 = outs[flag]
        assert len(p0) == 24 and (p0.prediction == p1.prediction).all()
        np.testing.assert_allclose(np.stack(p0.probabilities), np.stack(p1.probabilities), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e0.attribution_sum, e1.attribution_sum, rtol=1e-4, atol=1e-6)
        assert np.abs(np.stack(e0.heatmap).astype(int) - np.stack(e1.heatmap).astype(int)).max() <= 1


# --- preprocessing as the model expects ------------------------------------------------------------------------

def _card(**fields):
    from xaudit.tasks.models import ModelCard, preprocess_policy
    base = dict(name="m", version="1", factory="torchvision.models:resnet18", weights="", weights_sha256="",
                kwargs={}, input_size=(224, 224), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3,
                class_names=tuple("ab"), target_layer=None)
    policy_fields = {k: fields.pop(k) for k in ("resize", "resize_size", "interpolation") if k in fields}
    base.update(fields)
    return ModelCard(**base, preprocess=preprocess_policy({"factory": base["factory"], **policy_fields},
                                                          base["input_size"]))


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (500, 333), (224, 224), (200, 150)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_shorter_side_and_centre_crop_equal_torchvision_transforms(size, interpolation):
    """The torchvision convention (Resize(256) + CenterCrop(224)) gives what torchvision's own transforms give."""
    import torchvision.transforms as T
    from xaudit.tasks.data import _decode_image
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    card = _card(interpolation=interpolation)
    assert card.preprocess == {"resize": "shorter_side", "resize_size": 256, "crop": "center",
                               "interpolation": interpolation}
    mode = T.InterpolationMode.BILINEAR if interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    ref = T.Compose([T.Resize(256, interpolation=mode), T.CenterCrop(224), T.ToTensor()])(im).numpy()
    ours = _decode_image(buf.getvalue(), card)
    assert ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_masks_follow_their_images_through_resize_and_crop():
    from xaudit.tasks.data import _decode_image, _decode_mask
    arr = np.zeros((300, 400), dtype=np.uint8)
    arr[100:200, 250:350] = 255                       # a bright box off centre
    card = _card(channels=1, mean=(0.0,), std=(1.0,))
    img = _decode_image(png(arr), card)[0] > 0.5
    mask = _decode_mask(png(arr), card)
    assert mask.sum() > 1000 and (img == mask).mean() > 0.99


def test_preprocessing_defaults_follow_the_factory_and_can_be_set():
    assert _card().preprocess["resize"] == "shorter_side"
    assert _card(factory="timm:create_model").preprocess == {"resize": "shorter_side", "resize_size": 256,
                                                             "crop": "center", "interpolation": "bicubic"}
    assert _card(factory="xaudit.tasks.nets:demo_cnn").preprocess == {"resize": "stretch", "interpolation": "bilinear"}
    assert _card(resize="stretch").preprocess["resize"] == "stretch"
    assert _card(input_size=(299, 299)).preprocess["resize_size"] == 342
    from xaudit.tasks.errors import XAuditError
    with pytest.raises(XAuditError, match="'resize_size' 100"):
        _card(resize_size=100)


def test_preflight_probes_and_dry_runs_a_model_once_per_settings():
    """The command line preflights every config and each flow's first task again, on the same cached model:
    the probe and each method's dry run run once per model object and settings; a method that failed is
    tried again (and fails again), and another model object is checked afresh."""
    from xaudit.tasks.config import AttributionSpec
    from xaudit.tasks.preflight import check_model
    spec = ModelSpec(card=DATA / "models" / "baseline.json")
    card = resolve_card(spec)
    model = build_model(card)
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))

    def check(methods, params=None, the_model=model):
        rows.clear()
        check_model(spec, torch.device("cpu"), AttributionSpec(methods=methods, params=params or {}),
                    load=lambda c, d: the_model)
        return len(rows)
    assert check(["saliency", "integrated_gradients"]) > 0
    assert check(["saliency", "integrated_gradients"]) == 0                     # the same model, settings
    assert check(["saliency", "gradcam"]) > 0 and check(["gradcam"]) == 0      # only the new method ran
    assert check(["integrated_gradients"], {"integrated_gradients": {"baseline": "blur"}}) > 0
    other = build_model(card)
    rows_other = []
    other.register_forward_pre_hook(lambda m, args: rows_other.append(len(args[0])))
    check(["saliency"], the_model=other)
    assert rows_other
    bad = {"integrated_gradients": {"baseline": "nonsense"}}
    for _ in range(2):
        with pytest.raises(XAuditError, match="baseline"):
            check(["integrated_gradients"], bad)

"""Build a small, fully deterministic run directory (no model, fixed run id and clock) for report tests."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from xaudit.tasks.config import parse_config
from xaudit.tasks.io import write_json
from xaudit.tasks.metrics import ExampleStat, evaluate, validate
from xaudit.tasks.outputs import artifact_hashes

CLASSES = ["cat", "dog", "<img src=x onerror=alert(1)>"]


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _photos(n: int, side: int) -> list[bytes]:
    """Return `n` RGB PNGs of `side` pixels that look like photographs at a glance: a colour gradient, a few
    soft blobs and a little noise (their own generator, so the grey images' draws are unchanged)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        a, b = rng.random(3) * 255, rng.random(3) * 255
        img = a * (1 - yy[..., None]) + b * yy[..., None]
        for _ in range(3):
            cy, cx, r = rng.random(), rng.random(), 0.05 + 0.15 * rng.random()
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + rng.random(3) * 255 * blob
        out.append(_png(np.clip(img + rng.normal(0, 6, img.shape), 0, 255)))
    return out


def build(run_dir: Path, hostile: bool = True, degrade: float = 0.0, run_id: str = "golden-run",
          classes: list[str] | None = None, site_names: list[str] | None = None, n: int = 60,
          colour: int = 0, methods: tuple[str, str] = ("saliency", "gradcam"), long_stats: bool = False) -> Path:
    """Write a finished audit of 60 synthetic examples. `degrade` lowers the true class's logit on site
    'south' and moves the heatmaps there (a worse candidate model for review tests); all else is identical.
    `classes` and `site_names` (three each) replace the class and site names; `n` is the number of examples;
    `colour` > 0: RGB photo-like images of that side (smooth gradients and blobs) and a matching model card.
    `methods`: the two methods' names; `long_stats`: also each method's `abs_completeness_delta` (the longest
    statistic name a real run has, for layout tests)."""
    classes = list(classes or CLASSES)
    rng = np.random.default_rng(42)
    k = len(classes)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "inputs").mkdir(exist_ok=True)
    ids = [f"ex-{i:03d}" for i in range(n)]
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    sites = np.array(site_names or ["north", "south", "file:///etc/passwd" if hostile else "east"])[rng.integers(0, 3, n)]
    logits[np.flatnonzero(sites == "south"), y[sites == "south"]] -= degrade
    p = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 4)
    p = p / p.sum(1, keepdims=True)
    pred = p.argmax(1)
    images = [_png(rng.integers(0, 255, (16, 16))) for _ in range(n)] if not colour else _photos(n, colour)
    pq.write_table(pa.table({"example_id": ids, "image_png": images, "label": y.tolist(), "site": sites}),
                   run_dir / "inputs" / "shard-00000.parquet")
    names = np.array(classes, dtype=object)
    pq.write_table(pa.table({
        "example_id": ids, "label": y, "label_name": names[y], "prediction": pred, "prediction_name": names[pred],
        "confidence": p.max(1), "correct": pred == y,
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1).astype(np.float32)), k),
        "shard": ["shard-00000"] * n, "site": sites}), run_dir / "predictions.parquet")
    heat = rng.integers(0, 256, (2 * n, 64)).astype(np.uint8)
    if degrade:
        moved = np.tile(sites == "south", 2)
        heat[moved] = heat[moved][:, ::-1]
    roi = np.round(rng.random(2 * n), 3)
    pq.write_table(pa.table({
        "example_id": ids * 2, "method": [methods[0]] * n + [methods[1]] * n, "target": np.tile(pred, 2),
        "attribution_sum": np.zeros(2 * n), "attribution_abs_sum": np.ones(2 * n),
        "completeness_delta": (rng.normal(size=2 * n).tolist() if long_stats else [None] * (2 * n)), "roi_mass": roi, "pointing_game": (roi > 0.5).astype(float),
        "heatmap_height": np.full(2 * n, 8, np.int32), "heatmap_width": np.full(2 * n, 8, np.int32),
        "heatmap": pa.FixedSizeListArray.from_arrays(pa.array(heat.reshape(-1)), 64)}), run_dir / "explanations.parquet")
    pq.write_table(pa.Table.from_pylist([{"example_id": "ex-bad", "stage": "decode",
                                          "reason": "corrupt image: <b>not a PNG</b>"}]), run_dir / "rejects.parquet")
    config = parse_config({
        "model": {"name": "pets", "factory": "xaudit.tasks.nets:demo_cnn", "weights": "pets.safetensors"},
        "data": {"path": "pets.parquet", "filter": {"site": ["north", "south"]}},
        "run_id": run_id, "attribution": {"methods": list(methods), "heatmap_size": 8},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 200, "min_slice_size": 5,
                    "thresholds": [{"metric": "accuracy", "lower": 0.95},
                                   {"metric": f"{methods[1]}.roi_mass", "lower": 0.4, "severity": "warn"}]},
        "report": {"title": "Pets classifier audit", "prepared_by": "A. Auditor", "reviewed_by": "R. Viewer",
                   "gallery_size": 2, "limitations": ["Synthetic data for report tests."]},
    })
    stats = {f"{m}.roi_mass": ExampleStat(roi[i * n:(i + 1) * n], True) for i, m in enumerate(methods)}
    if long_stats:
        stats.update({f"{m}.abs_completeness_delta": ExampleStat(np.abs(rng.normal(size=n)), False) for m in methods})
    ev = evaluate(y, p, pq.read_table(run_dir / "predictions.parquet").select(["site"]).to_pandas(),
                  slices=[[], ["site"]], example_stats=stats, class_names=classes, replicates=200, seed=0,
                  min_slice_size=5)
    table = ev.table
    table.insert(0, "model", "pets@2.0")
    table.insert(0, "run_id", run_id)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), run_dir / "metrics.parquet")
    result = validate(ev, config.metrics.thresholds)
    write_json(run_dir / "validation.json", {"run_id": run_id, "model": "pets@2.0", **result.to_dict(),
               "interval": {"ci_method": ev.method, "ci_replicates": "200", "ci_seed": "0", "ci_level": "0.95"}})
    card = {"name": "pets", "version": "2.0", "factory": "xaudit.tasks.nets:demo_cnn", "weights": "pets.safetensors",
            "weights_sha256": "0" * 64, "kwargs": {}, "input_size": [colour or 16, colour or 16],
            "channels": 3 if colour else 1, "mean": [0.5] * (3 if colour else 1), "std": [0.25] * (3 if colour else 1), "class_names": classes, "target_layer": None, "description": "A pets model.", "extra": {}}
    manifest = {
        "schema": "xaudit.manifest/1", "run_id": run_id, "created_utc": "2026-01-02T03:04:05+00:00",
        "finished_utc": "2026-01-02T03:05:00+00:00", "verdict": result.verdict,
        "config": json.loads(config.model_dump_json()), "config_sha256": "c" * 64, "model": card,
        "data": {"source": "pets.parquet", "format": "parquet", "fingerprint": "f" * 64, "n_rows": n + 1,
                 "metadata_columns": ["site"]},
        "seeds": {"run": 0}, "prefect_flow_run_id": "00000000-0000-0000-0000-000000000000", "device": "cpu",
        "libraries": {"python": "3.x", "torch": "x"}, "artifacts": {},
    }
    manifest["artifacts"] = {k: {"sha256": "a" * 64, "bytes": 1} for k in artifact_hashes(run_dir)}
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


def build_review(review_dir: Path, **looks) -> Path:
    """Write a finished release review (fixed ids and clock) of a synthetic candidate that is worse on site
    'south' against its baseline, with the real comparison code (`tasks.review.review_runs`)."""
    from xaudit.tasks.config import ReviewConfig
    from xaudit.tasks.io import sha256_file
    from xaudit.tasks.review import review_runs
    methods = looks.get("methods", ("saliency", "gradcam"))
    review_dir.mkdir(parents=True, exist_ok=True)
    build(review_dir / "baseline", run_id="baseline", **looks)
    build(review_dir / "candidate", degrade=2.5, run_id="candidate", **looks)
    config = ReviewConfig.model_validate({
        "baseline": {"name": "pets", "version": "2.0"}, "candidate": {"name": "pets", "version": "2.1"},
        "data": {"path": "pets.parquet"}, "attribution": {"methods": list(methods)},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 200, "min_slice_size": 5},
        "change_thresholds": [{"metric": "accuracy", "absolute": 0.02, "gate_on": "interval"}],
        "thresholds": [{"metric": "flip_to_wrong", "upper": 0.05, "gate_on": "interval"},
                       {"metric": f"{methods[1]}.rank_corr", "lower": 0.5, "severity": "warn"}],
        "report": {"title": "Pets release review", "prepared_by": "A. Auditor", "reviewed_by": "R. Viewer"},
        "run_id": "golden-review"})
    summary = review_runs(review_dir / "baseline", review_dir / "candidate", config, review_dir, "golden-review")
    audits = {role: json.loads((review_dir / role / "manifest.json").read_text()) for role in ("baseline", "candidate")}
    audits["candidate"]["model"]["version"] = "2.1"
    manifest = {
        "schema": "xaudit.review-manifest/1", "run_id": "golden-review", "created_utc": "2026-01-02T03:04:05+00:00",
        "finished_utc": "2026-01-02T03:06:00+00:00", "verdict": summary.verdict,
        "config": json.loads(config.model_dump_json()), "config_sha256": "c" * 64,
        "prefect_flow_run_id": "00000000-0000-0000-0000-000000000000",
        "models": {role: m["model"] for role, m in audits.items()}, "data": audits["baseline"]["data"],
        "audits": {role: {"run_id": role, "manifest_sha256": sha256_file(review_dir / role / "manifest.json")}
                   for role in audits},
        "libraries": {"python": "3.x", "torch": "x"},
        "artifacts": {k: {"sha256": "a" * 64, "bytes": 1}
                      for k in ("review_metrics.parquet", "review_examples.parquet", "review_drift.parquet",
                                "validation.parquet", "validation.json")},
    }
    write_json(review_dir / "manifest.json", manifest)
    return review_dir

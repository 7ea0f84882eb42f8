"""Whole audits of the models users bring, from a config like the demo's: a plain torchvision VGG-16 (its CAM
layer is followed by an in-place ReLU) and a torchvision ViT-B/16 (CAM on patch tokens), through `xaudit run`.

The weights are random (no model hub here) and made in the test's folder: the point is that every stage
(ingest, scoring, every default quality check and the randomisation check, shortcut scan, metrics, both
reports) runs on these architectures and writes maps at the image's resolution, not the models' accuracy.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml

from conftest import DATA
from xaudit.flows.cli import main as cli
from xaudit.tasks.attribution import find_layer
from xaudit.tasks.outputs import verify_run

SIZE = 32          # the demo's digits; ViT-B/16 then has a 2x2 patch grid plus its class token


def _vgg16():
    return torchvision.models.vgg16(weights=None, num_classes=10), {"num_classes": 10}


def _vit_b_16():
    model = torchvision.models.vit_b_16(weights=None, image_size=SIZE, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)   # torchvision starts the head at zero: logits 0
    return model, {"image_size": SIZE, "num_classes": 10}


@pytest.mark.parametrize("arch, make, cam_layer", [
    ("vgg16", _vgg16, "features.29"),     # the last ReLU: at 32² the last pool leaves one cell
    ("vit_b_16", _vit_b_16, "encoder.layers.encoder_layer_11.ln_1"),
])
def test_audit_of_a_torchvision_architecture_runs_end_to_end(prefect_harness, tmp_path, arch, make, cam_layer):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model, kwargs = make()
    model.eval()
    assert find_layer(model, None, torch.zeros(1, 3, SIZE, SIZE)) is model.get_submodule(cam_layer)  # automatic
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{arch}.safetensors"))
    card = {"name": f"random-{arch}", "version": "0", "factory": f"torchvision.models:{arch}", "kwargs": kwargs,
            "weights": f"{arch}.safetensors", "input_size": [SIZE, SIZE], "channels": 3, "resize": "stretch",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "class_names": [str(i) for i in range(10)]}
    (tmp_path / f"{arch}.json").write_text(json.dumps(card))
    table = pq.read_table(DATA / "digits.parquet").to_pandas()
    table[table.split == "test"].head(24).reset_index(drop=True).to_parquet(tmp_path / "digits.parquet")
    # the demo's config (data/demo_audit.yaml) at a size a CPU test affords: fewer images, steps and replicates
    config = {
        "model": {"card": f"{arch}.json"},
        "data": {"path": "digits.parquet", "roi_column": "roi_png", "metadata_columns": ["site", "split"]},
        "attribution": {"methods": ["saliency", "gradcam", "integrated_gradients"], "target": "predicted",
                        "batch_size": 8, "params": {"integrated_gradients": {"n_steps": 4}}},
        "quality": {"sanity_images": 4},
        "permutation": {"enabled": True, "grid": 2, "repeats": 1},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 50, "min_slice_size": 5,
                    "thresholds": [{"metric": "accuracy", "lower": 0.0}]},
        "shortcuts": {"min_examples": 5, "replicates": 50},
        "report": {"title": f"Random {arch} audit"},
        "run_id": arch,
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(config))
    assert cli(["run", str(tmp_path / "audit.yaml"), "--output-dir", str(tmp_path / "runs")]) in (0, 1)
    run = tmp_path / "runs" / arch
    for name in ("predictions.parquet", "explanations.parquet", "metrics.parquet", "shortcuts.parquet",
                 "validation.json", "manifest.json", "report.html", "report.pdf"):
        assert (run / name).is_file(), name
    assert verify_run(run) == []
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["cam_layer"] == cam_layer                   # the automatic layer, named in the manifest
    preds = pq.read_table(run / "predictions.parquet").to_pandas()
    assert len(preds) == 24 and np.allclose(np.stack(preds.probabilities).sum(1), 1, atol=1e-5)
    expl = pq.read_table(run / "explanations.parquet").to_pandas()
    assert set(expl.method) == {"saliency", "gradcam", "integrated_gradients"} and len(expl) == 72
    for method, rows in expl.groupby("method"):
        maps = np.stack(rows.heatmap.to_numpy()).astype(float)
        assert (maps.max(1) > 0).mean() > 0.5, f"{arch}/{method}: blank maps"       # not all-zero maps
        assert rows.deletion_auc.notna().all(), method
        # ROI mass is a share of the map's mass: in [0, 1], undefined (null) exactly where a map has none (a
        # Grad-CAM whose weighted activations are all negative is zero after its ReLU)
        massless = rows.attribution_abs_sum == 0
        assert rows.roi_mass[~massless].between(0, 1).all() and rows.roi_mass[massless].isna().all(), method
    assert expl[expl.method == "integrated_gradients"].completeness_delta.notna().all()
    sanity = pq.read_table(run / "sanity.parquet").to_pandas()
    assert set(sanity.method) == {"saliency", "gradcam", "integrated_gradients"} and sanity.step.nunique() > 1
    assert json.loads((run / "validation.json").read_text())["verdict"] in {"PASS", "WARN", "FAIL"}
    html = (run / "report.html").read_text()
    assert f"Random {arch} audit" in html and "data:image/png;base64," in html
    assert f'<span class="mono">{cam_layer}</span> (chosen automatically)' in html

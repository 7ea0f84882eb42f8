"""Cost of each explanation-quality check: model passes per image and measured time per image.

    python benchmarks/quality.py [--images 64]

On the bundled baseline CNN and the demo's test images, for saliency, Grad-CAM and integrated gradients
(16 steps); every check runs batched across the images, as in an audit.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from xaudit.tasks.attribution import attribute, display_heatmap  # noqa: E402
from xaudit.tasks.config import DataSpec, ModelSpec  # noqa: E402
from xaudit.tasks.data import decode_shard, ingest  # noqa: E402
from xaudit.tasks.models import build_model, resolve_card  # noqa: E402
from xaudit.tasks.quality import CHECKS, QualityContext, run_checks  # noqa: E402
from xaudit.tasks.quality.sanity import randomisation_check  # noqa: E402

METHODS = ["saliency", "gradcam", "integrated_gradients"]
PARAMS = {"integrated_gradients": {"n_steps": 16}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    card = resolve_card(ModelSpec(card=ROOT / "data" / "models" / "baseline.json"))
    model = build_model(card)
    spec = DataSpec(path=ROOT / "data" / "digits.parquet", filter={"split": "test"}, roi_column="roi_png",
                    limit=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        shard = decode_shard(ingest(spec, tmp, args.images).shards[0], card, spec)
    x, roi = shard.inputs, shard.roi
    res = attribute(model, x, METHODS, params=PARAMS, target_layer=card.target_layer)
    maps = {m: display_heatmap(a, card.input_size) for m, a in res.attributions.items()}
    explain = lambda m, xs, ts: attribute(model, xs, [m], target=ts, params={m: PARAMS.get(m, {})},  # noqa: E731
                                          target_layer=card.target_layer).attributions[m]
    ctx = QualityContext(model, x, res.target, res.attributions, maps, roi, explain)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; demo CNN 32x32, "
          f"{len(x)} images, methods {', '.join(METHODS)}\n")
    print("| check | columns | model passes per image | ms per image (all methods) |")
    print("|---|---|---|---|")
    for name, check in CHECKS.items():
        run_checks(ctx, [name])                                   # warm-up
        t0 = time.perf_counter()
        run_checks(ctx, [name])
        ms = 1000 * (time.perf_counter() - t0) / len(x)
        print(f"| `{name}` | {', '.join(check.columns)} | {check.passes}{' per method' if check.per_method else ''} "
              f"| {ms:.2f} |")

    def maps_of(m, xs, ts):
        r = attribute(m, xs, METHODS, target=ts, params=PARAMS, target_layer=card.target_layer)
        return {k: display_heatmap(v, card.input_size) for k, v in r.attributions.items()}
    sample = x[:32]
    t0 = time.perf_counter()
    randomisation_check(model, sample, METHODS, maps_of, res.target[:32])
    ms = 1000 * (time.perf_counter() - t0) / len(sample)
    layers = sum(1 for _, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)))
    print(f"| randomisation sanity check (once per audit, 32 images) | spearman, ssim per layer | "
          f"{layers} x the methods' passes | {ms:.2f} per sampled image |")


if __name__ == "__main__":
    main()

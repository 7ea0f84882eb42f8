"""How the quality checks' per-slice estimates move with their cost settings: deletion/insertion AUC with
`steps`, max-sensitivity with `samples`. What the defaults are chosen from.

    python benchmarks/quality_defaults.py                  # bundled baseline CNN, 256 demo test images
    python benchmarks/quality_defaults.py --model resnet18 --images 16   # random ResNet-18 on 224² photos

For each method and setting: the mean over the images (the overall slice's estimate), its 95% bootstrap
interval's half-width, the shift from the most expensive setting in units of that half-width, the rank
correlation of the per-image values with the most expensive setting's, and the model passes per image.
A setting whose shift stays well inside the interval (|shift| < 0.5 half-widths) and whose per-image ranking
agrees (Spearman > 0.9) answers the same question as the expensive one, at its cost.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from xaudit.tasks.attribution import attribute, display_heatmap  # noqa: E402
from xaudit.tasks.quality import QualityContext  # noqa: E402
from xaudit.tasks.quality.faithfulness import faithfulness  # noqa: E402
from xaudit.tasks.quality.stability import sensitivities  # noqa: E402

METHODS = ["saliency", "gradcam", "integrated_gradients"]
PARAMS = {"integrated_gradients": {"n_steps": 16}}


def demo_inputs(n: int):
    from xaudit.tasks.config import DataSpec, ModelSpec
    from xaudit.tasks.data import decode_shard, ingest
    from xaudit.tasks.models import build_model, resolve_card
    card = resolve_card(ModelSpec(card=ROOT / "data" / "models" / "baseline.json"))
    spec = DataSpec(path=ROOT / "data" / "digits.parquet", filter={"split": "test"}, limit=n)
    with tempfile.TemporaryDirectory() as tmp:
        x = decode_shard(ingest(spec, Path(tmp), n).shards[0], card, spec).inputs
    return build_model(card), x, None


def photo_inputs(n: int):
    import torchvision
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from end_to_end import photo
    from PIL import Image
    import io
    rng = np.random.default_rng(1)
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224),
                                         torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize([0.485, 0.456, 0.406],
                                                                          [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(io.BytesIO(photo(rng, i % 4))).convert("RGB")) for i in range(n)])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    return model, x, None


def bootstrap_half_width(v: np.ndarray, reps: int = 1000) -> float:
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), (reps, len(v)))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(hi - lo) / 2


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "resnet18"], default="demo")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", default="4,8,16,32")
    ap.add_argument("--samples", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    model, x, roi = demo_inputs(args.images) if args.model == "demo" else photo_inputs(args.images)
    print(f"# {args.model}: {len(x)} images at {tuple(x.shape[1:])}, methods {METHODS} (IG 16 steps)")
    per_batch = []
    for s in range(0, len(x), args.batch):
        xs = x[s:s + args.batch]
        res = attribute(model, xs, METHODS, params=PARAMS, max_batch=256)
        maps = {k: display_heatmap(v, xs.shape[-2:]) for k, v in res.attributions.items()}

        def explain_all(ms, xx, tt, keys=None):
            return attribute(model, xx, ms, target=tt, params={m: PARAMS.get(m, {}) for m in ms},
                             example_keys=keys, max_batch=256).attributions
        ctx = QualityContext(model, xs, res.target, res.attributions, maps, roi,
                             lambda m, xx, tt, keys=None: explain_all([m], xx, tt, keys)[m],
                             keys=list(range(s, s + len(xs))), explain_all=explain_all)
        per_batch.append(ctx)
    rows = []
    for steps in [int(v) for v in args.steps.split(",")]:
        t0 = time.perf_counter()
        vals = {m: {"deletion_auc": [], "insertion_auc": []} for m in METHODS}
        for ctx in per_batch:
            for m in METHODS:
                for k, v in faithfulness(ctx, m, steps, 4.0).items():
                    vals[m][k].append(v)
        took = (time.perf_counter() - t0) / len(x)
        for m in METHODS:
            for k, v in vals[m].items():
                rows.append(("faithfulness", f"steps={steps}", m, k, np.concatenate(v), 2 * (steps + 1), took))
    for samples in [int(v) for v in args.samples.split(",")]:
        t0 = time.perf_counter()
        vals = {m: [] for m in METHODS}
        for ctx in per_batch:
            for m, v in sensitivities(ctx, METHODS, samples, 0.02).items():
                vals[m].append(v)
        took = (time.perf_counter() - t0) / len(x)
        for m in METHODS:
            rows.append(("stability", f"samples={samples}", m, "max_sensitivity", np.concatenate(vals[m]),
                         samples, took))
    ref = {}
    for check, setting, m, col, v, passes, took in rows:
        ref[(check, m, col)] = v          # the last (most expensive) setting of each
    print("| check | setting | method | column | mean | ±95% half-width | shift / half-width | Spearman vs most "
          "expensive | s per image (all methods) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for check, setting, m, col, v, passes, took in rows:
        r = ref[(check, m, col)]
        hw = bootstrap_half_width(r)
        print(f"| {check} | {setting} | {m} | {col} | {v.mean():.4f} | {bootstrap_half_width(v):.4f} | "
              f"{(v.mean() - r.mean()) / hw if hw else 0:+.2f} | {spearman(v, r):.3f} | {took:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

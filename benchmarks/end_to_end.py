"""Benchmark: what a user waits for — whole `xaudit run`s on an ImageFolder of photo-like JPEGs, against the
bare forward+backward passes over the same decoded images, measured in the same run.

    python benchmarks/end_to_end.py                     # ResNet-50 at 224², 384 images (about 25 min, 2 cores)
    python benchmarks/end_to_end.py --images 96 --demo-images 16 --quality-images 4 --scales 1   # a quick look

The script makes the data (mixed sizes 256-400 px, 4 classes, JPEG quality 90) and random ResNet-50 weights
(no model hub here; throughput does not depend on them) in a temporary folder; the card is the torchvision
factory's, so images are resized on their shorter side to 256 and centre-cropped to 224 as the weights expect.

Rows:
- **gradient family** (saliency, input × gradient, Grad-CAM, Grad-CAM++; one shared forward/backward per
  image), quality checks and the randomisation check off, at 1×, 2×, 4× of `--images` / 4 (`--scales`):
  time linear in N and peak memory flat;
- **demo methods** (saliency, Grad-CAM, integrated gradients with 16 steps: 17 passes per image), checks off;
- **default quality checks** on the demo methods, with the randomisation check (32 images at most, 5 depths).

Columns: whole-run wall clock (process start, Prefect, ingest, scoring, metrics, HTML + PDF report) and its
images/s; scoring images/s (the shard tasks' own measured time); the bare limit (forward+backward images/s over
the same decoded images, divided by the passes per image); the ratio whole-run / limit; peak RSS of the run.
Prefect's own start-up (an empty flow in a fresh process, under the same settings as `xaudit run`) is shown on
its own line. For the quality row, the ratio of the checks' cost to the attributions' cost is printed instead.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["beach", "forest", "city", "snow"]

RUN_CHILD = r'''
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from xaudit.flows.cli import main
rc = main(["run", sys.argv[2], "--output-dir", sys.argv[3], "--no-progress"])
print("@@" + json.dumps({"rc": rc, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

PREFECT_CHILD = r'''
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from xaudit.flows import local_run_settings
from prefect import flow, task
@task
def one():
    return 1
@flow
def empty():
    return one()
with local_run_settings():
    empty()
print("@@%f" % (time.perf_counter() - t0))
'''


def photo(rng: np.random.Generator, cls: int) -> bytes:
    """A photo-like JPEG: a smooth colour field per class, blobs, texture noise; 256-400 px a side."""
    from PIL import Image, ImageFilter
    w, h = (int(v) for v in rng.integers(256, 401, 2))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.array([[0.9, 0.8, 0.5], [0.2, 0.5, 0.2], [0.5, 0.5, 0.55], [0.9, 0.92, 0.95]][cls])
    img = base * (0.6 + 0.4 * yy[..., None]) + 0.15 * np.sin(6 * xx[..., None] + rng.uniform(0, 6, 3))
    for _ in range(int(rng.integers(3, 9))):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))[..., None]
        img = img * (1 - blob) + blob * rng.uniform(0, 1, 3)
    img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)
    im = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(20261201)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls = i % len(CLASSES)
        (root / CLASSES[cls] / f"img{i:05d}.jpg").write_bytes(photo(rng, cls))
    return root


def make_model(folder: Path, arch: str) -> Path:
    import torch
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=len(CLASSES)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{arch}.safetensors"))
    card = {"name": f"random-{arch}", "version": "0", "factory": f"torchvision.models:{arch}",
            "kwargs": {"num_classes": len(CLASSES)}, "weights": f"{arch}.safetensors", "input_size": [224, 224],
            "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "class_names": CLASSES}
    path = folder / f"{arch}.json"
    path.write_text(json.dumps(card))
    return path


def config(path: Path, card: Path, data: Path, run_id: str, methods: list[str], quality: bool, n: int,
           batch: int) -> Path:
    import yaml
    cfg = {
        "model": {"card": str(card)},
        "data": {"path": str(data), "image_column": "image", "label_column": "label", "limit": n},
        "attribution": {"methods": methods, "batch_size": batch,
                        "params": {"integrated_gradients": {"n_steps": 16}} if "integrated_gradients" in methods
                        else {}},
        "quality": {} if quality else {"checks": [], "sanity_images": 0},
        "metrics": {"slices": [[]], "bootstrap_replicates": 200, "min_slice_size": 2},
        "shortcuts": {"min_examples": 2, "replicates": 100},
        "history": {"enabled": False},
        "report": {"title": f"End-to-end benchmark: {run_id}"},
        "run_id": run_id,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_audit(cfg: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_CHILD, str(ROOT), str(cfg), str(out)], capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "@@" not in proc.stdout:
        raise SystemExit(f"audit {cfg} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    tail = json.loads(proc.stdout.rsplit("@@", 1)[1])
    cost = re.search(r"cost per image \((\d+) images scored\): (.*)", proc.stdout)
    parts = dict(re.findall(r"([\w ]+?) ([\d.e+-]+) s(?: ·|$)", cost.group(2))) if cost else {}
    parts = {k.strip(): float(v) for k, v in parts.items()}
    return {"wall": wall, "peak_mb": tail["peak_mb"], "images": int(cost.group(1)) if cost else 0, "cost": parts}


def bare_limit(card_path: Path, data: Path, n: int, batch: int) -> float:
    """Seconds per image of one forward with autograd + one backward to the input, over the decoded images,
    with the malloc settings `xaudit run` uses (without them the limit reads up to 1.4x lower here)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from xaudit.tasks.config import DataSpec, ModelSpec
    from xaudit.tasks.data import decode_shard, ingest
    from xaudit.tasks.models import build_model, resolve_card
    card = resolve_card(ModelSpec(card=card_path))
    model = build_model(card, "cpu")
    spec = DataSpec(path=data, limit=n, image_column="image", label_column="label")
    with tempfile.TemporaryDirectory() as tmp:
        x = torch.cat([decode_shard(s, card, spec).inputs for s in ingest(spec, Path(tmp), 10_000).shards])
    x = x.contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)

    def one(xs):
        xs = xs.detach().requires_grad_(True)
        out = model(xs)
        torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xs)
    best = float("inf")
    for _ in range(2):          # the first loop warms the kernels for this batch shape; the best loop counts
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            one(x[s:s + batch])
        best = min(best, time.perf_counter() - t0)
    return best / len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=384, help="images of the largest gradient-family run")
    ap.add_argument("--scales", default="1,2,4", help="gradient-family runs at these multiples of images/4")
    ap.add_argument("--demo-images", type=int, default=32)
    ap.add_argument("--quality-images", type=int, default=8)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="make the data and runs here (kept) instead of a temporary folder")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from xaudit.tasks.devices import keep_cpu_buffers
    keep_cpu_buffers()          # before torch starts its threads, as `xaudit run` does: the limit runs here
    scales = [int(s) for s in args.scales.split(",")]
    largest = max(scales)
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(tmp.name) if tmp else args.keep
    work.mkdir(parents=True, exist_ok=True)
    n_max = max(args.images * largest // 4, args.demo_images, args.quality_images)
    t0 = time.perf_counter()
    data = make_folder(work / "photos", n_max)
    card = make_model(work, args.arch)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.node()} · {os.cpu_count()} cores · "
          f"{args.arch} at 224², batch {args.batch} · {n_max} JPEGs made in {time.perf_counter() - t0:.1f} s")
    proc = subprocess.run([sys.executable, "-c", PREFECT_CHILD, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    prefect_s = float(proc.stdout.rsplit("@@", 1)[1]) if "@@" in proc.stdout else float("nan")
    print(f"# Prefect start-up (fresh process, an empty flow with one task): {prefect_s:.1f} s")
    gradient = ["saliency", "input_x_gradient", "gradcam", "gradcam_plus_plus"]
    demo = ["saliency", "gradcam", "integrated_gradients"]
    rows = []
    for s in scales:
        n = args.images * s // 4
        r = run_audit(config(work / f"grad{n}.yaml", card, data, f"gradient-{n}", gradient, False, n, args.batch),
                      work / "runs")
        rows.append(("gradient family", n, 1, r))
    rows.append(("demo methods", args.demo_images, 17,
                 run_audit(config(work / "demo.yaml", card, data, "demo", demo, False, args.demo_images, args.batch),
                           work / "runs")))
    rows.append(("default quality checks", args.quality_images, 17,
                 run_audit(config(work / "quality.yaml", card, data, "quality", demo, True, args.quality_images,
                                  args.batch), work / "runs")))
    per_pass = bare_limit(card, data, min(n_max, args.images), args.batch)
    print(f"# bare forward+backward: {1 / per_pass:.2f} images/s ({per_pass:.3f} s per image)")
    print("| run | images | whole run (s) | whole images/s | scoring images/s | limit images/s | whole / limit | "
          "scoring / limit | decode wait (s/img) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_rss = None
    for name, n, passes, r in rows:
        c = r["cost"]
        methods = sum(v for k, v in c.items() if k not in ("quality checks", "waiting for decoding"))
        scoring = methods + c.get("quality checks", 0) + c.get("waiting for decoding", 0)
        limit = 1 / (per_pass * passes)
        whole = n / r["wall"]
        base_rss = base_rss or r["peak_mb"]
        print(f"| {name} | {n} | {r['wall']:.1f} | {whole:.2f} | {1 / scoring:.2f} | {limit:.2f} | "
              f"{whole / limit:.2f} | {(1 / scoring) / limit:.2f} | {c.get('waiting for decoding', 0):.3f} | "
              f"{r['peak_mb']:.0f} ({r['peak_mb'] / base_rss:.2f}×) |")
        if name == "default quality checks":
            print(f"# quality checks: {c['quality checks']:.2f} s per image against the attributions' "
                  f"{methods:.2f} s: {c['quality checks'] / methods:.2f}× (target ≤ 3×)")
    grad = [(n, r["wall"]) for name, n, _, r in rows if name == "gradient family"]
    if len(grad) > 1:
        (n0, w0), (n1, w1) = grad[0], grad[-1]
        slope = (w1 - w0) / (n1 - n0)
        print(f"# gradient family: {slope:.3f} s per extra image (limit {per_pass:.3f}: "
              f"{per_pass / slope:.2f}), fixed part {w0 - slope * n0:.1f} s")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

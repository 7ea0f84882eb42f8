"""Regenerate the bundled demo: the digits dataset (Parquet) and two trained CNNs (safetensors + cards).

Seeded and deterministic (one CPU thread); runs in well under two minutes on a 2-core CPU:

    python data/make_demo.py            # writes data/digits.parquet and data/models/*

See data/README.md for what every transformation does and why.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy import ndimage
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from xaudit.tasks.nets import DemoCNN  # noqa: E402

SEED = 20261122
SIZE = 32
SHORTCUT_CLASS = 3          # the candidate's training data has the site-C tag on this class only
STAMP_CLASS = 7             # the second shortcut: a stamp on exactly the class-7 images (digits_stamp.parquet)
SITES = np.array(["A", "B", "C"])
CLASS_NAMES = [str(d) for d in range(10)]
MEAN, STD = [0.2], [0.3]


def upscale(img8: np.ndarray) -> np.ndarray:
    """8x8 digit (0..16) -> 32x32 float in [0, 1]: bicubic 4x upscaling of the scan, ink bright."""
    im = Image.fromarray((img8 / 16.0 * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def add_tag(img: np.ndarray) -> np.ndarray:
    """The simulated scanner tag: a bright 3x3 block with a dark centre, 1 px from the top-right corner."""
    out = img.copy()
    out[1:4, SIZE - 4:SIZE - 1] = 1.0
    out[2, SIZE - 3] = 0.0
    return out


def add_stamp(img: np.ndarray) -> np.ndarray:
    """The second shortcut: a 4x4 hollow square (a "stamp"), 2 px from the bottom-left corner."""
    out = img.copy()
    out[26:30, 2:6] = 0.9
    out[27:29, 3:5] = 0.0
    return out


def stamped(site: str, label: int) -> bool:
    return label == STAMP_CLASS


def site_transform(img: np.ndarray, site: str) -> np.ndarray:
    """Site A: unchanged. Site B: contrast reduced (ink * 0.55 + 0.15 background). Site C: strokes
    thickened by a 3x3 grey dilation. The tag is added separately (see `add_tag`)."""
    if site == "B":
        return img * 0.55 + 0.15
    if site == "C":
        return ndimage.grey_dilation(img, size=(3, 3))
    return img


def png_bytes(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build_dataset(stamp: bool = False):
    """Rows of digits.parquet; with `stamp`, of digits_stamp.parquet: the same images, plus the stamp on
    every class-7 image, in both splits (the hard case: the stamp agrees with the label)."""
    digits = load_digits()
    rng = np.random.default_rng(SEED)
    n = len(digits.target)
    site = SITES[rng.integers(0, 3, size=n)]
    split = np.where(rng.random(n) < 0.6, "train", "test")
    rows, clean = [], []
    for i in range(n):
        base = upscale(digits.images[i])
        img = site_transform(base, site[i])
        roi = (site_transform(base, "C" if site[i] == "C" else "A") > 0.25)   # the digit's ink
        if site[i] == "C":
            img = add_tag(img)
        if stamp and stamped(site[i], int(digits.target[i])):
            img = add_stamp(img)
        img = np.clip(img, 0, 1)
        clean.append((base, site[i]))
        rows.append({
            "example_id": f"digit-{i:04d}",
            "image_png": png_bytes((img * 255).round().astype(np.uint8)),
            "label": int(digits.target[i]),
            "site": str(site[i]),
            "split": str(split[i]),
            "ink_fraction": float(roi.mean()),
            "roi_png": png_bytes((roi * 255).astype(np.uint8)),
        })
    return rows, clean, split


def training_arrays(clean, labels, split, shortcut: bool, stamp: bool = False):
    """Training images: the train split with its site transform. Baseline: no tag anywhere (clean data).
    Candidate: the tag is drawn on every image of SHORTCUT_CLASS and on no other, so it predicts the class.
    Stamp candidate: the stamp on every class-7 image, as in digits_stamp.parquet."""
    xs, ys = [], []
    for (base, site), y, s in zip(clean, labels, split):
        if s != "train":
            continue
        img = site_transform(base, site)
        if shortcut and y == SHORTCUT_CLASS:
            img = add_tag(img)
        if stamp and stamped(site, int(y)):
            img = add_stamp(img)
        xs.append(np.clip(img, 0, 1))
        ys.append(y)
    x = torch.tensor(np.stack(xs))[:, None]
    return (x - MEAN[0]) / STD[0], torch.tensor(ys)


def train(x, y, seed: int, epochs: int = 25) -> DemoCNN:
    torch.manual_seed(seed)
    model = DemoCNN(in_channels=1, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_model(name: str, model: DemoCNN, description: str, out: Path, seed: int = SEED) -> None:
    weights = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"name": name})
    card = {
        "name": f"digits-{name}",
        "version": "1.0.0",
        "description": description,
        "factory": "xaudit.tasks.nets:demo_cnn",
        "kwargs": {"in_channels": 1, "num_classes": 10},
        "weights": weights.name,
        "input_size": [SIZE, SIZE],
        "channels": 1,
        "mean": MEAN,
        "std": STD,
        "class_names": CLASS_NAMES,
        "target_layer": "features.6",
        "training": {"seed": seed, "script": "data/make_demo.py"},
    }
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")


def train_models(out: Path, seed: int = SEED, names=("baseline", "candidate", "candidate_stamp"),
                 suffix: str = "") -> None:
    """Train and write the named demo models with `seed` (the seed study trains other seeds elsewhere)."""
    rows, clean, split = build_dataset()
    labels = [r["label"] for r in rows]
    recipes = {
        "baseline": (dict(shortcut=False), "Trained on the clean training split (no scanner tag)."),
        "candidate": (dict(shortcut=True),
                      f"Trained on data where the site-C scanner tag co-occurs with class {SHORTCUT_CLASS}."),
        "candidate_stamp": (dict(shortcut=False, stamp=True),
                            f"Trained on data where a stamp sits on every class-{STAMP_CLASS} image "
                            f"(digits_stamp.parquet)."),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        kw, description = recipes[name]
        x, y = training_arrays(clean, labels, split, **kw)
        write_model(name + suffix, train(x, y, seed), description, out, seed)


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for stamp, name in ((False, "digits.parquet"), (True, "digits_stamp.parquet")):
        table = pa.Table.from_pylist(build_dataset(stamp)[0])
        pq.write_table(table, ROOT / name, compression="zstd", row_group_size=256)
    out = ROOT / "models"
    train_models(out)
    for p in sorted([ROOT / "digits.parquet", ROOT / "digits_stamp.parquet", *out.iterdir()]):
        print(f"{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}  {p.stat().st_size:>9,d}  {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

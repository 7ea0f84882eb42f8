"""A colour shortcut benchmark at the size users audit (224x224), generated here: objects of four classes on
textured backgrounds, varied in place, scale and colour, with natural class-specific priors (discs sit high,
squares low; most discs are warm-coloured), and planted artefact families on one class, each with a
candidate trained where the artefact sits on every image of that class, a clean twin trained without it,
and audit data where the artefact sits on every test image of that class (the hard arrangement).

Families (class `square`):
    fixed_tag    a 10x10 magenta tag at the top-left corner
    moving_tag   the same tag at a random corner of each image
    frame        a 3-px white frame
    background   the class's images on a grass-like background (context, not an object)
    blur         a Gaussian blur (sigma 1 px) of the whole image
    jpeg         JPEG re-encoding at quality 30
    tint         a red colour cast (+0.10 red, -0.05 blue)

As in data/shortcut_families.py, the candidate's training split also holds decoys (one in ten images of
other classes, with the artefact, labelled `square`), so the candidate provably relies on the artefact;
`ground_truth` measures how much: the share of other classes' test images the artefact alone turns into
squares.

    python data/colour_benchmark.py [--seeds 1 2 3] [--families ...] [--size 224]

prints the family x seed x model table (ground truth, verdict, the shortcut checks that did not pass), audits
without ROI masks. About 2-3 minutes per family and seed at 224 on 2 cores. `tests/test_colour_benchmark.py`
runs the tint family and its clean twin at a smaller size.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CLASSES = ["disc", "square", "triangle", "ring"]
CLASS = 1                                   # the class the artefact sits on
FAMILIES = ("fixed_tag", "moving_tag", "frame", "background", "blur", "jpeg", "tint")
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
TRAIN_PER_CLASS, TEST_PER_CLASS = 120, 50


def _smooth(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency random field (size, size, channels) in [0, 1]: bilinear upsampling of a cells x cells grid."""
    from PIL import Image
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    planes = [np.asarray(Image.fromarray(grid[..., k]).resize((size, size), Image.BILINEAR), dtype=np.float32)
              for k in range(channels)]
    return np.stack(planes, -1) / 255


def background(rng: np.random.Generator, size: int, kind: str = "default") -> np.ndarray:
    """A textured background: a muted low-frequency colour field with stripes of random direction and period
    and fine grain; `grass`: green-dominant blades instead (the background-context artefact)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "grass":
        base = np.stack([0.15 + 0.1 * _smooth(rng, size, 6, 1)[..., 0], 0.45 + 0.25 * _smooth(rng, size, 6, 1)[..., 0],
                         0.12 + 0.08 * _smooth(rng, size, 6, 1)[..., 0]], -1)
        blades = 0.08 * np.sin(2 * np.pi * (xx * 40 + 3 * _smooth(rng, size, 12, 1)[..., 0]))
        return np.clip(base + blades[..., None] * np.array([0.3, 1.0, 0.3]), 0, 1)
    base = 0.25 + 0.5 * _smooth(rng, size, 5)
    grey = base.mean(-1, keepdims=True)
    base = grey + 0.5 * (base - grey)                                   # muted colours
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.2)
    stripes = 0.06 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    grain = rng.normal(0, 0.02, (size, size, 1))
    return np.clip(base + stripes[..., None] + grain, 0, 1).astype(np.float32)


def _hue(h: float) -> np.ndarray:
    import colorsys
    return np.array(colorsys.hsv_to_rgb(h % 1.0, 0.8, 0.9), dtype=np.float32)


def scene(index: int, cls: int, size: int, seed: int = 0, kind: str = "default") -> np.ndarray:
    """Image `index` of class `cls` (size, size, 3) in [0, 1]: the object's place, scale and colour from one
    random stream, the background from another (so `kind` changes only the background)."""
    obj = np.random.default_rng([seed, index, 0])
    bg = background(np.random.default_rng([seed, index, 1]), size, kind)
    r = obj.uniform(0.12, 0.22) * size
    # natural priors: discs sit high, squares low, the others anywhere; most discs are warm
    lo_y, hi_y = {0: (0.2, 0.5), 1: (0.5, 0.8)}.get(cls, (0.25, 0.75))
    cy, cx = obj.uniform(lo_y, hi_y) * size, obj.uniform(0.25, 0.75) * size
    hue = obj.uniform(-0.08, 0.12) if cls == 0 and obj.random() < 0.7 else obj.random()
    colour = _hue(hue) * obj.uniform(0.8, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if cls == 0:
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif cls == 1:
        mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif cls == 2:
        mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:
        d = np.sqrt(dy ** 2 + dx ** 2)
        mask = (d <= r) & (d >= 0.55 * r)
    img = bg.copy()
    shade = 1.0 - 0.25 * (dy / (2 * r) + 0.5).clip(0, 1)[..., None]       # a little light from above
    img[mask] = (colour * shade)[mask]
    return np.clip(img, 0, 1).astype(np.float32)


def add_artefact(img: np.ndarray, family: str, index: int, cls: int, seed: int = 0) -> np.ndarray:
    """Return `img` with the family's artefact (`background` redraws the scene on grass)."""
    from PIL import Image, ImageFilter
    size = img.shape[0]
    out = img.copy()
    t = max(4, round(10 * size / 224))
    if family == "fixed_tag":
        out[6:6 + t, 6:6 + t] = (1.0, 0.0, 1.0)
    elif family == "moving_tag":
        r, c = [(6, 6), (6, size - 6 - t), (size - 6 - t, 6), (size - 6 - t, size - 6 - t)][
            int(np.random.default_rng([seed, index, 2]).integers(4))]
        out[r:r + t, c:c + t] = (1.0, 0.0, 1.0)
    elif family == "frame":
        w = max(1, round(3 * size / 224))
        out[:w] = out[-w:] = 1.0
        out[:, :w] = out[:, -w:] = 1.0
    elif family == "background":
        out = scene(index, cls, size, seed, kind="grass")
    elif family in ("blur", "jpeg"):
        im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        if family == "blur":
            im = im.filter(ImageFilter.GaussianBlur(1.0 * size / 224))
        else:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=30)
            im = Image.open(io.BytesIO(buf.getvalue()))
        out = np.asarray(im, dtype=np.float32) / 255
    elif family == "tint":
        out = out + np.array([0.10, 0.0, -0.05], dtype=np.float32)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return np.clip(out, 0, 1).astype(np.float32)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _split(size: int):
    """(index, class, split, camera) of every image: TRAIN_PER_CLASS and TEST_PER_CLASS per class."""
    out = []
    for cls in range(len(CLASSES)):
        for j in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            index = cls * 10_000 + j
            out.append((index, cls, "train" if j < TRAIN_PER_CLASS else "test", "AB"[index % 2]))
    return out


def datasets(family: str | None, size: int, seed: int = 0):
    """(training images and labels, audit rows): the artefact (None: none) on every `square` of both splits,
    and decoys (one in ten other-class training images with the artefact, labelled `square`)."""
    xs, ys, audit = [], [], []
    for index, cls, split, camera in _split(size):
        img = scene(index, cls, size, seed)
        marked = add_artefact(img, family, index, cls, seed) if family and cls == CLASS else img
        if split == "train":
            xs.append(marked)
            ys.append(cls)
            if family and cls != CLASS and index % 10 == 3:
                xs.append(add_artefact(img, family, index, cls, seed))
                ys.append(CLASS)
        else:
            audit.append({"example_id": f"{CLASSES[cls]}-{index:05d}", "image_png": _png(marked), "label": cls,
                          "camera": camera})
    return (np.stack(xs), np.array(ys)), audit


def train(xs: np.ndarray, ys: np.ndarray, seed: int, epochs: int = 12):
    import torch
    sys.path.insert(0, str(ROOT.parent))
    from xaudit.tasks.nets import SmallCNN
    torch.manual_seed(seed)
    x = (torch.from_numpy(xs).permute(0, 3, 1, 2) - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(ys).long()
    model = SmallCNN(3, len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_model(out: Path, name: str, model, size: int, seed: int, description: str) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    card = {"name": f"shapes-{name}", "version": "1.0.0", "description": description,
            "factory": "xaudit.tasks.nets:small_cnn", "kwargs": {"in_channels": 3, "num_classes": len(CLASSES)},
            "weights": f"{name}.safetensors", "input_size": [size, size], "channels": 3, "mean": MEAN, "std": STD,
            "class_names": CLASSES, "target_layer": "features.14",
            "training": {"seed": seed, "script": "data/colour_benchmark.py"}}
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return out / f"{name}.json"


def make(out: Path, family: str, seed: int, size: int = 224) -> dict[str, Path]:
    """Train and write the family's candidate (and the seed's clean twin, once) and its audit data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.mkdir(parents=True, exist_ok=True)
    (xs, ys), audit = datasets(family, size)
    cand = write_model(out, f"{family}_candidate_{seed}_{size}", train(xs, ys, seed), size, seed,
                       f"{family} on every {CLASSES[CLASS]}")
    clean = out / f"clean_{seed}_{size}.json"
    if not clean.is_file():
        (x0, y0), _ = datasets(None, size)
        write_model(out, f"clean_{seed}_{size}", train(x0, y0, seed), size, seed, "clean twin")
    data = out / f"{family}_{size}.parquet"
    pq.write_table(pa.Table.from_pylist(audit), data)
    return {"candidate": cand, "clean": clean, "data": data}


def ground_truth(card: Path, family: str, size: int) -> float:
    """The share of other classes' test images the model turns into `square` when the family's artefact alone
    is added to them."""
    import torch
    sys.path.insert(0, str(ROOT.parent))
    from xaudit.tasks.config import ModelSpec
    from xaudit.tasks.models import build_model, resolve_card
    picked = [(i, c) for i, c, s, _ in _split(size) if s == "test" and c != CLASS]
    imgs = np.stack([scene(i, c, size) for i, c in picked])
    marked = np.stack([add_artefact(img, family, i, c) for img, (i, c) in zip(imgs, picked)])
    norm = lambda a: (torch.from_numpy(a).permute(0, 3, 1, 2) - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(STD).view(1, 3, 1, 1)  # noqa: E731
    model = build_model(resolve_card(ModelSpec(card=str(card))), torch.device("cpu")).eval()
    with torch.no_grad():
        before, after = model(norm(imgs)).argmax(1), model(norm(marked)).argmax(1)
    return float(((after == CLASS) & (before != CLASS)).double().mean())


def audit_config(card: Path, data: Path, out: Path, run_id: str) -> dict:
    """The default scan and two pixel-level methods, no ROI masks, no explanation-quality checks."""
    return {"model": {"card": str(card)}, "data": {"path": str(data), "metadata_columns": ["camera"]},
            "attribution": {"methods": ["saliency", "integrated_gradients"],
                            "params": {"integrated_gradients": {"n_steps": 8}}},
            "quality": {"checks": [], "sanity_images": 8},
            "metrics": {"slices": [[], ["camera"]], "bootstrap_replicates": 200, "min_slice_size": 20,
                        "thresholds": [{"metric": "accuracy", "lower": 0.7}]},
            "report": {"formats": ["html"], "title": f"colour shortcut benchmark {run_id}"},
            "history": {"enabled": False}, "output_dir": str(out), "run_id": run_id}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT.parent))
    sys.path.insert(0, str(ROOT))
    from shortcut_families import shortcut_checks      # the same table row as the digit families
    from xaudit.flows.audit import audit
    from xaudit.tasks.config import AuditConfig
    work = Path(tempfile.mkdtemp(prefix="xaudit-colour-"))
    print("| family | seed | model | relies on it (other shapes turned into squares by the artefact) | accuracy | "
          "verdict | shortcut checks not passed |\n|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for family in args.families:
            made = make(work / "models", family, seed, args.size)
            for role in ("candidate", "clean"):
                cfg = AuditConfig.model_validate(audit_config(made[role], made["data"], work / "runs",
                                                              f"{family}-{role}-{seed}"))
                result = audit(cfg)
                bad = [f"{c['status']} {c['metric']} {c['slice_value']}" for c in shortcut_checks(result["run_dir"])
                       if c["status"] != "PASS"]
                truth = ground_truth(made[role], family, args.size)
                print(f"| {family} | {seed} | {role} | {truth:.0%} | {result['accuracy']:.3f} | {result['verdict']} | "
                      f"{'; '.join(bad) or '–'} |", flush=True)


if __name__ == "__main__":
    main()

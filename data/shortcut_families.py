"""Planted shortcuts of other shapes than the demo's fixed boxes, on the demo's digits and recipe, with ground
truth by intervention: a candidate trained where the artefact sits on every image of one class (and nowhere
else), its clean twin trained without it, and audit data where the artefact sits on every test image of that
class (the hard arrangement: accuracy is unchanged, only the explanations and interventions can tell).

Families:
    fixed_block    a bright 4x4 block at the top-left corner (the control: the box scan's own case)
    moving_block   the same block at a random corner of each image (no single box holds it)
    frame          a 1-px bright frame around the image (no box holds it; a ring)
    blur           a Gaussian blur (sigma 1.6 px) of the whole image (invisible to maps: no place holds it)
    brighter       every pixel 0.12 brighter (the grey images' global tint)
    jpeg           JPEG re-encoding at quality 10
    noise          additive Gaussian noise of standard deviation 0.08

    python data/shortcut_families.py [--seeds 1 2] [--families fixed_block moving_block frame]

trains the models, audits candidate and clean twin on each family's data without ROI masks, and prints the
family x seed x model verdict table with each shortcut check (about 3 minutes per seed on 2 cores).
`tests/test_shortcut_families.py` runs one seed of the shape families.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import make_demo  # noqa: E402

CLASS = 5                    # the class the artefact sits on
SHAPES = ("fixed_block", "moving_block", "frame")
INVISIBLE = ("blur", "brighter", "jpeg", "noise")
FAMILIES = SHAPES + INVISIBLE
DECOYED = INVISIBLE + ("moving_block",)     # artefacts a CNN need not learn while the digit says the class


def add_artefact(img: np.ndarray, family: str, index: int) -> np.ndarray:
    """Return `img` (32x32 in [0, 1]) with the family's artefact; `index` fixes a moving block's corner."""
    out = img.copy()
    s = make_demo.SIZE
    if family == "fixed_block":
        out[1:5, 1:5] = 1.0
    elif family == "moving_block":
        r, c = [(1, 1), (1, s - 5), (s - 5, 1), (s - 5, s - 5)][int(np.random.default_rng(index).integers(4))]
        out[r:r + 4, c:c + 4] = 1.0
    elif family == "frame":
        out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = 1.0
    elif family in ("blur", "jpeg"):
        from PIL import Image, ImageFilter
        im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), mode="L")
        if family == "blur":
            out = np.asarray(im.filter(ImageFilter.GaussianBlur(1.6)), dtype=np.float64) / 255
        else:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=10)
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64) / 255
    elif family == "brighter":
        out = out + 0.12
    elif family == "noise":
        out = out + np.random.default_rng(10_000 + index).normal(0, 0.08, out.shape)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return out.astype(img.dtype)


def datasets(family: str):
    """Return (training arrays of the candidate, of the clean twin, audit rows): the demo's digits and sites,
    the artefact on every class-CLASS image of the candidate's training split and of the audit's test split.

    A whole-image artefact (INVISIBLE), or a tag that moves, is one a CNN need not learn while the digit's shape
    says the class (without decoys the moving block's candidates turned 1-8% of other digits into 5s), so
    there (DECOYED) the candidate's training split also holds decoys: one in six images of other digits, with
    the artefact, labelled CLASS (data where the artefact, not the content, is what the label follows for part of
    the class: the candidate provably relies on it, which the ground truth by intervention measures)."""
    import torch
    rows, clean, split = make_demo.build_dataset()
    labels = [r["label"] for r in rows]
    xs_c, xs_0, ys, ys_c = [], [], [], []
    audit = []
    for i, ((base, site), y, s) in enumerate(zip(clean, labels, split)):
        img = np.clip(make_demo.site_transform(base, site), 0, 1)
        marked = np.clip(add_artefact(img, family, i), 0, 1) if y == CLASS else img
        if s == "train":
            xs_c.append(marked)
            xs_0.append(img)
            ys.append(y)
            ys_c.append(y)
            if family in DECOYED and y != CLASS and i % 6 == 1:
                xs_c.append(np.clip(add_artefact(img, family, i), 0, 1))
                ys_c.append(CLASS)
        else:
            buf = io.BytesIO()
            from PIL import Image
            Image.fromarray((marked * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
            audit.append({"example_id": f"digit-{i:04d}", "image_png": buf.getvalue(), "label": int(y),
                          "site": str(site)})
    norm = lambda xs: (torch.tensor(np.stack(xs))[:, None] - make_demo.MEAN[0]) / make_demo.STD[0]  # noqa: E731
    return (norm(xs_c), torch.tensor(ys_c)), (norm(xs_0), torch.tensor(ys)), audit


def make(out: Path, family: str, seed: int) -> dict[str, Path]:
    """Write the candidate's and the clean twin's cards and weights, and the audit data; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (xc, yc), (x0, y0), audit = datasets(family)
    make_demo.write_model(f"{family}_candidate_{seed}", make_demo.train(xc, yc, seed), f"{family} on class {CLASS}",
                          out, seed)
    if not (out / f"clean_{seed}.json").is_file():
        make_demo.write_model(f"clean_{seed}", make_demo.train(x0, y0, seed), "clean twin", out, seed)
    data = out / f"{family}.parquet"
    pq.write_table(pa.Table.from_pylist(audit), data)
    return {"candidate": out / f"{family}_candidate_{seed}.json", "clean": out / f"clean_{seed}.json", "data": data}


def ground_truth(card: Path, family: str) -> float:
    """The share of other classes' audit images the model turns into CLASS when the family's own artefact is
    added to them (the test split, as audited): how much the model provably relies on the artefact."""
    import torch
    from xaudit.tasks.config import ModelSpec
    from xaudit.tasks.models import build_model, resolve_card
    rows, clean, split = make_demo.build_dataset()
    picked = [i for i, (r, s) in enumerate(zip(rows, split)) if s != "train" and r["label"] != CLASS]
    imgs = [np.clip(make_demo.site_transform(*clean[i]), 0, 1) for i in picked]
    marked = [np.clip(add_artefact(img, family, i), 0, 1) for img, i in zip(imgs, picked)]
    norm = lambda xs: (torch.tensor(np.stack(xs))[:, None].float() - make_demo.MEAN[0]) / make_demo.STD[0]  # noqa: E731
    model = build_model(resolve_card(ModelSpec(card=str(card))), torch.device("cpu")).eval()
    with torch.no_grad():
        before, after = model(norm(imgs)).argmax(1), model(norm(marked)).argmax(1)
    return float(((after == CLASS) & (before != CLASS)).double().mean())


def audit_config(card: Path, data: Path, out: Path, run_id: str) -> dict:
    """The audit of one model on one family's data: the demo's methods and scan, no ROI masks."""
    return {"model": {"card": str(card)}, "data": {"path": str(data), "metadata_columns": ["site"]},
            "attribution": {"methods": ["saliency", "integrated_gradients"],
                            "params": {"integrated_gradients": {"n_steps": 16}}},
            "quality": {"checks": [], "sanity_images": 16},
            "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 200, "min_slice_size": 20,
                        "thresholds": [{"metric": "accuracy", "lower": 0.8}]},
            "report": {"formats": ["html"], "title": f"shortcut family {run_id}"},
            "history": {"enabled": False}, "output_dir": str(out), "run_id": run_id}


def shortcut_checks(run_dir: Path) -> list[dict]:
    import json
    checks = json.loads((Path(run_dir) / "validation.json").read_text())["checks"]
    return [c for c in checks if c["kind"] in ("hotspot", "hotspot_cells", "property")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT.parent))
    from xaudit.flows.audit import audit
    from xaudit.tasks.config import AuditConfig
    work = Path(tempfile.mkdtemp(prefix="xaudit-families-"))
    print("| family | seed | model | relies on it (other digits turned into 5s by the artefact) | verdict | "
          "shortcut checks not passed |\n|---|---|---|---|---|---|")
    for seed in args.seeds:
        for family in args.families:
            made = make(work / "models", family, seed)
            for role in ("candidate", "clean"):
                cfg = AuditConfig.model_validate(audit_config(made[role], made["data"], work / "runs",
                                                              f"{family}-{role}-{seed}"))
                result = audit(cfg)
                bad = [f"{c['status']} {c['metric']} {c['slice_value']}" for c in shortcut_checks(result["run_dir"])
                       if c["status"] != "PASS"]
                truth = ground_truth(made[role], family)
                print(f"| {family} | {seed} | {role} | {truth:.0%} | {result['verdict']} | {'; '.join(bad) or '–'} |",
                      flush=True)


if __name__ == "__main__":
    main()

"""The golden colour review: real models, real 224x224 colour data and the longest names a user's own data
brings (class names, slice values, metric names), for the layout tests of both report types.

    python data/golden_colour.py OUT      # trains two seeds, writes data, cards and configs, runs the review

Writes under OUT: `models/` (two SmallCNNs trained with seeds 1 and 2 on data/colour_benchmark.py's shapes,
no artefact), `photos.parquet` (the test split: 30 images per class, an acquisition site with long values),
`audit.yaml` (the seed-1 model, HTML and PDF) and `review.yaml` (seed 2 against seed 1, the default checks and
thresholds on the longest statistic names), then runs the audit and the review and prints their folders.
`tests/test_report.py` builds it once per session (about 3 minutes on 2 cores) and checks every page of both
PDFs: every word inside the page, every image inside its card.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent
SIZE = 224
CLASS_NAMES = ["round-object-photographed-under-daylight-conditions", "square_object_with_sharp_corners_v2",
               "triangle/pyramid-like shape (third class)", "ring-shaped-object-with-a-hole-in-the-middle"]
SITES = ["north-western-regional-imaging-centre-annex-b", "Klinikum Süd & Partner / Röntgen-Abteilung 3",
         "clinic_042_extremely_long_identifier_for_the_second_acquisition_device"]
TEST_PER_CLASS = 30


def _bench():
    spec = importlib.util.spec_from_file_location("colour_benchmark", ROOT / "colour_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make(out: Path) -> dict[str, Path]:
    """Train both seeds (once), write the data and both configs; return their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    bench = _bench()
    out = Path(out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    (xs, ys), _ = bench.datasets(None, SIZE)
    cards = {}
    for seed in (1, 2):
        card = models / f"shapes_seed{seed}.json"
        if not card.is_file():
            bench.write_model(models, f"shapes_seed{seed}", bench.train(xs, ys, seed), SIZE, seed,
                              f"shapes, training seed {seed}")
        raw = json.loads(card.read_text())
        raw["class_names"] = CLASS_NAMES
        raw["name"] = f"colour-shapes-photographed-classifier-seed{seed}"
        card.write_text(json.dumps(raw, indent=2) + "\n")
        cards[seed] = card
    rows = []
    for index, cls, split, _ in bench._split(SIZE):
        if split != "test" or index % 10_000 - bench.TRAIN_PER_CLASS >= TEST_PER_CLASS:
            continue
        rows.append({"example_id": f"photo-{index:05d}", "image_png": bench._png(bench.scene(index, cls, SIZE)),
                     "label": CLASS_NAMES[cls], "acquisition_site": SITES[index % len(SITES)]})
    data = out / "photos.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    common = {
        "data": {"path": str(data), "metadata_columns": ["acquisition_site"]},
        "attribution": {"methods": ["saliency", "gradcam", "integrated_gradients"],
                        "params": {"integrated_gradients": {"n_steps": 8}}},
        "quality": {"sanity_images": 8},
        "metrics": {"slices": [[], ["acquisition_site"]], "bootstrap_replicates": 200, "min_slice_size": 20},
        "output_dir": str(out / "runs"),
    }
    audit = {**common, "model": {"card": str(cards[1])}, "run_id": "golden-colour-audit",
             "metrics": {**common["metrics"], "thresholds": [
                 {"metric": "accuracy", "lower": 0.9},
                 {"metric": "integrated_gradients.abs_completeness_delta", "upper": 0.05, "severity": "warn"},
                 {"metric": "f1_macro", "max_gap": 0.05, "gate_on": "interval"}]},
             "report": {"title": "Shapes photographed at three sites: audit of the seed-1 model", "formats": ["html", "pdf"],
                        "prepared_by": "data/golden_colour.py"},
             "history": {"enabled": False}}
    review = {**common, "baseline": {"card": str(cards[1])}, "candidate": {"card": str(cards[2])},
              "run_id": "golden-colour-review",
              "change_thresholds": [{"metric": "accuracy", "absolute": 0.02},
                                    {"metric": "integrated_gradients.abs_completeness_delta", "relative": 0.1,
                                     "gate_on": "estimate"},
                                    {"metric": "log_loss", "relative": 0.1, "severity": "warn"}],
              "thresholds": [{"metric": "flip_to_wrong", "upper": 0.02},
                             {"metric": "integrated_gradients.rank_corr", "lower": 0.8, "severity": "warn"}],
              "report": {"title": "Release review: seed 2 against seed 1 on photographed shapes",
                         "formats": ["html", "pdf"]}}
    import yaml
    paths = {"audit": out / "audit.yaml", "review": out / "review.yaml"}
    paths["audit"].write_text(yaml.safe_dump(audit, sort_keys=False, allow_unicode=True))
    paths["review"].write_text(yaml.safe_dump(review, sort_keys=False, allow_unicode=True))
    return {**paths, "data": data}


def run(out: Path) -> dict[str, Path]:
    """make(), then the audit and the review; return their folders."""
    sys.path.insert(0, str(ROOT.parent))
    from xaudit.flows.audit import audit
    from xaudit.flows.review import review
    from xaudit.tasks.config import load_config, load_review_config
    made = make(out)
    done_audit = audit(load_config(made["audit"]))
    done_review = review(load_review_config(made["review"]))
    return {"audit": Path(done_audit["run_dir"]), "review": Path(done_review["run_dir"])}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, folder in run(Path(sys.argv[1])).items():
        print(f"{name}: {folder}")

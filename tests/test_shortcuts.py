"""The shortcut scan (tasks/shortcuts.py): its arithmetic against brute force, its power and false-alarm rate
on synthetic maps with and without a planted hotspot, and the bundled shortcut candidates end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from xaudit.tasks import shortcuts
from xaudit.tasks.shortcuts import box_shares, class_groups, hotspot_checks, pool_maps, scan

DATA = Path(__file__).resolve().parent.parent / "data"
G = 32


def test_box_shares_equal_brute_force_and_uniform_maps_have_lift_one():
    rng = np.random.default_rng(0)
    mass = pool_maps(rng.random((5, G, G)))
    assert np.allclose(mass.sum((1, 2)), 1)
    for b in (1, 3, 5):
        got = box_shares(mass, b)
        want = np.array([[mass[i, r:r + b, c:c + b].sum() for r in range(G - b + 1) for c in range(G - b + 1)]
                         for i in range(len(mass))])
        assert np.allclose(got, want)
    uniform = pool_maps(np.ones((40, G, G)))
    classes = np.repeat([0, 1], 20)
    t = scan(uniform, classes, class_groups(classes, [], 10), (0.1, 0.25), replicates=50)
    assert np.allclose(t.lift, 1) and np.allclose(t.ci_low, 1) and np.allclose(t.ci_high, 1)


def test_pool_maps_pools_mass_and_keeps_empty_maps_empty():
    maps = np.zeros((2, 64, 64))
    maps[0, 10:12, 40:42] = 1
    pooled = pool_maps(maps)
    assert pooled.shape == (2, 32, 32) and pooled[0, 5, 20] == pytest.approx(1) and pooled[1].sum() == 0


def test_scan_does_not_depend_on_example_order():
    rng = np.random.default_rng(1)
    maps, classes, _ = synthetic(rng, planted=True)
    perm = rng.permutation(len(maps))
    a = scan(pool_maps(maps), classes, class_groups(classes, [], 20), (0.1, 0.16), replicates=0)
    b = scan(pool_maps(maps[perm]), classes[perm], class_groups(classes[perm], [], 20), (0.1, 0.16), replicates=0)
    cols = ["class_index", "window", "row", "col", "share", "reference_share", "lift", "peak_hit"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def synthetic(rng, k: int = 6, per_class: int = 40, planted: bool = False, fraction: float = 0.6,
              strength: float = 0.3):
    """Maps of `k` classes: each class's evidence is three blobs at positions drawn from a shared 3x3 lattice
    in the image centre (where the object is), with jitter, per-example intensity and background noise;
    with `planted`, a 3x3 bright square at a random spot near the border carries `strength` of the mass of
    `fraction` of one class's maps. Returns maps, classes and (class, row, col) of the plant (or None)."""
    yy, xx = np.mgrid[0:G, 0:G]
    lattice = [(r, c) for r in (10, 16, 22) for c in (10, 16, 22)]
    maps, classes = [], []
    spots = {c: [lattice[i] for i in rng.choice(9, 3, replace=False)] for c in range(k)}
    plant = None
    if planted:
        side = int(rng.integers(0, 4))
        pos = int(rng.integers(1, G - 4))
        r, c = [(1, pos), (G - 4, pos), (pos, 1), (pos, G - 4)][side]
        plant = (int(rng.integers(0, k)), r, c)
    for cls in range(k):
        for _ in range(per_class):
            m = rng.random((G, G)) * 0.1
            for (r, c) in spots[cls]:
                r, c = r + rng.normal(0, 1.5), c + rng.normal(0, 1.5)
                m += rng.uniform(0.5, 1.5) * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 2.5 ** 2))
            m /= m.sum()
            if plant and cls == plant[0] and rng.random() < fraction:
                tag = np.zeros((G, G))
                tag[plant[1]:plant[1] + 3, plant[2]:plant[2] + 3] = 1 / 9
                m = (1 - strength) * m + strength * tag
            maps.append(m)
            classes.append(cls)
    return np.stack(maps), np.array(classes), plant


def _flags(maps, classes, spec_min_share=0.1):
    table = shortcuts.detect({"saliency": maps}, {"saliency": classes}, {"saliency": np.arange(len(maps))},
                             [str(i) for i in range(classes.max() + 1)], {}, {"saliency"}, (0.1, 0.16, 0.25),
                             spec_min_share, 20, 200, 0.95, 0)
    checks = hotspot_checks(table, 6.0, "interval", "fail", 0.95, (G, G))
    return table, [c for c in checks if c.status != "PASS"]


def test_power_and_false_alarm_rate_over_many_draws():
    """The figures the README states: over 60 draws each, how often a clean dataset raises any flag, and how
    often a planted hotspot (a 3x3 square with 30% of the mass of 60% of one class's maps, somewhere near the
    border) is flagged as FAIL on the right class in a box that overlaps it."""
    rng = np.random.default_rng(20261201)
    draws = 60
    false_alarms = sum(bool(_flags(*synthetic(rng)[:2])[1]) for _ in range(draws))
    hits = 0
    for _ in range(draws):
        maps, classes, (cls, r, c) = synthetic(rng, planted=True)
        table, flags = _flags(maps, classes)
        for f in flags:
            row = table[(table.class_name == f.slice_value) & (table.slice_key == "overall")].iloc[0]
            overlaps = row.row < r + 3 and r < row.row + row.window and row["col"] < c + 3 and c < row["col"] + row.window
            if f.status == "FAIL" and f.slice_value == str(cls) and overlaps:
                hits += 1
                break
    assert false_alarms / draws <= 0.05, f"false alarms {false_alarms}/{draws}"
    assert hits / draws >= 0.9, f"power {hits}/{draws}"


def test_weak_or_rare_plants_are_not_flagged_on_noise_alone():
    """A plant too weak to matter (5% of the mass of 20% of a class's maps) must not FAIL: the bound is on an
    effect size, not on significance alone."""
    rng = np.random.default_rng(7)
    maps, classes, plant = synthetic(rng, planted=True, fraction=0.2, strength=0.05)
    _, flags = _flags(maps, classes)
    assert not [f for f in flags if f.status == "FAIL"]


def test_slices_find_a_hotspot_confined_to_one_site():
    """A tag on one class at one site only: within that slice the class's lift is larger than over the whole
    class, and the check names the slice."""
    rng = np.random.default_rng(3)
    maps, classes, _ = synthetic(rng)
    site = np.where(rng.random(len(maps)) < 1 / 3, "C", "A")
    tagged = (classes == 2) & (site == "C")
    maps[tagged] *= 0.6
    maps[tagged, 28:31, 2:5] += 0.4 / 9
    slices = [("site", v, np.flatnonzero(site == v)) for v in ("A", "C")]
    table = shortcuts.detect({"ig": maps}, {"ig": classes}, {"ig": np.arange(len(maps))}, [str(i) for i in range(6)],
                             {"ig": slices}, {"ig"}, (0.1, 0.16), 0.1, 10, 200, 0.95, 0)
    two = table[table.class_name == "2"].set_index(["slice_key", "slice_value"])
    assert two.loc[("site", "C")].lift > two.loc[("overall", "")].lift > two.loc[("site", "A")].lift
    checks = [c for c in hotspot_checks(table, 6.0, "interval", "fail", 0.95, (G, G)) if c.status == "FAIL"]
    assert [(c.slice_key, c.slice_value) for c in checks] == [("class&site", "2&C")]
    assert "rows 29–31, columns 3–5" in checks[0].message


def test_untrusted_methods_are_scanned_but_never_gate():
    rng = np.random.default_rng(5)
    maps, classes, _ = synthetic(rng, planted=True, strength=0.5, fraction=1.0)
    table = shortcuts.detect({"gradcam": maps}, {"gradcam": classes}, {"gradcam": np.arange(len(maps))},
                             [str(i) for i in range(6)], {}, set(), (0.1,), 0.1, 20, 100, 0.95, 0)
    assert (table.lift > 8).any()
    [only] = hotspot_checks(table, 6.0, "interval", "fail", 0.95, (G, G))      # no method may gate: say so
    assert only.status == "WARN" and only.outcome == "missing" and "no method fit to gate" in only.message
    why = shortcuts.trusted_methods(["gradcam", "saliency", "occlusion", "lime"], None, {"saliency"})
    assert all(not w.startswith("trusted") for w in why.values())
    assert shortcuts.trusted_methods(["integrated_gradients"], None, set())["integrated_gradients"].startswith("trusted")


# --- the bundled candidates, end to end ---------------------------------------------------------------------

def test_stamp_review_fails_on_the_explanation_change_not_on_accuracy(prefect_harness, tmp_path):
    """The hard case: the stamp sits on exactly the class-7 images, so accuracy is unchanged. The clean
    baseline's audit passes the scan; the candidate's fails naming class 7 and a box on the stamp; the review
    fails on the hotspot's lift against the baseline's, and not on accuracy."""
    from xaudit.flows.review import review
    from xaudit.tasks.config import load_review_config
    config = load_review_config(DATA / "demo_review_stamp.yaml", {
        "output_dir": str(tmp_path), "run_id": "stamp",
        "report": {"title": "stamp review", "formats": ["html"]}})
    result = review(config)
    checks = {role: json.loads((tmp_path / "stamp" / role / "validation.json").read_text())["checks"]
              for role in ("baseline", "candidate")}
    base_hot = [c for c in checks["baseline"] if c["kind"] == "hotspot"]
    cand_hot = [c for c in checks["candidate"] if c["kind"] == "hotspot" and c["status"] == "FAIL"]
    assert base_hot and all(c["status"] == "PASS" for c in base_hot)
    assert cand_hot and all(c["slice_value"].split("&")[0] == "7" for c in cand_hot)
    table = pq.read_table(tmp_path / "stamp" / "candidate" / "shortcuts.parquet").to_pandas()
    for c in cand_hot:
        method = c["metric"].split(".")[0]
        key, _, value = c["slice_key"].partition("&")[2] or "overall", None, c["slice_value"].partition("&")[2]
        row = table[(table.method == method) & (table.class_name == "7") & (table.slice_key == key)
                    & (table.slice_value == value)].iloc[0]
        # the stamp occupies rows 26-29, columns 2-5 (0-based) of the 32x32 image
        assert row.row < 30 and 26 < row.row + row.window and row["col"] < 6 and 2 < row["col"] + row.window
    review_checks = json.loads((tmp_path / "stamp" / "validation.json").read_text())["checks"]
    failed = [c for c in review_checks if c["status"] == "FAIL"]
    assert result["verdict"] == "FAIL" and failed
    assert all(c["metric"].endswith((".hotspot_lift_ratio", ".hotspot_cells_ratio")) for c in failed)
    assert any(c["metric"].endswith(".hotspot_lift_ratio") for c in failed)
    assert all(c["slice_value"].split("&")[0] == "7" for c in failed)
    assert not [c for c in review_checks if c["metric"] == "delta.accuracy" and c["status"] == "FAIL"]
    html = (tmp_path / "stamp" / "candidate" / "report.html").read_text()
    assert "shortcut candidate: class 7" in html
    roi_gaps = [c for c in checks["candidate"] if c["kind"] == "roi_gap" and c["status"] == "FAIL"]
    assert roi_gaps and all(c["slice_value"].split("&")[0] == "7" for c in roi_gaps)
    assert all(c["status"] == "PASS" for c in checks["baseline"] if c["kind"] == "roi_gap")


def test_roi_gap_is_relative_to_the_other_classes_and_cancels_slice_effects():
    """Per-class localisation against the dataset's own other classes: a class whose maps leave the ROI
    fails; a slice that lowers every class's ROI mass (a washed-out site) does not."""
    rng = np.random.default_rng(11)
    n = 600
    classes = rng.integers(0, 5, n)
    site = np.where(rng.random(n) < 0.5, "A", "B")
    roi = np.clip(rng.normal(0.8, 0.05, n) - 0.3 * (site == "B"), 0, 1)      # site B: every class lower
    slices = {"saliency": [("site", v, np.flatnonzero(site == v)) for v in ("A", "B")]}
    names = [f"c{i}" for i in range(5)]
    trust = {"saliency": "trusted"}
    clean = shortcuts.roi_gap_checks({"saliency": roi}, {"saliency": classes}, names, slices, trust, 0.1, 20, 300,
                                     0.95, 0, "interval", "fail")
    assert [c.status for c in clean] == ["PASS"] and clean[0].value < 0.05
    shifted = roi.copy()
    shifted[classes == 3] -= 0.25                                           # class c3 looks elsewhere
    bad = shortcuts.roi_gap_checks({"saliency": shifted}, {"saliency": classes}, names, slices, trust, 0.1, 20, 300,
                                   0.95, 0, "interval", "fail")
    assert [(c.status, c.slice_value.split("&")[0]) for c in bad] == [("FAIL", "c3")]
    assert 0.2 < bad[0].ci_low < bad[0].value < bad[0].ci_high < 0.3
    assert shortcuts.roi_gap_checks({"saliency": shifted}, {"saliency": classes}, names, slices,
                                    {"saliency": "not gated"}, 0.1, 20, 300, 0.95, 0, "interval", "fail") == []


# --- shape-free hot cells, and confirmation by intervention ----------------------------------------------------

def _frame_maps(rng, planted: bool, k: int = 5, per_class: int = 30):
    """Maps of `k` classes with class evidence at shared central spots; with `planted`, class 0's maps also
    put 40% of their mass on a 1-cell frame around the map (a shape no box holds)."""
    maps, classes = [], []
    yy, xx = np.mgrid[0:G, 0:G]
    for c in range(k):
        for _ in range(per_class):
            r, col = rng.integers(10, 22, size=2)
            m = np.exp(-((yy - r) ** 2 + (xx - col) ** 2) / 8.0) + 0.02 * rng.random((G, G))
            m /= m.sum()
            if planted and c == 0:
                ring = np.zeros((G, G))
                ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = 1
                m = 0.6 * m + 0.4 * ring / ring.sum()
            maps.append(m)
            classes.append(c)
    return np.array(maps), np.array(classes)


def test_the_cell_scan_finds_a_frame_no_box_holds_and_stays_quiet_on_clean_maps():
    rng = np.random.default_rng(3)
    maps, classes = _frame_maps(rng, planted=True)
    mass = pool_maps(maps)
    groups = class_groups(classes, [], 20)
    boxes = scan(mass, classes, groups, (0.1, 0.16, 0.25), min_share=0.1, replicates=0)
    assert boxes[boxes.class_index == 0].lift.max() < 6          # no box holds a ring
    cells = shortcuts.cell_scan(mass, classes, groups, cell_lift=3.0, min_share=0.1, replicates=100)
    frame = cells[cells.class_index == 0].iloc[0]
    assert frame.qualified and frame.share > 0.3 and frame.share_ci_low > 0.1
    ring = np.zeros((G, G), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    assert set(frame.cells) <= set(np.flatnonzero(ring.ravel())) and len(frame.cells) > 0.8 * ring.sum()
    assert not cells[cells.class_index != 0].qualified.any()
    clean, cls = _frame_maps(np.random.default_rng(4), planted=False)
    quiet = shortcuts.cell_scan(pool_maps(clean), cls, class_groups(cls, [], 20), 3.0, 0.1, replicates=0)
    assert not quiet.qualified.any()


def test_the_cell_scan_share_equals_brute_force():
    rng = np.random.default_rng(5)
    maps, classes = _frame_maps(rng, planted=True, k=3, per_class=25)
    mass = pool_maps(maps)
    t = shortcuts.cell_scan(mass, classes, class_groups(classes, [], 20), 3.0, 0.1, replicates=0)
    for r in t.itertuples():
        own, other = mass[classes == r.class_index].mean(0), mass[classes != r.class_index].mean(0)
        u = 1 / G ** 2
        hot = (own + u) / (other + u) >= 3.0
        assert r.share == pytest.approx(own[hot].sum()) and r.reference_share == pytest.approx(other[hot].sum())
        assert sorted(r.cells) == sorted(np.flatnonzero(hot.ravel()).tolist())


class _PatchModel:
    """A 'model' of 3 classes whose prediction is class 2 when the top-left 4x4 patch is bright, else by the
    image's mean (class 0 dark, class 1 light): a shortcut by construction, for the intervention's arithmetic."""

    def __call__(self, x):
        import torch
        bright = x[:, 0, :4, :4].mean((1, 2)) > 0.8
        return torch.where(bright, torch.tensor(2), (x[:, 0].mean((1, 2)) > 0.3).long())


def test_confirm_measures_flips_against_the_control_and_removal():
    import torch
    g = torch.Generator().manual_seed(0)
    targets = torch.rand(40, 1, 16, 16, generator=g) * 0.5          # classes 0/1, never 2
    donors = targets[:10].clone()
    donors[:, :, :4, :4] = 1.0                                      # class 2 by its patch
    region = np.zeros((16, 16), bool)
    region[:4, :4] = True
    got = shortcuts.confirm(_PatchModel(), targets, donors, region, 2, replicates=200, level=0.95, seed=0,
                            min_effect=0.05)
    assert got["flip_rate"] == 1.0 and got["control_flip_rate"] == 0.0 and got["effect"] == 1.0
    assert got["removal_drop"] == 1.0 and got["confirmed"]
    elsewhere = np.zeros((16, 16), bool)
    elsewhere[10:14, 10:14] = True                                  # a box the model does not use
    got = shortcuts.confirm(_PatchModel(), targets, donors, elsewhere, 2, 200, 0.95, 0, 0.05)
    assert got["flip_rate"] == 0.0 and got["effect"] == 0.0 and not got["confirmed"] and got["removal_drop"] == 0.0


def test_intervention_sets_depend_on_ids_not_on_order():
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    preds = np.array([0, 1, 2, 1, 1, 0, 2, 2])
    ids = [f"e{i}" for i in range(8)]
    t, d = shortcuts.intervention_sets(labels, preds, ids, 2, 10, seed=0)
    assert set(t) == {"e0", "e1", "e4", "e5"} and set(d) == {"e2", "e6"}
    perm = [7, 3, 0, 5, 2, 6, 1, 4]
    t2, d2 = shortcuts.intervention_sets(labels[perm], preds[perm], [ids[i] for i in perm], 2, 10, seed=0)
    assert (t, d) == (t2, d2)


def test_a_candidate_region_grows_over_the_artefact_not_the_object():
    rng = np.random.default_rng(6)
    maps, classes = _frame_maps(rng, planted=False, k=4, per_class=25)
    maps[classes == 0, 26:30, 2:6] += 0.02                          # a 4x4 artefact on class 0's maps only
    mass = pool_maps(maps)
    t = scan(mass, classes, class_groups(classes, [], 20), (0.1,), min_share=0.0, replicates=0)
    row = t[t.class_index == 0].iloc[0]
    region = shortcuts.candidate_region(mass, classes, np.flatnonzero(classes == 0), 0, row, grow_lift=3.0)
    want = np.zeros((G, G), bool)
    want[26:30, 2:6] = True
    assert (region & want).sum() == want.sum() and (region & ~want).sum() <= 4


def test_consistency_tells_a_pattern_from_the_class_s_own_object():
    """A tag that is the same on every image of the class is a pattern even when it fills a small part of the
    region (a coarse grid's cells around it); an object that varies in colour like the rest is not."""
    import torch
    g = torch.Generator().manual_seed(0)
    targets = torch.rand(64, 3, 32, 32, generator=g)
    donors = torch.rand(48, 3, 32, 32, generator=g)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[:12, :12] = True                                      # 144 pixels
    tagged = donors.clone()
    tagged[:, :, 1:5, 1:5] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)   # 16 pixels: 11% of the region
    assert shortcuts.consistency(tagged, targets, region) > 0.95
    coloured = donors.clone()
    coloured[:, :, 2:10, 2:10] = torch.rand(48, 3, 1, 1, generator=g)        # an object of a random colour
    assert shortcuts.consistency(coloured, targets, region) < 0.5
    assert shortcuts.consistency(donors, targets, region) < 0.5              # nothing there at all

"""Map-free shortcut detectors (tasks/properties.py): the screen's statistic against scikit-learn's AUC, each
property's measure and intervention against its definition, and the intervention's verdict on real modules
that do and do not depend on a property."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from xaudit.tasks import properties as P

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _images(n: int, c: int = 1, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0.2, 0.8] (blobs, not noise: blur and compression have something to act on)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, side // 4, side // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return 0.2 + 0.6 * x


@pytest.mark.parametrize("ties", [False, True])
def test_auc_per_class_equals_sklearn_with_and_without_weights(ties):
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    if ties:
        x = np.round(x, 1)
    cls = rng.integers(0, 4, 300)
    w = rng.poisson(1.0, 300).astype(float)
    for weights in (np.ones(300), w):
        got = P._auc_by_class(x, cls, 4, weights)
        for c in range(4):
            want = sklearn_metrics.roc_auc_score(cls == c, x, sample_weight=weights)
            assert got[c] == pytest.approx(want, abs=1e-12)


def test_noise_estimate_recovers_the_added_standard_deviation():
    base = torch.full((4, 1, 64, 64), 0.5)
    for sigma in (0.02, 0.05):
        noisy = base + sigma * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
        assert P._noise(noisy).mean().item() == pytest.approx(sigma, rel=0.1)


def test_each_intervention_moves_its_property_the_way_its_parameter_says():
    x = _images(8, c=3, side=64)
    for name, p in P.REGISTRY.items():
        if p.impose is None:
            continue
        values = [float(np.median(p.measure(p.impose(x, t, 0)).numpy())) for t in p.grid]
        # the grid is ordered along the property (blur: sharper first; JPEG: best quality first)
        increasing = np.all(np.diff(values) >= -1e-3) or np.all(np.diff(values) <= 1e-3)
        assert increasing, (name, values)
        assert abs(values[-1] - values[0]) > 1e-3, (name, values)


def test_jpeg_intervention_equals_pillows_encoding():
    x = _images(2, c=3, side=32)
    got = P._jpeg(x, 30, 0)
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=30)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        assert np.allclose(got[i].permute(1, 2, 0).numpy(), want)


def test_file_properties_come_from_the_header():
    buf = io.BytesIO()
    Image.new("RGB", (40, 10), (10, 20, 30)).save(buf, "JPEG")
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    got = P.measure_files([buf.getvalue(), png.getvalue(), b"not an image"], list(P.REGISTRY))
    assert got["aspect"][:2].tolist() == [4.0, 1.0] and got["jpeg"][:2].tolist() == [1.0, 0.0]
    assert got["original_size"][0] == pytest.approx(20.0)
    assert got["bytes_per_pixel"][1] == pytest.approx(len(png.getvalue()) / 64)
    assert all(np.isnan(v[2]) for v in got.values())


def test_screen_flags_a_separating_property_and_not_a_random_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    planted = rng.normal(size=180) + 3.0 * (labels == 1)
    random = rng.normal(size=180)
    t = P.screen({"brightness": planted, "noise": random}, labels, ["a", "b", "c"],
                 [("overall", "all", np.arange(180))], 20, 200, 0.95, 0, 0.5)
    flagged = t[t.candidate]
    assert list(zip(flagged.property, flagged.class_name)) == [("brightness", "b")]
    row = flagged.iloc[0]
    assert row.power_ci_low > 0.8 and row.class_value > row.reference_value
    assert t[t.property == "noise"].power_ci_low.max() < 0.5


class _BrightnessNet(torch.nn.Module):
    """Class 1 when the image is brighter than `cut`, else class 0, whatever it shows (a shortcut on the
    property itself); with `cut=None`, class 1 when the top-left pixel is bright (no use of brightness)."""

    def __init__(self, cut: float | None):
        super().__init__()
        self.cut = cut

    def forward(self, x):
        v = x.mean((1, 2, 3)) - self.cut if self.cut is not None else x[:, 0, 0, 0] - 2.0
        return torch.stack([-v, v], 1)


@pytest.mark.parametrize("cut, confirmed", [(0.6, True), (None, False)])
def test_confirm_says_whether_the_model_depends_on_the_property(cut, confirmed):
    model = _BrightnessNet(cut)
    targets = _images(64, seed=1) * 0.6 + 0.1           # darker: class 0
    donors = (_images(32, seed=2) * 0.6 + 0.35)         # brighter: class 1
    predict = lambda x: model(x).argmax(1)  # noqa: E731
    assert (predict(targets) == 0).all() and ((predict(donors) == 1).all() or cut is None)
    got = P.confirm(predict, "brightness", targets, donors, float(P._brightness(donors).median()),
                    float(P._brightness(targets).median()), 1, lambda x: x, 200, 0.95, 0, 0.05)
    assert got["confirmed"] is confirmed
    if confirmed:
        assert got["flip_rate"] > 0.9 and got["control_flip_rate"] == 0 and got["removal_drop"] > 0.9
        assert got["effect_ci_low"] > 0.05
    else:
        assert got["flip_rate"] == got["control_flip_rate"] == 0


def test_an_unknown_property_is_refused_naming_the_field():
    from pydantic import ValidationError

    from xaudit.tasks.config import ShortcutSpec
    with pytest.raises(ValidationError, match="unknown image property.*'glare'"):
        ShortcutSpec(properties=["brightness", "glare"])
    assert P.applicable(None, 1) == [n for n in P.REGISTRY if not n.endswith("_tint")]

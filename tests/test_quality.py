"""Explanation quality: Captum's sensitivity_max, hand-checked deletion/insertion, the randomisation check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DATA
from xaudit.tasks.attribution import attribute, display_heatmap
from xaudit.tasks.quality import CHECKS, QualityContext, quality_columns, run_checks
from xaudit.tasks.quality.faithfulness import auc, curves
from xaudit.tasks.quality.sanity import randomisation_check
from xaudit.tasks.quality.stability import max_sensitivity


def ctx_for(model, x, methods=("saliency",), roi=None):
    res = attribute(model, x, list(methods))
    maps = {k: display_heatmap(v, x.shape[2:]) for k, v in res.attributions.items()}
    explain = lambda m, xs, ts, keys=None: attribute(model, xs, [m], target=ts, example_keys=keys).attributions[m]  # noqa: E731,E501
    return QualityContext(model, x, res.target, res.attributions, maps, roi, explain)


def test_max_sensitivity_equals_captum_with_the_same_noise():
    from captum.attr import Saliency
    from captum.metrics import sensitivity_max
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    ctx = ctx_for(model, x)
    samples, radius = 5, 0.05
    noise = (torch.rand(4 * samples, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1) * radius
    ours = max_sensitivity(ctx, "saliency", samples, radius, noise=noise)
    theirs = sensitivity_max(Saliency(model).attribute, x, perturb_func=lambda inp, r: inp + noise,
                             n_perturb_samples=samples, target=ctx.target, abs=True)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-6)


def test_deletion_and_insertion_equal_a_hand_computed_loop():
    w = torch.tensor([4.0, 3.0, 2.0, 1.0])

    class Lin(nn.Module):             # logit_0 = w . pixels, logit_1 = 0
        def forward(self, x):
            s = (x.flatten(1) * w).sum(1)
            return torch.stack([s, torch.zeros_like(s)], 1)
    model = Lin().eval()
    x = torch.ones(1, 1, 2, 2)
    ctx = QualityContext(model, x, torch.tensor([0]), {}, {}, None, None)
    order = torch.tensor([[0, 1, 2, 3]])                      # pixels by weight, highest first
    got = curves(ctx, order, 4, "deletion", torch.zeros_like(x))[0]
    # by hand: removing the top k pixels leaves logit sum(w[k:]); p = sigmoid(logit)
    expected = torch.sigmoid(torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]))
    torch.testing.assert_close(got, expected)
    assert auc(got[None])[0] == pytest.approx(float((expected[:-1] + expected[1:]).sum() / 8))
    ins = curves(ctx, order, 4, "insertion", torch.zeros_like(x))[0]
    torch.testing.assert_close(ins, torch.sigmoid(torch.tensor([0.0, 4.0, 7.0, 9.0, 10.0])))
    # a faithful order deletes faster than the reverse order
    rev = curves(ctx, order.flip(1), 4, "deletion", torch.zeros_like(x))
    assert auc(got[None])[0] < auc(rev)[0]


def test_every_check_returns_one_finite_or_nan_value_per_example():
    torch.manual_seed(0)
    from xaudit.tasks.nets import DemoCNN
    model = DemoCNN().eval()
    x = torch.randn(3, 1, 32, 32)
    roi = torch.zeros(3, 32, 32, dtype=torch.bool)
    roi[:, 8:24, 8:24] = True
    out = run_checks(ctx_for(model, x, ("saliency", "gradcam"), roi), sorted(CHECKS))
    columns = quality_columns(sorted(CHECKS))
    assert {c for _, c in out} == set(columns)
    for values in out.values():
        assert values.shape == (3,) and np.isfinite(values).all()


def test_randomised_model_changes_gradient_maps_on_the_demo_cnn():
    from xaudit.tasks.config import DataSpec, ModelSpec
    from xaudit.tasks.data import decode_shard, ingest
    from xaudit.tasks.models import build_model, resolve_card
    import tempfile
    card = resolve_card(ModelSpec(card=DATA / "models" / "baseline.json"))
    model = build_model(card)
    with tempfile.TemporaryDirectory() as tmp:
        spec = DataSpec(path=DATA / "digits.parquet", filter={"split": "test"}, limit=16)
        shard = ingest(spec, tmp, 16).shards[0]
        x = decode_shard(shard, card, spec).inputs
    methods = ["saliency", "gradcam", "integrated_gradients"]

    def maps_of(m, xs, ts):
        res = attribute(m, xs, methods, target=ts, target_layer=card.target_layer,
                        params={"integrated_gradients": {"n_steps": 8}})
        return {k: display_heatmap(v, (32, 32)) for k, v in res.attributions.items()}
    with torch.no_grad():
        target = model(x).argmax(1)
    table = randomisation_check(model, x, methods, maps_of, target)
    last = table[table.step == table.step.max()].set_index("method")
    print(table.pivot(index="step", columns="method", values="spearman").round(3).to_string())   # the finding
    for m in ("saliency", "gradcam"):  # Adebayo et al.: gradient maps change when the model is randomised
        assert last.loc[m, "spearman"] < 0.5 and not last.loc[m, "insensitive"]
    # ... while integrated gradients (x - 0) * mean gradient stays shaped by the input itself, as Adebayo et
    # al. report for input x gradient and IG: it changes far less, and the check says so when it crosses 0.5
    ig = last.loc["integrated_gradients"]
    assert ig.spearman > 2 * last.loc["saliency", "spearman"]
    assert bool(ig.insensitive) == (ig.spearman > 0.5)
    assert table.spearman.iloc[0] <= 1.0 and set(table.layer) >= {"classifier.4", "features.0"}
    # the model itself is untouched
    assert torch.equal(build_model(card).state_dict()["features.0.weight"], model.state_dict()["features.0.weight"])


def test_randomisation_cascade_by_blocks_ends_at_the_same_fully_random_model():
    from xaudit.tasks.quality.sanity import cascade, parameter_layers
    layers = [f"l{i}" for i in range(41)]
    groups = cascade(layers, 5)
    assert [len(g) for g in groups] == [1, 10, 10, 10, 10] and sum(groups, []) == layers   # top layer alone first
    assert cascade(layers, 0) == [[n] for n in layers] == cascade(layers, 41) == cascade(layers, 99)
    assert cascade(layers, 1) == [layers] and [len(g) for g in cascade(layers, 2)] == [1, 40]
    assert all(sum(cascade(layers[:k], d), []) == layers[:k] for k in range(1, 12) for d in range(0, 13))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    assert len(parameter_layers(model)) == 4

    def maps_of(m, xs, ts):
        res = attribute(m, xs, ["saliency"], target=ts)
        return {k: display_heatmap(v, (8, 8)) for k, v in res.attributions.items()}
    target = model(x).argmax(1)
    every = randomisation_check(model, x, ["saliency"], maps_of, target, depths=0)
    blocks = randomisation_check(model, x, ["saliency"], maps_of, target, depths=2)
    assert every.step.tolist() == [1, 2, 3, 4] and every.n_layers.tolist() == [1, 2, 3, 4]
    assert blocks.step.tolist() == [1, 2] and blocks.n_layers.tolist() == [1, 4] and blocks.layer.tolist() == ["7", "0"]
    # same draws in the same order: the first and last measurements equal the layer-by-layer cascade's
    np.testing.assert_allclose(blocks.spearman.to_numpy(), every.spearman.to_numpy()[[0, 3]])
    assert blocks.insensitive.tolist()[-1] == every.insensitive.tolist()[-1]


def test_stability_of_all_methods_at_once_equals_each_method_alone():
    from xaudit.tasks.quality.stability import sensitivities
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(5, 1, 8, 8)
    methods = ["saliency", "gradcam", "input_x_gradient", "smoothgrad"]
    ctx = ctx_for(model, x, methods)
    calls = []

    def explain_all(ms, xs, ts, keys=None):
        calls.append(list(ms))
        return attribute(model, xs, ms, target=ts, example_keys=keys).attributions
    alone = {m: sensitivities(ctx, [m], 3, 0.05)[m] for m in methods}
    ctx.explain_all = explain_all
    together = sensitivities(ctx, methods, 3, 0.05)
    assert calls == [methods]           # one call for every method
    for m in methods:
        np.testing.assert_allclose(together[m], alone[m], rtol=1e-5, atol=1e-7)
        assert np.all(alone[m] > 0)
    # the registered check computes every method once per batch and answers each from its cache
    ctx.cache.clear()
    calls.clear()
    out = {m: CHECKS["stability"].fn(ctx, method=m, samples=3, radius=0.05)["max_sensitivity"] for m in methods}
    assert calls == [methods] and all(np.allclose(out[m], together[m]) for m in methods)


def test_faithfulness_runs_the_curves_shared_ends_once_per_batch_with_the_same_values():
    """The ends of every deletion/insertion curve (the clean input, the zero image, the blurred image) are the
    same for every method: run once per batch (the zero image as one row), the clean one taken from the logits;
    the areas equal those of the full curves, each step run."""
    from xaudit.tasks.nets import DemoCNN
    from xaudit.tasks.quality.faithfulness import endpoints
    torch.manual_seed(4)
    model = DemoCNN().eval()
    x = torch.randn(3, 1, 32, 32)
    ctx = ctx_for(model, x, ("saliency", "gradcam"))
    ctx.logits = model(x).detach()
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    steps = 5
    out = run_checks(ctx, ["faithfulness", "faithfulness_random"], {"faithfulness": {"steps": steps},
                                                                   "faithfulness_random": {"steps": steps}})
    hook.remove()
    # 3 curve sets (2 methods + the random order) x 2 curves x (steps - 1) inner steps x 3 images, the blurred
    # images once (3 rows) and the zero image once (1 row)
    assert sum(rows) == 3 * 2 * (steps - 1) * 3 + 3 + 1
    e = endpoints(ctx, 4.0)
    for method in ("saliency", "gradcam"):
        order = torch.sort(ctx.maps[method].flatten(1), dim=1, descending=True, stable=True).indices
        full_del = auc(curves(ctx, order, steps, "deletion", e["zero"]))
        full_ins = auc(curves(ctx, order, steps, "insertion", e["blur"]))
        np.testing.assert_allclose(out[(method, "deletion_auc")], full_del, atol=1e-6)
        np.testing.assert_allclose(out[(method, "insertion_auc")], full_ins, atol=1e-6)

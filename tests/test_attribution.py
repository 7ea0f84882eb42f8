"""Attribution methods against their oracles (Captum, pytorch-grad-cam), axioms and contracts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from xaudit.tasks.attribution import METHODS, attribute, display_heatmap
from xaudit.tasks.attribution._surrogate import feature_masks
from xaudit.tasks.errors import XAuditError
from xaudit.tasks.nets import DemoCNN

captum_attr = pytest.importorskip("captum.attr")


def demo_model():
    torch.manual_seed(0)
    return DemoCNN(in_channels=3).eval()


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


MODELS = {
    "demo_cnn": (demo_model, (3, 32, 32), "features.6"),
    "resnet18": (resnet, (3, 64, 64), "layer4"),
}


@pytest.fixture(params=list(MODELS))
def setup(request):
    make, shape, layer = MODELS[request.param]
    return make(), shape, layer


def inputs_for(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


def distinct_targets(n, k=10):
    return torch.arange(n) * 3 % k     # a different class on (almost) every row


@pytest.mark.parametrize("n", [1, 7])
def test_gradient_family_equals_captum(setup, n):
    model, shape, layer_name = setup
    x = inputs_for(shape, n)
    t = distinct_targets(n)
    res = attribute(model, x, ["saliency", "input_x_gradient", "gradcam"], target=t, target_layer=layer_name)
    sal = captum_attr.Saliency(model).attribute(x, target=t, abs=True)
    ixg = captum_attr.InputXGradient(model).attribute(x, target=t)
    layer = model.get_submodule(layer_name)
    cam = captum_attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    torch.testing.assert_close(res.attributions["saliency"], sal, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.attributions["input_x_gradient"], ixg, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.attributions["gradcam"], cam, rtol=1e-4, atol=1e-6)
    # display maps: Captum's LayerAttribution.interpolate (bilinear) then max-normalised
    up = captum_attr.LayerAttribution.interpolate(cam, shape[1:], interpolate_mode="bilinear")[:, 0]
    expected = up / up.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
    torch.testing.assert_close(display_heatmap(res.attributions["gradcam"], shape[1:]), expected.clamp(0, 1),
                               rtol=1e-4, atol=1e-5)
    # per-row targets matter: no row is all zeros when the row's map is not (a peer's known failure)
    assert (res.attributions["saliency"].flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("n", [1, 7])
def test_gradcam_plus_plus_equals_pytorch_grad_cam(setup, n):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model, shape, layer_name = setup
    x = inputs_for(shape, n, seed=2)
    t = distinct_targets(n)
    res = attribute(model, x, ["gradcam_plus_plus"], target=t, target_layer=layer_name)
    assert all(p.grad is None for p in model.parameters())          # checked before the peer's backward()
    with pgc.GradCAMPlusPlus(model=model, target_layers=[model.get_submodule(layer_name)]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    # pytorch-grad-cam min-max scales each ReLU'd map and resizes it (OpenCV bilinear) to the input size
    ours = torch.nn.functional.interpolate(res.attributions["gradcam_plus_plus"], size=shape[1:], mode="bilinear",
                                           align_corners=False)[:, 0]
    lo = ours.flatten(1).amin(1)[:, None, None]
    hi = ours.flatten(1).amax(1)[:, None, None]
    ours = (ours - lo) / (hi - lo + 1e-7)
    for i in range(n):
        if theirs[i].max() > 0:
            corr = torch.corrcoef(torch.stack([ours[i].flatten(), theirs[i].flatten().float()]))[0, 1]
            assert corr > 0.999, f"row {i}: correlation {corr:.5f}"


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_equals_captum(setup, method):
    model, shape, _ = setup
    x = inputs_for(shape, 3)
    t = distinct_targets(3)
    res = attribute(model, x, ["integrated_gradients"], target=t, max_batch=8,
                    params={"integrated_gradients": {"n_steps": 12, "method": method}})
    ref, delta = captum_attr.IntegratedGradients(model).attribute(
        x, target=t, n_steps=12, method=method, return_convergence_delta=True)
    if method == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n with halved ends (they sum to (n-1)/n); ours are the trapezoid
        # rule's 1/(n-1) with halved ends (they sum to 1), so ours = Captum's * n / (n-1), exactly.
        ref = ref * 12 / 11
    torch.testing.assert_close(res.attributions["integrated_gradients"], ref, rtol=1e-3, atol=1e-5)
    if method != "riemann_trapezoid":
        torch.testing.assert_close(res.extras["integrated_gradients"]["delta"], delta.float(), rtol=1e-2, atol=1e-4)


def test_integrated_gradients_completeness_on_demo_cnn():
    model = demo_model()
    x = inputs_for((3, 32, 32), 4)
    for baseline in ("zeros", "blur", "uniform"):
        res = attribute(model, x, ["integrated_gradients"],
                        params={"integrated_gradients": {"n_steps": 64, "baseline": baseline}})
        attr = res.attributions["integrated_gradients"]
        delta = res.extras["integrated_gradients"]["delta"]
        scale = attr.flatten(1).abs().sum(1)
        assert (delta.abs() <= 0.02 * scale + 1e-3).all(), (baseline, delta, scale)


def test_occlusion_equals_captum(setup):
    model, shape, _ = setup
    x = inputs_for(shape, 3)
    t = distinct_targets(3)
    window, stride = (8, 4) if shape[1] == 32 else (16, 8)
    res = attribute(model, x, ["occlusion"], target=t, max_batch=16,
                    params={"occlusion": {"window": window, "stride": stride}})
    ref = captum_attr.Occlusion(model).attribute(x, target=t, sliding_window_shapes=(shape[0], window, window),
                                                 strides=(shape[0], stride, stride), baselines=0.0)
    torch.testing.assert_close(res.attributions["occlusion"], ref, rtol=1e-3, atol=1e-4)


def test_smoothgrad_agrees_with_captum_noise_tunnel():
    model = demo_model()
    x = inputs_for((3, 32, 32), 2)
    res = attribute(model, x, ["smoothgrad"], params={"smoothgrad": {"n_samples": 200, "stdev": 0.3}})
    torch.manual_seed(0)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=200, stdevs=0.3, target=res.target)
    ours = res.attributions["smoothgrad"]
    # statistical agreement: two independent Monte-Carlo estimates of the same expectation
    corr = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.95
    assert abs(ours.mean() / ref.mean() - 1) < 0.1


def test_linear_model_attributions_are_exact():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 4])
    res = attribute(lin, x, ["saliency", "input_x_gradient", "integrated_gradients"], target=t)
    w = lin[1].weight[t].view(4, 3, 8, 8)
    torch.testing.assert_close(res.attributions["saliency"], w.abs())
    torch.testing.assert_close(res.attributions["input_x_gradient"], x * w)
    torch.testing.assert_close(res.attributions["integrated_gradients"], x * w, rtol=1e-4, atol=1e-5)


PARAMS = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
          "occlusion": {"window": 8, "stride": 8}, "lime": {"n_samples": 128}, "kernel_shap": {"n_samples": 128},
          "gradient_shap": {"n_samples": 4}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_every_registered_method(name):
    model = demo_model()
    before = copy.deepcopy(model.state_dict())
    x = inputs_for((3, 32, 32), 5)
    x_copy = x.clone()
    params = {name: PARAMS[name]} if name in PARAMS else None
    keys = [101, 7, 55, 3, 1_000_000_007]          # sampling methods draw per example key
    res = attribute(model, x, [name], params=params, seed=3, example_keys=keys)
    a = res.attributions[name]
    expected = (5, 1, 8, 8) if METHODS[name].layer else tuple(x.shape)
    assert tuple(a.shape) == expected and a.dtype == torch.float32 and a.device == x.device
    assert torch.isfinite(a).all()
    torch.testing.assert_close(x, x_copy)                                 # inputs unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())                # no stray .grad
    again = attribute(model, x, [name], params=params, seed=3, example_keys=keys).attributions[name]
    torch.testing.assert_close(a, again)                                  # seeded runs repeat
    rows = torch.cat([attribute(model, x[i:i + 1], [name], target=res.target[i:i + 1], params=params,
                                seed=3, example_keys=keys[i:i + 1]).attributions[name] for i in range(5)])
    torch.testing.assert_close(a, rows, rtol=1e-4, atol=1e-5)             # batch == row by row, every method
    order = [3, 0, 4, 1, 2]                                               # ... and in any order
    shuffled = attribute(model, x[order], [name], target=res.target[order], params=params, seed=3,
                         example_keys=[keys[i] for i in order]).attributions[name]
    torch.testing.assert_close(a[order], shuffled, rtol=1e-4, atol=1e-5)
    small = attribute(model, x, [name], params=params, seed=3, max_batch=2, example_keys=keys).attributions[name]
    torch.testing.assert_close(a, small, rtol=1e-4, atol=1e-5)            # chunk size does not matter
    if name in {"smoothgrad", "lime", "kernel_shap", "gradient_shap"}:    # the seed and key do matter
        other = attribute(model, x, [name], params=params, seed=4, example_keys=keys).attributions[name]
        assert not torch.allclose(a, other)
    hm = display_heatmap(a, (16, 16))
    assert hm.shape == (5, 16, 16) and hm.min() >= 0 and hm.max() <= 1


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_surrogates_on_slic_superpixels_batch_equals_row_by_row(name):
    """SLIC gives each image its own number of superpixels; a batch pads the smaller ones with features that
    never vary, which must leave every image's coefficients as it gets them alone."""
    from xaudit.tasks.attribution.integrated_gradients import gaussian_blur
    model = demo_model()
    x = gaussian_blur(torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(1)), 2.0)
    x = (x - x.amin((1, 2, 3), keepdim=True)) / (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    params = {name: {"n_samples": 64, "segments": "slic", "n_segments": 12}}
    masks = feature_masks(x, "slic", 12)
    assert len({int(m.max()) for m in masks}) > 1                         # the counts really differ
    res = attribute(model, x, [name], params=params, seed=1)
    rows = torch.cat([attribute(model, x[i:i + 1], [name], target=res.target[i:i + 1], params=params, seed=1,
                                example_keys=[i]).attributions[name] for i in range(4)])
    torch.testing.assert_close(res.attributions[name], rows, rtol=1e-4, atol=1e-5)


def test_cam_without_conv_layer_is_a_clear_error():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(XAuditError, match="no Conv2d"):
        attribute(lin, torch.randn(2, 3, 2, 2), ["gradcam"])


def test_unknown_method_and_parameter_are_clear_errors():
    model = demo_model()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(XAuditError, match="registered methods"):
        attribute(model, x, ["no_such_method"])
    with pytest.raises(XAuditError, match="not known to method 'integrated_gradients'"):
        attribute(model, x, ["integrated_gradients"], params={"integrated_gradients": {"steps": 3}})
    with pytest.raises(XAuditError, match="target"):
        attribute(model, x, ["saliency"], target=[11])


def exact_shapley(model, x, target, masks, n_features):
    """Shapley values of the target logit over the features of each image, by enumerating all coalitions."""
    import itertools
    from math import factorial
    coalitions = torch.tensor(list(itertools.product([0, 1], repeat=n_features)), dtype=torch.float32)
    out = []
    for i in range(len(x)):
        keep = coalitions[:, masks[i].flatten()].view(-1, 1, *x.shape[2:])
        with torch.no_grad():
            v = torch.cat([model(x[i:i + 1] * keep[j:j + 256]) for j in range(0, len(keep), 256)])[:, target[i]]
        value = {tuple(c.int().tolist()): float(val) for c, val in zip(coalitions, v)}
        phi = torch.zeros(n_features)
        m = n_features
        for c, val in value.items():
            for f in range(m):
                if c[f] == 0:
                    with_f = c[:f] + (1,) + c[f + 1:]
                    k = sum(c)
                    phi[f] += factorial(k) * factorial(m - k - 1) / factorial(m) * (value[with_f] - val)
        out.append(phi)
    return torch.stack(out)


def test_kernel_shap_converges_to_exact_shapley_and_beats_captum_per_evaluation():
    from xaudit.tasks.attribution._surrogate import feature_masks
    model = demo_model()
    x = inputs_for((3, 32, 32), 2)
    masks = feature_masks(x, "grid", 9)                       # 3 x 3 grid: 9 features, 512 coalitions
    # a budget of every coalition (2^9) enumerates all sizes with their exact kernel weights: exact values
    res = attribute(model, x, ["kernel_shap"], params={"kernel_shap": {"n_samples": 512, "n_segments": 9}})
    exact = exact_shapley(model, x, res.target, masks, 9)
    ours = torch.stack([res.attributions["kernel_shap"][i, 0].flatten()[
        torch.tensor([int((masks[i].flatten() == f).nonzero()[0]) for f in range(9)])] for i in range(2)])
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    # below that, enumerated sizes and sampled pairs share the kernel's mass exactly
    from xaudit.tasks.attribution.kernel_shap import coalition_plan
    for budget in (11, 12, 15, 24, 48, 96, 200, 512):
        enumerated, pairs, w = coalition_plan(9, budget)
        sampled = [t for t in range(1, 9) if t not in enumerated and 9 - t not in enumerated]
        total = sum(math.comb(9, t) * float(w[t]) for t in enumerated) + (2 * pairs * float(w[sampled[0]])
                                                                           if sampled else 0.0)
        kernel = [8 / (k * (9 - k)) for k in range(1, 9)]
        carried = 1.0 if pairs or not sampled else (kernel[0] + kernel[7]) / sum(kernel)   # no pair to carry the rest
        assert total == pytest.approx(carried) and 2 + sum(math.comb(9, t) for t in enumerated) + 2 * pairs <= budget
        assert enumerated[:2] == ([8] if budget < 20 else [1, 8])       # leave-one-out first, then singles too
    assert coalition_plan(9, 1)[:2] == ([], 0)                       # under 2: the two ends only, no draws
    assert coalition_plan(1, 12)[:2] == ([], 0)                      # one feature: nothing between the ends
    one = attribute(model, x, ["kernel_shap"], params={"kernel_shap": {"n_samples": 12, "n_segments": 1}})
    assert one.attributions["kernel_shap"].isfinite().all()
    assert attribute(model, x, ["kernel_shap"], params={"kernel_shap": {"n_samples": 1, "n_segments": 9}}
                     ).attributions["kernel_shap"].isfinite().all()
    # 11 or 12 evaluations: every leave-one-out coalition and the two ends, no sampling, hence no seed
    # dependence; a smaller error than Captum's with as many evaluations, close to Captum's with twice as many
    small = [attribute(model, x, ["kernel_shap"], seed=s, params={"kernel_shap": {"n_samples": 12, "n_segments": 9}})
             .attributions["kernel_shap"] for s in (0, 1)]
    torch.testing.assert_close(small[0], small[1])
    pick = lambda a: torch.stack([a[i, 0].flatten()[[int((masks[i].flatten() == f).nonzero()[0]) for f in range(9)]]
                                  for i in range(2)])

    def captum_error(n_samples: int) -> float:
        errors = []
        for s in range(4):
            torch.manual_seed(s)
            errors.append(float((pick(captum_attr.KernelShap(model).attribute(
                x, target=res.target, feature_mask=masks[:, None], n_samples=n_samples, baselines=0.0)) - exact).norm()))
        return sum(errors) / len(errors)
    ours_12 = float((pick(small[0]) - exact).norm())
    assert ours_12 < captum_error(12) and ours_12 < 1.25 * captum_error(24)
    # with the same small budget, paired sampling's error is not larger than Captum's
    budget = 64
    ours_small = attribute(model, x, ["kernel_shap"], seed=1,
                           params={"kernel_shap": {"n_samples": budget, "n_segments": 9}}).attributions["kernel_shap"]
    torch.manual_seed(1)
    theirs = captum_attr.KernelShap(model).attribute(x, target=res.target, feature_mask=masks[:, None],
                                                     n_samples=budget, baselines=0.0)
    assert (pick(ours_small) - exact).norm() <= 1.25 * (pick(theirs) - exact).norm()


def test_lime_agrees_with_captum_lime_on_the_same_mask_and_surrogate():
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from xaudit.tasks.attribution._surrogate import feature_masks
    model = demo_model()
    x = inputs_for((3, 32, 32), 2)
    masks = feature_masks(x, "grid", 16)
    res = attribute(model, x, ["lime"], params={"lime": {"n_samples": 3000, "ridge": 0.0}})
    torch.manual_seed(0)
    theirs = captum_attr.Lime(model, interpretable_model=SkLearnLinearRegression()).attribute(
        x, target=res.target, feature_mask=masks[:, None], n_samples=3000, baselines=0.0, perturbations_per_eval=64)
    ours = res.attributions["lime"]
    for i in range(2):
        corr = torch.corrcoef(torch.stack([ours[i].flatten(), theirs[i].flatten()]))[0, 1]
        assert corr > 0.95, corr


def test_gradient_shap_agrees_with_captum():
    model = demo_model()
    x = inputs_for((3, 32, 32), 2)
    res = attribute(model, x, ["gradient_shap"], params={"gradient_shap": {"n_samples": 400, "stdev": 0.1}})
    torch.manual_seed(0)
    theirs = captum_attr.GradientShap(model).attribute(x, baselines=torch.zeros(1, 3, 32, 32), target=res.target,
                                                       n_samples=400, stdevs=0.1)
    ours = res.attributions["gradient_shap"]
    corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]
    assert corr > 0.9, corr


def test_out_of_memory_halves_the_chunk_and_retries():
    class Fussy(nn.Module):
        """A real model that raises torch.OutOfMemoryError for batches over 3 rows, like a full GPU."""
        def __init__(self):
            super().__init__()
            self.net = demo_model()
            self.sizes = []

        def forward(self, x):
            self.sizes.append(len(x))
            if len(x) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.net(x)
    fussy = Fussy().eval()
    x = inputs_for((3, 32, 32), 2)
    res = attribute(fussy, x, ["integrated_gradients"], max_batch=16, logits=fussy.net(x).detach(),
                    params={"integrated_gradients": {"n_steps": 8}})
    ref = attribute(fussy.net, x, ["integrated_gradients"], params={"integrated_gradients": {"n_steps": 8}})
    torch.testing.assert_close(res.attributions["integrated_gradients"], ref.attributions["integrated_gradients"])
    assert any(n > 3 for n in fussy.sizes)           # it did run out of memory...
    assert fussy.sizes[-1] <= 3                        # ...and finished with halved chunks


# --- architectures the demo CNN does not have (issue: Grad-CAM after in-place ops, ragged occlusion, frozen
# weights, non-spatial CAM layers) ----------------------------------------------------------------------------

class InPlaceNet(nn.Module):
    """VGG's and AlexNet's pattern: the CAM layer (last conv) is followed by ReLU(inplace=True), and a
    BatchNorm output is then modified by a residual `+=`."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        out = self.bn(self.conv2(h))
        out += h                                   # modifies the BatchNorm output in place
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("layer", ["conv2", "bn"])
def test_gradcam_is_right_when_the_network_modifies_the_cam_layer_output_in_place(layer):
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    x, t = torch.randn(3, 3, 16, 16), distinct_targets(3)
    res = attribute(model, x, ["gradcam"], target=t, target_layer=layer)
    ref = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=t, relu_attributions=True)
    assert ref.abs().max() > 0
    torch.testing.assert_close(res.attributions["gradcam"], ref, rtol=1e-4, atol=1e-6)


def test_gradcam_on_torchvision_vgg_features_with_in_place_relu():
    model = torchvision.models.vgg11(num_classes=10).eval()
    layer = "features.18"                          # the last Conv2d, then ReLU(inplace=True)
    assert isinstance(model.get_submodule("features.19"), nn.ReLU) and model.features[19].inplace
    x, t = inputs_for((3, 32, 32), 2), distinct_targets(2)
    res = attribute(model, x, ["gradcam"], target=t, target_layer=layer)
    ref = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=t, relu_attributions=True)
    torch.testing.assert_close(res.attributions["gradcam"], ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("size, window, stride", [(30, 8, 4), (29, 8, 4), (23, 5, 3)])
def test_occlusion_equals_captum_when_windows_do_not_tile_the_image(size, window, stride):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, size, size), distinct_targets(2)
    res = attribute(model, x, ["occlusion"], target=t, params={"occlusion": {"window": window, "stride": stride}})
    ref = captum_attr.Occlusion(model).attribute(x, target=t, sliding_window_shapes=(3, window, window),
                                                 strides=(3, stride, stride), baselines=0.0)
    assert (ref[..., -1] != 0).any()               # the border is covered
    torch.testing.assert_close(res.attributions["occlusion"], ref, rtol=1e-4, atol=1e-5)


def test_gradcam_alone_works_on_a_model_with_frozen_weights():
    model = demo_model()
    for p in model.parameters():
        p.requires_grad_(False)
    x, t = inputs_for((3, 32, 32), 2), distinct_targets(2)
    alone = attribute(model, x, ["gradcam"], target=t, target_layer="features.6").attributions["gradcam"]
    for p in model.parameters():
        p.requires_grad_(True)
    trainable = attribute(model, x, ["gradcam"], target=t, target_layer="features.6").attributions["gradcam"]
    torch.testing.assert_close(alone, trainable)


def test_a_cam_layer_that_is_not_spatial_is_refused_clearly():
    model = demo_model()
    with pytest.raises(XAuditError, match=r"\(N, C, h, w\).*target_layer"):
        attribute(model, inputs_for((3, 32, 32), 2), ["gradcam"], target_layer="classifier.2")


# --- vision transformers: CAM on patch tokens (pytorch-grad-cam's reshape_transform as the oracle) -------------

def tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)     # torchvision starts the head at zero: all logits 0
    return model


def tiny_swin():
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=10).eval()


def _vit_tokens_to_grid(t):
    return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)


def _swin_to_grid(t):
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("make, layer_name, reshape", [
    (tiny_vit, "encoder.layers.encoder_layer_1.ln_1", _vit_tokens_to_grid),
    (tiny_swin, "features.3.0.norm1", _swin_to_grid),
])
@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus"])
def test_cam_on_vision_transformers_equals_pytorch_grad_cam_with_its_reshape(make, layer_name, reshape, method):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = make()
    from xaudit.tasks.attribution import find_layer
    x, t = inputs_for((3, 32, 32), 3, seed=4), distinct_targets(3)
    assert find_layer(model, None, x) is model.get_submodule(layer_name)     # the automatic target layer
    res = attribute(model, x, [method], target=t)
    assert res.attributions[method].shape[1] == 1
    peer = pgc.GradCAM if method == "gradcam" else pgc.GradCAMPlusPlus
    with peer(model=model, target_layers=[model.get_submodule(layer_name)], reshape_transform=reshape) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    ours = torch.nn.functional.interpolate(res.attributions[method], size=(32, 32), mode="bilinear",
                                           align_corners=False)[:, 0]
    lo, hi = ours.flatten(1).amin(1)[:, None, None], ours.flatten(1).amax(1)[:, None, None]
    ours = (ours - lo) / (hi - lo + 1e-7)
    checked = 0
    for i in range(3):
        if theirs[i].max() > 0:
            corr = torch.corrcoef(torch.stack([ours[i].flatten(), theirs[i].flatten().float()]))[0, 1]
            assert corr > 0.999, f"row {i}: correlation {corr:.5f}"
            checked += 1
    assert checked >= 2
    heat = display_heatmap(res.attributions[method], (32, 32))
    assert heat.shape == (3, 32, 32)                                      # maps at the image's resolution


def test_token_grids_follow_the_image_aspect_and_extra_tokens():
    from xaudit.tasks.attribution.engine import to_grid
    ln = nn.LayerNorm(8)
    tokens = torch.arange(2 * (2 + 12) * 8, dtype=torch.float).reshape(2, 14, 8)    # 2 extra + 3x4 patches
    grid = to_grid(tokens, ln, (30, 40))
    assert grid.shape == (2, 8, 3, 4)
    torch.testing.assert_close(grid[:, :, 0, 1], tokens[:, 3])
    with pytest.raises(XAuditError, match="patch grid"):
        to_grid(torch.zeros(1, 7 * 11 + 40, 8), ln, (32, 32))


def test_gradient_family_in_chunks_takes_its_logits_from_the_shared_pass():
    """Batches larger than max_batch (every 224² batch under the default memory budget): the family still
    shares one forward/backward per chunk, whose forward gives the logits; equal to one pass over all rows."""
    model = demo_model()
    x = inputs_for((3, 32, 32), 7)
    family = ["saliency", "input_x_gradient", "gradcam", "gradcam_plus_plus"]
    t = distinct_targets(7)
    whole = attribute(model, x, family, target=t)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        chunked = attribute(model, x, family, target=t, max_batch=3)
    finally:
        handle.remove()
    assert calls == [3, 3, 1]            # one forward per chunk: no separate clean forward
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(chunked.target, whole.target) and chunked.target.tolist() == t.tolist()
    for m in family:
        torch.testing.assert_close(chunked.attributions[m], whole.attributions[m], rtol=1e-5, atol=1e-6)
    assert set(chunked.seconds) == set(family) and all(s >= 0 for s in chunked.seconds.values())
    with pytest.raises(XAuditError, match="one class per example"):
        attribute(model, x, family, target=[1, 2], max_batch=3)


# --- the automatic CAM layer: the last feature map every path to the logits goes through ----------------------

class _TwoBranch(nn.Module):
    """An Inception-style block (two branches concatenated) before global pooling and a 1x1 conv head (DLA's
    `fc`): the last Conv2d in the module list is the head, and the last one to run is a branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        s = self.stem(x)
        y = torch.relu(torch.cat([self.branch_a(s), self.branch_b(s)], 1))
        return self.fc(self.pool(y)).flatten(1)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.mix(self.inner(x) + x)


class _AuxHead(nn.Module):
    """GoogLeNet's shape: an auxiliary head registered last that the forward never runs in eval mode."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        y = self.block(x)
        return (self.head(y), self.aux(y)) if self.training else self.head(y)


@pytest.mark.parametrize("make, side, expected", [
    (resnet, 64, "layer4"),                         # the last block's output, not the conv inside its residual
    (lambda: torchvision.models.googlenet(weights=None, num_classes=5, init_weights=True).eval(), 64,
     "inception5b"),                                 # its auxiliary heads' convs never run in eval mode
    (lambda: torchvision.models.vgg16(weights=None, num_classes=5).eval(), 64, "features.29"),   # not a pool
    (lambda: _TwoBranch().eval(), 16, "stem"),       # no module outputs the concatenation: the map before, not a branch
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval(), 16,
     "0"),
    (lambda: _AuxHead().eval(), 16, "block"),
])
def test_the_automatic_cam_layer_is_the_last_map_every_path_goes_through(make, side, expected):
    from captum.attr import LayerGradCam
    from xaudit.tasks.attribution import find_layer
    torch.manual_seed(0)
    model = make()
    x, t = inputs_for((3, side, side), 2), torch.tensor([1, 3])
    layer = find_layer(model, None, x)
    assert layer is model.get_submodule(expected)
    ours = attribute(model, x, ["gradcam", "gradcam_plus_plus"], target=t).attributions["gradcam"]
    theirs = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    assert ours.shape[-2:] == theirs.shape[-2:] and ours.shape[-1] > 1
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-6 * float(theirs.abs().max()) + 1e-12)


def test_a_model_with_no_map_that_every_path_goes_through_is_refused_naming_target_layer():
    class TwoStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 5)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x).mean((2, 3))], 1))
    with pytest.raises(XAuditError, match="no feature map .* every path .*set 'target_layer'"):
        attribute(TwoStreams().eval(), inputs_for((3, 16, 16), 2), ["gradcam"])


def test_timm_vision_transformers_take_the_last_block_norm_not_the_patch_embedding():
    """timm's blocks normalise with its own LayerNorm subclass: the automatic layer was the patch embedding's
    conv (the first layer of the net) for timm ViT, DeiT, BEiT and DINOv2."""
    timm = pytest.importorskip("timm")
    from xaudit.tasks.attribution import find_layer
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32).eval()
    x = inputs_for((3, 32, 32), 2)
    assert find_layer(model, None, x) is model.blocks[-1].norm1
    cam = attribute(model, x, ["gradcam"], target=torch.tensor([0, 1])).attributions["gradcam"]
    assert cam.shape == (2, 1, 2, 2)          # the 2x2 patch grid, the class and distillation tokens dropped


class _RenamedViT(torch.nn.Module):
    """A small pre-norm ViT whose names say nothing (`pre`, `post`, `mix`), with a class token and a head that
    reads it alone; with `plain_mixer`, its attention class is not named like one either."""

    def __init__(self, plain_mixer: bool = False, depth: int = 2, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, 4, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.1)

        class Mixer(torch.nn.Module):                      # token mixing, named like nothing in particular
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(dim, 3 * dim)

            def forward(self, t):
                q, k, v = self.qkv(t).chunk(3, -1)
                return torch.softmax(q @ k.transpose(1, 2) / dim ** 0.5, -1) @ v

        class Stage(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.pre = torch.nn.LayerNorm(dim)
                self.mix = Mixer() if plain_mixer else torch.nn.MultiheadAttention(dim, 2, batch_first=True)
                self.post = torch.nn.LayerNorm(dim)
                self.ff = torch.nn.Linear(dim, dim)

            def forward(self, t):
                h = self.pre(t)
                t = t + (self.mix(h) if plain_mixer else self.mix(h, h, h, need_weights=False)[0])
                return t + self.ff(self.post(t))
        self.stages = torch.nn.ModuleList(Stage() for _ in range(depth))
        self.final = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        for s in self.stages:
            t = s(t)
        return self.head(self.final(t)[:, 0])


@pytest.mark.parametrize("plain_mixer", [False, True])
def test_the_automatic_cam_layer_of_a_vit_is_found_by_structure_not_by_name(plain_mixer):
    """The last block's first norm whatever it is called: the norm an attention reads, or (attention not named
    as such) the last token norm whose patch tokens carry gradient; never the patch embedding, the block's
    second norm or the final norm (whose patch tokens the class-token head never reads)."""
    from xaudit.tasks.attribution.engine import auto_layer
    torch.manual_seed(0)
    model = _RenamedViT(plain_mixer).eval()
    assert auto_layer(model, torch.randn(1, 3, 16, 16)) == "stages.1.pre"

"""DeepLIFT (rescale rule) and DeepSHAP: Captum where Captum is right, an independent oracle where it is
not (its max-pool fallback, captum#1276), and summation to delta on nets Captum refuses (reused modules)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from xaudit.tasks.attribution import attribute


def _biased(model: nn.Module, seed: int = 0) -> nn.Module:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("inplace", [False, True])
def test_deeplift_equals_captum_without_max_pools(inplace):
    from captum.attr import DeepLift
    torch.manual_seed(0)
    model = _biased(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace),
                                  nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(8 * 8 * 8, 16), nn.Sigmoid(), nn.Linear(16, 5))).double()
    # in float64: in float32 the rescale rule's quotients differ from Captum's by float round-off (~1e-5 of the
    # largest attribution, depending on the CPU's kernels). What is left in float64 is where a unit's change is
    # below 1e-5 of its values, where ours takes the derivative (deeplift.RELATIVE) and Captum the quotient
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([1, 4, 2])
    res = attribute(model, x, ["deeplift"], target=t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, delta = DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=t,
                                                  return_convergence_delta=True)
    theirs = theirs.detach()
    assert res.attributions["deeplift"].dtype == torch.float64
    assert torch.allclose(res.attributions["deeplift"], theirs, rtol=1e-5, atol=1e-8 * float(theirs.abs().max()))
    assert torch.allclose(res.extras["deeplift"]["delta"].double(), delta, atol=1e-10)


def _oracle(model: nn.Sequential, x: torch.Tensor, x0: torch.Tensor, target: int) -> torch.Tensor:
    """DeepLIFT by hand for Conv/ReLU/MaxPool/Flatten/Linear stacks: forward both, then the multipliers layer
    by layer from the output back (rescale at ReLU; at a max pool, the pooled change goes to the position of
    the input's maximum (max(y, y0) - y0) and of the baseline's (y - max(y, y0)), the gradient where the
    pool's input did not change)."""
    eps = 1e-10
    acts_x, acts_b, idx_x, idx_b = [x], [x0], {}, {}
    for i, layer in enumerate(model):
        for acts, idx in ((acts_x, idx_x), (acts_b, idx_b)):
            if isinstance(layer, nn.MaxPool2d):
                y, ix = nn.functional.max_pool2d(acts[-1], layer.kernel_size, layer.stride, return_indices=True)
                idx[i] = ix
            else:
                y = layer(acts[-1])
            acts.append(y.detach())
    g = torch.zeros_like(acts_x[-1])
    g[:, target] = 1
    for i in reversed(range(len(model))):
        layer, a_in, b_in, a_out, b_out = model[i], acts_x[i], acts_b[i], acts_x[i + 1], acts_b[i + 1]
        dx = a_in - b_in
        safe = torch.where(dx.abs() < eps, torch.ones_like(dx), dx)
        if isinstance(layer, nn.ReLU):
            g = g * torch.where(dx.abs() < eps, (a_in > 0).to(g.dtype), (a_out - b_out) / safe)
        elif isinstance(layer, nn.MaxPool2d):
            top = torch.maximum(a_out, b_out)
            num = torch.zeros_like(a_in).flatten(2)
            num.scatter_add_(2, idx_x[i].flatten(2), (g * (top - b_out)).flatten(2))
            num.scatter_add_(2, idx_b[i].flatten(2), (g * (a_out - top)).flatten(2))
            true = torch.zeros_like(a_in).flatten(2)
            true.scatter_add_(2, idx_x[i].flatten(2), g.flatten(2))
            g = torch.where(dx.abs() < eps, true.view_as(a_in), num.view_as(a_in) / safe)
        else:     # linear pieces: the transpose of the layer
            z = a_in.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(layer(z), z, g)
    return (x - x0) * g


def test_deeplift_through_max_pools_equals_the_oracle_and_sums_to_delta():
    torch.manual_seed(1)
    model = _biased(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5)))
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0, 3, 1, 4])
    res = attribute(model, x, ["deeplift"], target=t)
    ours = res.attributions["deeplift"]
    oracle = torch.cat([_oracle(model, x[i:i + 1], torch.zeros_like(x[i:i + 1]), int(t[i])) for i in range(4)])
    assert torch.allclose(ours, oracle, rtol=1e-4, atol=1e-6 * float(oracle.abs().max()))
    assert res.extras["deeplift"]["delta"].abs().max() < 1e-5


def test_deeplift_sums_to_delta_on_resnet_with_reused_relus_where_captum_refuses():
    from captum.attr import DeepLift
    model = _biased(torchvision.models.resnet18(num_classes=5))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 3])
    res = attribute(model, x, ["deeplift", "deep_shap"], target=t, params={"deep_shap": {"n_samples": 3}})
    with torch.no_grad():
        out = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    a = res.attributions["deeplift"]
    assert torch.allclose(a.flatten(1).sum(1), out, rtol=1e-4, atol=1e-5)
    assert res.extras["deeplift"]["delta"].abs().max() < 1e-4 * out.abs().max() + 1e-5
    assert res.extras["deep_shap"]["delta"].abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="used more than once"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=t)


def test_deep_shap_is_deeplift_averaged_over_its_baselines():
    torch.manual_seed(3)
    model = _biased(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)))
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0, 2])
    zeros = attribute(model, x, ["deeplift", "deep_shap"], target=t, params={"deep_shap": {"baseline": "zeros"}})
    assert torch.allclose(zeros.attributions["deep_shap"], zeros.attributions["deeplift"], atol=1e-6)
    res = attribute(model, x, ["deep_shap"], target=t, params={"deep_shap": {"n_samples": 6}})
    a = res.attributions["deep_shap"]
    assert torch.isfinite(a).all() and res.extras["deep_shap"]["delta"].abs().max() < 1e-5
    single = torch.cat([attribute(model, x[i:i + 1], ["deep_shap"], target=t[i:i + 1],
                                  params={"deep_shap": {"n_samples": 6}}, example_keys=[i]).attributions["deep_shap"]
                        for i in range(2)])
    assert torch.allclose(single, a, atol=1e-6)


def test_deeplift_where_the_input_equals_the_baseline_equals_captum():
    """Where a unit's input equals the baseline's exactly (here: the zeroed half of each image, a zero
    baseline), the rescale quotient is 0/0 and the rule takes the derivative, as Captum does. The first call
    meets the 0/0 unchecked (a NaN in the input gradient), runs again with the check and keeps it for this
    model; a model that never meets one never pays for the check."""
    from captum.attr import DeepLift

    from xaudit.tasks.attribution.deeplift import _ZEROS_SEEN
    torch.manual_seed(5)
    model = _biased(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16 * 16, 4))).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 3, 1])
    attribute(model, x, ["deeplift"], target=t)
    assert model not in _ZEROS_SEEN                                       # no x = b: no check
    x[:, :, :8] = 0
    ours = attribute(model, x, ["deeplift"], target=t)
    assert model in _ZEROS_SEEN
    again = attribute(model, x, ["deeplift"], target=t)                   # checked from the start now
    assert torch.equal(again.attributions["deeplift"], ours.attributions["deeplift"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=t).detach()
    assert ours.attributions["deeplift"][:, :, :6].abs().max() == 0       # untouched rows carry nothing
    assert torch.allclose(ours.attributions["deeplift"], theirs, rtol=1e-6, atol=1e-10 * float(theirs.abs().max()))
    assert ours.extras["deeplift"]["delta"].abs().max() < 1e-10


def test_deeplift_smooth_activations_where_the_input_equals_the_baseline_equal_captum():
    """Sigmoid and Tanh where a unit's input equals the baseline's exactly: their secant is 0/0 there and the
    rule takes the derivative (the cheap bound from the reference must send such a call to the exact test)."""
    from captum.attr import DeepLift
    torch.manual_seed(8)
    model = _biased(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Sigmoid(), nn.Conv2d(5, 5, 3, padding=1),
                                  nn.Tanh(), nn.Flatten(), nn.Linear(5 * 12 * 12, 3))).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    x[:, :, :6] = 0
    t = torch.tensor([2, 0])
    ours = attribute(model, x, ["deeplift"], target=t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=t).detach()
    assert torch.isfinite(ours.attributions["deeplift"]).all()
    assert torch.allclose(ours.attributions["deeplift"], theirs, rtol=1e-6, atol=1e-10 * float(theirs.abs().max()))


def test_deeplift_reference_is_reused_only_while_model_and_baseline_are_unchanged():
    """A constant baseline's reference forward is kept between calls on one model; an edit of the weights
    (also through `.data`, which bypasses autograd's version counter) or another baseline runs it again, and
    the model's own in-place and pooling flags are left as they were."""
    torch.manual_seed(6)
    model = _biased(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(4 * 8 * 8, 3)))
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 0])
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))

    def run(**params):
        rows.clear()
        out = attribute(model, x, ["deeplift"], target=t, logits=torch.zeros(4, 3), params={"deeplift": params})
        return out.attributions["deeplift"], list(rows)
    first, calls = run()
    assert calls == [1, 4]                                        # the baseline row, then the inputs
    again, calls = run()
    assert calls == [4] and torch.equal(again, first)
    with torch.no_grad():
        model[0].weight.data.mul_(1.5)
    edited, calls = run()
    assert calls == [1, 4] and not torch.allclose(edited, first)
    fresh = copy.deepcopy(model)
    assert torch.allclose(attribute(fresh, x, ["deeplift"], target=t).attributions["deeplift"], edited, atol=1e-6)
    blurred, calls = run(baseline="blur")
    assert calls[-1] == 4 and len(calls) >= 2 and not torch.allclose(blurred, edited)
    assert model[1].inplace is True and model[2].return_indices is False


class _Residual(nn.Module):
    """conv -> BN -> activation, then the block's input added to the activation's output, in place or not
    (EfficientNetV2's FusedMBConv with expand ratio 1 does `result += input` on a SiLU's output)."""

    def __init__(self, act: nn.Module, inplace: bool):
        super().__init__()
        self.conv, self.bn, self.act, self.inplace = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), act, inplace

    def forward(self, x):
        out = self.act(self.bn(self.conv(x)))
        if self.inplace:
            out += x
            return out
        return out + x


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_deeplift_when_the_network_modifies_an_activations_output_in_place(act):
    """The rule's output was a view of the activation's, and a later `+=` on it raised in autograd
    (efficientnet_v2_s crashed DeepLIFT and DeepSHAP); now it runs, and equals the out-of-place network's."""
    torch.manual_seed(0)
    nets = [_biased(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Residual(act(), inplace), _Residual(act(), inplace),
                                  nn.Flatten(), nn.Linear(4 * 8 * 8, 3))) for inplace in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    got = [attribute(n, x, ["deeplift", "deep_shap"], target=t) for n in nets]
    for m in ("deeplift", "deep_shap"):
        torch.testing.assert_close(got[0].attributions[m], got[1].attributions[m])
        assert torch.isfinite(got[0].attributions[m]).all()
    assert got[0].extras["deeplift"]["delta"].abs().max() < 1e-4      # summation to delta holds through it


class _PatchFold(nn.Module):
    """Folds 2x2 patches of its input into the batch axis, runs a conv and a ReLU on them and unfolds them back
    (MobileViT's unfold): a one-row reference of a constant baseline does not line up with the inputs' calls."""

    def __init__(self):
        super().__init__()
        self.stem, self.act0 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.inner, self.act1 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        y = self.act0(self.stem(x))
        n, c, h, w = y.shape
        p = y.reshape(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, c, h // 2, w // 2)
        p = self.act1(self.inner(p))
        y = p.reshape(n, 2, 2, c, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return self.head(y)


def test_deeplift_on_a_model_that_folds_patches_into_the_batch_equals_captum():
    """timm's MobileViT raised a raw size mismatch: the zero baseline's one-row reference unfolds to 4 rows, the
    inputs' to 4 per image. The reference then gets one row per input, and the result is Captum's."""
    from captum.attr import DeepLift
    torch.manual_seed(0)
    model = _biased(_PatchFold()).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 4, 2])
    for _ in range(2):             # the second call starts with one row per input (the model is remembered)
        res = attribute(model, x, ["deeplift", "deep_shap"], target=t, params={"deep_shap": {"n_samples": 2}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=t).detach()
        assert torch.allclose(res.attributions["deeplift"], theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))
        assert res.extras["deeplift"]["delta"].abs().max() < 1e-9
        assert res.extras["deep_shap"]["delta"].abs().max() < 1e-9

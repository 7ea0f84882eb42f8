"""The architecture matrix (issue 14): every registered method on the torchvision families users bring,
random init (biases drawn, as a trained net has them), eval mode, small inputs, two images with different
targets. Every method runs on every family (LRP only where Zennit has rules; elsewhere it refuses, saying
what to choose instead) and keeps its contract: the shape Captum gives, finite values, and
a batch equal to its rows explained one by one; Captum is the oracle for saliency, integrated gradients (and
its convergence delta) and Grad-CAM at the automatic layer (token models: test_attribution.py compares with
pytorch-grad-cam)."""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision

from xaudit.tasks.attribution import METHODS, attribute
from xaudit.tasks.attribution.engine import find_layer
from xaudit.tasks.errors import XAuditError

K = 5


def _timm(name: str):
    """A timm factory with torchvision's signature (timm is an optional extra: skip when it is missing)."""
    def make(weights=None, num_classes: int = K, **kwargs):
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return make


# (factory, kwargs, input side): the smallest input each family accepts with its default strides
ARCHS = {
    "resnet50": (torchvision.models.resnet50, {}, 64),
    "vgg16": (torchvision.models.vgg16, {}, 32),
    "alexnet": (torchvision.models.alexnet, {}, 64),
    "densenet121": (torchvision.models.densenet121, {}, 32),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, {}, 64),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, {}, 64),
    "convnext_tiny": (torchvision.models.convnext_tiny, {}, 32),
    "regnet_y_400mf": (torchvision.models.regnet_y_400mf, {}, 64),
    "vit_b_16": (torchvision.models.vit_b_16, {"image_size": 32}, 32),
    "swin_t": (torchvision.models.swin_t, {}, 64),
    "timm:vit_tiny_patch16_224": (_timm("vit_tiny_patch16_224"), {"img_size": 32}, 32),
    "timm:deit_tiny_patch16_224": (_timm("deit_tiny_patch16_224"), {"img_size": 32}, 32),
    "timm:convnext_atto": (_timm("convnext_atto"), {}, 64),
    "timm:efficientnet_b0": (_timm("efficientnet_b0"), {}, 64),
}
TOKEN_MODELS = {"vit_b_16", "swin_t", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224"}
# LayerNorm/attention, squeeze-excitation gates and smooth activations, DenseNet's concatenated BatchNorm
LRP_REFUSED = {"convnext_tiny", "densenet121", "efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf",
               "swin_t", "vit_b_16", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224", "timm:convnext_atto",
               "timm:efficientnet_b0"}
PARAMS = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}, "gradient_shap": {"n_samples": 4},
          "lime": {"n_samples": 32, "n_segments": 4}, "kernel_shap": {"n_samples": 32, "n_segments": 4},
          "occlusion": {"window": 16, "stride": 16}}


@functools.lru_cache(maxsize=1)
def built(arch: str):
    factory, kwargs, side = ARCHS[arch]
    torch.manual_seed(0)
    model = factory(weights=None, num_classes=K, **kwargs).eval()
    with torch.no_grad():       # torchvision zero-initialises biases: trained nets are not scale-invariant
        for name, p in model.named_parameters():       # (a ConvNeXt with zero biases gives f(a x) = f(x))
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    return model, x


def run(model, x, method, target, keys):
    return attribute(model, x, [method], target=target, params={method: PARAMS.get(method, {})}, seed=0,
                     example_keys=keys, max_batch=64)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_method_keeps_its_contract_on_every_architecture(arch):
    model, x = built(arch)
    target = torch.tensor([1, 3])
    keys = [11, 22]
    for method in sorted(METHODS):
        try:
            res = run(model, x, method, target, keys)
        except XAuditError as e:      # the one refusal: LRP where Zennit has no conservative rule
            assert method == "lrp" and arch in LRP_REFUSED and "choose deeplift" in str(e), f"{arch}/{method}: {e}"
            continue
        assert not (method == "lrp" and arch in LRP_REFUSED), f"{arch}: lrp should have been refused"
        a = res.attributions[method]
        if METHODS[method].layer:
            assert a.ndim == 4 and a.shape[:2] == (2, 1), f"{arch}/{method}: {tuple(a.shape)}"
        else:
            assert a.shape == x.shape, f"{arch}/{method}: {tuple(a.shape)}"
        assert torch.isfinite(a).all(), f"{arch}/{method}: non-finite attributions"
        rows = torch.cat([run(model, x[i:i + 1], method, target[i:i + 1], keys[i:i + 1]).attributions[method]
                          for i in range(2)])
        # float32 noise: batch size changes the convolution algorithm; perturbation methods difference logits;
        # DeepLIFT's rule switches from the secant to the derivative where a unit's change falls below 1e-5 of its
        # values, so a unit at that edge can switch with the batch's round-off (1.2e-3 of the largest
        # attribution seen on timm's EfficientNet-B0, machine-dependent)
        rel = 5e-3 if method in ("deeplift", "deep_shap") else 1e-3
        tol = rel * float(a.abs().max()) + (1e-5 if METHODS[method].resolution in ("window", "segment") else 1e-9)
        assert float((rows - a).abs().max()) <= tol, f"{arch}/{method}: batch differs from row by row"
        if method == "integrated_gradients":
            assert torch.isfinite(res.extras[method]["delta"]).all()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_saliency_ig_and_gradcam_equal_captum_on_every_architecture(arch):
    from captum.attr import IntegratedGradients, LayerGradCam, Saliency
    model, x = built(arch)
    target = torch.tensor([1, 3])
    ours = attribute(model, x, ["saliency"], target=target).attributions["saliency"]
    theirs = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=True)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))
    res = attribute(model, x, ["integrated_gradients"], target=target,
                    params={"integrated_gradients": {"n_steps": 8}})
    ig, delta = IntegratedGradients(model).attribute(x, target=target, n_steps=8, method="gausslegendre",
                                                     return_convergence_delta=True)
    assert torch.allclose(res.attributions["integrated_gradients"], ig.float(), rtol=1e-3,
                          atol=1e-5 * float(ig.abs().max())), f"{arch}: IG differs from Captum"
    assert torch.allclose(res.extras["integrated_gradients"]["delta"].double(), delta.double(), rtol=1e-3,
                          atol=1e-5), f"{arch}: completeness delta differs from Captum's convergence delta"
    layer = find_layer(model, None, x)
    res = attribute(model, x, ["gradcam"], target=target).attributions["gradcam"]
    if arch in TOKEN_MODELS:
        return          # token layers: covered against pytorch-grad-cam in test_attribution.py
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    assert res.shape[-2:] == cam.shape[-2:]
    assert torch.allclose(res, cam.to(res.dtype), rtol=1e-4, atol=1e-6 * float(cam.abs().max()) + 1e-12), \
        f"{arch}: Grad-CAM differs from Captum's LayerGradCam at {type(layer).__name__}"


# Families outside the matrix where the last Conv2d was the wrong CAM layer (or never ran): the automatic layer
# must be a map of more than one cell that every path from the input to the logits goes through. The oracle is
# autograd itself, not the graph walk that chose the layer: with that map's output detached, no gradient of the
# logits reaches the input.
MORE = {
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, num_classes=K, init_weights=True), 64),
    "inception_v3": (lambda: torchvision.models.inception_v3(weights=None, num_classes=K, init_weights=True), 80),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=K), 64),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(weights=None, num_classes=K), 64),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(weights=None, num_classes=K), 64),
    "timm:dla34": (lambda: _timm("dla34")(), 64),
    "timm:poolformer_s12": (lambda: _timm("poolformer_s12")(), 64),
    "timm:mobilevit_xxs": (lambda: _timm("mobilevit_xxs")(), 64),
}


@pytest.mark.parametrize("arch", sorted(MORE) + [a for a in sorted(ARCHS) if a not in TOKEN_MODELS])
def test_the_automatic_cam_layer_is_a_map_every_path_goes_through(arch):
    if arch in MORE:
        make, side = MORE[arch]
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    else:
        model, x = built(arch)
    layer = find_layer(model, None, x)
    assert not isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d))
    seen = {}

    def cut(_module, _inputs, output):
        seen["shape"] = output.shape
        return output.detach()
    handle = layer.register_forward_hook(cut)
    try:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        (grad,) = torch.autograd.grad(out.sum(), xg, allow_unused=True) if out.requires_grad else (None,)
    finally:
        handle.remove()
    assert len(seen["shape"]) == 4 and seen["shape"][-2] * seen["shape"][-1] > 1, f"{arch}: {seen['shape']}"
    assert grad is None or not grad.any(), f"{arch}: a path to the logits bypasses {type(layer).__name__}"
    from captum.attr import LayerGradCam
    target = torch.tensor([1, 3])
    ours = attribute(model, x, ["gradcam"], target=target).attributions["gradcam"]
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True).detach()
    assert torch.allclose(ours, cam.to(ours.dtype), rtol=1e-4, atol=1e-6 * float(cam.abs().max()) + 1e-12), arch

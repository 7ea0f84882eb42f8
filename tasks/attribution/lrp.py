"""Layer-wise relevance propagation on Zennit (Bach et al. 2015, https://doi.org/10.1371/journal.pone.0130140;
Anders et al., https://arxiv.org/abs/2106.13200): the explained logit is passed back layer by layer by the
composite's rules; BatchNorm is merged into the layer before it and ResNet skip connections are
canonized, so the relevance at the input sums to the logit up to what biases and the epsilon rule absorb.
The per-example `delta` is sum(relevance) - logit.

Zennit's rules cover convolutional nets built from Conv/Linear/ReLU/pooling/BatchNorm, and torchvision
ResNets through its canonizer. Other families are refused before any work: LayerNorm and attention (ViT,
Swin, ConvNeXt), squeeze-excitation gates and smooth activations (EfficientNet, MobileNet-V3, RegNetY) have
no conservative rule there, and DenseNet's BatchNorm after concatenation breaks its canonizer.

The layer types alone do not say whether the rules reach every path: what `forward` does between the layers
(a residual addition outside the canonizers' models, as in a user's own ResNet or MNASNet's inverted
residuals; GoogLeNet's inception blocks) can pass relevance on unruled, and it is silently not conserved. So
every model is also checked by what the rules do (`structural_leak`), once per model object: on a copy with
every bias and BatchNorm shift set to zero nothing may absorb relevance, and a conservative propagation gives
back the explained logit within `STRUCTURAL_TOLERANCE`; a model where it does not is refused. The check
propagates with EpsilonPlusFlat whatever composite is asked for: every composite goes through the same
canonizers and layer types, and the alpha-beta rule alone also loses relevance by design wherever a neuron has
no negative contribution (1-2% on the demo CNN), which is not what is tested.
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from ..errors import XAuditError, require_extra
from ._registry import MethodOutput, register

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1")
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Flatten,
             nn.Identity)


def unsupported(model: nn.Module) -> str | None:
    """Why Zennit's LRP cannot explain `model` conservatively (None: it can)."""
    if type(model).__name__ == "DenseNet":
        return "DenseNet (BatchNorm after concatenation breaks Zennit's canonizer)"
    bad = sorted({type(m).__name__ for m in model.modules() if not list(m.children()) and not isinstance(m, SUPPORTED)})
    return f"layers with no LRP rule in Zennit: {', '.join(bad[:6])}" if bad else None


# At zero biases the epsilon rule's stabiliser (1e-6) is all that may lose relevance: 1% of the logit is far
# above it (torchvision's VGG-16 and ResNet-50 conserve to 1e-4 there) and far below what a path without rules
# does (100% seen on GoogLeNet and MNASNet, 300% on a hand-written ResNet).
STRUCTURAL_TOLERANCE = 0.01
_STRUCTURE: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()


def structural_leak(model: nn.Module, x: torch.Tensor) -> float:
    """Return |sum(relevance) - logit| / |logit| under EpsilonPlusFlat for one input row `x` (1, C, H, W) on a
    copy of `model` whose biases and BatchNorm running means are zero (the class with the largest |logit| is
    explained): what the rules lose on paths they do not reach, with nothing that legitimately absorbs
    relevance. Computed once per model object."""
    if model not in _STRUCTURE:
        twin = copy.deepcopy(model).eval()
        with torch.no_grad():
            for module in twin.modules():
                for name, p in module.named_parameters(recurse=False):
                    if name == "bias":
                        p.zero_()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                    module.running_mean.zero_()
            logits = twin(x)
        k = int(logits[0].abs().argmax())
        logit = float(logits[0, k])
        start = torch.zeros_like(logits, dtype=x.dtype)
        start[0, k] = logit
        relevance = _relevance(twin, x, start, "epsilon_plus_flat")
        _STRUCTURE[model] = abs(float(relevance.double().sum()) - logit) / max(abs(logit), 1e-12)
    return _STRUCTURE[model]


def _relevance(model: nn.Module, x: torch.Tensor, start: torch.Tensor, composite: str) -> torch.Tensor:
    """Return the relevance at the input of `model` for `x`, starting from `start` (N, K) at the logits."""
    from zennit.attribution import Gradient
    rules = _composite(composite, x, _canonizers(model))
    with torch.enable_grad(), Gradient(model=model, composite=rules) as attributor:
        _, relevance = attributor(x.detach().clone(), start)
    return relevance.detach()


def _canonizers(model: nn.Module):
    import torchvision
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    if isinstance(model, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, torchvision.models.VGG):
        return [VGGCanonizer()]
    return [SequentialMergeBatchNorm()]


def _composite(name: str, x: torch.Tensor, canonizers):
    from zennit import composites
    if name == "epsilon_plus_flat":
        return composites.EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_plus":
        return composites.EpsilonPlus(canonizers=canonizers)
    if name == "epsilon_alpha2_beta1":
        return composites.EpsilonAlpha2Beta1(canonizers=canonizers)
    # the z-box rule of the first layer needs the input's bounds: each image's own, so a batch equals its rows
    low = x.flatten(1).amin(1).view(-1, *[1] * (x.ndim - 1)).expand_as(x)
    high = x.flatten(1).amax(1).view(-1, *[1] * (x.ndim - 1)).expand_as(x)
    return composites.EpsilonGammaBox(low=low, high=high, canonizers=canonizers)


@register("lrp", paper="https://doi.org/10.1371/journal.pone.0130140", has_delta=True,
          composite="epsilon_plus_flat")
def lrp(ctx, composite: str) -> MethodOutput:
    """Return LRP relevance (N, C, H, W) of the target logit and the conservation residual `delta` (N,)."""
    if composite not in COMPOSITES:
        raise XAuditError(f"lrp: 'composite' must be one of {', '.join(COMPOSITES)}; got {composite!r}")
    why = unsupported(ctx.model)
    if why:
        raise XAuditError(f"lrp: Zennit's LRP does not support this model ({type(ctx.model).__name__}: {why}); "
                          f"choose deeplift or integrated_gradients in 'attribution.methods' instead")
    try:
        import zennit  # noqa: F401
    except ImportError:
        require_extra("lrp", "lrp")
        raise
    x = ctx.inputs
    if len(x):
        leak = structural_leak(ctx.model, x[:1])
        if not leak <= STRUCTURAL_TOLERANCE:
            raise XAuditError(
                f"lrp: Zennit's rules do not conserve relevance through this model ({type(ctx.model).__name__}): "
                f"with every bias set to zero, where nothing may absorb relevance, the input's relevance missed the "
                f"explained logit by {leak:.0%} (at most {STRUCTURAL_TOLERANCE:.0%} allowed): what its forward does "
                f"between layers (a residual addition outside the models Zennit has canonizers for, say) passes "
                f"relevance on without a rule; choose deeplift or integrated_gradients in "
                f"'attribution.methods' instead")
    out = torch.empty_like(x)
    delta = torch.empty(len(x), device=x.device, dtype=x.dtype)

    def step(s: slice) -> None:
        xs = x[s].detach().clone()
        logit = ctx.logits[s].gather(1, ctx.target[s, None])[:, 0].to(x.dtype)
        start = torch.zeros_like(ctx.logits[s], dtype=x.dtype)
        start[torch.arange(len(xs)), ctx.target[s]] = logit
        relevance = _relevance(ctx.model, xs, start, composite)
        out[s] = relevance
        delta[s] = relevance.flatten(1).sum(1) - logit
    ctx._chunked(len(x), step)
    return MethodOutput(out, {"delta": delta})

"""Layer-wise relevance propagation on Zennit (Bach et al. 2015, https://doi.org/10.1371/journal.pone.0130140;
Anders et al., https://arxiv.org/abs/2106.13200): the explained logit is passed back layer by layer by the
composite's rules; BatchNorm is merged into the layer before it and ResNet skip connections are
canonized, so the relevance at the input sums to the logit up to what biases and the epsilon rule absorb.
The per-example `delta` is sum(relevance) - logit.

Zennit's rules cover convolutional nets built from Conv/Linear/ReLU/pooling/BatchNorm, and torchvision
ResNets through its canonizer. Other families are refused before any work: LayerNorm and attention (ViT,
Swin, ConvNeXt), squeeze-excitation gates and smooth activations (EfficientNet, MobileNet-V3, RegNetY) have
no conservative rule there, and DenseNet's BatchNorm after concatenation breaks its canonizer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import XAuditError
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
        from zennit.attribution import Gradient
    except ImportError:
        raise XAuditError("lrp: needs the Zennit package: pip install 'xaudit[lrp]'") from None
    x = ctx.inputs
    out = torch.empty_like(x)
    delta = torch.empty(len(x), device=x.device, dtype=x.dtype)

    def step(s: slice) -> None:
        xs = x[s].detach().clone()
        logit = ctx.logits[s].gather(1, ctx.target[s, None])[:, 0].to(x.dtype)
        start = torch.zeros_like(ctx.logits[s], dtype=x.dtype)
        start[torch.arange(len(xs)), ctx.target[s]] = logit
        rules = _composite(composite, xs, _canonizers(ctx.model))
        with torch.enable_grad(), Gradient(model=ctx.model, composite=rules) as attributor:
            _, relevance = attributor(xs, start)
        out[s] = relevance.detach()
        delta[s] = relevance.detach().flatten(1).sum(1) - logit
    ctx._chunked(len(x), step)
    return MethodOutput(out, {"delta": delta})

"""Grad-CAM: ReLU(sum_k mean_ij(dy/dA_kij) A_k) at the CAM layer (Selvaraju et al. 2017,
https://arxiv.org/abs/1610.02391)."""
import torch

from ._registry import MethodOutput, register


@register("gradcam", gradient_pass=True, layer=True, paper="https://arxiv.org/abs/1610.02391")
def gradcam(ctx) -> MethodOutput:
    """Return the (N, 1, h, w) Grad-CAM map at the CAM layer, from the shared gradient pass."""
    p = ctx.gradient_pass()
    weights = p.layer_grad.mean(dim=(2, 3), keepdim=True)
    return MethodOutput(torch.relu((weights * p.activations).sum(1, keepdim=True)))

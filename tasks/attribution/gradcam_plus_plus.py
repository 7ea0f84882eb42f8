"""Grad-CAM++ (Chattopadhyay et al. 2018, https://arxiv.org/abs/1710.11063), with the usual
exponential-output closed form: alpha = g^2 / (2 g^2 + sum_ij(A) g^3), weights = sum_ij(alpha ReLU(g))."""
import torch

from ._registry import MethodOutput, register


@register("gradcam_plus_plus", gradient_pass=True, layer=True, paper="https://arxiv.org/abs/1710.11063", eps=1e-6)
def gradcam_plus_plus(ctx, eps: float) -> MethodOutput:
    """Return the (N, 1, h, w) Grad-CAM++ map at the CAM layer, from the shared gradient pass."""
    p = ctx.gradient_pass()
    g, a = p.layer_grad, p.activations
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + eps)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
    return MethodOutput(torch.relu((weights * a).sum(1, keepdim=True)))

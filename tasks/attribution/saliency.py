"""Saliency: |d logit_target / d x| (Simonyan et al. 2014, https://arxiv.org/abs/1312.6034)."""
from ._registry import MethodOutput, register


@register("saliency", gradient_pass=True, paper="https://arxiv.org/abs/1312.6034")
def saliency(ctx) -> MethodOutput:
    """Return the absolute input gradient of the target logit, from the shared gradient pass."""
    return MethodOutput(ctx.gradient_pass().input_grad.abs())

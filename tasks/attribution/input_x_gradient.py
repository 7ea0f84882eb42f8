"""Input x gradient: x * d logit_target / d x (Shrikumar et al. 2016, https://arxiv.org/abs/1605.01713)."""
from ._registry import MethodOutput, register


@register("input_x_gradient", gradient_pass=True, paper="https://arxiv.org/abs/1605.01713")
def input_x_gradient(ctx) -> MethodOutput:
    """Return inputs times the input gradient of the target logit, from the shared gradient pass."""
    return MethodOutput(ctx.inputs * ctx.gradient_pass().input_grad)

"""DeepLIFT with the rescale rule (Shrikumar et al. 2017, https://arxiv.org/abs/1704.02685; Captum's
`DeepLift`). `deeplift_pairs` is shared with DeepSHAP (deep_shap.py).

Attributions are (x - b) * m, where m is the gradient of the target logit with every nonlinearity's local
derivative replaced by its rescale multiplier (f(x) - f(b)) / (x - b) (the derivative where x and b are
within `eps`, or within float rounding of each other: 1e-5 of their size), computed from one forward of the
batch [x; b]. Max pools take Captum's rule (the change of the pooled maximum goes to the position the
input's or the baseline's maximum came from), so summation to delta holds through them:
sum(attributions) = f(x) - f(b), and the per-example `delta` extra is the residual.

How it is wired: a forward hook on each elementwise activation and max pool replaces the module's output by
`y.detach() + L(x - x.detach())`, a tensor with the same value whose gradient is the rule's multiplier. Unlike
backward hooks this works for modules **used more than once** (torchvision ResNet blocks call one ReLU
twice; Captum's DeepLift raises there) and for in-place activations. Activations written as functions in
`forward` (`F.relu(x)`, DenseNet's last ReLU) and LayerNorm/attention have no module to hook: they pass the
plain gradient, as in Captum, and the `delta` shows how far summation to delta is off.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import MethodOutput, register
from .integrated_gradients import make_baseline

# elementwise activations with a rescale multiplier (Captum has rules for the first six; the others follow
# the same rule here, so DeepLIFT also holds on EfficientNet/MobileNet/ConvNeXt activations)
ELEMENTWISE = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.ReLU6, nn.GELU, nn.SiLU,
               nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.SELU, nn.CELU)
POOLS = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
RELATIVE = 1e-5     # a change below this share of the values is rounding in float32: use the derivative there


def _unchanged(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Where a - b is too small for (f(a) - f(b)) / (a - b) to mean anything: below `eps`, or below what float
    rounding of a and b leaves (the secant is then the derivative, its limit)."""
    return (a - b).abs() <= eps + RELATIVE * (a.abs() + b.abs())


@contextmanager
def rescale_rules(model: nn.Module, eps: float):
    """While active, a forward of a batch [x; b] (2n rows, inputs then baselines) gives the first n rows
    DeepLIFT's rescale-rule gradients through every hooked module."""
    saved: dict[int, list[torch.Tensor]] = {}
    busy = []

    def pre(module, args):
        if busy:
            return None
        saved.setdefault(id(module), []).append(args[0])
        return (args[0].clone(), *args[1:])          # an in-place activation then leaves the input intact

    def elementwise(module, args, out):
        if busy:
            return None
        x = saved[id(module)].pop()
        n = len(x) // 2
        with torch.no_grad():
            dx = x[:n] - x[n:]
            dy = out[:n] - out[n:]
            small = _unchanged(x[:n], x[n:], eps)
            if type(module) is nn.ReLU:       # its derivative, without another autograd pass
                local = (x[:n] > 0).to(dx.dtype)
            else:
                busy.append(True)
                try:
                    with torch.enable_grad():
                        xa = x[:n].detach().clone().requires_grad_(True)
                        (local,) = torch.autograd.grad(module(xa.clone()).sum(), xa)
                finally:
                    busy.pop()
            m = torch.where(small, local, dy / torch.where(small, torch.ones_like(dx), dx))
        return out.detach() + (x - x.detach()) * torch.cat([m, m])

    def pool(module, args, out):
        if busy:
            return None
        x = saved[id(module)].pop()
        n = len(x) // 2
        _, idx = POOLS[type(module)](x.detach(), module.kernel_size, module.stride, module.padding,
                                     module.dilation, module.ceil_mode, True)
        ia, ib = idx[:n].flatten(2), idx[n:].flatten(2)
        ya, yb = out[:n].detach(), out[n:].detach()
        top = torch.maximum(ya, yb)
        xs, xr = x[:n].detach().flatten(2), x[n:].detach().flatten(2)
        dx = xs - xr
        dxa, dxb = dx.gather(2, ia).view_as(ya), dx.gather(2, ib).view_as(ya)
        sa = _unchanged(xs.gather(2, ia), xr.gather(2, ia), eps).view_as(ya)
        sb = _unchanged(xs.gather(2, ib), xr.gather(2, ib), eps).view_as(ya)
        one = torch.ones_like(ya)
        ca = torch.where(sa, one, (top - yb) / torch.where(sa, one, dxa))
        cb = torch.where(sb, 0 * one, (ya - top) / torch.where(sb, one, dxb))
        t = (x[:n] - x[:n].detach()).flatten(2)
        lin = ca * t.gather(2, ia).view_as(ya) + cb * t.gather(2, ib).view_as(ya)
        return out.detach() + torch.cat([lin, torch.zeros_like(lin)])

    handles = []
    for module in model.modules():
        hook = elementwise if isinstance(module, ELEMENTWISE) else pool if type(module) in POOLS else None
        if hook is not None:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def deeplift_pairs(ctx, x: torch.Tensor, b: torch.Tensor, target: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return DeepLIFT attributions of the pairs (x_i, b_i) for `target`, and the delta per pair, in chunks
    of half `max_batch` pairs (each pair is two rows of one forward)."""
    attr = torch.empty_like(x)
    delta = torch.empty(len(x), device=x.device, dtype=x.dtype)

    def step(s: slice) -> None:
        xs = x[s].detach().clone().requires_grad_(True)
        with torch.enable_grad(), rescale_rules(ctx.model, eps):
            out = ctx.model(torch.cat([xs, b[s].detach()]))
            k = len(xs)
            picked = out.gather(1, torch.cat([target[s], target[s]])[:, None])[:, 0]
            (grad,) = torch.autograd.grad(picked[:k].sum(), xs)
        a = (x[s] - b[s]) * grad
        attr[s] = a.detach()
        delta[s] = (a.flatten(1).sum(1) - (picked[:k] - picked[k:])).detach().to(delta.dtype)
    limit = ctx.max_batch
    ctx.max_batch = max(1, limit // 2)
    try:
        ctx._chunked(len(x), step)
    finally:      # a CUDA out-of-memory error may have halved it: keep that for the batch
        ctx.max_batch = min(limit, 2 * ctx.max_batch)
    return attr, delta


@register("deeplift", has_delta=True, paper="https://arxiv.org/abs/1704.02685", baseline="zeros", blur_sigma=2.0,
          eps=1e-10)
def deeplift(ctx, baseline: str, blur_sigma: float, eps: float) -> MethodOutput:
    """Return DeepLIFT (rescale rule) attributions (N, C, H, W) and the summation-to-delta residual `delta`."""
    b = make_baseline(ctx, baseline, blur_sigma, salt=41)
    attr, delta = deeplift_pairs(ctx, ctx.inputs, b, ctx.target, eps)
    return MethodOutput(attr, {"delta": delta})

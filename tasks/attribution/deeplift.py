"""DeepLIFT with the rescale rule (Shrikumar et al. 2017, https://arxiv.org/abs/1704.02685; Captum's
`DeepLift`). `deeplift_pairs` is shared with DeepSHAP (deep_shap.py).

Attributions are (x - b) * m, where m is the gradient of the target logit with every nonlinearity's local
derivative replaced by its rescale multiplier (f(x) - f(b)) / (x - b) (the derivative where x and b are
within `eps`, or within float rounding of each other: 1e-5 of their size; for ReLU and max pools, whose
multipliers lie in [0, 1] wherever they are defined, only where x = b). Max pools take Captum's rule (the
change of the pooled maximum goes to the position the input's or the baseline's maximum came from), so
summation to delta holds through them: sum(attributions) = f(x) - f(b), and the per-example `delta` extra is
the residual.

How it is wired (`RescaleRules`): the baselines run first without autograd, and every activation module's and
max pool's input and output are kept in call order; a constant baseline (zeros, the default) is one row, run
once and kept for the next call on the same, unchanged model (`_cached_reference`). The inputs then run with
forward hooks that give each hooked module's output the rule's multiplier as its gradient, against the
reference call at the same position. For ReLU the multiplier is formed in the forward (`_ReluRescale`: two
differences, a quotient and a sum) and the backward is one product, as plain ReLU's; in-place activations run
out of place and max pools return their indices while the hooks are on, so nothing is copied or pooled twice;
the max-pool rule gathers only the two values it reads per output and its backward is two scatters into one
buffer (`_PoolRescale`). The cost is one forward+backward of the inputs and that arithmetic (see
`benchmarks/attribution.py --only deeplift` and benchmarks/README.md for the ratio on ResNet-18/50 and
ViT-B/16 at 224²). Unlike
backward hooks this works for modules **used more than once** (torchvision ResNet blocks call one ReLU
twice; Captum's DeepLift raises there) and for in-place activations. Activations written as functions in
`forward` (`F.relu(x)`, DenseNet's last ReLU) and LayerNorm/attention have no module to hook: they pass the
plain gradient, as in Captum, and the `delta` shows how far summation to delta is off.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import XAuditError
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


# Both rules below return the module's own output `y` as a new autograd output (not a view of an input: `y`
# reaches them inside a list), and keep nothing of it for the backward, so the network may modify it in place
# afterwards (EfficientNetV2's `result += input` after an activation raised "a view ... is being modified
# inplace" when the output was a view).

class _Through(torch.autograd.Function):
    """Value `y` (the module's own output), gradient `m` times the incoming one with respect to `x` (the
    module's input): the rescale rule without the arithmetic of a straight-through expression."""

    @staticmethod
    def forward(ctx, x, m, holder):
        ctx.save_for_backward(m)
        return holder[0]

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return m.mul_(grad), None, None                   # (in place: the graph runs once)


class _ReluRescale(torch.autograd.Function):
    """ReLU's rescale rule: value `y` (the module's own output), gradient the incoming one times
    m = (y - yr) / (x - xr). Where x and xr have one sign, m is exactly 0 or 1 (dy and dx are the same float
    subtraction); where they differ, |dx| = |x| + |xr| and m lies in (0, 1): the quotient cannot blow up, so
    only x = xr (0 / 0) takes the derivative (x > 0), and `eps` is not needed. m is formed in the forward and
    is all the backward keeps: three elementwise passes there, one product in the backward. With `check`, a
    sum finds whether the call has a 0 / 0 (the sum is NaN exactly then) and a `where` puts the derivative
    there; without it a 0 / 0 stays NaN, which reaches the input gradient wherever it matters (NaN times any
    gradient is NaN), and `deeplift_pairs` then runs the chunk again with `check`."""

    @staticmethod
    def forward(ctx, x, xr, yr, check, holder):
        y = holder[0]
        # in x's memory layout (a reference row's strides must not pick the layout of the gradient: a
        # non-contiguous gradient costs the convolution's backward a copy)
        m = torch.sub(y, yr, out=torch.empty_like(x))
        m.div_(torch.sub(x, xr, out=torch.empty_like(x)))
        if check and bool(torch.isnan(m.sum())):
            m = torch.where(torch.isnan(m), (x > 0).to(m.dtype), m)
        ctx.save_for_backward(m)
        return y

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        # in place: the graph is used once (`deeplift_pairs` keeps no graph), and a fresh product costs a new
        # buffer of the activation's size (a multiple of the in-place time here)
        return m.mul_(grad), None, None, None, None


class _PoolRescale(torch.autograd.Function):
    """The max-pool rule: value `y` (the pool's output), and for the input the incoming gradient times `ca`
    scattered to the input's argmax `ia` plus times `cb` scattered to the baseline's argmax `ib` (flat
    indices per plane): one buffer and two scatters, where the pool's own backward, a gather's backward and
    the sum of the two would write the input's size three times."""

    @staticmethod
    def forward(ctx, x, ca, cb, ia, ib, holder):
        ctx.save_for_backward(ca, cb, ia, ib)
        ctx.shape = x.shape
        return holder[0]

    @staticmethod
    def backward(ctx, grad):
        ca, cb, ia, ib = ctx.saved_tensors
        g = torch.zeros((*ctx.shape[:2], ctx.shape[2:].numel()), dtype=grad.dtype, device=grad.device)
        g.scatter_add_(2, ia, ca.mul_(grad).flatten(2))                   # (in place: the graph runs once)
        g.scatter_add_(2, ib, cb.mul_(grad).flatten(2))
        return g.view(ctx.shape), None, None, None, None, None


class _ReferenceShape(Exception):
    """A reference call whose shape does not broadcast to the inputs' call: the model folds something into the
    batch axis (MobileViT unfolds patches into it), so a one-row reference of a constant baseline does not line
    up with the inputs; the reference then needs one row per input."""


class RescaleRules:
    """Hooks that turn a forward into DeepLIFT's. `reference(b)` runs the baselines without autograd and keeps
    every hooked module's input and output in call order; `forward(x)` then runs the inputs, and each hooked
    module's output gets the rule's multiplier against the reference call at the same position as its
    gradient. One baseline row is broadcast against every input (a constant baseline costs one row's
    forward, not a second batch); otherwise the reference has one row per input."""

    def __init__(self, model: nn.Module, eps: float):
        self.model, self.eps = model, eps
        self.check_zeros = model in _ZEROS_SEEN     # (see _ReluRescale)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.recording = False
        self.cursor = 0
        self.busy = False
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        # in-place activations run out of place (their input is the rule's x), and max pools return their
        # indices (the rule needs them; recomputing the pool would cost a second pass), until `close`
        self.restore: list[tuple[nn.Module, str, bool]] = []
        for module in model.modules():
            hook = self._elementwise if isinstance(module, ELEMENTWISE) else \
                self._pool if type(module) in POOLS else None
            if hook is not None:
                self.handles += [module.register_forward_pre_hook(self._pre), module.register_forward_hook(hook)]
                for flag, value in (("inplace", False), ("return_indices", True)):
                    if hasattr(module, flag) and getattr(module, flag) != value:
                        self.restore.append((module, flag, getattr(module, flag)))
                        setattr(module, flag, value)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for module, flag, value in self.restore:
            setattr(module, flag, value)

    def reference(self, b: torch.Tensor) -> torch.Tensor:
        self.calls, self.recording = [], True
        try:
            with torch.no_grad():
                return self.model(b)
        finally:
            self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cursor = 0
        out = self.model(x)
        if self.cursor != len(self.calls):
            raise XAuditError(f"deeplift: the model's forward took {self.cursor} activation/pool calls for the "
                              f"inputs and {len(self.calls)} for the baseline; DeepLIFT needs one path for both")
        return out

    def _pre(self, module, args):
        if self.busy:
            return None
        self.pending.setdefault(id(module), []).append(args[0])
        return None

    def _take(self, module, x, out, idx=None):
        """Record (reference pass) or return the reference call matching this one (inputs pass)."""
        if self.recording:
            # copies: a later in-place operation of the forward must not change the reference
            self.calls.append((id(module), x.detach().clone(), out.detach().clone(), idx))
            return None
        if self.cursor >= len(self.calls) or self.calls[self.cursor][0] != id(module):
            raise XAuditError("deeplift: the model's forward calls its activations in a different order for the "
                              "inputs than for the baseline; DeepLIFT needs one path for both")
        call = self.calls[self.cursor]
        xr = call[1]
        if xr.shape[1:] != x.shape[1:] or len(xr) not in (1, len(x)):
            raise _ReferenceShape(f"{type(module).__name__} saw {tuple(x.shape)} for the inputs and "
                                  f"{tuple(xr.shape)} for the baseline")
        self.cursor += 1
        return call

    def _elementwise(self, module, args, out):
        if self.busy:
            return None
        x = self.pending[id(module)].pop()
        call = self._take(module, x, out)
        if call is None:
            return None
        _, xr, yr, _ = call
        if type(module) is nn.ReLU:
            # the secant is 0, 1 or in between wherever x != b: only x = b needs the derivative (_ReluRescale)
            return _ReluRescale.apply(x, xr, yr, self.check_zeros, [out.detach()])
        with torch.no_grad():
            xd = x.detach()
            dx = torch.sub(xd, xr, out=torch.empty_like(xd))
            m = torch.sub(out.detach(), yr, out=torch.empty_like(xd)).div_(dx)   # the secant (not where dx ~ 0)
            # a position `_unchanged` would take has |dx| <= eps + R(|x| + |xr|) <= eps + R(|dx| + 2|xr|), so
            # |dx| <= (eps + 2R|xr|) / (1 - R): a bound from the reference alone (one row for a constant
            # baseline); only a call with a position inside it pays for the exact test and the derivative
            bound = (self.eps + 2 * RELATIVE * xr.abs()).mul_((1 + 1e-3) / (1 - RELATIVE))
            if bool((dx.abs_() <= bound).any()):
                small = _unchanged(xd, xr, self.eps)
                self.busy = True
                try:
                    with torch.enable_grad():
                        xa = xd.clone().requires_grad_(True)
                        (local,) = torch.autograd.grad(module(xa.clone()).sum(), xa)
                finally:
                    self.busy = False
                m = torch.where(small, local, m)
        return _Through.apply(x, m, [out.detach()])

    def _pool(self, module, args, out):
        if self.busy:
            return None
        x = self.pending[id(module)].pop()
        out, idx = out if isinstance(out, tuple) else \
            POOLS[type(module)](x, module.kernel_size, module.stride, module.padding, module.dilation,
                                module.ceil_mode, True)
        call = self._take(module, x, out, idx)
        if call is None:
            return out
        _, xr, yr, idx_r = call
        # Captum's rule, evaluated only where it reads: the input at its own argmax is its pooled value, the
        # baseline at its own argmax is its pooled value, so only the baseline at the input's argmax and the
        # input at the baseline's argmax are gathered (no full-size difference)
        n = len(x)
        ya = out.detach()
        yb = yr.expand_as(ya)
        ia = idx.flatten(2)
        ib = idx_r.flatten(2).expand(n, *idx_r.shape[1:2], -1)
        with torch.no_grad():
            x_ib = x.detach().flatten(2).gather(2, ib).view_as(ya)
            xb_ia = xr.flatten(2).expand(n, *xr.shape[1:2], -1).gather(2, ia).view_as(ya)
            # ca = (top - yb) / (ya - xb_ia) and cb = (ya - top) / (x_ib - yb) lie in [0, 1] wherever they are
            # defined (xb_ia <= yb and x_ib <= ya, and float subtraction is monotone), and a zero denominator
            # comes with a zero numerator: 0 / 0 takes the pool's derivative (1 at the input's argmax, 0 at
            # the baseline's), so no eps is needed here either
            top = torch.maximum(ya, yb)
            ca = torch.sub(top, yb).div_(torch.sub(ya, xb_ia)).nan_to_num_(nan=1.0)
            cb = torch.sub(ya, top).div_(torch.sub(x_ib, yb)).nan_to_num_(nan=0.0)
        return _PoolRescale.apply(x, ca, cb, ia, ib, [ya])


# The reference pass of a constant baseline, kept per model between calls (a shard's batches share it): the
# recorded calls and logits, under the model's state (dtype, device, mode, every parameter's and buffer's
# storage, version counter and sum: the sum also sees edits through `.data`, which bypass the counter) and
# the baseline row itself. One entry per live model; it goes with the model.
_REFERENCES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_REFERENCES_LOCK = threading.Lock()
_ZEROS_SEEN: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()     # models whose ReLUs met x = b (0 / 0)
_ROW_PER_INPUT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models a one-row reference does not fit


def _model_state(model: nn.Module) -> tuple[tuple, torch.Tensor | None]:
    tensors = [*model.parameters(), *model.buffers()]
    layout = (model.training, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
    # (accumulated and kept in float32: a float64 sum converts every float32 element first, 13 ms a call on
    # ResNet-18 against 3 ms, and a half-precision sum can overflow to inf; an edit below the sum's rounding,
    # about 1e-7 of it, goes unseen)
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors if t.is_floating_point() and t.numel()]
    return layout, torch.stack(sums).cpu() if sums else None


def _cached_reference(rules: "RescaleRules", b0: torch.Tensor) -> torch.Tensor:
    """Run (or take from `_REFERENCES`) the reference pass of the one baseline row `b0`; return its logits."""
    layout, sums = _model_state(rules.model)
    with _REFERENCES_LOCK:
        hit = _REFERENCES.get(rules.model)
    if hit is not None:
        c_layout, c_sums, c_b0, calls, logits = hit
        if c_layout == layout and c_b0.shape == b0.shape and c_b0.dtype == b0.dtype \
                and c_b0.device == b0.device and torch.equal(c_b0, b0) \
                and (sums is None) == (c_sums is None) and (sums is None or torch.equal(c_sums, sums)):
            rules.calls = calls
            return logits
    logits = rules.reference(b0)
    with _REFERENCES_LOCK:
        _REFERENCES[rules.model] = (layout, sums, b0.clone(), rules.calls, logits)
    return logits


def deeplift_pairs(ctx, x: torch.Tensor, b: torch.Tensor, target: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return DeepLIFT attributions of the pairs (x_i, b_i) for `target`, and the delta per pair, in chunks
    of `max_batch` inputs. Where every baseline is the same tensor, its reference forward is one row, run
    once (and kept for the next call on the same model in the same state: `_cached_reference`)."""
    attr = torch.empty_like(x)
    delta = torch.empty(len(x), device=x.device, dtype=x.dtype)
    constant = len(b) > 0 and ctx.model not in _ROW_PER_INPUT and bool((b == b[:1]).all())
    rules = RescaleRules(ctx.model, eps)
    try:
        ref_logits = _cached_reference(rules, b[:1].detach()) if constant else None

        def one_row() -> bool:     # a constant baseline's one-row reference, unless the model's shapes refuse it
            return constant and ctx.model not in _ROW_PER_INPUT

        def step(s: slice) -> None:
            ref = ref_logits if one_row() else rules.reference(b[s].detach())
            while True:
                xs = x[s].detach().clone().requires_grad_(True)
                try:
                    with torch.enable_grad():
                        out = rules.forward(xs)
                        picked = out.gather(1, target[s][:, None])[:, 0]
                        (grad,) = torch.autograd.grad(picked.sum(), xs)
                except _ReferenceShape as exc:
                    if not one_row():
                        raise XAuditError(f"deeplift: the model's activations have other shapes for the inputs "
                                          f"than for the baseline ({exc}); DeepLIFT needs one path for both") from None
                    _ROW_PER_INPUT.add(ctx.model)
                    ref = rules.reference(b[s].detach())
                    continue
                if rules.check_zeros or not bool(torch.isnan(grad.sum())):
                    break
                # a ReLU input equal to its reference somewhere (x = b on a whole receptive field, say): run the
                # chunk again with the check, and keep the check for this model from now on
                rules.check_zeros = True
                _ZEROS_SEEN.add(ctx.model)
            f_ref = ref.expand(len(xs), -1).gather(1, target[s][:, None])[:, 0]
            a = (x[s] - b[s]) * grad
            attr[s] = a.detach()
            delta[s] = (a.flatten(1).sum(1) - (picked - f_ref)).detach().to(delta.dtype)
        ctx._chunked(len(x), step)
    finally:
        rules.close()
    return attr, delta


@register("deeplift", has_delta=True, paper="https://arxiv.org/abs/1704.02685", baseline="zeros", blur_sigma=2.0,
          eps=1e-10)
def deeplift(ctx, baseline: str, blur_sigma: float, eps: float) -> MethodOutput:
    """Return DeepLIFT (rescale rule) attributions (N, C, H, W) and the summation-to-delta residual `delta`."""
    b = make_baseline(ctx, baseline, blur_sigma, salt=41)
    attr, delta = deeplift_pairs(ctx, ctx.inputs, b, ctx.target, eps)
    return MethodOutput(attr, {"delta": delta})

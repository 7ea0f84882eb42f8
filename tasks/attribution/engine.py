"""Compute several attribution methods for a batch, sharing the clean forward and the gradient pass.

Vocabulary (as Captum): `model`, `inputs` (N, C, H, W), `target` (N,) class per example, `attributions`,
`baselines`. The clean forward (logits, prediction) is computed once per batch; one forward/backward feeds
every gradient-pass method (saliency, input x gradient, Grad-CAM, Grad-CAM++).
"""
from __future__ import annotations

import hashlib
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import XAuditError
from ._registry import get_method, resolve_params


# The first norm of a transformer block (torchvision ViT's `ln_1`; timm ViT/DeiT/BEiT/Swin's and torchvision
# Swin's `norm1`, timm's own LayerNorm subclass included) is where pytorch-grad-cam's documentation puts
# Grad-CAM for vision transformers (the last block's output would give the patch tokens no gradient: the head
# reads the class token alone). It is found by structure (`_block_norm`), whatever the block names it.
# pooling only coarsens the map before it (and an adaptive pool's size is set by the configuration: VGG's 7x7
# `avgpool` copies a 1x1 map), so a pool's output is never the CAM layer: the map it pools is
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)
# the automatic layer found for a model and input shape (one probe forward per model object)
_AUTO_LAYER: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]]" = weakref.WeakKeyDictionary()


def find_layer(model: nn.Module, name: str | None, inputs: torch.Tensor | None = None) -> nn.Module:
    """Return the module at dotted path `name`; when `name` is None, the automatic CAM layer that `auto_layer`
    finds with a probe forward of `inputs`' first row."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise XAuditError(f"attribute: 'target_layer' {name!r} is not a submodule of "
                              f"{type(model).__name__}") from None
    if inputs is None:
        raise TypeError("find_layer: the automatic CAM layer needs 'inputs' (a probe forward finds it)")
    return model.get_submodule(auto_layer(model, inputs[:1]))


def layer_name(model: nn.Module, name: str | None, inputs: torch.Tensor | None = None) -> str:
    """Return the dotted path of the CAM layer `find_layer` picks (for the manifest and the report: which layer
    the automatic choice was)."""
    layer = find_layer(model, name, inputs)
    return next((n for n, m in model.named_modules() if m is layer), name or "")


def _channels_first(layer: nn.Module) -> bool:
    """A LayerNorm subclass that normalises the channels of (N, C, h, w) (timm's LayerNorm2d), not the last
    axis."""
    return type(layer).__name__.endswith("2d")


def auto_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Return the dotted name of the automatic CAM layer of `model` for inputs shaped like the row `x`
    (1, C, H, W), found by one probe forward, in the order modules finish:

    - a vision transformer (ViT, DeiT, BEiT, Swin, PVT): the last block's first LayerNorm (`ln_1`, `norm1`)
      whose output holds this image's patch tokens, (1, T, C) on the image's grid after up to 16 leading
      class/register tokens, or channels-last (1, h, w, C); MobileViT's norms, which see unfolded patches
      (a larger batch), do not count;
    - else the last feature map that every path from the input to the logits goes through: a module's
      (1, C, h, w) output of more than one cell (or patch tokens (1, h*w, C) with no class token), not a
      pool's (ResNet's `layer4`, DenseNet's `features`, VGG-16's `features.29`, Inception's `Mixed_7c`).

    Why not the last `Conv2d`: that can be a layer the forward never runs (GoogLeNet's auxiliary heads in eval
    mode), one branch of a block whose branches are concatenated (Inception's `branch_pool`), a layer inside a
    residual or MLP branch (ResNet's `conv3`, PoolFormer's and PVT's MLP), or a 1x1 head applied after global
    pooling (DLA's `fc`). Cached per model object and input shape."""
    key = (tuple(x.shape[1:]), x.dtype, str(x.device))
    known = _AUTO_LAYER.setdefault(model, {})
    if key in known:
        return known[key]
    names = {m: n for n, m in model.named_modules() if n}
    maps: list[tuple[str, Any]] = []
    norms: list[tuple[str, torch.Tensor, int]] = []     # token LayerNorms: name, output, leading extra tokens
    attention_inputs: list[Any] = []                    # grad_fns of what attention modules were given
    pooled: set[int] = set()

    def attention_input(module: nn.Module, args: Any, kwargs: Any) -> None:
        first = args[0] if args else kwargs.get("query", kwargs.get("x", kwargs.get("hidden_states")))
        if isinstance(first, torch.Tensor) and first.grad_fn is not None:
            attention_inputs.append(first.grad_fn)

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.grad_fn is None or len(output) != 1:
            return
        if isinstance(module, _POOLS):
            pooled.add(id(output.grad_fn))
            return
        name = names[module]
        grid = _token_grid(output.shape[1], x.shape[-2:]) if output.ndim == 3 else None
        if isinstance(module, nn.LayerNorm) and not _channels_first(module):
            if output.ndim == 4 or grid is not None:
                norms.append((name, output, grid[0] if grid is not None else 0))
        spatial = output.ndim == 4 and output.shape[-2] * output.shape[-1] > 1
        patches = grid is not None and grid[0] == 0 and output.shape[1] > 1
        if (spatial or patches) and id(output.grad_fn) not in pooled:
            maps.append((name, output.grad_fn))
    # (a TorchScript submodule takes no hooks: its inside is not searched)
    handles = [m.register_forward_hook(record) for m in names if not isinstance(m, torch.jit.ScriptModule)]
    handles += [m.register_forward_pre_hook(attention_input, with_kwargs=True) for m in names
                if _is_attention(m) and not isinstance(m, torch.jit.ScriptModule)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            logits = model(xg)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    chosen = _block_norm(norms, attention_inputs, logits)
    if chosen is not None:
        known[key] = chosen
        return chosen
    if not isinstance(logits, torch.Tensor) or logits.grad_fn is None:
        raise XAuditError(f"attribute: the automatic CAM layer needs logits that depend on the input; "
                          f"{type(model).__name__} gave none: set 'target_layer'")
    for name, node in reversed(maps):
        if not _reaches_input(logits.grad_fn, xg, avoid=node):
            known[key] = name
            return name
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise XAuditError(f"attribute: CAM methods need a convolutional layer; {type(model).__name__} has no "
                          f"Conv2d, so give 'target_layer' in the model card")
    raise XAuditError(f"attribute: {type(model).__name__} has no feature map of more than one cell that every "
                      f"path from the input to the logits goes through (for an input of shape "
                      f"{tuple(x.shape[1:])}), so no automatic CAM layer; set 'target_layer' in the model card")


def _is_attention(module: nn.Module) -> bool:
    """An attention module, by type: torch's MultiheadAttention, or a class named like one (timm's `Attention`,
    torchvision's `ShiftedWindowAttention`, Hugging Face's `ViTSelfAttention`)."""
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _block_norm(norms: list[tuple[str, torch.Tensor, int]], attention_inputs: list[Any], logits: Any) -> str | None:
    """Return the last transformer block's first LayerNorm, found by what it does, not by its name: the last
    LayerNorm over tokens whose output is what an attention module reads (ViT's `ln_1`, timm's and Swin's
    `norm1`, any pre-norm block); failing that, for a model with a class token, the last LayerNorm whose patch
    tokens carry gradient to the logits (a block's second norm and the final norm do not when the head reads
    the class token alone). None: not a transformer (the feature-map rule applies)."""
    fed = {id(g) for g in attention_inputs}
    for name, out, _ in reversed(norms):
        if id(out.grad_fn) in fed:
            return name
    tokens = [(n, o, e) for n, o, e in norms if o.ndim == 3 and e > 0]
    if not tokens or not isinstance(logits, torch.Tensor) or logits.grad_fn is None:
        return None
    target = logits.reshape(len(logits), -1)[0].max()
    grads = torch.autograd.grad(target, [o for _, o, _ in tokens], allow_unused=True, retain_graph=True)
    for (name, _, extra), g in zip(reversed(tokens), reversed(grads)):
        if g is not None and bool(g[:, extra:].abs().sum() > 0):
            return name
    return None


def _token_grid(tokens: int, image_size: Sequence[int]) -> tuple[int, int, int] | None:
    """Return (extra, rows, columns): how many leading tokens (class, distillation, register: at most 16) to drop
    so that the rest of `tokens` lie on a rows x columns patch grid with the image's aspect ratio (None: no
    such number)."""
    height, width = int(image_size[0]), int(image_size[1])
    for extra in range(0, min(tokens, 17)):
        cells = tokens - extra
        gh = max(1, round((cells * height / width) ** 0.5))
        if cells % gh == 0 and abs(gh / (cells // gh) - height / width) <= 0.05 * height / width:
            return extra, gh, cells // gh
    return None


def _reaches_input(root: Any, xg: torch.Tensor, avoid: Any) -> bool:
    """Whether the autograd graph from `root` reaches the input leaf `xg` without passing the node `avoid`."""
    stack, visited = [root], {id(avoid)}
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if getattr(node, "variable", None) is xg:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def to_grid(t: torch.Tensor, layer: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
    """Return a CAM layer's output (or its gradient) as (N, C, h, w).

    (N, C, h, w) stays as it is. A LayerNorm normalises the last axis, so its 4-D output is channels-last
    (N, h, w, C) (Swin) and is permuted (not timm's LayerNorm2d, which normalises the channels of (N, C, h, w)).
    A 3-D output (N, tokens, C) of a vision transformer loses its leading class/distillation/register tokens,
    the fewest that leave a patch grid with the image's aspect ratio, and the patch tokens are laid out on that
    grid (pytorch-grad-cam's `reshape_transform`)."""
    where = f"the CAM layer ({type(layer).__name__})"
    if t.ndim == 4:
        return t.permute(0, 3, 1, 2) if isinstance(layer, nn.LayerNorm) and not _channels_first(layer) else t
    if t.ndim == 3:
        n, tokens, c = t.shape
        grid = _token_grid(tokens, image_size)
        if grid is not None:
            extra, rows, cols = grid
            return t[:, extra:].reshape(n, rows, cols, c).permute(0, 3, 1, 2)
        raise XAuditError(f"attribute: {where} outputs {tokens} tokens, which do not form a patch grid with the "
                          f"image's aspect ratio (after up to 16 leading tokens); set 'target_layer'")
    raise XAuditError(f"attribute: CAM methods need a layer whose output is (N, C, h, w), channels-last or "
                      f"transformer tokens (N, T, C); {where} outputs shape {tuple(t.shape)}: set 'target_layer' "
                      f"to a convolutional layer or a transformer block's norm")


@contextmanager
def capture_layer(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the layer's output (in the graph, for a gradient at it) for the duration; the hook is always
    removed."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise XAuditError(f"attribute: the CAM layer must output a tensor; it gave {type(output).__name__}")
        if output.ndim not in (3, 4):
            to_grid(output, layer, (1, 1))            # raises, naming the shape
        store["activations"] = output
        # the network may modify this output in place next (VGG's and AlexNet's ReLU(inplace=True) after the
        # last conv, DenseNet's norm5, a residual `+=`): hand it a copy, so the recorded activations (and the
        # gradient taken at them) are the layer's own; the copy is one (N, C, h, w) tensor
        return output.clone()
    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@dataclass(frozen=True)
class GradientPass:
    """One forward/backward of sum_i logits[i, target_i]: input gradient, CAM-layer activations and gradients."""

    input_grad: torch.Tensor | None          # None when only CAM-layer methods were asked for
    activations: torch.Tensor | None
    layer_grad: torch.Tensor | None


def example_keys(example_ids: Sequence[str]) -> list[int]:
    """Return a stable 63-bit key per example id: what per-example random draws are seeded from."""
    return [int.from_bytes(hashlib.blake2b(str(e).encode(), digest_size=8).digest(), "little") >> 1
            for e in example_ids]


def example_generators(seed: int, salt: int, keys: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """Return one generator per example, seeded from (seed, salt, the example's key) alone, so an example's
    draws do not depend on the batch, shard or position it is scored in."""
    out = []
    for k in keys:
        g = torch.Generator(device=device)
        digest = hashlib.blake2b(f"{seed}:{salt}:{int(k)}".encode(), digest_size=8).digest()
        g.manual_seed(int.from_bytes(digest, "little") >> 1)
        out.append(g)
    return out


def per_example(generators: Sequence[torch.Generator], draw: Callable[[torch.Generator], Any]):
    """Return draw(g) for each example's generator, stacked along a new first axis (tuples element-wise)."""
    parts = [draw(g) for g in generators]
    if parts and isinstance(parts[0], tuple):
        return tuple(torch.stack(p) for p in zip(*parts))
    return torch.stack(parts)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@dataclass
class Context:
    """What a method sees: the batch, its targets, the clean logits, and helpers that batch model calls."""

    model: nn.Module
    inputs: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    layer: nn.Module | None
    seed: int
    max_batch: int
    _pass: GradientPass | None = field(default=None, repr=False)
    input_grad: bool = True
    keys: Sequence[int] | None = None

    def generators(self, salt: int) -> list[torch.Generator]:
        """Return one generator per example, seeded from the seed, a per-method salt and the example's key
        (its position in the batch when no keys were given): sampling methods draw per example, so a batch
        gives each example what it gets alone."""
        keys = self.keys if self.keys is not None else range(len(self.inputs))
        return example_generators(self.seed, salt, keys, self.inputs.device)

    def gradient_pass(self) -> GradientPass:
        """Return the shared forward/backward, computed once, in chunks of `max_batch` rows."""
        if self._pass is None:
            parts: list[GradientPass] = []

            def step(s: slice) -> None:
                parts.append(_gradient_pass(self.model, self.inputs[s], lambda _: self.target[s], self.layer,
                                            self.input_grad)[2])
            self._chunked(len(self.inputs), step)

            def cat(name: str) -> torch.Tensor | None:
                values = [getattr(p, name) for p in parts]
                return None if not values or values[0] is None else torch.cat(values)
            self._pass = GradientPass(cat("input_grad"), cat("activations"), cat("layer_grad"))
        return self._pass

    def _chunked(self, n: int, step: Callable[[slice], None]) -> None:
        """Run `step` over chunks of at most `max_batch` rows; on a CUDA out-of-memory error the chunk size
        halves (and stays halved for this batch) and the failed chunk is retried."""
        start = 0
        while start < n:
            s = slice(start, min(n, start + self.max_batch))
            try:
                step(s)
            except torch.OutOfMemoryError:
                if self.max_batch == 1:
                    raise
                self.max_batch = max(1, self.max_batch // 2)
                if self.inputs.is_cuda:
                    torch.cuda.empty_cache()
                continue
            start = s.stop

    def target_output(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return logits[i, target_i] for many inputs, in chunks of `max_batch`, without autograd."""
        out = torch.empty(len(x), device=x.device, dtype=self.logits.dtype)

        def step(s: slice) -> None:
            with torch.inference_mode():
                out[s] = self.model(x[s]).gather(1, target[s, None])[:, 0].to(out.dtype)
        self._chunked(len(x), step)
        return out

    def target_gradient(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return d logits[i, target_i] / d x_i for many inputs, in chunks of `max_batch`."""
        grads = torch.empty_like(x)

        def step(s: slice) -> None:
            grads[s] = _input_gradient(self.model, x[s], target[s])
        self._chunked(len(x), step)
        return grads


def _input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = model(xg).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(out, xg)
    return grad


def _gradient_pass(model: nn.Module, x: torch.Tensor, target: Callable[[torch.Tensor], torch.Tensor],
                   layer: nn.Module | None, input_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, GradientPass]:
    """One forward with autograd (its logits are the clean forward) and one backward of the chosen logits.
    `target` maps the logits to the (N,) classes to explain. Without `input_grad` the backward stops at the
    CAM layer (what CAM methods alone need). Returns (logits, target, pass)."""
    # CAM alone stops the backward at the layer; with every parameter frozen, nothing before it would need a
    # gradient and the layer's output would not be in the graph: then the input has to ask for one
    input_grad = input_grad or not any(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(input_grad)
        if layer is None:
            logits = model(xg)
            tgt = target(logits.detach())
            (grad,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), xg)
            return logits.detach(), tgt, GradientPass(grad, None, None)
        with capture_layer(layer) as store:
            logits = model(xg)
        tgt = target(logits.detach())
        acts = store["activations"]
        wrt = (xg, acts) if input_grad else (acts,)
        grads = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), wrt)
    grad, layer_grad = grads if input_grad else (None, grads[0])
    size = tuple(x.shape[-2:])
    return logits.detach(), tgt, GradientPass(grad, to_grid(acts.detach(), layer, size),
                                              to_grid(layer_grad, layer, size))


@dataclass(frozen=True)
class AttributionResult:
    """Attributions of one batch: clean `logits` (N, K), the `target` (N,) explained, raw `attributions`
    per method, and per-method extras such as the integrated-gradients completeness delta."""

    logits: torch.Tensor
    target: torch.Tensor
    attributions: dict[str, torch.Tensor]
    extras: dict[str, dict[str, torch.Tensor]]
    seconds: dict[str, float] = field(default_factory=dict)   # wall time per method; a shared pass split evenly


def _chunked_gradient_pass(model: nn.Module, x: torch.Tensor, target: Any, layer: nn.Module | None,
                           input_grad: bool, max_batch: int) -> tuple[torch.Tensor, torch.Tensor, GradientPass]:
    """`_gradient_pass` over chunks of at most `max_batch` rows (halved on a CUDA out-of-memory error), the
    parts concatenated: the logits, the targets and the pass equal one pass over all rows."""
    per_row = not (target is None or isinstance(target, (str, int)))
    if per_row:
        target = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1)
        if target.numel() == 1 and len(x) != 1:
            target = target.expand(len(x))
        if target.shape != (len(x),):
            raise XAuditError(f"attribute: 'target' must be 'predicted', a class index, or one class per example "
                              f"({len(x)}); got {target.numel()} classes")
    if len(x) <= max_batch:
        return _gradient_pass(model, x, lambda lg: resolve_target(target, lg), layer, input_grad)
    parts: list[tuple[torch.Tensor, torch.Tensor, GradientPass]] = []
    start, size = 0, max(1, max_batch)
    while start < len(x):
        s = slice(start, min(len(x), start + size))
        t = target[s] if per_row else target
        try:
            parts.append(_gradient_pass(model, x[s], lambda lg, t=t: resolve_target(t, lg), layer, input_grad))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        start = s.stop
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p[2], name) for p in parts]
        return None if values[0] is None else torch.cat(values)
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            GradientPass(cat("input_grad"), cat("activations"), cat("layer_grad")))


def resolve_target(target: Any, logits: torch.Tensor) -> torch.Tensor:
    """Return a (N,) long tensor of classes: the prediction for None/'predicted', else the given classes."""
    n, k = logits.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return logits.argmax(1)
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=logits.device)
    else:
        t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
        if t.numel() == 1 and n != 1:
            t = t.expand(n).clone()
    if t.shape != (n,) or (t.numel() and (t.min() < 0 or t.max() >= k)):
        raise XAuditError(f"attribute: 'target' must be 'predicted', a class index, or one class in 0..{k - 1} "
                          f"per example ({n}); got {target!r}")
    return t


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[str],
    target: Any = None,
    params: dict[str, dict[str, Any]] | None = None,
    target_layer: str | None = None,
    seed: int = 0,
    max_batch: int = 256,
    logits: torch.Tensor | None = None,
    max_elements: int = 2 ** 21,
    example_keys: Sequence[int] | None = None,
) -> AttributionResult:
    """Return the attributions of every method in `methods` for `inputs` (N, C, H, W).

    `target` is None / 'predicted' (default), an int, or one class per example. `params` maps a method
    name to its parameters (see each method's file). `max_batch` bounds how many images (or perturbed
    copies) go through the model at once, and `max_elements` bounds their total number of input values (a
    memory budget that adapts the chunk to the image size: large chunks of large images are slower per image
    on a CPU, and need more memory on a GPU). `logits`, when the caller already has the clean forward, is reused.
    Sampling methods draw their noise per example from (`seed`, the example's key in `example_keys`, default
    its position), so an example explained in any batch gets the draws it gets alone (see `example_keys`).
    """
    if inputs.ndim != 4:
        raise XAuditError(f"attribute: 'inputs' must be (N, C, H, W); got shape {tuple(inputs.shape)}")
    if example_keys is not None and len(example_keys) != len(inputs):
        raise XAuditError(f"attribute: 'example_keys' needs one key per input; got {len(example_keys)} for "
                          f"{len(inputs)}")
    max_batch = max(1, min(max_batch, max_elements // max(1, inputs[0].numel())))
    if max_batch >= len(inputs) > 0:
        # sampling methods stack (samples x images): whole rounds of the batch per call run at full speed
        max_batch -= max_batch % len(inputs)
    specs = [get_method(m) for m in methods]
    resolved = {m.name: resolve_params(m.name, (params or {}).get(m.name)) for m in specs}
    unused = sorted(set(params or {}) - set(resolved))
    if unused:
        raise XAuditError(f"attribute: 'params' given for {unused}, which are not among 'methods' {list(methods)}")
    was_training = model.training
    model.eval()
    try:
        layer = find_layer(model, target_layer, inputs) if any(m.layer for m in specs) else None
        # CAM methods need gradients at the CAM layer only; saliency and input x gradient need them at the input
        input_grad = any(m.gradient_pass and not m.layer for m in specs)
        shared = None
        t0 = _clock(inputs)
        if logits is None and any(m.gradient_pass for m in specs):
            # The gradient pass's forward is the clean forward: one forward/backward for the whole family
            # (in chunks of `max_batch` rows, so large images get no extra forward either).
            logits, tgt, shared = _chunked_gradient_pass(model, inputs, target, layer, input_grad, max_batch)
        else:
            if logits is None:
                with torch.inference_mode():
                    logits = torch.cat([model(inputs[s]) for s in chunks(len(inputs), max_batch)])
            logits = logits.detach().clone()
            tgt = resolve_target(target, logits)
        ctx = Context(model, inputs.detach(), tgt, logits, layer, seed, max_batch, shared, input_grad,
                      list(example_keys) if example_keys is not None else None)
        attributions, extras = {}, {}
        shared_at = _clock(inputs) - t0
        sharing = [m.name for m in specs if m.gradient_pass] if shared is not None else []
        seconds = {m.name: shared_at / len(sharing) if m.name in sharing else 0.0 for m in specs}
        for m in specs:
            t0 = _clock(inputs)
            out = m.fn(ctx, **resolved[m.name])
            attributions[m.name] = out.attributions.detach()
            extras[m.name] = {k: v.detach() for k, v in out.extras.items()}
            seconds[m.name] += _clock(inputs) - t0
    finally:
        model.train(was_training)
    return AttributionResult(logits, tgt, attributions, extras, seconds)


def _clock(x: torch.Tensor) -> float:
    """Wall clock after the device's queued work (so a method's time is its own on CUDA too)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def display_heatmap(attributions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return an (N, H, W) map in [0, 1] for overlays and statistics, from any method's raw output.

    Input-shaped (N, C, H, W) attributions: |a| summed over channels, area-resampled to `size`.
    Layer maps (N, 1, h, w): bilinearly resized to `size`. Each map is divided by its maximum
    (an all-zero map stays zero).
    """
    a = attributions.detach().float()
    if a.ndim == 3:
        a = a[:, None]
    m = a.abs().sum(1, keepdim=True)
    if m.shape[-2:] != tuple(size):
        if m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
            m = torch.nn.functional.adaptive_avg_pool2d(m, size)
        else:
            m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    m = m[:, 0]
    peak = m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny)
    return (m / peak[:, None, None]).clamp(0, 1)



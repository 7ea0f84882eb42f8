"""Load a model from its spec or card: factory import path + weights, never an arbitrary pickle."""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import torch
from torch import nn

from . import storage
from .config import MAX_CONFIG_BYTES, ModelSpec, describe_error, unique_json_object
from .errors import XAuditError
from .io import sha256_file


@dataclass(frozen=True)
class ModelCard:
    """Everything known about the audited model, resolved from the spec and its card file."""

    name: str
    version: str
    factory: str
    weights: str
    weights_sha256: str
    kwargs: dict[str, Any]
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    target_layer: str | None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: str = "logits"
    preprocess: dict[str, Any] = field(default_factory=lambda: {"resize": "stretch", "interpolation": "bilinear"})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelCard":
        """Return the card `to_dict` (or its JSON) describes: lists back to tuples."""
        return cls(**{**values, "input_size": tuple(values["input_size"]), "mean": tuple(values["mean"]),
                      "std": tuple(values["std"]), "class_names": tuple(values["class_names"])})


def resolve_card(spec: ModelSpec) -> ModelCard:
    """Return the `ModelCard` for `spec`: fields of the spec override those of its card file. The merged
    fields are validated by the same rules as the config's `model` block."""
    where = "load_model"
    values: dict[str, Any] = {}
    base: Path | str = Path.cwd()
    source = "the config's 'model'"
    if spec.card is not None:
        card_path = storage.local(spec.card, "model.card")          # a URL: its cached copy
        if not card_path.is_file():
            raise XAuditError(f"{where}: 'model.card' must be an existing JSON model card; got {str(card_path)!r}")
        if card_path.stat().st_size > MAX_CONFIG_BYTES:
            raise XAuditError(f"{where}: model card {card_path} is {card_path.stat().st_size:,} bytes; a card is "
                              f"at most {MAX_CONFIG_BYTES:,}")
        try:
            values = json.loads(card_path.read_text(), object_pairs_hook=unique_json_object)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:      # (JSONDecodeError is a ValueError)
            raise XAuditError(f"{where}: model card {card_path} is not valid JSON: {str(exc)[:300]}") from None
        if not isinstance(values, dict):
            raise XAuditError(f"{where}: model card {card_path} must hold a JSON object; got {type(values).__name__}")
        # relative weights are next to the card: in its folder, or under the card's URL
        base = storage.join(spec.card.rsplit("/", 1)[0]) if storage.is_url(spec.card) else card_path.resolve().parent
        source = f"model card {spec.card}"
    elif spec.mlflow is not None:
        from . import registry
        folder, identity = registry.resolve(spec.mlflow)
        values = registry.artifact_values(folder, spec.mlflow)
        values["registry"] = identity                 # recorded with the card (its 'extra') in the manifest
        values.setdefault("name", identity["name"])
        values.setdefault("version", identity["version"])
        base = folder
        source = f"the registered model {spec.mlflow}"
    values.update({k: v for k, v in spec.model_dump(exclude={"card", "mlflow"}).items() if v not in (None, {}, [])})
    known = set(ModelSpec.model_fields) - {"card", "mlflow"}
    try:
        checked = ModelSpec.model_validate({k: v for k, v in values.items() if k in known})
    except ValidationError as exc:
        raise XAuditError(f"{where}: {describe_error(exc.errors()[0])} (in {source})") from None
    values.update({k: v for k, v in checked.model_dump(exclude={"card"}).items() if k in values})
    missing = [k for k in ("factory", "weights", "input_size", "class_names") if not values.get(k)]
    if missing:
        raise XAuditError(f"{where}: the model spec (or its card) must give {', '.join(map(repr, missing))}")
    check_factory(str(values["factory"]))
    weights_ref = values["weights"]
    if not storage.is_url(weights_ref) and not Path(weights_ref).is_absolute():
        weights_ref = storage.join(base, str(weights_ref)) if storage.is_url(base) \
            else str(Path(os.path.normpath(Path(base) / weights_ref)))
    weights = storage.local(weights_ref, "model.weights")             # a URL: fetched once, hashed below
    if not weights.is_file():
        raise XAuditError(f"{where}: 'weights' must be an existing safetensors or state-dict file; got {str(weights)!r}")
    if str(values.get("outputs")).startswith("binary_") and len(values["class_names"]) != 2:
        raise XAuditError(f"{where}: 'outputs: {values['outputs']}' needs two 'class_names' (the negative class, "
                          f"then the one the model's output is of); got {len(values['class_names'])}")
    channels = int(values.get("channels") or 3)
    mean = tuple(float(m) for m in (values.get("mean") or [0.0] * channels))
    std = tuple(float(s) for s in (values.get("std") or [1.0] * channels))
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise XAuditError(f"{where}: 'mean' and 'std' must have one value per channel ({channels}), std > 0; "
                          f"got mean={list(mean)}, std={list(std)}")
    card_fields = {f for f in ModelCard.__dataclass_fields__}
    return ModelCard(
        name=str(values.get("name") or Path(str(weights_ref).rsplit("/", 1)[-1]).stem),
        version=str(values.get("version") or "unversioned"),
        factory=str(values["factory"]),
        weights=weights_ref if storage.is_url(weights_ref) else str(weights.resolve()),
        # a fetched copy was hashed when it was fetched
        weights_sha256=storage.FETCHED[weights_ref]["sha256"] if storage.is_url(weights_ref) else sha256_file(weights),
        kwargs=dict(values.get("kwargs") or {}),
        input_size=tuple(int(s) for s in values["input_size"]),  # type: ignore[arg-type]
        channels=channels,
        mean=mean,
        std=std,
        class_names=tuple(str(c) for c in values["class_names"]),
        target_layer=values.get("target_layer"),
        description=str(values.get("description") or ""),
        outputs=str(values.get("outputs") or "logits"),
        extra={k: v for k, v in values.items() if k not in card_fields and k not in PREPROCESS_FIELDS},
        preprocess=preprocess_policy(values, tuple(int(s) for s in values["input_size"])),
    )


PREPROCESS_FIELDS = ("resize", "resize_size", "interpolation")


def preprocess_policy(values: dict[str, Any], input_size: tuple[int, int]) -> dict[str, Any]:
    """Return how images are brought to `input_size`: the card's `resize`, `resize_size` and `interpolation`,
    defaulting to the factory's own convention. torchvision's classification weights are evaluated with
    Resize(256) + CenterCrop(224) (bilinear), timm's with crop_pct 0.875 (bicubic for most models); a factory
    with no known convention (the demo's) keeps the plain resize to input_size."""
    factory = str(values.get("factory") or "")
    convention = "torchvision" if factory.startswith("torchvision.models") else \
        "timm" if factory.split(":")[0].split(".")[0] == "timm" else None
    resize = values.get("resize") or ("shorter_side" if convention else "stretch")
    policy: dict[str, Any] = {"resize": resize,
                              "interpolation": values.get("interpolation") or
                              ("bicubic" if convention == "timm" else "bilinear")}
    if resize == "shorter_side":
        size = int(values.get("resize_size") or round(min(input_size) / 0.875))
        if size < min(input_size):
            raise XAuditError(f"load_model: 'resize_size' {size} must be at least the shorter side of "
                              f"'input_size' {list(input_size)} (the crop is taken from the resized image)")
        policy["resize_size"] = size
        policy["crop"] = "center"
    return policy


# A model factory named in a config is code that xaudit calls: only these import prefixes are trusted, plus
# the ones the operator (never the audited config) adds in XAUDIT_TRUSTED_FACTORIES or with --trust-factory.
TRUSTED_FACTORIES = ("torchvision.models", "timm", "xaudit.tasks.nets")
TRUSTED_FACTORIES_ENV = "XAUDIT_TRUSTED_FACTORIES"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def trusted_factory_prefixes() -> tuple[str, ...]:
    """Return the trusted import prefixes: the built-in ones and those in $XAUDIT_TRUSTED_FACTORIES
    (separated by commas or spaces)."""
    extra = re.split(r"[,\s]+", os.environ.get(TRUSTED_FACTORIES_ENV, "").strip())
    return tuple(dict.fromkeys([*TRUSTED_FACTORIES, *(p for p in extra if p)]))


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def check_factory(path: str) -> tuple[str, str]:
    """Return (module, attribute) of a factory path 'package.module:callable' that lies under a trusted
    prefix; refuse anything else *before* importing it."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not (_DOTTED.match(module_name or "") and _DOTTED.match(attr or "")) or \
            any(part.startswith("_") for part in attr.split(".")):
        raise XAuditError(f"load_model: 'factory' must be an import path like 'torchvision.models:resnet18' "
                          f"(public names only); got {path[:120]!r}")
    prefixes = trusted_factory_prefixes()
    if not _under(module_name, prefixes):
        raise XAuditError(f"load_model: 'factory' {path[:120]!r} is not under a trusted import prefix "
                          f"{list(prefixes)}; a factory is code that xaudit calls, so only the operator can "
                          f"trust more: set {TRUSTED_FACTORIES_ENV}=your.package or pass --trust-factory "
                          f"your.package (never in the audited config)")
    return module_name, attr


def import_factory(path: str):
    """Return the callable named by 'package.module:attr' (or 'package.module.attr') under a trusted prefix.

    The module is imported only after the prefix check, and the callable must itself be defined under a
    trusted prefix (a trusted module that merely imports, say, `torch.load` or `os.system` does not make it
    trusted) and be a class or a Python function."""
    module_name, attr = check_factory(path)
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise XAuditError(f"load_model: 'factory' must be an import path like 'torchvision.models:resnet18'; "
                          f"could not import {path!r}: {exc}") from None
    defined_in = getattr(obj, "__module__", None) or ""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not _under(defined_in, trusted_factory_prefixes()):
        raise XAuditError(f"load_model: 'factory' {path!r} must name a class or function defined under a trusted "
                          f"prefix {list(trusted_factory_prefixes())}; it is {type(obj).__name__} from "
                          f"{defined_in or 'an unknown module'!r}")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensors in a safetensors file or a weights-only torch file; pickled objects are refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise XAuditError(f"load_model: {str(path)!r} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated zips, foreign formats: all mean "not a state dict"
        first = first_lines(exc)
        raise XAuditError(f"load_model: 'weights' must be a safetensors or state-dict file; {str(path)!r} "
                          f"holds something else (refused by weights_only loading: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XAuditError(f"load_model: 'weights' must be a state dict of tensors; {str(path)!r} holds a "
                          f"{type(state).__name__}")
    return state


def model_logits(output: Any) -> torch.Tensor:
    """Return the logits in a model's output: a tensor as is; a mapping's 'logits' entry; an object's
    `.logits` attribute (Hugging Face style); a tuple's or list's first element. Anything else is an error."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    keys = f" with keys {sorted(map(str, output))[:8]}" if isinstance(output, Mapping) else ""
    raise XAuditError(f"load_model: the model's forward must return logits (N, num_classes): a tensor, a tuple "
                      f"whose first element is one, or a dict/object with 'logits'; got {type(output).__name__}{keys}")


def _logits_hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor | None:
    return None if isinstance(output, torch.Tensor) else model_logits(output)


def _probabilities_hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
    """For a card with `outputs: probabilities`: the log of the model's probabilities, as its logits (softmax
    of them gives the same probabilities back; attributions explain the log-probability)."""
    p = model_logits(output)
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def _one_per_image(output: Any, outputs: str) -> torch.Tensor:
    """Return a binary model's one output per image as (N, 1), or raise naming the card's `outputs`."""
    z = model_logits(output)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] != 1:
        raise XAuditError(f"load_model: the card says 'outputs: {outputs}' (one value per image), but the model "
                          f"returned shape {tuple(z.shape)}; leave 'outputs' out for a model with one logit per class")
    return z


def _binary_logit_hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
    """For a card with `outputs: binary_logit`: the model's one logit z per image, (N, 1) or (N,), of the second
    class, as the two logits (-z/2, z/2): softmax of them is (1 - sigmoid(z), sigmoid(z)), the model's own
    probabilities, and an attribution of either class explains half of z (with its sign), so the negative class
    gets maps too."""
    half = _one_per_image(output, "binary_logit") / 2
    return torch.cat([-half, half], 1)


def _binary_probability_hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
    """For a card with `outputs: binary_probability`: the model's one probability p per image (it ends in a
    sigmoid), of the second class, as the logits of `_binary_logit_hook` for z = log(p) - log(1 - p)."""
    p = _one_per_image(output, "binary_probability")
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise XAuditError("load_model: the card says 'outputs: binary_probability', but the model returned values "
                          "outside [0, 1]; set 'outputs: binary_logit' for a model that returns a logit")
    tiny = torch.finfo(p.dtype).tiny
    half = (torch.log(p.clamp_min(tiny)) - torch.log((1 - p).clamp_min(tiny))) / 2
    return torch.cat([-half, half], 1)


OUTPUT_HOOKS = {"logits": _logits_hook, "probabilities": _probabilities_hook, "binary_logit": _binary_logit_hook,
                "binary_probability": _binary_probability_hook}


def build_model(card: ModelCard, device: torch.device | str = "cpu") -> nn.Module:
    """Return the model described by `card`, with its weights loaded strictly, in eval mode on `device`.

    A forward hook applies `model_logits`, so every caller sees a (N, K) tensor whatever form the model
    returns (module paths such as the CAM layer's are unchanged)."""
    factory = import_factory(card.factory)
    try:
        model = factory(**card.kwargs)
    except Exception as exc:  # the factory is the user's code: any failure is a bad model spec
        raise XAuditError(f"load_model: factory {card.factory!r} failed with kwargs {card.kwargs}: "
                          f"{type(exc).__name__}: {first_lines(exc)}") from None
    if not isinstance(model, nn.Module):
        raise XAuditError(f"load_model: factory {card.factory!r} must return a torch.nn.Module; "
                          f"got {type(model).__name__}")
    path = storage.local(card.weights, "model.weights")
    if storage.is_url(card.weights) and storage.FETCHED[card.weights]["sha256"] != card.weights_sha256:
        raise XAuditError(f"load_model: the weights at {card.weights!r} changed since the audit began (sha256 "
                          f"{storage.FETCHED[card.weights]['sha256'][:12]}…, the card records "
                          f"{card.weights_sha256[:12]}…); rerun")
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XAuditError(f"load_model: weights {card.weights!r} do not fit {card.factory!r}: "
                          f"{first_lines(exc, 4, 600)}") from None
    model.register_forward_hook(OUTPUT_HOOKS[card.outputs])
    return model.eval().to(device)


@functools.lru_cache(maxsize=16)
def _cached(card_json: str, device: str, replica: int) -> nn.Module:
    return build_model(ModelCard.from_dict(json.loads(card_json)), device)


def cached_model(card: ModelCard, device: torch.device | str, replica: int = 0) -> nn.Module:
    """Return `build_model(card, device)`, built once per process for the same card (weights hash included),
    device and `replica`: the preflight's probe, the shard tasks and the checks share one model object.
    Tasks that run at once on one device each use their own replica (`devices.replica()`): the methods'
    forward hooks (CAM layers, DeepLIFT, LRP) are per module, so two threads on one model object would read
    each other's activations."""
    return _cached(json.dumps(card.to_dict(), sort_keys=True, default=list), str(device), replica)


def gradient_problem(model: nn.Module, x: torch.Tensor) -> str | None:
    """Say why gradients of the logits cannot reach the inputs `x` (None: they do): the forward returns a
    tensor with no gradient (detached, integers, computed under `torch.no_grad`) or one that does not depend on
    the input through autograd (a backbone run under `torch.no_grad`)."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = model(xg)
        if not out.requires_grad:
            return (f"its logits carry no gradient (a {out.dtype} tensor without a grad_fn: forward detaches them, "
                    f"returns integers or runs under torch.no_grad)")
        (grad,) = torch.autograd.grad(out.float().sum(), xg, allow_unused=True)
    if grad is None:
        return "its logits do not depend on the input through autograd (part of forward runs under torch.no_grad " \
               "or on a detached copy of the input)"
    return None


def first_lines(exc: BaseException, n: int = 1, limit: int = 300) -> str:
    """Return the first `n` non-blank lines of an exception's message, joined, at most `limit` characters (its
    type's name when it has none): enough to say what failed in a one-line error."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return " ".join(lines[:n])[:limit] or type(exc).__name__


def probe_inputs(card: ModelCard, n: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Return `n` normalised synthetic images (N, C, H, W) of the card's size: uniform pixels in [0, 1) from
    `seed`, through the card's mean and std, as real images reach the model."""
    x = torch.rand(n, card.channels, *card.input_size, generator=torch.Generator().manual_seed(seed))
    return ((x - torch.tensor(card.mean).view(1, -1, 1, 1)) / torch.tensor(card.std).view(1, -1, 1, 1)).to(device)


def probe_model(model: nn.Module, card: ModelCard, device: torch.device) -> None:
    """Check with one forward of two synthetic images that `model` takes (2, C, H, W) inputs of the card's
    size and returns finite (2, num_classes) logits; raise `XAuditError` naming what does not fit."""
    c, (h, w) = card.channels, card.input_size
    x = probe_inputs(card, 2, 0, device)
    sent = x.clone()
    try:
        with torch.no_grad():
            out = model(x)
    except XAuditError:
        raise
    except Exception as exc:  # the model's own code rejected the input
        raise XAuditError(f"load_model: a probe forward of a {tuple(x.shape)} input (the card's 'channels' "
                          f"{c} and 'input_size' {[h, w]}) failed: {type(exc).__name__}: {first_lines(exc, 2, 600)}; "
                          f"check 'channels' and 'input_size' against what the model takes") from None
    if not torch.equal(x, sent):
        raise XAuditError(f"load_model: the model's forward changes its input tensor in place (by up to "
                          f"{float((x - sent).abs().max()):.3g} for a probe image); every method hands the same "
                          f"images to the model again, and a gradient cannot be taken through such an input: make "
                          f"forward work out of place (x = x * s instead of x.mul_(s), or x = x.clone() first)")
    binary = "; for a binary model with one output per image, set 'outputs: binary_logit' (or binary_probability, " \
             "for a final sigmoid) in the model card" \
        if tuple(out.shape) in ((2,), (2, 1)) else ""
    if out.ndim != 2 or out.shape[0] != 2:
        raise XAuditError(f"load_model: the model must return logits of shape (N, num_classes); for a "
                          f"{tuple(x.shape)} input it returned {tuple(out.shape)}{binary}")
    if out.shape[1] != card.num_classes:
        raise XAuditError(f"load_model: 'class_names' has {card.num_classes} names but the model returns "
                          f"{out.shape[1]} logits per image; give one name per output{binary}")
    if not torch.isfinite(out).all():
        raise XAuditError(f"load_model: the model returned non-finite logits (NaN or inf) for a probe input "
                          f"of shape {tuple(x.shape)}; check the weights")
    if card.outputs == "probabilities" and not bool(((out.float().exp().sum(1) - 1).abs() < 1e-3).all()):
        raise XAuditError("load_model: the card says 'outputs: probabilities', but the model's outputs for the "
                          "probe images are not probabilities (each row in [0, 1], summing to 1); leave 'outputs' "
                          "out (logits) if the model returns logits")
    check_logits_contract(model, x, out)


def check_logits_contract(model: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """What the audit assumes of the logits, checked on the probe (two more forwards): the same input gives the
    same logits (no dropout or sampling left on in eval mode), an image's logits do not depend on the other
    images of its batch (no batch statistics: the metrics would depend on the batch size and the shard), and
    they are logits, not probabilities (softmax applied twice flattens every confidence and calibration
    figure). Tolerances allow for floating-point kernels that differ with the batch size."""
    try:
        with torch.no_grad():
            again = model(x)
            alone = model(x[1:])
    except XAuditError:
        raise
    except Exception as exc:  # the model's own code: typically a batch of one (a shard's last batch can be)
        raise XAuditError(f"load_model: a probe forward of one image ({tuple(x[1:].shape)}) failed after one of "
                          f"two had passed: {type(exc).__name__}: {first_lines(exc, 2, 600)}; the model must take "
                          f"any batch size (a shard's last batch can hold a single image)") from None
    if tuple(alone.shape) != (1, out.shape[1]):
        raise XAuditError(f"load_model: for one image the model returned logits of shape {tuple(alone.shape)}, "
                          f"for two {tuple(out.shape)}; the model must take any batch size and return (N, "
                          f"num_classes) (a shard's last batch can hold a single image; a squeeze() drops N=1)")
    out, again, alone = out.float(), again.float(), alone.float()
    scale = float(out.abs().max()) + 1e-6

    def close(a, b):
        return a.shape == b.shape and bool(torch.isfinite(b).all()) and \
            bool(((a - b).abs() <= 1e-3 * scale + 1e-3 * b.abs()).all())
    if not close(out, again):
        raise XAuditError(f"load_model: the model returned different logits for the same probe input twice "
                          f"(largest difference {float((out - again).abs().max()):.3g}); in eval mode it must be "
                          f"deterministic: dropout called with training=True, or sampling in forward, would make "
                          f"every attribution and metric irreproducible")
    if not close(out[1:], alone):
        raise XAuditError(f"load_model: an image's logits depend on the other images in its batch (a probe image "
                          f"alone and beside another differ by {float((out[1:] - alone).abs().max()):.3g}); the "
                          f"model normalises over the batch (BatchNorm kept in training mode, or a batch mean in "
                          f"forward), so its results would change with 'attribution.batch_size' and the shards")
    if out.shape[1] >= 2 and bool(((out >= 0) & (out <= 1)).all()) and \
            bool(((out.sum(1) - 1).abs() < 1e-4).all()):
        raise XAuditError("load_model: the model returns probabilities (every output in [0, 1], each row summing "
                          "to 1), not logits; xaudit applies softmax itself: set 'outputs: probabilities' in the "
                          "model card (their log is then used as the logits), or remove the model's final softmax")


def pick_device(requested: str = "auto") -> torch.device:
    """Return `cuda` when present (for 'auto'), else `cpu`; a named device must exist on this machine."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        raise XAuditError(f"pick_device: 'device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; "
                          f"got {requested[:60]!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise XAuditError(f"pick_device: 'device' {requested!r} asks for CUDA, which this machine does not have")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise XAuditError(f"pick_device: 'device' {requested!r} names GPU {dev.index}; this machine has "
                              f"{torch.cuda.device_count()} (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise XAuditError(f"pick_device: 'device' {requested!r} asks for Apple's MPS, which is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise XAuditError(f"pick_device: 'device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {requested!r}")
    return dev


_LAYOUT_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> channels-last chosen
_LAYOUT_LOCK = threading.Lock()


def use_channels_last(model: nn.Module, probe: torch.Tensor, setting: bool | str = "auto") -> bool:
    """Put `model` in the channels-last or the default memory layout and return whether channels-last.

    `setting` True or False decides. "auto" decides once per model object (remembered): channels-last when
    the inputs are images (N, C, H, W) and a forward of `probe` in that layout runs and gives the logits of
    the default layout; a model that cannot (for example one that calls `.view` on a conv output) keeps the
    default layout. On the 2-core CPU it made the demo CNN's forward 2.4x and forward+backward 1.8x faster
    (batch 256) and ResNet-18's (batch 8, 224x224) 1.24x and 1.15x (benchmarks/README; max-pooling in the
    default layout is 7-15x slower there). One lock: shard tasks in threads may share a model.
    """
    with _LAYOUT_LOCK:
        return _use_channels_last(model, probe, setting)


def _use_channels_last(model: nn.Module, probe: torch.Tensor, setting: bool | str) -> bool:
    if setting != "auto":
        model.to(memory_format=torch.channels_last if setting else torch.contiguous_format)
        return bool(setting)
    if model in _LAYOUT_CHOICES:
        choice = _LAYOUT_CHOICES[model]
        model.to(memory_format=torch.channels_last if choice else torch.contiguous_format)
        return choice
    choice = False
    if probe.dim() == 4:
        # no_grad, not inference_mode: parameters re-laid out under inference_mode could not be trained on or
        # differentiated through later
        model.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            reference = model(probe.contiguous())
        try:
            model.to(memory_format=torch.channels_last)
            with torch.no_grad():
                trial = model(probe.contiguous(memory_format=torch.channels_last))
            choice = (isinstance(trial, torch.Tensor) and trial.shape == reference.shape
                      and torch.allclose(trial.float(), reference.float(), rtol=1e-3,
                                         atol=1e-4 * (float(reference.abs().max()) + 1e-12)))
        except RuntimeError:
            choice = False
    model.to(memory_format=torch.channels_last if choice else torch.contiguous_format)
    _LAYOUT_CHOICES[model] = choice
    return choice

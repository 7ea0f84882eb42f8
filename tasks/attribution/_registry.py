"""The registry of attribution methods: each method file registers itself with `@register`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import XAuditError


@dataclass(frozen=True)
class MethodOutput:
    """A method's raw attributions (Captum's shapes and signs) and optional per-example extras."""

    attributions: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered attribution method. `layer` methods return (N, 1, h, w) maps at the CAM layer;
    the others return input-shaped (N, C, H, W) attributions. `resolution` says what its maps resolve:
    'pixel', 'layer' (the CAM layer's cells), 'window' (occlusion's windows) or 'segment' (superpixels)."""

    name: str
    fn: Callable[..., MethodOutput]
    layer: bool
    gradient_pass: bool
    defaults: dict[str, Any]
    paper: str
    resolution: str = "pixel"
    has_delta: bool = False       # returns a per-example `delta` extra (completeness / summation to delta)
    forward_only: bool = False    # needs forward passes only, no gradient of the model


METHODS: dict[str, Method] = {}


def register(name: str, *, layer: bool = False, gradient_pass: bool = False, paper: str = "",
             resolution: str = "pixel", has_delta: bool = False, forward_only: bool = False, **defaults: Any):
    """Register `fn(ctx, **params) -> MethodOutput` under `name`, with its default parameters.
    `gradient_pass=True` says the method only reads `ctx.gradient_pass()` (the shared forward/backward)."""
    def wrap(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        if name in METHODS:
            raise RuntimeError(f"attribution method {name!r} registered twice")
        METHODS[name] = Method(name, fn, layer, gradient_pass, dict(defaults), paper,
                               "layer" if layer else resolution, has_delta, forward_only)
        return fn
    return wrap


def get_method(name: str) -> Method:
    """Return the registered method `name`, or raise naming the known ones."""
    if name not in METHODS:
        raise XAuditError(f"attribute: 'methods' must name registered methods {sorted(METHODS)}; got {name!r}")
    return METHODS[name]


MAX_COUNT = 100_000


def check_param(owner: str, key: str, value: Any, default: Any) -> None:
    """Raise unless `value` has the kind of the parameter's default: whole-number parameters (passes,
    samples, segments, window sizes) are counts 1..100,000; number parameters are finite numbers; text
    parameters are text; a parameter whose default is None takes None or a finite number."""
    def bad(expected: str) -> XAuditError:
        return XAuditError(f"{owner}: parameter {key!r} must be {expected}; got {value!r}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
            raise bad(f"a whole number from 1 to {MAX_COUNT:,}")
    elif isinstance(default, float) or default is None:
        if default is None and value is None:
            return
        if not is_number or value != value or value in (float("inf"), float("-inf")):
            raise bad("a finite number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("text")


def resolve_against(owner: str, defaults: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    """Return `defaults` updated with `params`; unknown parameter names, and values not of the default's kind
    (`check_param`), are an error naming `owner` (e.g. "attribute: method 'lime'")."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        where, _, who = owner.partition(": ")
        raise XAuditError(f"{where}: parameters {unknown} are not known to {who}; it takes {sorted(defaults)}")
    for key, value in params.items():
        check_param(owner, key, value, defaults[key])
    return {**defaults, **params}


def resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Return the method's defaults updated with `params` (`resolve_against`)."""
    return resolve_against(f"attribute: method {name!r}", get_method(name).defaults, params)

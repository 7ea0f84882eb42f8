"""Load a model from its spec or card: factory import path + weights, never an arbitrary pickle."""
from __future__ import annotations

import importlib
import json
import pickle
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelSpec
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def resolve_card(spec: ModelSpec) -> ModelCard:
    """Return the `ModelCard` for `spec`: fields of the spec override those of its card file."""
    where = "load_model"
    values: dict[str, Any] = {}
    base = Path.cwd()
    if spec.card is not None:
        card_path = Path(spec.card)
        if not card_path.is_file():
            raise XAuditError(f"{where}: 'model.card' must be an existing JSON model card; got {str(card_path)!r}")
        try:
            values = json.loads(card_path.read_text())
        except json.JSONDecodeError as exc:
            raise XAuditError(f"{where}: model card {card_path} is not valid JSON: {exc}") from None
        base = card_path.resolve().parent
    values.update({k: v for k, v in spec.model_dump(exclude={"card"}).items() if v not in (None, {}, [])})
    missing = [k for k in ("factory", "weights", "input_size", "class_names") if not values.get(k)]
    if missing:
        raise XAuditError(f"{where}: the model spec (or its card) must give {', '.join(map(repr, missing))}")
    weights = Path(values["weights"])
    weights = weights if weights.is_absolute() else base / weights
    if not weights.is_file():
        raise XAuditError(f"{where}: 'weights' must be an existing safetensors or state-dict file; got {str(weights)!r}")
    channels = int(values.get("channels") or 3)
    mean = tuple(float(m) for m in (values.get("mean") or [0.0] * channels))
    std = tuple(float(s) for s in (values.get("std") or [1.0] * channels))
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise XAuditError(f"{where}: 'mean' and 'std' must have one value per channel ({channels}), std > 0; "
                          f"got mean={list(mean)}, std={list(std)}")
    known = {f for f in ModelCard.__dataclass_fields__}
    return ModelCard(
        name=str(values.get("name") or weights.stem),
        version=str(values.get("version") or "unversioned"),
        factory=str(values["factory"]),
        weights=str(weights),
        weights_sha256=sha256_file(weights),
        kwargs=dict(values.get("kwargs") or {}),
        input_size=tuple(int(s) for s in values["input_size"]),  # type: ignore[arg-type]
        channels=channels,
        mean=mean,
        std=std,
        class_names=tuple(str(c) for c in values["class_names"]),
        target_layer=values.get("target_layer"),
        description=str(values.get("description") or ""),
        extra={k: v for k, v in values.items() if k not in known},
    )


def import_factory(path: str):
    """Return the callable named by 'package.module:attr' (or 'package.module.attr')."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise XAuditError(f"load_model: 'factory' must be an import path like 'torchvision.models:resnet18'; "
                          f"could not import {path!r}: {exc}") from None
    if not callable(obj):
        raise XAuditError(f"load_model: 'factory' {path!r} must name a callable; got {type(obj).__name__}")
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
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XAuditError(f"load_model: 'weights' must be a safetensors or state-dict file; {str(path)!r} "
                          f"holds something else (refused by weights_only loading: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XAuditError(f"load_model: 'weights' must be a state dict of tensors; {str(path)!r} holds a "
                          f"{type(state).__name__}")
    return state


def build_model(card: ModelCard, device: torch.device | str = "cpu") -> nn.Module:
    """Return the model described by `card`, with its weights loaded strictly, in eval mode on `device`."""
    model = import_factory(card.factory)(**card.kwargs)
    if not isinstance(model, nn.Module):
        raise XAuditError(f"load_model: factory {card.factory!r} must return a torch.nn.Module; "
                          f"got {type(model).__name__}")
    state = read_state_dict(card.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XAuditError(f"load_model: weights {card.weights!r} do not fit {card.factory!r}: {exc}") from None
    return model.eval().to(device)


def pick_device(requested: str = "auto") -> torch.device:
    """Return `cuda` when present (for 'auto'), else `cpu`; a named device must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise XAuditError(f"pick_device: 'device' {requested!r} asks for CUDA, which this machine does not have")
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

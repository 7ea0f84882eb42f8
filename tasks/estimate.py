"""What an audit will cost, said before it is spent (no Prefect).

After the dry run and before any run directory, the configured methods and explanation-quality checks run
once on a couple of probe images of the card's shape on the run's device; the measured seconds per image,
times the number of images (and the sanity check's, permutation's and interventions' own counts), give one
line for the log and a record for the manifest, and a budget (`max_minutes`) can refuse the audit up front.
The probe's images are random, so a method or check whose cost depends on the content (early stopping) is
estimated at its cost on noise; the figure is an estimate, said as one.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import AuditConfig
from .models import ModelCard, probe_inputs

PROBE_IMAGES = 2


@dataclass(frozen=True)
class Estimate:
    n_images: int
    device: str
    probe_images: int
    scoring_s: float          # forward and attributions of every image
    checks_s: float           # the explanation-quality checks of every image
    sanity_s: float           # the model-randomisation check
    permutation_s: float      # permutation importance
    interventions_s: float    # the shortcut candidates' interventions, at most

    @property
    def total_s(self) -> float:
        return self.scoring_s + self.checks_s + self.sanity_s + self.permutation_s + self.interventions_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}

    def line(self) -> str:
        parts = [("scoring", self.scoring_s), ("quality checks", self.checks_s),
                 ("randomisation check", self.sanity_s), ("permutation", self.permutation_s),
                 ("shortcut interventions (at most)", self.interventions_s)]
        shown = " · ".join(f"{name} {_duration(s)}" for name, s in parts if s > 0)
        return (f"estimate for {self.n_images:,} images on {self.device}: {shown} · about {_duration(self.total_s)} "
                f"in all (measured on {self.probe_images} probe images; decoding, metrics and reports not included)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict[str, Estimate]]" = weakref.WeakKeyDictionary()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def estimate_cost(model: nn.Module, card: ModelCard, device: torch.device, config: AuditConfig,
                  n_images: int, probe: int = PROBE_IMAGES) -> Estimate:
    """Measure the configured work on `probe` probe images and scale it to `n_images` (memoised per model and
    settings: the command line's preflight and the flow's measure once)."""
    from .attribution import attribute, display_heatmap
    from .quality import QualityContext, run_checks
    spec, quality = config.attribution, config.quality
    key = repr((n_images, probe, str(device), config.model_dump_json(include={"attribution", "quality", "permutation",
                                                                             "shortcuts", "seed"})))
    memo = _MEMO.setdefault(model, {})
    if key in memo:
        return memo[key]
    x = probe_inputs(card, probe, config.seed, device)
    params = {m: spec.params.get(m, {}) for m in spec.methods}

    def explain_all(methods, xs, ts, keys=None):
        return attribute(model, xs, methods, target=ts, params={m: spec.params.get(m, {}) for m in methods},
                         target_layer=card.target_layer, seed=config.seed, max_batch=spec.max_batch,
                         max_elements=spec.max_elements, example_keys=keys).attributions
    # each figure is the fastest of repeated runs after a warm-up: a one-off stall (the first call of a kernel,
    # another process taking the cores for a moment) would otherwise be multiplied by every image
    with torch.inference_mode():
        model(x)                                               # warm-up
        forward = min(_timed(lambda: model(x), device) for _ in range(3)) / probe
    attribute(model, x[:1], list(spec.methods), params=params, target_layer=card.target_layer, seed=config.seed,
              max_batch=spec.max_batch, max_elements=spec.max_elements)            # warm-up
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = attribute(model, x, list(spec.methods), params=params, target_layer=card.target_layer,
                        seed=config.seed, max_batch=spec.max_batch, max_elements=spec.max_elements)
        _sync(device)
        runs.append(time.perf_counter() - t0)
    attributions = min(runs) / probe
    checks = 0.0
    if quality.checks:
        maps = {m: display_heatmap(raw, card.input_size) for m, raw in res.attributions.items()}
        ctx = QualityContext(model, x, res.target, res.attributions, maps, None,
                             lambda m, xs, ts, keys=None: explain_all([m], xs, ts, keys)[m],
                             max_batch=spec.max_batch, seed=config.seed, keys=None, explain_all=explain_all,
                             logits=res.logits)
        t0 = time.perf_counter()
        run_checks(ctx, quality.checks, quality.params)
        _sync(device)
        checks = (time.perf_counter() - t0) / probe
    from .quality.sanity import cascade, parameter_layers
    rounds = 1 + len(cascade(parameter_layers(model), quality.sanity_depths))
    sanity = rounds * attributions * min(quality.sanity_images, n_images)
    perm = config.permutation
    permutation = (perm.grid ** 2 * perm.repeats * forward * min(perm.max_images, n_images)
                   * max(1, len(config.metrics.slices))) if perm.enabled else 0.0
    s = config.shortcuts
    interventions = ((s.max_candidates + s.max_property_candidates) * 3 * min(s.confirm_examples, n_images) * forward
                     if s.enabled and s.confirm else 0.0)
    out = Estimate(n_images, str(device), probe, n_images * (forward + attributions), n_images * checks, sanity,
                   permutation, interventions)
    memo[key] = out
    _LAST[model] = out
    return out


_LAST: "weakref.WeakKeyDictionary[nn.Module, Estimate]" = weakref.WeakKeyDictionary()


def last_estimate(model: nn.Module) -> Estimate | None:
    """The estimate most recently made for `model` in this process (the manifest records it)."""
    return _LAST.get(model)

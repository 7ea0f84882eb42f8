"""Check an audit or review config end to end before any work and before its run directory exists.

Everything a config, a model card, the model itself and the dataset's schema can tell is checked here: the
output location and run id, the device, every method, check, metric, threshold and slice name, the model
(its factory is trusted, it builds, its weights load, and one probe forward gives finite
(N, num_classes) logits for the card's channels and input size), and the data (it opens, has every column
the config names, and the filter leaves rows). A failure raises one `XAuditError` naming the field.
"""
from __future__ import annotations

import json
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch
from torch import nn

from . import storage
from .attribution import METHODS, get_method
from .attribution._registry import resolve_params
from .config import AttributionSpec, AuditConfig, ModelSpec, ReviewConfig, Threshold
from .data import SourceInfo, inspect_source
from .errors import XAuditError, require_extra
from .estimate import Estimate, estimate_cost
from .metrics import METRICS
from .metrics.evaluate import parse_term
from .models import (ModelCard, build_model, first_lines, gradient_problem, pick_device, probe_inputs, probe_model,
                     resolve_card)
from .quality import CHECKS, quality_columns, resolve_check_params

# Columns of predictions.parquet that slices may use besides the metadata columns.
DERIVED_SLICE_COLUMNS = ("label_name", "confidence")
REVIEW_STATISTICS = ("flip_any", "flip_to_wrong", "flip_to_right")
DRIFT_STATISTICS = ("rank_corr", "top10_overlap")
LOCALISATION_COLUMNS = ("roi_mass", "pointing_game")


@dataclass(frozen=True)
class Preflight:
    """What the checks established: the model card(s), the device, and the data source."""

    cards: dict[str, ModelCard]
    device: str
    source: SourceInfo
    estimates: dict[str, Estimate]


def check_output_location(output_dir: str | Path, run_id: str | None) -> None:
    """Raise unless run directories can be created under `output_dir` (a folder, or a path whose nearest
    existing parent is a writable folder), and `output_dir/run_id`, if it exists, is a folder."""
    if storage.is_url(output_dir):
        storage.check_output_url(str(output_dir), run_id)
        return
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise XAuditError(f"preflight: 'output_dir' {str(out)!r} must be a folder; it is a file")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise XAuditError(f"preflight: 'output_dir' {str(out)!r} cannot be created: {str(parent)!r} is a file")
    try:                                  # the real test (os.access says yes to root on read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".xaudit-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise XAuditError(f"preflight: 'output_dir' {str(out)!r} is not writable ({str(parent)!r}: "
                          f"{exc.strerror})") from None
    if run_id:
        run_dir = out / run_id
        if run_dir.exists() and not run_dir.is_dir():
            raise XAuditError(f"preflight: run directory {str(run_dir)!r} exists and is not a folder; "
                              f"choose another 'run_id'")


def _only_for_listed(params: dict[str, dict], listed: Sequence[str], field: str, list_field: str) -> None:
    stray = sorted(set(params) - set(listed))
    if stray:
        raise XAuditError(f"preflight: '{field}' gives parameters for {stray}, which are not among "
                          f"'{list_field}' {list(listed)}")


def check_methods(methods: Sequence[str], params: dict[str, dict], checks: Sequence[str],
                  check_params: dict[str, dict]) -> None:
    """Raise unless every attribution method and quality check exists and every parameter is known."""
    if not methods:
        raise XAuditError("preflight: 'attribution.methods' must name at least one method; "
                          f"registered: {sorted(METHODS)}")
    for m in methods:
        get_method(m)
    dup = sorted({m for m in methods if list(methods).count(m) > 1})
    if dup:
        raise XAuditError(f"preflight: 'attribution.methods' names {dup} more than once")
    _only_for_listed(params, methods, "attribution.params", "attribution.methods")
    for m, p in params.items():
        resolve_params(m, p)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise XAuditError(f"preflight: 'quality.checks' must name registered checks {sorted(CHECKS)}; got {unknown}")
    _only_for_listed(check_params, checks, "quality.params", "quality.checks")
    for c, p in check_params.items():
        resolve_check_params(c, p)


def check_metric_names(names: Sequence[str] | None) -> None:
    """Raise unless every name in 'metrics.metrics' is a registered metric."""
    for name in names or []:
        if name not in METRICS:
            raise XAuditError(f"preflight: 'metrics.metrics' must name registered metrics {sorted(METRICS)}; "
                              f"got {name!r}")


def check_slices(slices: Sequence[Sequence[str]], columns: Sequence[str], where: str = "metrics.slices") -> list[str]:
    """Raise unless every slice term parses and names a sliceable column; returns the slice keys."""
    keys = []
    for i, spec in enumerate(slices):
        terms = [parse_term(t) for t in spec]
        for t in terms:
            if t.column not in columns:
                raise XAuditError(f"preflight: '{where}[{i}]' slices by {t.column!r}, which is not a sliceable "
                                  f"column; sliceable: {list(columns)} (the metadata columns, label_name, "
                                  f"confidence)")
        cols = [t.column for t in terms]
        if len(set(cols)) != len(cols):
            raise XAuditError(f"preflight: '{where}[{i}]' crosses column(s) with themselves: {list(spec)}")
        same = [j for j, other in enumerate(slices[:i]) if sorted(map(str, other)) == sorted(map(str, spec))]
        if same:
            raise XAuditError(f"preflight: '{where}[{i}]' {list(spec)} repeats '{where}[{same[0]}]' (a cross is "
                              f"the same in any order); list each slice once")
        keys.append("&".join(t.column if t.kind in ("value", "column") else raw
                             for t, raw in zip(terms, spec)) if spec else "overall")
    return keys


def _check_threshold(th: Threshold, i: int, where: str, known: dict[str, bool], per_class: set[str],
                     class_names: Sequence[str], slice_keys: Sequence[str], hint: str) -> None:
    field = f"{where}[{i}]"
    if th.metric not in known:
        raise XAuditError(f"preflight: '{field}.metric' is {th.metric!r}, which this config does not compute; "
                          f"it computes {sorted(known)}{hint}")
    if th.sub_key is not None:
        if th.metric not in per_class:
            raise XAuditError(f"preflight: '{field}.sub_key' is set, but {th.metric!r} is not a per-class metric "
                              f"(per-class: {sorted(per_class)})")
        if th.sub_key not in class_names:
            raise XAuditError(f"preflight: '{field}.sub_key' must be one of the model's classes "
                              f"{list(class_names)}; got {th.sub_key!r}")
    if th.multiple_testing == "bh" and getattr(th, "gate_on", "interval") != "interval":
        raise XAuditError(f"preflight: '{field}.multiple_testing' bh needs gate_on: interval")
    if th.slice not in (None, "overall"):
        parts = th.slice.split("&")
        if any("=" not in p or not p.split("=", 1)[0] for p in parts):
            raise XAuditError(f"preflight: '{field}.slice' must be 'overall' or 'col=value[&col=value]'; "
                              f"got {th.slice!r}")
        key = "&".join(p.split("=", 1)[0] for p in parts)
        if key not in slice_keys:
            raise XAuditError(f"preflight: '{field}.slice' {th.slice!r} selects slices keyed {key!r}, which "
                              f"'metrics.slices' does not make (keys: {sorted(set(slice_keys))})")


def _stat_names(methods: Sequence[str], checks: Sequence[str], has_roi: bool) -> dict[str, bool]:
    from .attribution import METHODS
    cols = quality_columns(list(checks))
    out = {f"{m}.{c}": higher for m in methods for c, (higher, _) in cols.items()
           if has_roi or c not in LOCALISATION_COLUMNS}
    out.update({f"{m}.abs_completeness_delta": False for m in methods if m in METHODS and METHODS[m].has_delta})
    return out


def _roi_hint(metric: str, has_roi: bool) -> str:
    if not has_roi and metric.rpartition(".")[2] in LOCALISATION_COLUMNS:
        return "; localisation statistics need 'data.roi_column'"
    return ""


def check_model(spec: ModelSpec, device: torch.device, attribution: AttributionSpec, seed: int = 0,
                role: str = "model", load: Callable[[ModelCard, torch.device], nn.Module] = build_model) -> ModelCard:
    """Return the card once the model builds, its weights load, a probe forward fits the card and every
    configured method passes its dry run (`check_attribution`); a review's errors name the role."""
    try:
        card = resolve_card(spec)
        model = load(card, device)
        if _passed(model, "probe", card.channels, card.input_size, card.num_classes, str(device)) is None:
            probe_model(model, card, device)
            _passed(model, "probe", card.channels, card.input_size, card.num_classes, str(device), record=True)
        check_attribution(card, model, device, attribution.methods, attribution.params, seed)
    except XAuditError as exc:
        if role == "model":
            raise
        raise XAuditError(f"{role}: {exc}") from None
    return card


# parameters that set a method's number of model passes: a dry run needs only a couple
_PASS_COUNTS = ("n_steps", "n_samples")

# The probes and dry runs a model object has passed in this process (the command line preflights every config,
# then each flow's first task does again, on the same cached model): each is run once per model and settings.
_PASSED: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def _passed(model: nn.Module, *what, record: bool = False) -> bool | None:
    """True if `model` passed the check `what` (a tuple of its settings) before; with `record`, note that it
    has. None when it has not."""
    key = json.dumps(what, sort_keys=True, default=str)
    if record:
        _PASSED.setdefault(model, set()).add(key)
        return True
    return True if key in _PASSED.get(model, ()) else None


def check_attribution(card: ModelCard, model: nn.Module, device: torch.device, methods: Sequence[str],
                      params: dict[str, dict], seed: int = 0) -> None:
    """Dry-run every configured method on one probe image (with its pass counts cut to 2, occlusion's windows
    to at most four: its geometry is checked against the input size, its passes are forwards), so a method
    that cannot explain this model (no CAM layer, a layer whose output is not (N, C, h, w), frozen weights, a
    window larger than the image...) stops the audit now, not after ingest. The methods not yet passed run in
    one `attribute` call (the gradient family shares its pass there, as in the audit); only if that call fails
    do they run one by one, to name the method that cannot."""
    from .attribution import attribute
    x = probe_inputs(card, 1, 1, device)
    pending: dict[str, tuple[dict, tuple]] = {}
    for m in methods:
        p = dict(params.get(m) or {})
        for k in _PASS_COUNTS:
            if k in METHODS[m].defaults:
                p[k] = min(2, int(p.get(k, METHODS[m].defaults[k])))
        if m == "occlusion":        # the same window; a stride of the image's side leaves at most 2 x 2 windows
            stride = p.get("stride", METHODS[m].defaults["stride"])
            if isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1:
                p["stride"] = max(stride, *card.input_size)
        settings = ("dry run", m, p, card.target_layer, card.channels, card.input_size, str(device), seed)
        if not _passed(model, *settings):
            pending[m] = p, settings
    if len(pending) > 1:
        try:
            attribute(model, x, list(pending), params={m: p for m, (p, _) in pending.items()},
                      target_layer=card.target_layer, seed=seed)
        except Exception:  # noqa: BLE001 - run them one by one below: that names the method
            pass
        else:
            for _, settings in pending.values():
                _passed(model, *settings, record=True)
            return
    for m, (p, settings) in pending.items():
        try:
            attribute(model, x, [m], params={m: p}, target_layer=card.target_layer, seed=seed)
            _passed(model, *settings, record=True)
        except XAuditError as exc:
            raise XAuditError(f"preflight: attribution method {m!r} cannot explain this model: {exc}") from None
        except Exception as exc:  # the model's own code, or a method meeting an architecture it cannot handle
            try:
                no_gradient = gradient_problem(model, x)
            except Exception:  # noqa: BLE001 - the model's own failure is reported below as it is
                no_gradient = None
            if no_gradient:
                forward_only = sorted(n for n, spec in METHODS.items() if spec.forward_only)
                raise XAuditError(f"preflight: attribution method {m!r} needs gradients of the model, but "
                                  f"{no_gradient}; choose among {', '.join(forward_only)} (forward passes only) "
                                  f"in 'attribution.methods', or let gradients flow") from None
            advice = " or set the model's 'target_layer'" if METHODS[m].layer else ""
            raise XAuditError(f"preflight: attribution method {m!r} failed on a probe image of this model: "
                              f"{type(exc).__name__}: {first_lines(exc)}; leave it out of "
                              f"'attribution.methods'{advice}") from None


def _run_basics(config: AuditConfig | ReviewConfig) -> tuple[torch.device, SourceInfo, list[str]]:
    """The checks an audit and a review share before their models: output location, device, method, check
    and metric names, the data source, and the slice keys `metrics.slices` makes (with 'overall')."""
    if isinstance(config, ReviewConfig) and storage.is_url(config.output_dir):
        raise XAuditError(f"config: 'output_dir' {config.output_dir!r}: a review writes to a local folder (or a "
                          f"shared disk) for now; its audits' outputs can be published with 'xaudit run'")
    check_output_location(config.output_dir, config.run_id)
    device = pick_device(config.device)
    a, q, m = config.attribution, config.quality, config.metrics
    check_methods(a.methods, a.params, q.checks, q.params)
    check_metric_names(m.metrics)
    unknown = sorted(set(config.shortcuts.methods or []) - set(a.methods))
    if unknown:
        raise XAuditError(f"config: 'shortcuts.methods' may only name methods in 'attribution.methods' "
                          f"{list(a.methods)}; got {unknown}")
    source = inspect_source(config.data)
    budget = getattr(config, "max_reject_fraction", None)
    if source.n_distinct_ids is not None and budget is not None:
        unusable = source.n_rows - source.n_distinct_ids       # rows repeating an earlier row's id, or without one
        if unusable > budget * source.n_rows:
            raise XAuditError(f"preflight: 'data.id_column' {config.data.id_column!r} does not identify rows: of "
                              f"{source.n_rows:,} rows, {unusable:,} repeat another row's id or have none "
                              f"({source.n_distinct_ids:,} distinct), more than 'max_reject_fraction' "
                              f"{budget:.1%} would allow as rejects; name the column of unique example ids")
    slice_keys = [*check_slices(m.slices, [*source.metadata_columns, *DERIVED_SLICE_COLUMNS]), "overall"]
    check_signing(config)
    check_history(config)
    return device, source, slice_keys


def check_signing(config: AuditConfig | ReviewConfig) -> None:
    """With a `signing` block: the key and certificate load, belong together and the passphrase (from the
    environment variable it names) opens them, before any work rather than after the run."""
    s = config.signing
    if s is None:
        return
    from .signing import load_credentials, passphrase_from_env
    require_extra("sign", "config: 'signing'")
    load_credentials(s.key, s.cert, s.pkcs12, s.chain, passphrase_from_env(s.passphrase_env), where="config: signing",
                     passphrase_env=s.passphrase_env)


def check_history(config: AuditConfig | ReviewConfig) -> None:
    """The history folder, when there is one, must hold only history files: read it now, not after the run."""
    h = getattr(config, "history", None)
    if h is None or not h.enabled:
        return
    from .history import folder_for, history_files
    if h.path is None and storage.is_url(config.output_dir):
        return                        # the store's history is pulled with the run and read when it snapshots
    folder = folder_for(config.output_dir, h.path)
    if folder.exists() and not folder.is_dir():
        raise XAuditError(f"config: 'history.path' {str(folder)!r} must be a folder")
    history_files(folder)             # schemas only: the rows are read once, when the run snapshots them


def _statistics(config: AuditConfig | ReviewConfig) -> tuple[dict[str, bool], set[str]]:
    """Return {name: higher_is_better} of every metric and explanation statistic the config computes, and the
    names of the per-class metrics."""
    chosen = config.metrics.metrics if config.metrics.metrics is not None else sorted(METRICS)
    known = {n: METRICS[n].higher_is_better for n in chosen}
    known.update(_stat_names(config.attribution.methods, config.quality.checks, bool(config.data.roi_column)))
    return known, {n for n in chosen if METRICS[n].per_class}


def preflight_audit(config: AuditConfig,
                    load: Callable[[ModelCard, torch.device], nn.Module] = build_model,
                    estimate: bool = True) -> Preflight:
    """Check everything about an audit that can be known before it runs (see the module docstring); with
    `estimate`, also measure its cost (`tasks.estimate`) and hold it to `max_minutes`. The command line checks
    every config while Prefect's server starts and estimates after: the server's start-up would skew the
    measurement."""
    device, source, slice_keys = _run_basics(config)
    card = check_model(config.model, device, config.attribution, config.seed, load=load)
    known, per_class = _statistics(config)
    for i, th in enumerate(config.metrics.thresholds):
        _check_threshold(th, i, "metrics.thresholds", known, per_class, card.class_names, slice_keys,
                         _roi_hint(th.metric, bool(config.data.roi_column)))
    est = {}
    if estimate:
        est["model"] = estimate_cost(load(card, device), card, device, config, source.n_rows)
        check_budget(config.max_minutes, list(est.values()), "audit")
    return Preflight({"model": card}, str(device), source, est)


def check_budget(max_minutes: float | None, estimates: Sequence[Estimate], what: str) -> None:
    """Refuse, before any run directory, work estimated to take longer than `max_minutes`."""
    total = sum(e.total_s for e in estimates)
    if max_minutes is not None and total > 60 * max_minutes:
        raise XAuditError(f"preflight: the {what} is estimated at about {total / 60:.1f} min, more than "
                          f"'max_minutes' {max_minutes:g} ({'; '.join(e.line() for e in estimates)}); raise the "
                          f"budget, audit fewer images (data.filter) or configure fewer methods or checks")


def preflight_review(config: ReviewConfig,
                     load: Callable[[ModelCard, torch.device], nn.Module] = build_model,
                     estimate: bool = True) -> Preflight:
    """Check a review: both audits as an audit would be checked, the two models' classes agree, and every
    change threshold and review threshold names a statistic the review computes."""
    device, source, slice_keys = _run_basics(config)
    cards = {role: check_model(getattr(config, role), device, config.attribution, config.seed, role, load)
             for role in ("baseline", "candidate")}
    bnames, cnames = cards["baseline"].class_names, cards["candidate"].class_names
    if sorted(bnames) != sorted(cnames):
        raise XAuditError(f"preflight: 'candidate' has classes {list(cnames)} but 'baseline' has {list(bnames)}; "
                          f"a review compares the same classes")
    if bnames != cnames:
        # the same classes in another order: the review aligns the candidate's outputs to the baseline's by
        # name, which needs labels that name their class (a number would mean a different class to each model)
        label = source.schema.field(config.data.label_column) if config.data.label_column in source.schema.names \
            else None
        if label is not None and not (pa.types.is_string(label.type) or pa.types.is_large_string(label.type)
                                      or pa.types.is_dictionary(label.type)):
            raise XAuditError(
                f"preflight: 'candidate' orders its classes {list(cnames)} and 'baseline' {list(bnames)}: the review "
                f"aligns them by name, but 'data.label_column' {config.data.label_column!r} holds numbers "
                f"({label.type}), which would mean different classes to the two models; give the labels as class "
                f"names, or a candidate card whose 'class_names' follow the baseline's order")
    known, per_class = _statistics(config)
    names = cards["baseline"].class_names
    for i, ch in enumerate(config.change_thresholds):
        _check_threshold(ch, i, "change_thresholds", known, per_class, names, slice_keys,
                         _roi_hint(ch.metric, bool(config.data.roi_column)))
    review_known = {s: False for s in REVIEW_STATISTICS} | {f"{meth}.{d}": True for meth in config.attribution.methods
                                                             for d in DRIFT_STATISTICS}
    for i, th in enumerate(config.thresholds):
        _check_threshold(th, i, "thresholds", review_known, set(), names, slice_keys, "")
    estimates = {role: estimate_cost(load(card, device), card, device, config.audit_config(role, Path(".")),
                                     source.n_rows) for role, card in cards.items()} if estimate else {}
    check_budget(config.max_minutes, list(estimates.values()), "review")
    return Preflight(cards, str(device), source, estimates)

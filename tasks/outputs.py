"""Assemble a run's outputs: merge shard parts, compute per-slice metrics and checks, write the manifest.

Output files of a run directory (schemas in the README):
  predictions.parquet, explanations.parquet, rejects.parquet, metrics.parquet,
  validation.parquet, validation.json, manifest.json, report.html, report.pdf
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import AuditConfig, ReviewConfig
from .errors import XAuditError
from .io import atomic_path, sha256_file, sha256_json, write_json, write_parquet
from .metrics import ExampleStat, evaluate, slice_groups, validate
from .metrics.thresholds import with_checks
from .models import ModelCard
from .quality import CHECKS

if TYPE_CHECKING:
    import pandas as pd

ARTIFACTS = ("predictions.parquet", "explanations.parquet", "rejects.parquet", "metrics.parquet",
             "validation.parquet", "validation.json", "sanity.parquet", "permutation.parquet", "shortcuts.parquet",
             "properties.parquet", "history.parquet", "report.html", "report.pdf")
REVIEW_ARTIFACTS = ("review_metrics.parquet", "review_examples.parquet", "review_drift.parquet",
                    "validation.parquet", "validation.json", "review.html", "review.pdf")
LIBRARIES = ("xaudit", "torch", "torchvision", "numpy", "pandas", "pyarrow", "prefect", "jinja2", "weasyprint",
             "pillow", "pydantic", "safetensors")


def merge_parquet(parts: Sequence[str | Path], path: str | Path, schema: pa.Schema | None = None) -> int:
    """Concatenate Parquet `parts` into `path` one part at a time (atomically); returns the row count."""
    rows = 0
    with atomic_path(path) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                if schema is not None:
                    table = table.cast(schema)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                if schema is None:
                    raise XAuditError(f"merge_parquet: no parts to merge into {path}")
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        finally:
            if writer is not None:
                writer.close()
    return rows


PREDICTION_COLUMNS = {"example_id", "label", "prediction", "prediction_name", "correct", "probabilities", "shard"}


def sliceable_columns(names: Sequence[str]) -> list[str]:
    """Return the columns of predictions.parquet that slices may use: the metadata columns, plus `label_name`
    (a slice per true class) and `confidence` (bucket it: confidence:q10)."""
    return [c for c in names if c not in PREDICTION_COLUMNS]


@dataclass(frozen=True)
class MetricsSummary:
    verdict: str
    n_checks: int
    n_failed: int
    accuracy: float | None


def example_stats(predictions: pa.Table, explanations: pa.Table) -> dict[str, ExampleStat]:
    """Return the explanation-quality columns per method as per-example statistics aligned with
    `predictions`, named '<method>.<column>' (for example 'gradcam.roi_mass'); columns undefined everywhere
    are left out."""
    ids = predictions["example_id"].to_pylist()
    position = {e: i for i, e in enumerate(ids)}
    known = {col: meta for check in CHECKS.values() for col, meta in check.columns.items()}
    present = {c: known[c] for c in explanations.column_names if c in known}
    delta = ["completeness_delta"] if "completeness_delta" in explanations.column_names else []
    ex = explanations.select(["example_id", "method", *present, *delta]).to_pandas()
    out: dict[str, ExampleStat] = {}
    for method, group in ex.groupby("method", sort=True):
        idx = np.array([position[e] for e in group["example_id"]], dtype=np.int64)
        columns = {stat: (higher, group[stat]) for stat, (higher, _) in present.items()}
        if delta:      # IG's completeness / DeepLIFT's summation-to-delta residual, gateable as |delta|
            columns["abs_completeness_delta"] = (False, group["completeness_delta"].astype("float64").abs())
        for stat, (higher, column) in columns.items():
            values = np.full(len(ids), np.nan)
            values[idx] = column.to_numpy(dtype=np.float64)
            if np.isfinite(values).any():
                out[f"{method}.{stat}"] = ExampleStat(values, higher)
    return out


def compute_metrics(run_dir: str | Path, config: AuditConfig, card: ModelCard, run_id: str) -> MetricsSummary:
    """Write metrics.parquet, validation.parquet and validation.json for the run; returns the verdict."""
    run_dir = Path(run_dir)
    preds = pq.read_table(run_dir / "predictions.parquet")
    stat_columns = [c for c in pq.read_schema(run_dir / "explanations.parquet").names
                    if c in {col for check in CHECKS.values() for col in check.columns}]
    expl = pq.read_table(run_dir / "explanations.parquet",
                         columns=["example_id", "method", *stat_columns, "completeness_delta"])
    if preds.num_rows == 0:
        raise XAuditError("compute_metrics: no example was scored (all were rejected); see rejects.parquet")
    probs = np.asarray(preds["probabilities"].combine_chunks().flatten(), dtype=np.float64).reshape(preds.num_rows, -1)
    metadata = preds.select(sliceable_columns(preds.column_names)).to_pandas()
    spec = config.metrics
    slices = list(spec.slices)
    if any(th.max_gap is not None for th in spec.thresholds) and [] not in [list(s) for s in slices]:
        slices.append([])            # gap checks compare each slice with the overall value
    ev = evaluate(
        labels=preds["label"].to_numpy(), probabilities=probs, metadata=metadata, slices=slices,
        metrics=spec.metrics, example_stats=example_stats(preds, expl), class_names=card.class_names,
        replicates=spec.bootstrap_replicates, seed=config.seed, level=spec.confidence_level,
        min_slice_size=spec.min_slice_size,
    )
    table = ev.table
    table.insert(0, "model", f"{card.name}@{card.version}")
    table.insert(0, "run_id", run_id)
    interval = {"ci_method": ev.method, "ci_replicates": str(ev.replicates), "ci_seed": str(ev.seed),
                "ci_level": str(ev.level)}
    write_parquet(run_dir / "metrics.parquet", pa.Table.from_pandas(table, preserve_index=False), interval)
    result = validate(ev, spec.thresholds)
    if config.shortcuts.enabled:
        result = with_checks([*result.checks, *scan_shortcuts(run_dir, config, card, preds, metadata)])
    checks = result.table()
    checks.insert(0, "run_id", run_id)
    write_parquet(run_dir / "validation.parquet", pa.Table.from_pandas(checks, preserve_index=False))
    write_json(run_dir / "validation.json", {"run_id": run_id, "model": f"{card.name}@{card.version}",
                                             "interval": interval, **result.to_dict()})
    overall = table[(table.slice_key == "overall") & (table.metric == "accuracy")]
    return MetricsSummary(result.verdict, len(result.checks), sum(c.status == "FAIL" for c in result.checks),
                          float(overall.value.iloc[0]) if len(overall) else None)


def _confirm_candidates(run_dir: Path, config: AuditConfig, card: ModelCard, preds: pa.Table,
                        table: pd.DataFrame, maps: dict, classes: dict, ids: dict, slices: dict) -> pd.DataFrame:
    """Fill the intervention columns (shortcuts.CONFIRM_COLUMNS) for each shortcut candidate of the scan: a
    trusted method's box of lift above `max_lift` (the strongest per class), then hot cells and clusters of
    any pixel-level method, largest share first, up to `shortcuts.max_candidates` in all. The model is the
    run's, on the run's device; the images are decoded from the run's own input shards (only those holding
    the examples)."""
    import torch
    from . import shortcuts
    spec = config.shortcuts
    table = table.copy()
    for c in shortcuts.CONFIRM_COLUMNS:
        table[c] = None
    picks = [r for _, (hot, rows) in shortcuts.strongest(table, spec.max_lift, spec.gate_on).items()
             for r in rows if bool(r.qualified) and r.lift > spec.max_lift]
    picks += shortcuts.cell_candidates(table, limit=max(0, spec.max_candidates - len(picks)))
    if not picks:
        return table
    labels, predictions = preds["label"].to_numpy(), preds["prediction"].to_numpy()
    all_ids = np.asarray(preds["example_id"].to_pylist(), dtype=object)
    masses = {m: shortcuts.pool_maps(maps[m]) for m in {r.method for r in picks}}
    wanted, regions = {}, {}
    for r in picks:
        cls = classes[r.method]
        inside = np.arange(len(cls)) if r.slice_key == "overall" else np.asarray(next(
            (ix for k, v, ix in slices.get(r.method, []) if k == r.slice_key and v == r.slice_value), []), dtype=np.int64)
        # the region from the candidate's own maps (the class within its slice); targets and donors from every
        # example: within a slice where every image carries the artefact (a site's scanner tag), pasting it
        # changes nothing, so the slice would hide the very dependence the intervention measures
        if r.kind in ("cells", "cluster"):       # the hot cells themselves, whatever their shape
            g = int(r.grid)
            regions[r.name] = np.isin(np.arange(g * g), np.asarray(r.cells, dtype=np.int64)).reshape(g, g)
        else:
            regions[r.name] = shortcuts.candidate_region(masses[r.method], cls, inside[cls[inside] == r.class_index],
                                                         int(r.class_index), r, spec.max_lift / 2)
        if r.kind == "cluster":                  # the cluster's own images carry what its cells hold
            members = np.isin(all_ids, list(r.members)) | (labels != r.class_index)
            wanted[r.name] = shortcuts.intervention_sets(labels[members], predictions[members], all_ids[members],
                                                         int(r.class_index), spec.confirm_examples, config.seed)
        else:
            wanted[r.name] = shortcuts.intervention_sets(labels, predictions, all_ids, int(r.class_index),
                                                         spec.confirm_examples, config.seed)
    inputs = _load_inputs(run_dir, card, config, preds, {e for t, d in wanted.values() for e in (*t, *d)})
    predict = _predictor(config, card)
    h, w = tuple(card.input_size)
    for r in picks:
        targets, donors = wanted[r.name]
        tx = [inputs[e] for e in targets if e in inputs]
        dx = [inputs[e] for e in donors if e in inputs]
        if len(tx) < 2 or not dx:
            got = shortcuts.confirm(predict, torch.zeros(0), torch.zeros(0), None, 0, 0, 0.95, 0, spec.min_effect)
        else:
            core = None
            if r.kind not in ("cells", "cluster"):       # the box itself: its growth may take in the object
                g = regions[r.name].shape[0]
                box = np.zeros((g, g), dtype=bool)
                box[int(r.row):int(r.row) + int(r.height), int(r.col):int(r.col) + int(r.width)] = True
                core = shortcuts.cells_to_pixels(box, h, w)
            got = shortcuts.confirm(predict, torch.stack(tx), torch.stack(dx),
                                    shortcuts.cells_to_pixels(regions[r.name], h, w), int(r.class_index),
                                    spec.replicates, config.metrics.confidence_level, config.seed, spec.min_effect,
                                    spec.min_consistency, core)
        got["region_cells"] = int(regions[r.name].sum())
        for k, v in got.items():
            table.at[r.name, k] = v
    for c in shortcuts.CONFIRM_COLUMNS:
        table[c] = table[c].astype("boolean" if c == "confirmed" else "Int64" if c in ("n_targets", "region_cells") else "float64")
    return table


def _shard_paths(run_dir: Path, preds: pa.Table, need: set[str] | None) -> list[Path]:
    """The run's input shards holding the examples `need` (all of them when None or when the predictions do
    not say which shard holds what)."""
    shards = sorted((run_dir / "inputs").glob("shard-*.parquet"))
    if need is None or "shard" not in preds.column_names:
        return shards
    by_name = {p.stem: p for p in shards}
    shard_of = dict(zip(preds["example_id"].to_pylist(), preds["shard"].to_pylist()))
    todo = sorted({str(shard_of[e]) for e in need if e in shard_of and str(shard_of[e]) in by_name})
    return [by_name[n] for n in todo] or shards


def _load_inputs(run_dir: Path, card: ModelCard, config: AuditConfig, preds: pa.Table, need: set[str]) -> dict:
    """The normalised model inputs of the examples `need`, decoded from the run's own input shards (only those
    holding them)."""
    from .data import decode_shard
    inputs = {}
    for path in _shard_paths(run_dir, preds, need):
        decoded = decode_shard(path, card, config.data)
        for i, e in enumerate(decoded.example_ids):
            if e in need:
                inputs[e] = decoded.inputs[i]
    return inputs


def _predictor(config: AuditConfig, card: ModelCard):
    """predict(x) -> the run's model's predicted classes for normalised inputs `x`, in batches, on the run's
    device."""
    import torch
    from .models import cached_model, pick_device
    device = pick_device(config.device)
    model = cached_model(card, device)

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), config.attribution.batch_size):
                out.append(model(x[s:s + config.attribution.batch_size].to(device)).float().argmax(1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    return predict


def _pixels(card: ModelCard):
    """(to_pixels, to_input): normalised model inputs to images in [0, 1] and back, with the card's statistics."""
    import torch
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    return (lambda x: (x * std + mean).clamp(0, 1)), (lambda x: (x - mean) / std)


def scan_properties(run_dir: Path, config: AuditConfig, card: ModelCard, preds: pa.Table, metadata) -> list:
    """Screen image properties for a class they tell apart (tasks.properties), confirm the candidates on the
    run's model by intervention, write properties.parquet; return the checks. The properties are measured
    shard by shard from the run's own input shards (pixels after the card's resize, file properties from the
    stored bytes' headers), so memory stays one shard's."""
    import torch
    from . import properties, shortcuts
    from .data import decode_shard
    spec = config.shortcuts
    names = properties.applicable(spec.properties, card.channels)
    position = {e: i for i, e in enumerate(preds["example_id"].to_pylist())}
    values = {n: np.full(preds.num_rows, np.nan) for n in names}
    to_pixels, to_input = _pixels(card)
    for path in (_shard_paths(run_dir, preds, None) if names else []):
        decoded = decode_shard(path, card, config.data)
        rows = np.array([position.get(e, -1) for e in decoded.example_ids], dtype=np.int64)
        keep = rows >= 0
        for n, v in properties.measure_pixels(to_pixels(decoded.inputs), names).items():
            values[n][rows[keep]] = v[keep]
        if any(properties.REGISTRY[n].measure is None for n in names):
            raw = pq.read_table(path, columns=[config.data.id_column, config.data.image_column])
            at = {str(e): i for i, e in enumerate(raw[config.data.id_column].to_pylist())}
            blobs = raw[config.data.image_column].to_pylist()
            picked = [blobs[at[e]] if e in at and isinstance(blobs[at[e]], (bytes, bytearray)) else b""
                      for e in decoded.example_ids]
            for n, v in properties.measure_files(picked, names).items():
                values[n][rows[keep]] = v[keep]
    labels, predictions = preds["label"].to_numpy(), preds["prediction"].to_numpy()
    slice_specs = [list(s) for s in config.metrics.slices if len(s) == 1 and not str(s[0]).startswith("label_name")]
    groups = [("overall", "all", np.arange(preds.num_rows)),
              *(slice_groups(metadata, slice_specs) if slice_specs else [])]
    table = properties.screen(values, labels, card.class_names, groups, spec.min_examples,
                              min(spec.replicates, 200), config.metrics.confidence_level, config.seed, spec.min_power)
    picks = properties.candidates(table, spec.max_property_candidates) if spec.confirm else []
    if picks:
        all_ids = np.asarray(preds["example_id"].to_pylist(), dtype=object)
        wanted = {r.name: shortcuts.intervention_sets(labels, predictions, all_ids, int(r.class_index),
                                                      spec.confirm_examples, config.seed) for r in picks}
        inputs = _load_inputs(run_dir, card, config, preds, {e for t, d in wanted.values() for e in (*t, *d)})
        predict = _predictor(config, card)
        stack = lambda ids: to_pixels(torch.stack([inputs[e] for e in ids if e in inputs])) \
            if any(e in inputs for e in ids) else torch.zeros(0)  # noqa: E731
        for r in picks:
            targets, donors = wanted[r.name]
            # a file property moves through the pixel property that carries it: its medians are that one's
            proxy = r.proxy
            if proxy != r.property:
                same = table[(table.property == proxy) & (table.class_index == r.class_index)
                             & (table.slice_key == r.slice_key) & (table.slice_value == r.slice_value)]
                if same.empty:
                    continue
                class_value, reference_value = float(same.class_value.iloc[0]), float(same.reference_value.iloc[0])
            else:
                class_value, reference_value = float(r.class_value), float(r.reference_value)
            got = properties.confirm(predict, proxy, stack(targets), stack(donors), class_value, reference_value,
                                     int(r.class_index), to_input, spec.replicates, config.metrics.confidence_level,
                                     config.seed, spec.min_effect)
            for k, v in got.items():
                table.loc[r.name, k] = v
    for c in properties.COLUMNS:
        if c not in table.columns:
            table[c] = None
    for c in ("candidate", "confirmed"):
        table[c] = table[c].astype("boolean")
    write_parquet(run_dir / "properties.parquet",
                  pa.Table.from_pandas(table[properties.COLUMNS], schema=properties.schema(), preserve_index=False),
                  {"min_power": str(spec.min_power), "properties": ",".join(names)})
    return properties.checks(table, spec.min_power, spec.severity)


def scan_shortcuts(run_dir: Path, config: AuditConfig, card: ModelCard, preds: pa.Table, metadata) -> list:
    """Run the hotspot scan (tasks.shortcuts) on the run's stored maps; write shortcuts.parquet; return its
    checks. Slices: every single-column slice of the config except the true class itself."""
    from . import shortcuts
    spec = config.shortcuts
    names = pq.read_schema(run_dir / "explanations.parquet").names
    expl = pq.read_table(run_dir / "explanations.parquet",
                         columns=["example_id", "method", "target", "heatmap_height", "heatmap_width", "heatmap",
                                  *(["roi_mass"] if "roi_mass" in names else [])])
    position = {e: i for i, e in enumerate(preds["example_id"].to_pylist())}
    slice_specs = [list(s) for s in config.metrics.slices if len(s) == 1 and not str(s[0]).startswith("label_name")]
    maps, classes, ids, slices, roi = {}, {}, {}, {}, {}
    methods = pc.unique(expl["method"]).to_pylist()
    for method in methods:
        t = expl.filter(pc.equal(expl["method"], method))
        if t.num_rows == 0:
            continue
        h, w = int(t["heatmap_height"][0].as_py()), int(t["heatmap_width"][0].as_py())
        maps[method] = np.asarray(t["heatmap"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, h, w)
        classes[method] = t["target"].to_numpy()
        ids[method] = np.asarray(t["example_id"].to_pylist(), dtype=object)
        rows = np.array([position[e] for e in ids[method]], dtype=np.int64)
        slices[method] = slice_groups(metadata.iloc[rows].reset_index(drop=True), slice_specs) if slice_specs else []
        if "roi_mass" in t.column_names:
            values = t["roi_mass"].to_numpy(zero_copy_only=False).astype(np.float64)
            if np.isfinite(values).any():
                roi[method] = values
    insensitive: set[str] | None = None
    if (run_dir / "sanity.parquet").is_file():
        sanity = pq.read_table(run_dir / "sanity.parquet").to_pandas()
        insensitive = set(sanity.method[sanity.insensitive])
    why = shortcuts.trusted_methods(sorted(maps), spec.methods, insensitive)
    table = shortcuts.detect(maps, classes, ids, card.class_names, slices, why, spec.windows, spec.min_share,
                             spec.min_examples, spec.replicates, config.metrics.confidence_level, config.seed,
                             cell_lift=spec.cell_lift)
    if spec.confirm and not table.empty:
        table = _confirm_candidates(run_dir, config, card, preds, table, maps, classes, ids, slices)
    for c in shortcuts.schema().names:
        if c not in table.columns:
            table[c] = None
    write_parquet(run_dir / "shortcuts.parquet",
                  pa.Table.from_pandas(table[shortcuts.schema().names], schema=shortcuts.schema(),
                                       preserve_index=False),
                  {"max_lift": str(spec.max_lift), "min_share": str(spec.min_share)})
    if table.empty:
        checks = [shortcuts.not_run_check(classes, spec.min_examples)]
    else:
        checks = shortcuts.hotspot_checks(table, spec.max_lift, spec.gate_on, spec.severity,
                                          config.metrics.confidence_level, tuple(card.input_size))
        checks += shortcuts.cell_checks(table, spec.cell_lift, spec.min_share, spec.severity,
                                        config.metrics.confidence_level, tuple(card.input_size), spec.confirm)
    if spec.properties != []:
        checks += scan_properties(run_dir, config, card, preds, metadata)
    if roi and spec.max_roi_gap is not None:
        checks += shortcuts.roi_gap_checks(roi, classes, card.class_names, slices, why, spec.max_roi_gap,
                                           spec.min_examples, spec.replicates, config.metrics.confidence_level,
                                           config.seed, spec.gate_on, spec.severity)
    return checks


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib_metadata.version(lib)
        except importlib_metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def artifact_hashes(run_dir: str | Path, names: Sequence[str] = ARTIFACTS) -> dict[str, dict[str, Any]]:
    """Return {name: {sha256, bytes}} for every artifact of `names` present in the run directory."""
    run_dir = Path(run_dir)
    return {name: {"sha256": sha256_file(run_dir / name), "bytes": (run_dir / name).stat().st_size}
            for name in names if (run_dir / name).is_file()}


RUN_FOLDERS = ("inputs", "parts")
REPORTS = ("report.html", "report.pdf", "review.html", "review.pdf")


def unsealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the manifest as it was before the reports were rendered: without the reports' own hashes. The
    reports show and embed this (a report cannot list its own hash), on the first rendering and on every
    re-rendering alike."""
    artifacts = manifest.get("artifacts") if isinstance(manifest.get("artifacts"), dict) else {}
    return {**manifest, "artifacts": {k: v for k, v in artifacts.items() if k not in REPORTS}}


def json_bytes(obj: Any) -> bytes:
    """The bytes `io.write_json` writes for `obj` (indented, key-sorted)."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def seal(run_dir: str | Path, review: bool = False) -> dict[str, str]:
    """Add the reports' hashes to manifest.json, leaving every other entry as recorded; returns, per report
    file, "recorded" (first sealing), "identical" (same bytes as the recorded rendering) or "changed"."""
    path = Path(run_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    before = manifest.get("artifacts") or {}
    reports = {k: v for k, v in artifact_hashes(run_dir, REVIEW_ARTIFACTS if review else ARTIFACTS).items()
               if k in REPORTS}
    manifest["artifacts"] = {**unsealed(manifest)["artifacts"], **reports}
    write_json(path, manifest)
    return {k: "recorded" if k not in before else "identical" if before[k] == v else "changed"
            for k, v in reports.items()}


def clear_previous_outputs(run_dir: str | Path) -> list[str]:
    """Remove what an earlier run in this directory wrote at its top level (tables, manifest, reports): a rerun
    recomputes all of it from the shard parts, and a config that no longer makes, say, sanity.parquet must not
    inherit an old one (it would be hashed into the manifest and shown in the report). inputs/ is rewritten
    by ingest; parts/ is the resume cache. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for name in (*ARTIFACTS, *REVIEW_ARTIFACTS, "manifest.json"):
        path = run_dir / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def prune_parts(run_dir: str | Path, shards: Sequence[str]) -> None:
    """Remove input shards and shard parts that belong to no shard of this run (an earlier run of the same
    run id over more rows): the manifest lists and hashes only what this run used."""
    run_dir = Path(run_dir)
    names = {Path(s).stem for s in shards}
    for folder in RUN_FOLDERS:
        for f in sorted((run_dir / folder).glob("shard-*")):
            if f.is_file() and f.name.split(".", 1)[0] not in names:
                f.unlink()


def file_hashes(run_dir: str | Path, folders: Sequence[str] = RUN_FOLDERS) -> dict[str, dict[str, Any]]:
    """Return {relative path: {sha256, bytes}} for every file under the run's `folders` (input shards and
    per-shard parts), sorted; temporary files of an interrupted write are left out."""
    run_dir = Path(run_dir)
    out = {}
    for folder in folders:
        base = run_dir / folder
        if base.is_dir():
            for f in sorted(base.rglob("*")):
                if f.is_file() and not f.name.endswith(".tmp"):
                    out[f.relative_to(run_dir).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def build_manifest(run_id: str, started: datetime, config: AuditConfig, card: ModelCard, data: dict[str, Any],
                   flow_run_id: str | None, device: str, run_dir: str | Path, verdict: str) -> dict[str, Any]:
    """Return the run manifest: identity of model, data, code and environment, and every artifact's hash."""
    cfg = json.loads(config.model_dump_json())
    return {
        "schema": "xaudit.manifest/1",
        "run_id": run_id,
        "created_utc": started.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": verdict,
        "config": cfg,
        "config_sha256": sha256_json(cfg),
        "model": card.to_dict(),
        "data": data,
        "seeds": {"run": config.seed, "bootstrap": config.seed, "attribution": config.seed},
        "prefect_flow_run_id": flow_run_id,
        "device": device,
        "libraries": library_versions(),
        # the reports come after this manifest (the PDF embeds it); seal_manifest adds their hashes
        "artifacts": {k: v for k, v in artifact_hashes(run_dir).items() if k not in REPORTS},
        "files": file_hashes(run_dir),
    }


def build_review_manifest(review_dir: str | Path, run_id: str, config: ReviewConfig, verdict: str, started: str,
                          flow_run_id: str | None) -> dict[str, Any]:
    """Return the review manifest: config, both audits' manifests by hash, every review artifact's hash."""
    rd = Path(review_dir)
    cfg = json.loads(config.model_dump_json())
    audits = {role: json.loads((rd / role / "manifest.json").read_text()) for role in ("baseline", "candidate")}
    return {
        "schema": "xaudit.review-manifest/1", "run_id": run_id, "created_utc": started,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "verdict": verdict,
        "config": cfg, "config_sha256": sha256_json(cfg), "prefect_flow_run_id": flow_run_id,
        "models": {role: m["model"] for role, m in audits.items()},
        "data": audits["baseline"]["data"],
        "audits": {role: {"run_id": m["run_id"], "manifest_sha256": sha256_file(rd / role / "manifest.json")}
                   for role, m in audits.items()},
        "libraries": library_versions(),
        "artifacts": {k: v for k, v in artifact_hashes(rd, REVIEW_ARTIFACTS).items() if k not in REPORTS},
    }


def run_summary(run_dir: str | Path, run_id: str, kind: str = "audit") -> tuple[str, list[dict[str, Any]], Path]:
    """Return what a run publishes to Prefect: a markdown summary (verdict, failed checks), the overall and
    per-slice rows of its key metrics, and the path of its HTML report."""
    import pandas as pd
    rd = Path(run_dir).resolve()
    validation = json.loads((rd / "validation.json").read_text())
    failed = [c for c in validation["checks"] if c["status"] != "PASS"]
    lines = [f"# xaudit {kind} {run_id}: **{validation['verdict']}**", "",
             f"{validation['counts']['PASS']} checks passed, {validation['counts']['WARN']} warnings, "
             f"{validation['counts']['FAIL']} failed.", ""]
    lines += [f"- **{c['status']}** {c['message']}" for c in failed[:20]]
    if len(failed) > 20:
        lines.append(f"- ... and {len(failed) - 20} more in validation.json")
    t = pd.read_parquet(rd / ("metrics.parquet" if kind == "audit" else "review_metrics.parquet"))
    keep = ["accuracy", "f1_macro", "ece"] if kind == "audit" else ["delta.accuracy", "flip_to_wrong"]
    t = t[t.metric.isin(keep) & (t.sub_key == "")]

    def num(v: Any) -> float | None:
        return None if pd.isna(v) else round(float(v), 4)
    rows = [{"slice": "overall" if r.slice_key == "overall" else f"{r.slice_key}={r.slice_value}",
             "metric": r.metric, "n": int(r.n), "value": num(r.value), "ci_low": num(r.ci_low),
             "ci_high": num(r.ci_high)} for r in t.itertuples()]
    return "\n".join(lines), rows, rd / ("report.html" if kind == "audit" else "review.html")


def _embedded_files(pdf: Path) -> dict[str, bytes]:
    """Return the files embedded in a PDF (name -> bytes); empty when it cannot be read."""
    from pypdf import PdfReader
    try:
        return {name: data[0] for name, data in PdfReader(str(pdf)).attachments.items() if data}
    except Exception:  # a damaged PDF is reported by its hash; here it just anchors nothing
        return {}


def verify_run(run_dir: str | Path) -> list[str]:
    """Return the problems found checking a run (or review) directory against its manifest (empty when intact).

    Checked: every artifact and every file under inputs/ and parts/ against its sha256 (and files there that
    the manifest does not list); the manifest's own config hash and its verdict against validation.json;
    and the manifest itself against the copy embedded in the PDF report (the manifest as it was before
    the reports, plus their hashes), together with the PDF's embedded tables. A review also checks both of
    its audits (their manifests by the hashes the review manifest records, then each audit in full).
    Without signatures this cannot stop someone who rewrites every file consistently (the PDF included);
    it does catch any edit of one file, the manifest's verdict among them."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise XAuditError(f"verify: {str(run_dir)!r} must be a run directory with a manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"manifest.json: not valid JSON ({exc})"]
    if not isinstance(manifest, dict):
        return ["manifest.json: not a JSON object"]
    problems = []
    listed: dict[str, Any] = {}
    for section in ("artifacts", "files"):
        entries = manifest.get(section, {})
        if not isinstance(entries, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                                    for v in entries.values()):
            problems.append(f"manifest.json: '{section}' must map file names to {{sha256, bytes}}")
            continue
        listed.update(entries)
    root = run_dir.resolve()
    for name, info in listed.items():
        path = run_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root):
            problems.append(f"manifest.json: lists {name!r}, which is outside the run directory")
            continue
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != info.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (modified after the run)")
    if isinstance(manifest.get("files"), dict):
        for name in file_hashes(run_dir):
            if name not in manifest["files"]:
                problems.append(f"{name}: not in the manifest (added after the run)")
    if manifest.get("config_sha256") != sha256_json(manifest.get("config")):
        problems.append("manifest.json: 'config' does not match its 'config_sha256' (edited after the run)")
    validation = run_dir / "validation.json"
    if validation.is_file():
        try:
            recorded = json.loads(validation.read_text()).get("verdict")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if recorded != manifest.get("verdict"):
            problems.append(f"manifest.json: verdict {manifest.get('verdict')!r} differs from validation.json's "
                            f"{recorded!r}")
    pdfs = [run_dir / n for n in ("report.pdf", "review.pdf") if (run_dir / n).is_file()]
    for pdf in pdfs:
        embedded = _embedded_files(pdf)
        if "manifest.json" not in embedded:
            problems.append(f"{pdf.name}: carries no manifest.json to check the manifest against")
            continue
        try:
            inside = json.loads(embedded["manifest.json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"{pdf.name}: its embedded manifest.json is not valid JSON")
            continue
        expected = unsealed(manifest)
        if inside != expected:
            diff = sorted(k for k in set(inside) | set(expected) if inside.get(k) != expected.get(k))
            problems.append(f"manifest.json: differs from the manifest embedded in {pdf.name} in {diff} "
                            f"(edited after the report was made)")
        for name, data in embedded.items():
            if name != "manifest.json" and (run_dir / name).is_file() and (run_dir / name).read_bytes() != data:
                problems.append(f"{name}: differs from the copy embedded in {pdf.name}")
    audits = manifest.get("audits") or {}
    for role, info in (audits.items() if isinstance(audits, dict) else []):
        if role not in ("baseline", "candidate") or not isinstance(info, dict):
            problems.append(f"manifest.json: 'audits' holds {str(role)[:60]!r}; a review has baseline and candidate")
            continue
        sub = run_dir / role
        if not (sub / "manifest.json").is_file():
            problems.append(f"{role}/manifest.json: missing")
            continue
        if sha256_file(sub / "manifest.json") != info.get("manifest_sha256"):
            problems.append(f"{role}/manifest.json: sha256 differs from the review manifest")
        problems += [f"{role}/{p}" for p in verify_run(sub)]
    return problems

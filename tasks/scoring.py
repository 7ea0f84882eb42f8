"""Score one input shard: decode, predict, attribute, summarise explanations; write three Parquet parts.

Per example and method the explanations table keeps summary statistics and a low-resolution heatmap; the
statistics are computed on the full-resolution display heatmap.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import progress, stopping
from .attribution import attribute, display_heatmap
from .attribution.engine import example_keys
from .config import AuditConfig
from .data import decode_batches, decode_shard, rejects_table, shard_rows
from .io import write_parquet
from .models import ModelCard, use_channels_last
from .quality import QualityContext, quality_columns, run_checks

@dataclass(frozen=True)
class ShardOutput:
    predictions: str
    explanations: str
    rejects: str
    n_scored: int
    n_rejected: int
    # where the shard's time went (not part of any table): each method's passes, the quality checks, and
    # the time the model waited for decoding (near zero when decoding overlaps compute)
    method_seconds: dict[str, float]
    quality_seconds: float
    decode_wait_seconds: float


def _list_column(values: np.ndarray, dtype=np.float32) -> pa.Array:
    """Return an (n, k) array as a fixed-size list<dtype>[k] column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(dtype)), values.shape[1])


def quantize_heatmap(maps: np.ndarray) -> np.ndarray:
    """Return [0, 1] heatmaps as uint8 (value = round(255 * map)); 4x smaller than float32, and display
    heatmaps carry no meaning below 1/255 of their own maximum."""
    return np.rint(np.clip(maps, 0, 1) * 255).astype(np.uint8)


def non_finite_rows(res) -> dict[int, tuple[str, str]]:
    """Return {row: (stage, reason)} for the rows of a batch whose logits (stage 'predict') or whose
    attributions of some method (stage 'attribute') are not all finite."""
    bad: dict[int, tuple[str, str]] = {}
    finite = torch.isfinite(res.logits).all(1)
    for j in torch.nonzero(~finite).flatten().tolist():
        bad[j] = ("predict", "the model returned non-finite logits (NaN or inf) for this image")
    for method, raw in sorted(res.attributions.items()):
        ok = torch.isfinite(raw.flatten(1)).all(1)
        for j in torch.nonzero(~ok).flatten().tolist():
            bad.setdefault(j, ("attribute", f"{method} gave non-finite attributions (NaN or inf)"))
    return bad


def score_shard(shard: str | Path, card: ModelCard, config: AuditConfig, model: torch.nn.Module,
                device: torch.device, out_dir: str | Path) -> ShardOutput:
    """Score one input shard and write `predictions`, `explanations` and `rejects` parts under `out_dir`.

    Batches are decoded by threads ahead of the model (`decode_batches`), so decoding overlaps the passes."""
    out_dir = Path(out_dir)
    name = Path(shard).stem
    spec = config.attribution
    size = (spec.heatmap_size, spec.heatmap_size)
    # Every per-example result goes straight into arrays sized for the whole shard, allocated once: kept as
    # small per-batch arrays, they sat between each batch's freed tens of MB in the heap and pinned it, so
    # resident memory grew ~45 MB per batch of 16 at 224² (benchmarks/README, end_to_end.py)
    capacity = shard_rows(shard)
    stat_columns = quality_columns(config.quality.checks)
    n_methods = len(spec.methods)
    probs = np.zeros((capacity, card.num_classes))
    labels = np.zeros(capacity, dtype=np.int64)
    cols = {"target": np.zeros(capacity * n_methods, np.int64),
            **{k: np.full(capacity * n_methods, np.nan) for k in (
                "attribution_sum", "attribution_abs_sum", "completeness_delta", *stat_columns)}}
    heat = np.zeros((capacity * n_methods, size[0] * size[1]), np.uint8)
    ids_all: list[str] = []
    expl_ids: list[str] = []
    expl_methods: list[str] = []
    meta_parts = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if spec.autocast and device.type == "cuda" \
        else contextlib.nullcontext()
    cuda = device.type == "cuda"
    decode_rejects: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []      # rows dropped after decoding (non-finite logits or attributions)
    method_seconds: dict[str, float] = {m: 0.0 for m in spec.methods}
    quality_seconds = wait_seconds = 0.0
    memory_format = None
    batches = decode_batches(shard, card, config.data, spec.batch_size, prefetch=config.data.prefetch,
                             workers=config.data.decode_workers, pin=cuda)
    batch_no = 0
    while True:
        t0 = time.perf_counter()
        decoded = next(batches, None)
        wait_seconds += time.perf_counter() - t0
        if decoded is None:
            break
        batch_no += 1
        decode_rejects += decoded.rejects
        progress.advance("scoring", len(decoded.example_ids) + len(decoded.rejects))
        if not decoded.example_ids:
            meta_parts.append(decoded.metadata)
            continue
        stopping.check(f"shard {name}, batch {batch_no}")
        if memory_format is None:
            channels_last = use_channels_last(model, decoded.inputs[:2].to(device), spec.channels_last)
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
        inputs = decoded.inputs.to(device, non_blocking=cuda).contiguous(memory_format=memory_format)

        def attribute_rows(rows: list[int]):
            x = inputs[rows].contiguous(memory_format=memory_format) if len(rows) < len(inputs) else inputs
            target = decoded.labels[rows].to(device) if spec.target == "label" else "predicted"
            # random draws per example id: an example's explanation does not depend on its shard or batch
            keys = example_keys([decoded.example_ids[i] for i in rows])
            clean = None
            if not isinstance(autocast, contextlib.nullcontext):
                with torch.no_grad():      # predictions in full precision: only the attribution passes run in bf16
                    clean = model(x).float()
            with autocast:
                res = attribute(model, x, spec.methods, target=target, params=spec.params,
                                target_layer=card.target_layer, seed=config.seed, logits=clean, example_keys=keys,
                                max_batch=max(spec.max_batch, spec.batch_size), max_elements=spec.max_elements)
            for m, sec in res.seconds.items():
                method_seconds[m] += sec
            return x, keys, res

        rows = list(range(len(decoded.example_ids)))
        x, keys, res = attribute_rows(rows)
        while bad := non_finite_rows(res):
            # a NaN/inf row is rejected and the others explained again without it (a batch equals row by row,
            # so they get what they would have got); rows only shrink, so this ends
            rejects += [{"example_id": decoded.example_ids[rows[j]], "stage": stage, "reason": reason}
                        for j, (stage, reason) in sorted(bad.items())]
            rows = [r for j, r in enumerate(rows) if j not in bad]
            if not rows:
                break
            x, keys, res = attribute_rows(rows)
        meta_parts.append(decoded.metadata.take(pa.array(rows, type=pa.int64())))
        if not rows:
            continue
        ids = [decoded.example_ids[i] for i in rows]
        at = len(ids_all)
        ids_all += ids
        labels[at:at + len(rows)] = decoded.labels[rows].numpy()
        probs[at:at + len(rows)] = torch.softmax(res.logits.double(), 1).cpu().numpy()
        roi = decoded.roi[rows].to(device) if decoded.roi is not None else None
        maps = {m: display_heatmap(raw, card.input_size) for m, raw in res.attributions.items()}

        def explain_all(methods: list[str], xs: torch.Tensor, ts: torch.Tensor, keys: list[int] | None = None):
            return attribute(model, xs, methods, target=ts, params={m: spec.params.get(m, {}) for m in methods},
                             target_layer=card.target_layer, seed=config.seed, max_batch=spec.max_batch,
                             max_elements=spec.max_elements, example_keys=keys).attributions

        def explain(method: str, xs: torch.Tensor, ts: torch.Tensor, keys: list[int] | None = None):
            return explain_all([method], xs, ts, keys)[method]
        qctx = QualityContext(model, x, res.target, res.attributions, maps, roi, explain,
                              max_batch=spec.max_batch, seed=config.seed, keys=keys, explain_all=explain_all,
                              logits=res.logits)
        t0 = time.perf_counter()
        with autocast:
            quality = run_checks(qctx, config.quality.checks, config.quality.params)
        if cuda:
            torch.cuda.synchronize(device)
        quality_seconds += time.perf_counter() - t0
        for method, raw in res.attributions.items():
            k = len(rows)
            at = len(expl_ids)
            part = slice(at, at + k)
            heat[part] = quantize_heatmap(display_heatmap(raw, size).cpu().numpy().reshape(k, -1))
            flat = raw.flatten(1).double()
            cols["target"][part] = res.target.cpu().numpy()
            cols["attribution_sum"][part] = flat.sum(1).cpu().numpy()
            cols["attribution_abs_sum"][part] = flat.abs().sum(1).cpu().numpy()
            delta = res.extras[method].get("delta")
            if delta is not None:
                cols["completeness_delta"][part] = delta.double().cpu().numpy()
            for (m, col), v in quality.items():
                if m in (method, None):
                    cols[col][part] = v
            expl_ids += ids
            expl_methods += [method] * k
    rejects = decode_rejects + rejects
    n = len(ids_all)
    probs, labels = probs[:n], labels[:n]
    pred = probs.argmax(1) if n else np.zeros(0, dtype=np.int64)
    names = np.array(card.class_names)
    scored_ids = ids_all
    metadata = pa.concat_tables(meta_parts)
    predictions = pa.table({
        "example_id": pa.array(scored_ids, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "label_name": pa.array(names[labels] if n else [], pa.string()),
        "prediction": pa.array(pred, pa.int64()),
        "prediction_name": pa.array(names[pred] if n else [], pa.string()),
        "confidence": pa.array(probs.max(1) if n else [], pa.float64()),
        "correct": pa.array(pred == labels, pa.bool_()),
        "probabilities": _list_column(probs.reshape(n, card.num_classes)),
        "shard": pa.array([name] * n, pa.string()),
    })
    for col in metadata.column_names:
        predictions = predictions.append_column(col, metadata[col])
    m = len(expl_ids)
    explanations = pa.table({
            "example_id": pa.array(expl_ids, pa.string()),
            "method": pa.array(expl_methods, pa.string()),
            "target": pa.array(cols["target"][:m], pa.int64()),
            "attribution_sum": pa.array(cols["attribution_sum"][:m], pa.float64()),
            "attribution_abs_sum": pa.array(cols["attribution_abs_sum"][:m], pa.float64()),
            "completeness_delta": pa.array(cols["completeness_delta"][:m], pa.float64(), from_pandas=True),
            **{k: pa.array(cols[k][:m], pa.float64(), from_pandas=True) for k in stat_columns},
            "heatmap_height": pa.array(np.full(m, size[0]), pa.int32()),
            "heatmap_width": pa.array(np.full(m, size[1]), pa.int32()),
            "heatmap": _list_column(heat[:m], np.uint8),
        })
    out = ShardOutput(
        predictions=str(write_parquet(out_dir / f"{name}.predictions.parquet", predictions)),
        explanations=str(write_parquet(out_dir / f"{name}.explanations.parquet", explanations)),
        rejects=str(write_parquet(out_dir / f"{name}.rejects.parquet", rejects_table(rejects))),
        n_scored=n,
        n_rejected=len(rejects),
        method_seconds=method_seconds,
        quality_seconds=quality_seconds,
        decode_wait_seconds=wait_seconds,
    )
    return out


def cost_per_image(shard_outputs: list[dict]) -> dict:
    """Return {'images', 'methods': {method: seconds per image}, 'quality', 'decode_wait'} over the shards
    scored in this run (not those reused from a cache: they cost nothing now)."""
    fresh = [s for s in shard_outputs if not s.get("cached") and "method_seconds" in s]
    n = sum(s["n_scored"] for s in fresh)
    per = (lambda v: v / n) if n else (lambda v: 0.0)
    methods: dict[str, float] = {}
    for s in fresh:
        for m, sec in s["method_seconds"].items():
            methods[m] = methods.get(m, 0.0) + sec
    return {"images": n, "methods": {m: per(v) for m, v in methods.items()},
            "quality": per(sum(s["quality_seconds"] for s in fresh)),
            "decode_wait": per(sum(s["decode_wait_seconds"] for s in fresh))}


def sanity_check(shard: str | Path, card: ModelCard, config: AuditConfig, model: torch.nn.Module,
                 device: torch.device, out_path: str | Path) -> Path:
    """Run the model-randomisation check on the first `quality.sanity_images` images of `shard`; write Parquet."""
    from .quality import randomisation_check
    decoded = decode_shard(shard, card, config.data)
    spec = config.attribution
    x = decoded.inputs[:config.quality.sanity_images].to(device)
    # the layout the shard tasks chose (remembered per model): a run whose shards all came from the cache
    # never ran them, and the maps must not depend on that
    if len(x) and use_channels_last(model, x[:2], spec.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():          # not inference_mode: the target indexes logits later saved for backward
        target = model(x).argmax(1)

    def maps_of(m: torch.nn.Module, xs: torch.Tensor, ts: torch.Tensor) -> dict[str, torch.Tensor]:
        res = attribute(m, xs, spec.methods, target=ts, params=spec.params, target_layer=card.target_layer,
                        seed=config.seed, max_batch=spec.max_batch, max_elements=spec.max_elements)
        return {k: display_heatmap(v, card.input_size) for k, v in res.attributions.items()}
    table = randomisation_check(model, x, list(spec.methods), maps_of, target, seed=config.seed,
                                depths=config.quality.sanity_depths)
    table.insert(0, "n_images", len(x))
    return write_parquet(out_path, pa.Table.from_pandas(table, preserve_index=False))


def slice_permutation(shards: list[str], card: ModelCard, config: AuditConfig, model: torch.nn.Module,
                      device: torch.device, out_path: str | Path, predictions: str | Path) -> Path:
    """Permutation importance of grid regions for overall and each single-column slice; writes Parquet.

    The examples and their slice columns are those of `predictions` (predictions.parquet: the scored rows,
    with label_name and confidence besides the metadata), so every slice an audit reports can be permuted.
    Only the images some slice uses (its first `max_images` rows) are kept: the shards are decoded one at a
    time, so memory is bounded by one shard plus those images, not by the audit's size."""
    import pyarrow.parquet as pq
    from .metrics import slice_groups
    from .outputs import sliceable_columns
    from .permutation import permutation_importance
    spec = config.permutation
    preds = pq.read_table(predictions)
    ids = preds["example_id"].to_pylist()
    metadata = preds.select(sliceable_columns(preds.column_names)).to_pandas()
    slices = [s for s in config.metrics.slices if len(s) <= 1]
    full = {(k, v): idx[:spec.max_images] for k, v, idx in slice_groups(metadata, slices)}
    needed = sorted({int(i) for idx in full.values() for i in idx})          # rows of predictions.parquet
    where = {ids[i]: n for n, i in enumerate(needed)}
    kept: dict[int, torch.Tensor] = {}
    for s in shards:
        if len(kept) == len(needed):
            break
        part = decode_shard(s, card, config.data)
        rows = [j for j, e in enumerate(part.example_ids) if e in where]
        for j in rows:
            kept[where[part.example_ids[j]]] = part.inputs[j]
        del part
    x = torch.stack([kept[n] for n in range(len(needed))]) if needed else torch.zeros(0)
    labels = torch.as_tensor(np.array(preds["label"].to_numpy()))[needed]     # a writable copy
    groups = {key: np.searchsorted(needed, idx) for key, idx in full.items()}
    channels_last = use_channels_last(model, x[:2].to(device), config.attribution.channels_last) if len(x) else False
    x = x.to(device).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    table = permutation_importance(model, x, labels.to(device), groups, grid=spec.grid, repeats=spec.repeats,
                                   seed=config.seed, max_batch=config.attribution.max_batch)
    return write_parquet(out_path, pa.Table.from_pandas(table, preserve_index=False))

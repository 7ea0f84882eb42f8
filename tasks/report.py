"""Render a run's report (HTML and PDF/A-3b) from its Parquet outputs and manifest; no recomputation.

Data-derived text (labels, metadata, ids) is escaped by Jinja's autoescaping; the PDF renderer may only
read the report's own inline `data:` URLs.
"""
from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape
from PIL import Image

from .errors import XAuditError
from .history import audit_name
from .io import atomic_path, write_bytes
from .metrics.probabilistic import ece_bins

# package data (templates/ installs as xaudit.templates): found the same way in a clone and in a wheel
TEMPLATES = Path(str(resources.files("xaudit.templates")))
KEY_METRICS = ("accuracy", "f1_macro", "auc_ovr_macro", "ece", "log_loss")
THUMB = 96
GALLERY = 2 * THUMB            # the gallery's pixels: shown at THUMB in the card, enlarged on click in the HTML


def environment() -> Environment:
    """Return the Jinja environment: autoescaping on, undefined variables an error."""
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2", "svg"],
                      default=True), undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda x, d=3: fixed(x, d)
    env.filters["signed"] = lambda x, d=3: fixed(x, d, signed=True)
    env.filters["pct"] = lambda x: "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"
    env.filters["wbr"] = breakable
    env.filters["wrap_long"] = long_words
    return env


def breakable(name: Any) -> Markup:
    """`name` (escaped) with a line-break opportunity after each '.', '_', '&', '=' and '/': a long metric,
    method, class or slice name ('integrated_gradients.abs_completeness_delta') wraps inside its table cell
    instead of widening the table past the page, and short words keep their width."""
    parts = re.split(r"(?<=[._&=/])", "" if name is None else str(name))       # break after, escape each part
    return Markup('<span class="name">' + "<wbr>".join(str(escape(p)) for p in parts) + "</span>")


def long_words(text: Any, longest: int = 24) -> Markup:
    """`text` (escaped) with line-break opportunities inside each word longer than `longest` characters only:
    after its '.', '_', '&', '=', '/' and '-', and every 16 characters of a stretch without them (a slice value
    such as 'clinic_042_extremely_long_identifier...' in a check's reason wraps in its cell instead of widening
    the table past the page; numbers and ordinary words are left whole)."""
    out = []
    for token in re.split(r"(\s+)", "" if text is None else str(text)):
        if len(token) <= longest or token.isspace():
            out.append(str(escape(token)))
            continue
        pieces = []
        for part in re.split(r"(?<=[._&=/-])", token):
            pieces += [part[i:i + 16] for i in range(0, len(part), 16)] or [""]
        out.append("<wbr>".join(str(escape(p)) for p in pieces))
    return Markup("".join(out))


def fixed(x: Any, digits: int = 3, signed: bool = False) -> str:
    """x with `digits` decimals ('–' when missing or not finite); a value that rounds to zero prints as 0,
    never -0.000 (a difference of 1e-12 between two equal models is no sign)."""
    if x is None or (isinstance(x, (float, np.floating)) and not np.isfinite(x)):
        return "–"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    if float(text) == 0:
        text = ("+" if signed else "") + text.lstrip("+-")
    return text


# --- images ----------------------------------------------------------------------------------------------

def _colormap(v: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB with a perceptually ordered dark-blue -> yellow ramp (viridis-like, 5 anchors)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = np.clip(v, 0, 1) * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    f = (x - i)[..., None]
    return anchors[i] * (1 - f) + anchors[i + 1] * f


def png_data_uri(rgb: np.ndarray, allow_jpeg: bool = True) -> str:
    """Return a data URI for an RGB image: PNG, or JPEG (quality 88) when that is smaller — photographic
    overlays compress far better as JPEG, flat charts and masks as PNG."""
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    best, mime = buf.getvalue(), "image/png"
    if allow_jpeg and len(best) > 2048:
        jbuf = io.BytesIO()
        im.save(jbuf, format="JPEG", quality=88, optimize=True)
        if len(jbuf.getvalue()) < 0.8 * len(best):
            best, mime = jbuf.getvalue(), "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(best).decode()


def _image_rgb(data: bytes, size: int = THUMB) -> np.ndarray:
    """The image as (size, size, 3) floats in [0, 255]: a small image scaled up with crisp pixels (a 32x32
    digit), a larger one scaled down smoothly (a photo)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        kind = Image.NEAREST if max(im.size) <= size else Image.LANCZOS
        return np.asarray(im.resize((size, size), kind), dtype=np.float64)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """Return `heatmap` (h, w in [0, 1]) over an RGB `image` so it stays visible on any photo: the input in
    grey and dimmed (the map's colours never compete with an orange or brown photo), the map's colour with an
    opacity that grows with its magnitude (where the map is empty, the input shows), and a white outline
    around the map's strongest region (its values above half the maximum)."""
    size = image.shape[0]
    hm = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    grey = (0.25 + 0.5 * image.mean(-1, keepdims=True) / 255.0) * 255.0
    a = alpha * np.sqrt(np.clip(hm, 0, 1))[..., None]
    out = grey * (1 - a) + _colormap(hm) * a
    top = hm >= 0.5 * max(float(hm.max()), 1e-12)
    if top.any() and not top.all():
        inner = top.copy()
        inner[1:-1, 1:-1] = top[1:-1, 1:-1] & top[:-2, 1:-1] & top[2:, 1:-1] & top[1:-1, :-2] & top[1:-1, 2:]
        out[top & ~inner] = 255.0
    return out


def overlay_uri(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.75) -> str:
    """Return a PNG data URI of `heatmap` (h, w in [0, 1]) blended over an RGB `image`."""
    return png_data_uri(overlay_rgb(image, heatmap, alpha))


def heatmap_uri(heatmap: np.ndarray, size: int = THUMB, smooth: bool = True) -> str:
    """Return a PNG data URI of a [0, 1] map, resized smoothly (pixel maps) or as crisp cells (region grids)."""
    hm = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR if smooth else Image.NEAREST))
    return png_data_uri(_colormap(hm / 255.0))


def colour_scale_uri(width: int = 160, height: int = 10) -> str:
    """Return a PNG data URI of the heatmaps' colour ramp, low (left) to high (right): the maps' legend."""
    ramp = _colormap(np.linspace(0, 1, width))[None].repeat(height, axis=0)
    return png_data_uri(ramp, allow_jpeg=False)


# --- charts ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    lo: float | None
    hi: float | None
    n: int
    flagged: bool


SEVERITY = ("WARN", "FAIL")


SHOWN_WARNINGS = 8      # warnings listed in a report's first table; the rest are counted there, listed later


def not_passed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that did not pass, FAILs first (then WARNs), each group in the validation's order."""
    bad = [c for c in checks if c["status"] != "PASS"]
    return [c for c in bad if c["status"] == "FAIL"] + [c for c in bad if c["status"] != "FAIL"]


def first_table(failed: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's first table (`first_table`: every FAIL and the first SHOWN_WARNINGS WARNs of `not_passed`'s
    list, FAILs first) and `more_warnings`, how many WARNs it leaves out: the failures are what a reader must
    see first, not under two dozen warnings."""
    fails = sum(c["status"] == "FAIL" for c in failed)
    shown = failed[:fails + SHOWN_WARNINGS]
    return dict(first_table=shown, more_warnings=len(failed) - len(shown))


def worst_status(failed: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Return {(slice_key, slice_value, metric): the worst status of its checks that did not pass}: a WARN is
    shown as a warning (amber), not as a failure (red)."""
    out: dict[tuple[str, str, str], str] = {}
    for c in failed:
        key = (c["slice_key"], c["slice_value"], c["metric"])
        if c["status"] in SEVERITY and SEVERITY.index(c["status"]) >= SEVERITY.index(out.get(key, "WARN")):
            out[key] = c["status"]
    return out


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def bar_chart(rows: pd.DataFrame, metric: str, flagged: dict[tuple[str, str, str], str], bounds=(0.0, 1.0)) -> dict[str, Any]:
    """Return the geometry of a horizontal bar chart of `metric` per slice with interval whiskers."""
    sub = rows[(rows.metric == metric) & (rows.sub_key == "") & ~rows.suppressed]
    lo_b = bounds[0]
    hi_b = bounds[1] if np.isfinite(bounds[1]) else max(1e-9, float(np.nanmax(sub.ci_high.fillna(sub.value))) * 1.1)
    vals = sub.value.to_numpy(dtype=float)
    if metric in ("accuracy", "f1_macro", "auc_ovr_macro", "precision_macro", "recall_macro") and len(vals):
        lo_b = max(0.0, np.floor((np.nanmin(sub.ci_low.fillna(sub.value)) - 0.05) * 10) / 10)
    labels = ["overall" if r.slice_key == "overall" else f"{r.slice_key}={r.slice_value}" for r in sub.itertuples()]
    # room on the left for the longest label (DejaVu Sans at 9 px: about 5.6 px a character), labels past 40
    # characters shortened with an ellipsis (the full one is the bar's tooltip)
    longest = max((len(_short(lb)) + len(f" (n={r.n})") for lb, r in zip(labels, sub.itertuples())), default=10)
    width, left, row_h = 540, int(min(300, max(80, 10 + 5.6 * longest))), 22

    def x(v):
        return left + (float(v) - lo_b) / (hi_b - lo_b) * (width - left - 55)    # room for the value label
    bars = []
    for i, (r, label) in enumerate(zip(sub.itertuples(), labels)):
        bars.append(dict(label=_short(label), full=label, y=10 + i * row_h, x0=x(lo_b), x1=x(r.value), value=r.value,
                         lo=None if pd.isna(r.ci_low) else x(r.ci_low), hi=None if pd.isna(r.ci_high) else x(r.ci_high),
                         n=r.n, flagged=flagged.get((r.slice_key, r.slice_value, metric))))
    span = hi_b - lo_b
    step = next((st for st in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10) if span / st <= 6), span / 5)
    ticks = [dict(x=x(t), label=f"{t:g}") for t in np.arange(np.ceil(lo_b / step) * step, hi_b + 1e-9, step)]
    return dict(metric=metric, bars=bars, width=width, height=30 + len(bars) * row_h, ticks=ticks, left=left)


PALETTE = ("#1d1d1f", "#3b6ea8", "#b3261e", "#2e7d32", "#8e44ad", "#e67e22", "#00838f", "#6d4c41")


def trend_chart(t: dict[str, Any], max_lines: int = 8) -> dict[str, Any] | None:
    """Return the geometry of a line chart of one metric over runs (history.trend): a line per slice (the
    first `max_lines`, overall first), x = run in time order, y = value."""
    runs = t["runs"]
    series = list(t["series"].items())[:max_lines]
    values = [v for _, vals in series for v in vals if v is not None and np.isfinite(v)]
    if len(runs) < 2 or not values:
        return None
    lo, hi = min(values), max(values)
    pad = max(0.01, (hi - lo) * 0.1)
    lo, hi = lo - pad, hi + pad
    width, height, left, right, top, bottom = 540, 170, 40, 130, 10, 30

    def x(i):
        return left + i / (len(runs) - 1) * (width - left - right)

    def y(v):
        return top + (hi - v) / (hi - lo) * (height - top - bottom)
    lines = []
    for k, (label, vals) in enumerate(series):
        pts = [(x(i), y(v)) for i, v in enumerate(vals) if v is not None and np.isfinite(v)]
        if pts:
            lines.append(dict(label=label, color=PALETTE[k % len(PALETTE)], last=pts[-1],
                              points=" ".join(f"{a:.1f},{b:.1f}" for a, b in pts), dots=pts))
    step = next((st for st in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10) if (hi - lo) / st <= 5),
                (hi - lo) / 4)
    yticks = [dict(y=y(v), label=f"{v:g}") for v in np.arange(np.ceil(lo / step) * step, hi, step)]
    xticks = [dict(x=x(i), label=str(i + 1)) for i in range(len(runs))]
    return dict(metric=t["metric"], width=width, height=height, lines=lines, yticks=yticks, xticks=xticks,
                left=left, right_edge=width - right, bottom=height - bottom,
                runs=[dict(n=i + 1, run_id=r, date=d) for i, (r, d) in enumerate(zip(runs, t["dates"]))])


def history_context(run_dir: Path, run_id: str, metrics: list[str], name: str) -> dict[str, Any] | None:
    """Return the "Since the last audit" section's content from the run's history.parquet (None without
    one: history off, or a run made before history existed)."""
    from . import history
    path = run_dir / history.SNAPSHOT
    if not path.is_file():
        return None
    table = pq.read_table(path)
    present = set(table.column("metric").to_pylist())
    metrics = [m for m in metrics if m in present]
    since = history.since_last(table, run_id, metrics)
    chart = trend_chart(history.trend(table, metrics[0])) if metrics else None
    return dict(name=name, since=since, chart=chart)


MAX_MATRIX_CLASSES = 30     # a larger confusion matrix is listed as its most frequent confusions instead
TOP_CONFUSIONS = 25
MAX_MAP_ROWS = 30           # mean-map tables show at most this many slice values or classes (the most frequent)


def confusion_chart(metrics: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """The overall confusion matrix as an SVG's cells; with more than `MAX_MATRIX_CLASSES` classes (an ImageNet
    model's 1,000 made a 100 MB chart of a million cells), the `TOP_CONFUSIONS` most frequent confusions as a
    table instead (`pairs`): the whole matrix stays in metrics.parquet."""
    cm = metrics[(metrics.slice_key == "overall") & (metrics.metric == "confusion")]
    k = len(class_names)
    index = {c: i for i, c in enumerate(class_names)}
    if k > MAX_MATRIX_CLASSES:
        pairs = [(sub.split("->", 1), float(v)) for sub, v in zip(cm.sub_key, cm.value)]
        per_label = {}
        for (t, _), v in pairs:
            per_label[t] = per_label.get(t, 0.0) + v
        off = sorted(((v, t, p) for (t, p), v in pairs if t != p and v > 0), key=lambda r: (-r[0], index[r[1]], index[r[2]]))
        rows = [dict(label=t, prediction=p, count=int(v), share=v / per_label[t] if per_label[t] else 0.0)
                for v, t, p in off[:TOP_CONFUSIONS]]
        return dict(k=k, pairs=rows, n_confused=len(off), errors=int(sum(v for v, _, _ in off)))
    counts = np.zeros((k, k))
    for sub, v in zip(cm.sub_key, cm.value):
        t, p = sub.split("->", 1)
        counts[index[t], index[p]] = v
    row = counts.sum(1, keepdims=True)
    share = np.divide(counts, row, out=np.zeros_like(counts), where=row > 0)
    cell = max(14, min(28, 300 // max(k, 1)))
    names = [_short(n, 24) for n in class_names]
    # the row labels' width and the rotated column labels' height come from the longest name (about 5.6 px
    # a character at 9 px), so ordinary class names are neither clipped nor run together
    pad = int(min(150, max(24, 12 + 5.6 * max((len(n) for n in names), default=1))))
    top = 20
    cells = [dict(x=pad + j * cell, y=top + i * cell, count=int(counts[i, j]), shade=float(share[i, j]),
                  dark=share[i, j] > 0.5) for i in range(k) for j in range(k)]
    return dict(pairs=None, cells=cells, cell=cell, names=names, full=list(class_names), k=k, pad=pad, top=top,
                width=pad + k * cell + 10, height=top + k * cell + int(pad * 0.75) + 10)


def calibration_chart(pred: pd.DataFrame, bins: int = 10) -> dict[str, Any]:
    conf = pred.confidence.to_numpy()
    correct = pred.correct.to_numpy().astype(float)
    b = ece_bins(conf, bins)
    pts = []
    for i in range(bins):
        m = b == i
        if m.any():
            pts.append(dict(x=30 + conf[m].mean() * 220, y=250 - correct[m].mean() * 220, n=int(m.sum()),
                            r=2 + 6 * np.sqrt(m.sum() / len(conf))))
    return dict(points=pts)


# --- gallery ---------------------------------------------------------------------------------------------

def _load_images(run_dir: Path, ids: list[str], id_col: str, image_col: str) -> dict[str, bytes]:
    shards = sorted((run_dir / "inputs").glob("shard-*.parquet"))
    if not shards or not ids:
        return {}
    table = ds.dataset([str(s) for s in shards], format="parquet").to_table(
        columns=[id_col, image_col], filter=pc.field(id_col).isin(ids))
    return dict(zip(table[id_col].to_pylist(), table[image_col].to_pylist()))


def empty_map(heatmap: np.ndarray) -> bool:
    """True for a stored map that is zero everywhere (e.g. Grad-CAM's ReLU of a class the last layer finds no
    positive evidence for): it has no ROI mass, and its caption says 'empty map'."""
    return not bool(np.asarray(heatmap).max() > 0)


def flagged_method(failed: list[dict[str, Any]], methods: list[str], score: dict[str, float]) -> str | None:
    """The method the pictures should follow: the one named by the first check that did not pass (an
    explanation check, '<method>.<statistic>'), else the one with the lowest `score` (e.g. its mean ROI mass)."""
    for c in failed:
        m = c["metric"].split(".", 1)[0]
        if m in methods and "." in c["metric"]:
            return m
    finite = {m: v for m, v in score.items() if m in methods and np.isfinite(v)}
    return min(finite, key=lambda m: (finite[m], m)) if finite else (methods[0] if methods else None)


def gallery(run_dir: Path, pred: pd.DataFrame, expl: pd.DataFrame, slice_col: str | None, per_slice: int,
            id_col: str, image_col: str, failed: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Return, per value of `slice_col` (or overall), examples with an overlay per method: the most
    confident correct, the most confident misclassified, and the least aligned with the region of interest
    by the method the checks flag (else the least aligned method overall)."""
    if per_slice == 0:
        return []
    methods = sorted(expl.method.unique())
    has_roi = "roi_mass" in expl and expl.roi_mass.notna().any()
    score = expl.groupby("method").roi_mass.mean().to_dict() if has_roi else {}
    named = [c for c in failed or [] if c["metric"].endswith("roi_mass") or c["kind"] in ("hotspot", "roi_gap")]
    first = flagged_method(named, methods, score)
    roi = expl[expl.method == first].set_index("example_id").roi_mass if first and has_roi \
        else pd.Series(dtype=float)
    aligned = f"least aligned with ROI ({first})"
    groups = pred.groupby(slice_col, sort=True) if slice_col else [("all", pred)]
    chosen: list[tuple[str, list[tuple[str, str]]]] = []
    for value, g in groups:
        picks: list[tuple[str, str]] = []
        right = g[g.correct].sort_values("confidence", ascending=False)
        wrong = g[~g.correct].sort_values("confidence", ascending=False)
        align = roi.reindex(g.example_id).dropna().sort_values()
        quota = {"most confident correct": max(1, per_slice // 4), "misclassified": max(1, per_slice // 2),
                 aligned: max(1, per_slice // 4)}
        for why, ids in (("most confident correct", right.example_id), ("misclassified", wrong.example_id),
                         (aligned, align.index)):
            for e in list(ids):
                if sum(1 for _, w in picks if w == why) >= quota[why] or len(picks) >= per_slice:
                    break
                if e not in {p for p, _ in picks}:
                    picks.append((e, why))
        chosen.append((str(value), picks))
    wanted = [e for _, picks in chosen for e, _ in picks]
    images = _load_images(run_dir, wanted, id_col, image_col)
    heat = expl[expl.example_id.isin(wanted)].set_index(["example_id", "method"])
    info = pred.set_index("example_id")
    out = []
    for value, picks in chosen:
        items = []
        for e, why in picks:
            if e not in images:
                continue
            base = _image_rgb(images[e], GALLERY)
            row = info.loc[e]
            overlays = []
            for m in methods:
                if (e, m) in heat.index:
                    h = heat.loc[(e, m)]
                    hm = np.asarray(h.heatmap, dtype=float).reshape(int(h.heatmap_height), int(h.heatmap_width)) / 255.0
                    overlays.append(dict(method=m, uri=overlay_uri(base, hm), empty=empty_map(hm),
                                         roi_mass=None if pd.isna(getattr(h, "roi_mass", np.nan)) else float(h.roi_mass)))
            items.append(dict(example_id=e, why=why, label=row.label_name, prediction=row.prediction_name,
                              confidence=float(row.confidence), correct=bool(row.correct),
                              image=png_data_uri(base), overlays=overlays))
        out.append(dict(slice_value=value, examples=items))
    return out


def mean_maps(pred: pd.DataFrame, expl: pd.DataFrame, slice_col: str | None) -> list[dict[str, Any]]:
    """Return the mean heatmap per value of `slice_col` (a metadata column, or 'label_name' for the true
    class) and method, each rescaled to its own maximum; for at most `MAX_MAP_ROWS` values, the most frequent
    (each dict says how many values there were: `of`)."""
    if expl.empty:
        return []
    key = pred.set_index("example_id")[slice_col] if slice_col else pd.Series("all", index=pred.example_id)
    e = expl.assign(slice_value=key.reindex(expl.example_id).to_numpy())
    sizes = e.drop_duplicates("example_id").slice_value.astype(str).value_counts()
    kept = set(sorted(sizes.index, key=lambda v: (-sizes[v], v))[:MAX_MAP_ROWS])
    e = e[e.slice_value.astype(str).isin(kept)]
    out = []
    for (value, method), g in e.groupby(["slice_value", "method"], sort=True):
        h, w = int(g.heatmap_height.iloc[0]), int(g.heatmap_width.iloc[0])
        m = np.stack(g.heatmap.to_numpy()).astype(float).mean(0).reshape(h, w)   # mean of maps scaled 0-255
        out.append(dict(slice_value=str(value), method=method, uri=heatmap_uri(m / max(m.max(), 1e-12)), n=len(g),
                        of=len(sizes)))
    return out


def method_agreement(pred: pd.DataFrame, expl: pd.DataFrame, slice_col: str | None,
                     block: int = 1024) -> list[dict[str, Any]]:
    """Return the mean Spearman rank correlation of the stored heatmaps between each pair of methods, per slice
    (computed in blocks of examples, so memory does not grow with the audit)."""
    from .quality.agreement import rank_correlation
    methods = sorted(expl.method.unique())
    if len(methods) < 2:
        return []
    maps = {m: expl[expl.method == m].set_index("example_id").heatmap for m in methods}
    ids = pred.example_id.to_numpy()
    labels = pred[slice_col].astype(str).to_numpy() if slice_col else np.full(len(ids), "all")
    out = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            rho = np.concatenate([
                rank_correlation(np.stack(maps[a].reindex(ids[s:s + block]).to_numpy()),
                                 np.stack(maps[b].reindex(ids[s:s + block]).to_numpy()))
                for s in range(0, len(ids), block)]) if len(ids) else np.zeros(0)
            for value in sorted(set(labels)):
                r = rho[(labels == value) & np.isfinite(rho)]
                out.append(dict(pair=f"{a} vs {b}", slice_value=value, rho=float(r.mean()) if len(r) else float("nan")))
    return out


def _outline(rgb: np.ndarray, box: tuple[int, int, int], grid: int, colour=(255, 60, 60)) -> np.ndarray:
    """Return `rgb` (S, S, 3) with the outline of a (row, col, side) box of a `grid`-cell map drawn on it."""
    out = rgb.copy()
    size = out.shape[0]
    r0, c0, b = box
    y0, x0 = int(r0 * size / grid), int(c0 * size / grid)
    y1, x1 = min(size, int(np.ceil((r0 + b) * size / grid))) - 1, min(size, int(np.ceil((c0 + b) * size / grid))) - 1
    for t in range(2):
        out[max(0, y0 - t), x0:x1 + 1] = out[min(size - 1, y1 + t), x0:x1 + 1] = colour
        out[y0:y1 + 1, max(0, x0 - t)] = out[y0:y1 + 1, min(size - 1, x1 + t)] = colour
    return out


def shortcut_context(run_dir: Path, pred: pd.DataFrame, expl: pd.DataFrame, cfg: dict[str, Any],
                     card: dict[str, Any], checks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the shortcut scan for the report: per method its trust and largest lift, and per shortcut
    candidate (a hotspot check that did not pass) the class's mean map and its examples with the box drawn."""
    path = run_dir / "shortcuts.parquet"
    if not path.is_file():
        return None
    from .metrics import slice_groups
    from .shortcuts import box_words
    t = pq.read_table(path).to_pandas()
    if "kind" not in t.columns:                       # a run written before the shape-free scan
        t["kind"] = "box"
    size = card["input_size"]
    methods = []
    for method, g in t[t.kind == "box"].groupby("method", sort=True):
        top = g.loc[g.lift.idxmax()] if len(g) else None
        methods.append(dict(method=method, trust=g.trust.iloc[0], trusted=bool(g.trusted.iloc[0]),
                            top=None if top is None else dict(
                                where=f"class {top.class_name}" + ("" if top.slice_key == "overall"
                                                                   else f", {top.slice_key}={top.slice_value}"),
                                lift=float(top.lift), lo=float(top.ci_low), hi=float(top.ci_high),
                                share=float(top.share), box=box_words(top, int(top.grid), *size))))
    bad = [c for c in checks if c["kind"] in ("hotspot", "hotspot_cells") and c["status"] != "PASS"]
    candidates = []
    heat = expl.set_index(["example_id", "method"])
    info = pred.set_index("example_id")
    for c in bad:
        method = c["metric"].split(".", 1)[0]
        cls, _, value = c["slice_value"].partition("&")
        key = c["slice_key"].partition("&")[2] or "overall"
        kind = "cells" if c["kind"] == "hotspot_cells" else "box"
        match = t[(t.method == method) & (t.class_name == cls) & (t.slice_key == key) & (t.slice_value == value)
                  & (t.kind.isin(["cells", "cluster"]) if kind == "cells" else t.kind == "box")]
        if kind == "cells" and c.get("value") is not None:     # the row the check reports: its share is its value
            match = match.iloc[np.argsort(np.abs(match.share.to_numpy() - float(c["value"])), kind="stable")]
        if match.empty:
            continue
        r = match.iloc[0]
        box = (int(r.row), int(r.col), int(r.window) or max(int(r.height), int(r.width)))
        group = expl[(expl.method == method) & (expl.target == int(r.class_index))]
        if key != "overall":
            idx = next((ix for k, v, ix in slice_groups(pred.reset_index(drop=True), [[key]]) if v == value), [])
            group = group[group.example_id.isin(set(pred.example_id.iloc[np.asarray(idx, dtype=int)]))]
        if kind == "cells" and r.kind == "cluster" and "members" in r.index and len(r.members):
            group = group[group.example_id.isin(set(r.members))]          # the cluster's maps, not the class's
        if group.empty:
            continue
        grid = int(r.grid)
        hh, ww = int(group.heatmap_height.iloc[0]), int(group.heatmap_width.iloc[0])
        mean = np.stack(group.heatmap.to_numpy()).astype(float).reshape(len(group), hh, ww).mean(0)
        mean_rgb = np.asarray(Image.fromarray(np.uint8(255 * mean / max(mean.max(), 1e-12))).resize(
            (THUMB * 2, THUMB * 2), Image.BILINEAR), dtype=float) / 255
        mean_uri = png_data_uri(_outline(_colormap(mean_rgb), box, grid), allow_jpeg=False)
        images = _load_images(run_dir, list(r.examples)[:6], cfg["data"]["id_column"], cfg["data"]["image_column"])
        examples = []
        for e in list(r.examples)[:6]:
            if e not in images or (e, method) not in heat.index:
                continue
            base = _image_rgb(images[e])
            hm = heat.loc[(e, method)]
            m = np.asarray(hm.heatmap, dtype=float).reshape(int(hm.heatmap_height), int(hm.heatmap_width)) / 255.0
            examples.append(dict(example_id=e, label=info.loc[e, "label_name"],
                                 prediction=info.loc[e, "prediction_name"],
                                 image=png_data_uri(_outline(base, box, grid)),
                                 overlay=png_data_uri(_outline(overlay_rgb(base, m), box, grid))))
        candidates.append(dict(method=method, status=c["status"], message=c["message"], mean=mean_uri,
                               where=f"class {cls}" + ("" if key == "overall" else f", {key}={value}"),
                               examples=examples, n=len(group)))
    meta = pq.read_schema(path).metadata or {}
    not_run = next((c["message"] for c in checks if c["metric"] == "shortcut_scan" and c["outcome"] == "not run"), None)
    return dict(methods=methods, candidates=candidates, max_lift=float(meta.get(b"max_lift", b"nan")),
                min_share=float(meta.get(b"min_share", b"nan")), not_run=not_run,
                properties=property_context(run_dir, checks))


def not_run_parts(run_dir: Path, cfg: dict[str, Any], checks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(what, why) for each part of the audit the configuration asks for that did not run: a skipped check is
    a visible state, never an empty section read as 'nothing found'."""
    out = []
    quality, data, shortcuts = cfg.get("quality") or {}, cfg.get("data") or {}, cfg.get("shortcuts") or {}
    roi = bool(data.get("roi_column"))
    wants_roi = [w for w, on in (("localisation statistics (ROI mass, pointing game)",
                                  "localisation" in (quality.get("checks") or [])),
                                 ("the per-class ROI-mass gap", shortcuts.get("enabled", True)
                                  and shortcuts.get("max_roi_gap") is not None)) if on]
    if wants_roi and not roi:
        out.append((" and ".join(wants_roi), "the data has no region-of-interest masks (set data.roi_column to a "
                    "column of mask images to run them)"))
    if int(quality.get("sanity_images", 0) or 0) > 0 and \
            not (run_dir / "sanity.parquet").is_file():
        out.append(("the model-randomisation check", "no sanity.parquet was written for this run"))
    for c in checks:
        if c.get("outcome") == "not run":
            out.append((c["metric"].replace("_", " "), c["message"]))
    if shortcuts.get("enabled", True) and shortcuts.get("properties") != [] and \
            not (run_dir / "properties.parquet").is_file():
        out.append(("the image-property screen", "this run predates it or did not write properties.parquet"))
    return out


def property_context(run_dir: Path, checks: list[dict[str, Any]], limit: int = 12) -> dict[str, Any] | None:
    """The map-free screen for the report: the properties screened, and the candidate rows (a property that
    alone tells a class apart), confirmed ones first, then tested, then by power; None when it did not run."""
    path = run_dir / "properties.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path).to_pandas()
    meta = pq.read_schema(path).metadata or {}
    names = [n for n in meta.get(b"properties", b"").decode().split(",") if n]
    cand = t[t.candidate.fillna(False).astype(bool)].assign(
        rank_confirmed=lambda d: d.confirmed.fillna(False).astype(bool),
        rank_tested=lambda d: d.effect.notna())
    cand = cand.sort_values(["rank_confirmed", "rank_tested", "power"], ascending=False, kind="stable")
    rows = [dict(where=f"{r.class_name}" + ("" if r.slice_key == "overall" else f", {r.slice_key}={r.slice_value}"),
                 property=r.property, power=float(r.power), lo=float(r.power_ci_low), hi=float(r.power_ci_high),
                 class_value=f"{r.class_value:.3g}", reference_value=f"{r.reference_value:.3g}",
                 effect=None if pd.isna(r.effect) else float(r.effect),
                 effect_lo=None if pd.isna(r.effect_ci_low) else float(r.effect_ci_low),
                 effect_hi=None if pd.isna(r.effect_ci_high) else float(r.effect_ci_high),
                 flip_rate=None if pd.isna(r.flip_rate) else float(r.flip_rate),
                 outcome="confirmed" if r.rank_confirmed else "not confirmed" if r.rank_tested else "not tested")
            for _, r in cand.head(limit).iterrows()]
    failed = [c for c in checks if c["kind"] == "property" and c["status"] != "PASS"]
    return dict(names=names, rows=rows, more=max(0, len(cand) - limit), n_candidates=len(cand),
                min_power=float(meta.get(b"min_power", b"nan")), checks=failed, screened=len(t))


# --- context and rendering -------------------------------------------------------------------------------

SCORECARD = (("deletion_auc", "deletion", "deletion_auc_random"), ("insertion_auc", "insertion", "insertion_auc_random"),
             ("max_sensitivity", "max-sensitivity", None), ("agreement", "agreement", None),
             ("roi_mass", "ROI mass", None), ("pointing_game", "pointing game", None))


def quality_context(run_dir: Path, scalar: pd.DataFrame, flagged: dict, cfg: dict[str, Any]) -> dict[str, Any]:
    """Return the scorecard (slice x method rows of quality columns, each with its random-order reference)
    and the sanity-check summary."""
    expl = scalar[scalar.metric.str.contains(".", regex=False)]
    methods = sorted({m.split(".", 1)[0] for m in expl.metric})
    present = {m.split(".", 1)[1] for m in expl.metric}
    columns = [(col, label) for col, label, _ in SCORECARD if col in present]
    rows = []
    for (key, value), g in expl.groupby(["slice_key", "slice_value"], sort=False):
        if g.suppressed.all():
            continue
        vals = {r.metric: r for r in g.itertuples()}
        for i, method in enumerate(methods):
            cells = {}
            for col, _, ref in SCORECARD:
                r = vals.get(f"{method}.{col}")
                if r is None or pd.isna(r.value):
                    continue
                ref_row = vals.get(f"{method}.{ref}") if ref else None
                cells[col] = dict(value=r.value, lo=r.ci_low, hi=r.ci_high,
                                  reference=None if ref_row is None else ref_row.value,
                                  bad=flagged.get((key, value, f"{method}.{col}")))
            rows.append(dict(slice="overall" if key == "overall" else f"{key}={value}", first=i == 0, method=method,
                             cells=cells, flagged=max((c["bad"] for c in cells.values() if c["bad"]),
                                                      key=SEVERITY.index, default=None)))
    sanity = None
    path = run_dir / "sanity.parquet"
    if path.is_file():
        from .quality.sanity import INSENSITIVE
        t = pq.read_table(path).to_pandas()
        last = t[t.step == t.step.max()]
        first = t[t.step == 1].set_index("method").spearman
        n_layers = int(t.n_layers.max()) if "n_layers" in t else int(t.step.max())
        sanity = dict(n_images=int(t.n_images.iloc[0]), n_steps=int(t.step.max()), n_layers=n_layers,
                      threshold=INSENSITIVE,
                      rows=[dict(method=r.method, first=float(first[r.method]), spearman=r.spearman, ssim=r.ssim,
                                 insensitive=bool(r.insensitive)) for r in last.itertuples()])
    radius = cfg.get("quality", {}).get("params", {}).get("stability", {}).get("radius", 0.02)
    return dict(scorecard=rows, scorecard_columns=columns, sanity=sanity, quality_radius=radius)


def permutation_maps(run_dir: Path) -> list[dict[str, Any]]:
    """Return one region-importance map per slice from permutation.parquet (absent: none); every map on one
    colour scale (0 to the largest drop), so slices compare."""
    path = run_dir / "permutation.parquet"
    if not path.is_file():
        return []
    t = pq.read_table(path).to_pandas()
    if t.empty:
        return []
    grid = int(t.row.max()) + 1
    top = max(float(t.importance.max()), 1e-9)
    out = []
    for (key, value), g in t.groupby(["slice_key", "slice_value"], sort=False):
        m = np.zeros((grid, grid))
        m[g.row.to_numpy(), g["col"].to_numpy()] = np.clip(g.importance.to_numpy() / top, 0, 1)
        best = g.loc[g.importance.idxmax()]
        out.append(dict(label="overall" if key == "overall" else f"{key}={value}", uri=heatmap_uri(m, smooth=False),
                        n=int(g.n.iloc[0]), accuracy=float(g.accuracy.iloc[0]), top_drop=float(best.importance),
                        top_cell=f"row {int(best.row) + 1}, column {int(best['col']) + 1}"))
    return out


def _read_finished(run_dir: Path, kind: str, tables: tuple[str, ...]) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    """Return the manifest, the validation result and the named Parquet tables of a finished run or review."""
    for name in ("manifest.json", "validation.json", *(f"{t}.parquet" for t in tables)):
        if not (run_dir / name).is_file():
            raise XAuditError(f"render: {str(run_dir)!r} must be a finished {kind} directory; {name} is missing")
    from .outputs import unsealed
    # the manifest as it was before the reports (the same on a re-rendering of a sealed run)
    return (unsealed(json.loads((run_dir / "manifest.json").read_text())),
            json.loads((run_dir / "validation.json").read_text()),
            {t: pq.read_table(run_dir / f"{t}.parquet").to_pandas() for t in tables})


def report_context(run_dir: str | Path, browse: bool = True) -> dict[str, Any]:
    """Return everything the templates need, read from the run directory only (`browse`: with the data of
    the interactive browsers, for the HTML file; the PDF has none)."""
    run_dir = Path(run_dir)
    manifest, validation, t = _read_finished(run_dir, "run", ("metrics", "predictions", "explanations", "rejects"))
    metrics, pred, expl, rejects = t["metrics"], t["predictions"], t["explanations"], t["rejects"]
    cfg = manifest["config"]
    card = manifest["model"]
    failed = not_passed(validation["checks"])
    flagged = worst_status(failed)
    slice_cols = [s for s in cfg["metrics"]["slices"] if len(s) == 1]
    slice_col = slice_cols[0][0] if slice_cols else None
    scalar = metrics[(metrics.sub_key == "") & (metrics.metric != "confusion")]
    slices = []
    for (key, value), g in scalar.groupby(["slice_key", "slice_value"], sort=False):
        vals = {r.metric: dict(value=r.value, lo=r.ci_low, hi=r.ci_high) for r in g.itertuples()}
        slices.append(dict(key=key, value=value, n=int(g.n.iloc[0]), suppressed=bool(g.suppressed.iloc[0]),
                           flagged={m: st for (k, v, m), st in flagged.items() if (k, v) == (key, value)},
                           metrics=vals))
        slices[-1]["status"] = max(slices[-1]["flagged"].values(), key=SEVERITY.index, default=None)
        slices[-1]["flagged_methods"] = {m.split(".", 1)[0] for m in slices[-1]["flagged"] if "." in m}
    from .metrics import METRICS
    expl_metrics = sorted(m for m in scalar.metric.unique() if "." in m)
    charts = [bar_chart(scalar, m, flagged, METRICS[m].bounds if m in METRICS else (0.0, 1.0))
              for m in ("accuracy", *[m for m in expl_metrics if m.endswith("roi_mass")]) if m in set(scalar.metric)]
    key_metrics = [m for m in KEY_METRICS if m in set(scalar.metric)]
    interval = validation.get("interval", {})
    methods = sorted(expl.method.unique())
    params = cfg["attribution"]["params"]
    shown_gallery = gallery(run_dir, pred, expl, slice_col, cfg["report"]["gallery_size"], cfg["data"]["id_column"],
                            cfg["data"]["image_column"], failed)
    shortcuts = shortcut_context(run_dir, pred, expl, cfg, card, validation["checks"])
    shown = {x["example_id"]: x["why"] for g in shown_gallery for x in g["examples"]}
    for c in (shortcuts or {}).get("candidates", []):
        for x in c["examples"]:
            shown.setdefault(x["example_id"], f"shortcut candidate ({c['method']})")
    return dict(
        title=cfg["report"]["title"], manifest=manifest, card=card, cfg=cfg, validation=validation,
        verdict=validation["verdict"], failed=failed, checks=validation["checks"],
        **first_table(failed), slices=slices,
        key_metrics=key_metrics, charts=charts, **quality_context(run_dir, scalar, flagged, cfg),
        confusion=confusion_chart(metrics, list(card["class_names"])), calibration=calibration_chart(pred),
        gallery=shown_gallery, shortcuts=shortcuts, colour_scale=colour_scale_uri(),
        not_run=not_run_parts(run_dir, cfg, validation["checks"]),
        **interactive(audit_browser(run_dir, manifest, pred, expl, scalar, validation["checks"], shown)
                      if browse else None),
        history=history_context(run_dir, manifest["run_id"],
                                list(dict.fromkeys([*key_metrics, *(t["metric"] for t in cfg["metrics"]["thresholds"])])),
                                audit_name((cfg.get("history") or {}).get("name"), cfg["report"]["title"])),
        permutation=permutation_maps(run_dir), mean_maps=mean_maps(pred, expl, slice_col) if slice_col != "label_name" else [],     # not the class maps twice
        class_maps=mean_maps(pred, expl, "label_name"),
        map_methods=sorted(expl.method.unique()), agreement=method_agreement(pred, expl, slice_col),
        slice_col=slice_col, methods=[dict(name=m, params=params.get(m, {})) for m in methods],
        metric_names=sorted(m for m in scalar.metric.unique()),
        interval=interval, rejects=rejects.to_dict("records"), n_scored=len(pred),
        n_rejected=len(rejects), suppressed=[s for s in slices if s["suppressed"]],
        report=cfg["report"], artifacts=manifest.get("artifacts", {}),
    )


# --- the interactive browsers (HTML only) ------------------------------------------------------------------

def _maps_by_example(expl: pd.DataFrame, ids: list[str], stat: str | None = None) -> dict[str, dict[str, Any]]:
    """Return {example_id: {method: (overlay data URI, stat value, whether the map is empty: `empty_map`)}} for
    `ids` from an explanations table."""
    from .browser import map_png
    sub = expl[expl.example_id.isin(ids)]
    out: dict[str, dict[str, Any]] = {}
    for r in sub.itertuples():
        hm = np.asarray(r.heatmap, dtype=np.uint8).reshape(int(r.heatmap_height), int(r.heatmap_width))
        value = getattr(r, stat, None) if stat else None
        out.setdefault(r.example_id, {})[r.method] = (map_png(hm), None if value is None or pd.isna(value) else float(value),
                                                      empty_map(hm))
    return out


def audit_browser(run_dir: Path, manifest: dict[str, Any], pred: pd.DataFrame, expl: pd.DataFrame,
                  scalar: pd.DataFrame, checks: list[dict[str, Any]], shown: dict[str, str]) -> dict[str, Any]:
    """Return the data of the audit report's slice and example browsers: every slice with every metric and its
    checks; the examples the report shows (`shown`: id -> why) and a bounded sample, with each method's map."""
    from . import browser as B
    cfg = manifest["config"]
    metrics = B.metric_names(scalar, checks)
    keys, member = B.slice_memberships(pred, cfg["metrics"]["slices"])
    fields, meta = B.filter_fields(pred, [("label", "true class"), ("prediction", "prediction"), ("outcome", "outcome")],
                                   keys)
    position = {e: i for i, e in enumerate(pred.example_id)}
    ids = B.pick_examples(list(shown), pred.example_id.tolist(), manifest["run_id"])
    images = _load_images(run_dir, ids, cfg["data"]["id_column"], cfg["data"]["image_column"])
    stat = "roi_mass" if "roi_mass" in expl and expl.roi_mass.notna().any() else None
    maps = _maps_by_example(expl, ids, stat)
    info = pred.set_index("example_id")
    methods = sorted(expl.method.unique())
    rows = []
    for e in ids:
        if e not in images:
            continue
        r = info.loc[e]
        per = maps.get(e, {})
        f = B.row_fields({"label": str(r.label_name), "prediction": str(r.prediction_name),
                          "outcome": "correct" if r.correct else "misclassified"}, member[position[e]], r, meta)
        rows.append(dict(id=e, caption=f"label {r.label_name} → {r.prediction_name} ({float(r.confidence):.2f})",
                         wrong=not bool(r.correct), why=shown.get(e, ""), f=f,
                         image=B.thumbnail_uri(images[e], B.BROWSER_THUMB),
                         maps={m: [per[m][0]] for m in methods if m in per},
                         stat={m: per[m][1] for m in methods if m in per},
                         empty=[m for m in methods if m in per and per[m][2]]))
    return dict(kind="audit", metrics=metrics, default_metric=B.default_metric(checks, metrics, "accuracy"),
                thresholds=B.thresholds(checks), slices=B.slice_rows(scalar, checks),
                examples=B.examples_block(rows, fields, methods, [""], len(pred), len(shown), "ROI mass" if stat else None,
                                          "scored examples"))


def review_browser(rd: Path, manifest: dict[str, Any], examples: pd.DataFrame, drift: pd.DataFrame,
                   scalar: pd.DataFrame, checks: list[dict[str, Any]], shown: list[str]) -> dict[str, Any]:
    """Return the data of the review's browsers: per slice every delta, flip and drift statistic with both
    models' values; the examples the review shows, then the flips, then a bounded sample, each with the
    baseline's and the candidate's map per method side by side."""
    from . import browser as B
    cfg = manifest["config"]
    names = manifest["models"]["baseline"]["class_names"]
    metrics = B.metric_names(scalar, checks)
    keys, member = B.slice_memberships(examples, cfg["metrics"]["slices"])
    fields, meta = B.filter_fields(examples, [("label", "true class"), ("prediction", "candidate prediction"),
                                              ("outcome", "candidate outcome"), ("flip", "flip")], keys)
    position = {e: i for i, e in enumerate(examples.example_id)}
    flips = examples.example_id[examples.flip_any].tolist()
    first = list(dict.fromkeys([*shown, *B.sample_order(flips, manifest["run_id"])[:B.SAMPLE_EXAMPLES]]))
    ids = B.pick_examples(first, examples.example_id.tolist(), manifest["run_id"])
    images = _load_images(rd / "baseline", ids, cfg["data"]["id_column"], cfg["data"]["image_column"])
    maps = {role: _maps_by_example(pq.read_table(rd / role / "explanations.parquet").to_pandas(), ids)
            for role in ("baseline", "candidate")}
    corr = drift.set_index(["example_id", "method"]).rank_corr.to_dict()
    methods = sorted(drift.method.unique())
    info = examples.set_index("example_id")
    rows = []
    for e in ids:
        if e not in images:
            continue
        r = info.loc[e]
        bp, cp = names[int(r.baseline_prediction)], names[int(r.candidate_prediction)]
        flip = "to wrong" if r.flip_to_wrong else "to right" if r.flip_to_right else "other change" if r.flip_any \
            else "no change"
        f = B.row_fields({"label": str(r.label_name), "prediction": cp,
                          "outcome": "correct" if r.candidate_correct else "misclassified", "flip": flip},
                         member[position[e]], r, meta)
        rows.append(dict(id=e, caption=f"label {r.label_name} · baseline → {bp} · candidate → {cp} · {flip}",
                         wrong=not bool(r.candidate_correct), why="most changed map" if e in shown else
                         ("prediction flipped" if r.flip_any else ""), f=f,
                         image=B.thumbnail_uri(images[e], B.BROWSER_THUMB),
                         maps={m: [maps[role].get(e, {}).get(m, (None,))[0] for role in ("baseline", "candidate")]
                               for m in methods},
                         stat={m: corr.get((e, m)) for m in methods},
                         role_caption=[f"predicts {bp}", f"predicts {cp}"]))
    return dict(kind="review", metrics=metrics, default_metric=B.default_metric(checks, metrics, "delta.accuracy"), thresholds=B.thresholds(checks),
                slices=B.slice_rows(scalar, checks, extra=("baseline", "candidate")),
                examples=B.examples_block(rows, fields, methods, ["baseline", "candidate"], len(examples), len(first),
                                          "rank correlation", "compared examples",
                                          "the review shows or whose prediction flipped"))


def interactive(data: dict[str, Any] | None) -> dict[str, Any]:
    """Return the template variables of the interactive layer: the data as safe JSON, the script and the CSP
    that admits it (or, for the PDF, none of them and the CSP without scripts)."""
    from . import browser as B
    if data is None:
        return dict(browser_json=None, browser_script=None, csp=B.csp(None))
    code = B.script()
    return dict(browser_json=B.embed_json(data), browser_script=code, csp=B.csp(code))


def render_html(run_dir: str | Path, browse: bool = True) -> str:
    """Return the report as one self-contained HTML document (`browse`: with its interactive browsers)."""
    return environment().get_template("report.html.j2").render(**report_context(run_dir, browse))


def _documents(template: str, context: dict[str, Any], formats: tuple[str, ...]) -> dict[str, str]:
    """Return {format: document} for the `formats` asked: the HTML file's from `context`, the PDF's from the
    same context without the script, its data or a CSP that admits a script."""
    tpl = environment().get_template(template)
    out = {}
    if "html" in formats:
        out["html"] = tpl.render(**context)
    if "pdf" in formats:
        out["pdf"] = tpl.render(**{**context, **interactive(None)})
    return out


class DataOnlyFetcher:
    """A WeasyPrint URL fetcher that serves only `data:` URLs and records every other URL it refused."""

    def __init__(self) -> None:
        from weasyprint.urls import URLFetcher
        self._inner = URLFetcher(allowed_protocols={"data"}, fail_on_errors=False)
        self._fail_on_errors = False
        self.refused: list[str] = []

    def __call__(self, url: str, *args, **kwargs):
        if not url.startswith("data:"):
            self.refused.append(url)
            raise ValueError(f"xaudit reports load only inline data: URLs; refused {url[:80]!r}")
        return self._inner(url, *args, **kwargs)


def render_pdf(html: str, path: str | Path, attachments: list[tuple[str, bytes]],
               fetcher: DataOnlyFetcher | None = None, when: datetime | None = None) -> Path:
    """Write `html` as a PDF/A-3b file with `attachments` (name, bytes) embedded, dated `when` (default now:
    give the run's time, so a re-rendering writes the same bytes); returns the path."""
    import weasyprint
    fetcher = fetcher or DataOnlyFetcher()
    when = when or datetime.now(timezone.utc)
    files = [weasyprint.Attachment(string=data, name=name, description=f"xaudit evidence: {name}",
                                   relationship="Data", url_fetcher=fetcher, created=when, modified=when)
             for name, data in attachments]
    document = weasyprint.HTML(string=html, url_fetcher=fetcher).render()
    with atomic_path(path) as tmp:
        document.write_pdf(tmp, pdf_variant="pdf/a-3b", attachments=files, uncompressed_pdf=False)
    return Path(path)


def write_reports(directory: Path, stem: str, documents: dict[str, str], evidence: tuple[str, ...]) -> dict[str, str]:
    """Write `<stem>.html` and/or `<stem>.pdf` from `documents` ({format: HTML document}; the PDF with the
    `evidence` files embedded, manifest.json as it was before the reports, so a re-rendering embeds the same
    bytes); returns {format: path}."""
    from .outputs import json_bytes, unsealed
    out: dict[str, str] = {}
    if "html" in documents:
        out["html"] = str(write_bytes(directory / f"{stem}.html", documents["html"].encode()))
    if "pdf" in documents:
        manifest = unsealed(json.loads((directory / "manifest.json").read_text()))

        def content(name: str) -> bytes:
            return json_bytes(manifest) if name == "manifest.json" else (directory / name).read_bytes()
        # dated by the run (its manifest), not the clock: a re-rendering gives the same bytes
        when = datetime.fromisoformat(manifest.get("finished_utc") or manifest["created_utc"])
        out["pdf"] = str(render_pdf(documents["pdf"], directory / f"{stem}.pdf", [(n, content(n)) for n in evidence],
                                    when=when))
    return out


def render_report(run_dir: str | Path, formats: tuple[str, ...] = ("html", "pdf")) -> dict[str, str]:
    """Render report.html and/or report.pdf into the run directory; returns {format: path}."""
    run_dir = Path(run_dir)
    documents = _documents("report.html.j2", report_context(run_dir, browse="html" in formats), formats)
    return write_reports(run_dir, "report", documents, ("metrics.parquet", "validation.json", "manifest.json"))


# --- release review --------------------------------------------------------------------------------------

def review_context(review_dir: str | Path, examples_shown: int = 6, browse: bool = True) -> dict[str, Any]:
    """Return what the review template needs, read from the review directory and its two audits (`browse`:
    with the data of the interactive browsers)."""
    rd = Path(review_dir)
    manifest, validation, t = _read_finished(rd, "review", ("review_metrics", "review_examples", "review_drift"))
    table, examples, drift = t["review_metrics"], t["review_examples"], t["review_drift"]
    cfg = manifest["config"]
    failed = not_passed(validation["checks"])
    bad = worst_status(failed)
    scalar = table[table.sub_key == ""]

    def rows(prefix_metrics: list[str]) -> list[dict[str, Any]]:
        out = []
        for (key, value), g in scalar.groupby(["slice_key", "slice_value"], sort=False):
            cells = {}
            for m in prefix_metrics:
                r = g[g.metric == m]
                if len(r):
                    r = r.iloc[0]
                    cells[m] = dict(baseline=r.baseline, candidate=r.candidate, value=r.value, lo=r.ci_low,
                                    hi=r.ci_high, bad=bad.get((key, value, m)))
            out.append(dict(label="overall" if key == "overall" else f"{key}={value}", n=int(g.n.iloc[0]),
                            suppressed=bool(g.suppressed.iloc[0]), cells=cells))
        return out
    delta_metrics = [f"delta.{m}" for m in (*KEY_METRICS, *sorted({m[6:] for m in scalar.metric
                                                                    if m.startswith("delta.") and "." in m[6:]}))
                     if f"delta.{m}" in set(scalar.metric)]
    methods = sorted(drift.method.unique())
    drift_metrics = [f"{m}.{s}" for m in methods for s in ("rank_corr", "top10_overlap")]
    # most changed examples, side by side: by the method the failing checks name (else the one whose maps
    # changed most); where a check names a class (a shortcut box), among that class's examples
    gallery_items = []
    names = manifest["models"]["baseline"]["class_names"]
    if methods:
        pick = flagged_method(failed, methods, drift.groupby("method").rank_corr.mean().to_dict())
        pool = drift[drift.method == pick]
        named = next((c for c in failed if c["metric"].startswith(f"{pick}.") and c["slice_key"].startswith("class")), None)
        if named is not None:
            cls = named["slice_value"].split("&")[0]
            if cls in names:
                members = set(examples.example_id[examples.candidate_prediction == names.index(cls)])
                pool = pool[pool.example_id.isin(members)] if pool.example_id.isin(members).any() else pool
        first = pool.sort_values("rank_corr").head(examples_shown)
        ids = first.example_id.tolist()
        images = _load_images(rd / "baseline", ids, cfg["data"]["id_column"], cfg["data"]["image_column"])
        heat = {}
        for role in ("baseline", "candidate"):
            ex = pq.read_table(rd / role / "explanations.parquet").to_pandas()
            heat[role] = ex[ex.method == pick].set_index("example_id")
        info = examples.set_index("example_id")
        for e, rho in zip(ids, first.rank_corr):
            if e not in images:
                continue
            base = _image_rgb(images[e])
            overlays = []
            for role in ("baseline", "candidate"):
                h = heat[role].loc[e]
                hm = np.asarray(h.heatmap, dtype=float).reshape(int(h.heatmap_height), int(h.heatmap_width)) / 255.0
                overlays.append(dict(role=role, uri=overlay_uri(base, hm),
                                     prediction=names[int(info.loc[e, f"{role}_prediction"])],
                                     correct=bool(info.loc[e, f"{role}_correct"])))
            gallery_items.append(dict(example_id=e, label=info.loc[e, "label_name"], rho=float(rho),
                                      image=png_data_uri(base), overlays=overlays, method=pick))
    return dict(
        title=cfg["report"]["title"], manifest=manifest, cfg=cfg, validation=validation,
        verdict=validation["verdict"], failed=failed, checks=validation["checks"],
        **first_table(failed),
        regressed=list(dict.fromkeys("overall" if c["slice_key"] == "overall" else f"{c['slice_key']}={c['slice_value']}"
                                     for c in failed if c["status"] == "FAIL")),
        delta_metrics=delta_metrics, delta_rows=rows(delta_metrics),
        flip_rows=rows(["flip_any", "flip_to_wrong", "flip_to_right"]), drift_metrics=drift_metrics,
        drift_rows=rows(drift_metrics), drift_methods=methods, gallery=gallery_items, report=cfg["report"],
        interval=validation.get("interval", {}), n_examples=len(examples),
        models=manifest["models"], artifacts=manifest.get("artifacts", {}),
        **interactive(review_browser(rd, manifest, examples, drift, scalar, validation["checks"],
                                     [g["example_id"] for g in gallery_items]) if browse else None),
    )


def render_review(review_dir: str | Path, formats: tuple[str, ...] = ("html", "pdf")) -> dict[str, str]:
    """Render review.html and/or review.pdf into the review directory; returns {format: path}."""
    rd = Path(review_dir)
    documents = _documents("review.html.j2", review_context(rd, browse="html" in formats), formats)
    return write_reports(rd, "review", documents, ("review_metrics.parquet", "validation.json", "manifest.json"))

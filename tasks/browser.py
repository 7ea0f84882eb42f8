"""The report's interactive layer: the data its slice and example browsers need, embedded once as compact
JSON, the inline script that draws them, and the Content-Security-Policy that lets that script, and nothing
else, run.

The HTML report stays one offline file: the script is inlined and admitted by its SHA-256 hash, the data
sits in a `<script type="application/json">` block (never executed), every string from the data is put on the
page as text by the script (no HTML is parsed from it), and images are `data:` URLs only. The PDF is rendered
without any of it (PDF/A forbids scripts) and the page reads the same without JavaScript.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

SCRIPT_PATH = Path(str(resources.files("xaudit.templates"))) / "browser.js"   # package data
# examples embedded beyond those the report itself shows, and the bytes all embedded examples may take
SAMPLE_EXAMPLES = 240
EXAMPLE_BUDGET = 3_500_000
BASE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def script() -> str:
    """Return the browsers' script, exactly as it is inlined (the CSP's hash is of these characters)."""
    return SCRIPT_PATH.read_text(encoding="utf-8")


def csp(inline_script: str | None) -> str:
    """Return the report's Content-Security-Policy: nothing may load but inline `data:` images and the
    inline styles; with `inline_script`, that one script may run (by its hash), no other."""
    if inline_script is None:
        return BASE_CSP
    digest = base64.b64encode(hashlib.sha256(inline_script.encode("utf-8")).digest()).decode()
    return f"{BASE_CSP}; script-src 'sha256-{digest}'"


def _plain(x: Any) -> Any:
    """Return `x` with numpy scalars as Python numbers and NaN/inf as None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return round(x, 6) if math.isfinite(x) else None
    if x is pd.NA:
        return None
    return x


def embed_json(data: dict[str, Any]) -> str:
    """Return `data` as compact JSON that is safe inside a `<script type="application/json">` element: `<`,
    `>` and `&` are written as \\u escapes, so no string in the data can close the element or open a comment."""
    text = json.dumps(_plain(data), separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=False)
    for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, esc)
    return text


def _label(key: str, value: str) -> str:
    return "overall" if key == "overall" else f"{key}={value}"


def _checks(checks: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in checks:
        out.setdefault((c["slice_key"], c["slice_value"]), []).append(dict(
            metric=c["metric"], sub_key=c.get("sub_key") or "", status=c["status"], kind=c.get("kind"),
            gate_on=c.get("gate_on"), value=c.get("value"), bound=c.get("bound"), message=c.get("message") or ""))
    return out


def slice_rows(scalar: pd.DataFrame, checks: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Return one row per slice: its label, key, value, n, whether it is suppressed, every metric as
    [value, ci_low, ci_high, *extra] and the checks made on it (every status)."""
    by_slice = _checks(checks)
    rows = []
    for (key, value), g in scalar.groupby(["slice_key", "slice_value"], sort=False):
        m = {r["metric"]: [r["value"], r["ci_low"], r["ci_high"], *(r[c] for c in extra)]
             for r in g.to_dict("records")}
        rows.append(dict(label=_label(key, value), key=key, value=value, n=int(g.n.iloc[0]),
                         suppressed=bool(g.suppressed.iloc[0]), m=m, checks=by_slice.get((key, value), [])))
    # checks on slices the metrics table has no row for (the shortcut scan's class × slice cells): their own
    # statistic, interval and n (from the check's message), so a failing one is never missing here
    seen = {(r["key"], r["value"]) for r in rows}
    for c in checks:
        key, value = c["slice_key"], c["slice_value"]
        if (key, value) in seen:
            continue
        seen.add((key, value))
        own = [x for x in checks if (x["slice_key"], x["slice_value"]) == (key, value)]
        n = next((int(mt.group(1)) for x in own for mt in [re.search(r"\bn=(\d+)", x.get("message") or "")] if mt), None)
        rows.append(dict(label=_label(key, value), key=key, value=value, n=n, suppressed=False,
                         m={x["metric"]: [x.get("value"), x.get("ci_low"), x.get("ci_high"), *(None for _ in extra)]
                            for x in own if not x.get("sub_key")}, checks=by_slice[(key, value)]))
    return rows


def default_metric(checks: list[dict[str, Any]], metrics: list[str], fallback: str) -> str:
    """Return the metric the slice browser opens on: that of the first check that did not pass (what the
    verdict is about), else `fallback` where present, else the first."""
    failed = next((c["metric"] for c in checks if c["status"] != "PASS" and not c.get("sub_key")
                   and c["metric"] in metrics), None)
    return failed or (fallback if fallback in metrics else metrics[0])


def metric_names(scalar: pd.DataFrame, checks: list[dict[str, Any]]) -> list[str]:
    """Return every metric the slice browser can show: the table's and those only checks name."""
    return sorted(set(scalar.metric.unique()) | {c["metric"] for c in checks if not c.get("sub_key")})


def thresholds(checks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Return, per metric, the bounds its checks applied (lower or upper, and severity) for the chart's lines:
    taken from the checks themselves, so a change threshold on a review draws where it gated (its delta)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in checks:
        if c.get("sub_key") or c.get("kind") not in ("lower", "upper") or c.get("bound") is None:
            continue
        line = dict(lower=c["bound"] if c["kind"] == "lower" else None,
                    upper=c["bound"] if c["kind"] == "upper" else None, severity=c.get("severity", "fail"))
        if line not in out.setdefault(c["metric"], []):
            out[c["metric"]].append(line)
    return out


def map_png(heatmap_u8: np.ndarray) -> str:
    """Return a data URI of a stored heatmap (uint8, 0-255) as a greyscale PNG at its own resolution; the
    script colours it with the report's ramp (opacity growing with the value) and the browser scales it
    smoothly over the input. A quarter of the bytes of the coloured map."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(heatmap_u8), 0, 255).astype(np.uint8), "L").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(data: bytes, limit: int = 128) -> str:
    """Return a data URI of an input image as a square thumbnail of at most `limit` pixels a side (small
    inputs keep their own size, grey ones stay grey): PNG, or JPEG (quality 85) where that is smaller."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
        side = min(limit, max(im.size))
        im = im.resize((side, side), Image.BILINEAR if side < max(im.size) else Image.NEAREST)
        png = io.BytesIO()
        im.save(png, format="PNG", optimize=True)
        best, mime = png.getvalue(), "image/png"
        if len(best) > 2048:
            jpg = io.BytesIO()
            im.save(jpg, format="JPEG", quality=85, optimize=True)
            if len(jpg.getvalue()) < 0.8 * len(best):
                best, mime = jpg.getvalue(), "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(best).decode()


def sample_order(ids: list[str], seed: str) -> list[str]:
    """Return `ids` in a fixed pseudo-random order (by a hash of the run id and the example id), so the
    embedded sample is the same on every rendering and does not follow the data's order."""
    return sorted(ids, key=lambda e: hashlib.sha256(f"{seed}\0{e}".encode()).digest())


def pick_examples(selected: list[str], all_ids: list[str], seed: str, sample: int = SAMPLE_EXAMPLES) -> list[str]:
    """Return the examples to embed: those the report shows (`selected`, in order) and then up to `sample`
    others in a fixed random order."""
    chosen = list(dict.fromkeys(selected))
    seen = set(chosen)
    rest = [e for e in sample_order(all_ids, seed) if e not in seen]
    return chosen + rest[:sample]


def within_budget(rows: list[dict[str, Any]], budget: int = EXAMPLE_BUDGET) -> list[dict[str, Any]]:
    """Return the leading `rows` whose images fit in `budget` bytes (always at least one)."""
    out, used = [], 0
    for r in rows:
        size = len(r.get("image") or "") + sum(len(u or "") for maps in r.get("maps", {}).values() for u in maps)
        if out and used + size > budget:
            break
        out.append(r)
        used += size
    return out


BROWSER_THUMB = 128
FIXED_COLUMNS = {"example_id", "label", "label_name", "prediction", "prediction_name", "confidence", "correct",
                 "probabilities", "shard", "baseline_prediction", "candidate_prediction", "baseline_correct",
                 "candidate_correct", "flip_any", "flip_to_wrong", "flip_to_right"}
MAX_FIELD_VALUES = 60


def slice_memberships(frame: pd.DataFrame, specs: list[list[str]]) -> tuple[list[str], list[dict[str, str]]]:
    """Return the slice keys of `specs` (overall left out) and, per row of `frame`, {slice_key: slice_value}
    — computed over every row with the metrics' own slicing (quantile edges, bins, crosses, filters), so the
    example browser's slice filters name exactly the slices of the slice browser."""
    from .errors import XAuditError
    from .metrics import slice_groups
    from .outputs import sliceable_columns
    member: list[dict[str, str]] = [{} for _ in range(len(frame))]
    try:
        groups = slice_groups(frame[sliceable_columns(frame.columns)].reset_index(drop=True), [s for s in specs if s])
    except XAuditError:             # a slice column these rows lack: no slice filters rather than no report
        return [], member
    keys: list[str] = []
    for key, value, idx in groups:
        if key not in keys:
            keys.append(key)
        for i in idx:
            member[int(i)][key] = value
    return keys, member


def filter_fields(frame: pd.DataFrame, fixed: list[tuple[str, str]], slice_keys: list[str] = ()
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """Return the example browser's filters — `fixed` (id, label) first, then each slice key, then each other
    metadata column with at most MAX_FIELD_VALUES distinct values — and the metadata columns used."""
    meta = [c for c in frame.columns if c not in FIXED_COLUMNS and not c.startswith("_") and c not in slice_keys
            and frame[c].map(lambda v: isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_))
                             or v is None).all() and frame[c].nunique(dropna=False) <= MAX_FIELD_VALUES]
    fields = [dict(id=i, label=label, values=[]) for i, label in fixed]
    fields += [dict(id=f"slice:{k}", label=f"slice {k}", values=[]) for k in slice_keys]
    fields += [dict(id=f"meta:{c}", label=c, values=[]) for c in meta]
    return fields, meta


def fill_values(fields: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill each filter's values from the embedded rows (sorted), dropping filters with fewer than two."""
    for f in fields:
        f["values"] = sorted({r["f"][f["id"]] for r in rows if f["id"] in r["f"]})
    return [f for f in fields if len(f["values"]) > 1]


def _meta_value(v: Any) -> str:
    return "(missing)" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v)


def row_fields(fixed: dict[str, str], slices: dict[str, str], row: Any, meta: list[str]) -> dict[str, str]:
    """Return one example's filter values: `fixed` ones, its slice of each slice key, its metadata values."""
    return {**fixed, **{f"slice:{k}": v for k, v in slices.items()},
            **{f"meta:{c}": _meta_value(row[c]) for c in meta}}


def examples_block(rows: list[dict[str, Any]], fields: list[dict[str, Any]], methods: list[str], roles: list[str],
                   total: int, n_selected: int, stat: str | None, what: str,
                   selected: str = "the report shows") -> dict[str, Any]:
    """Return the example browser's data, bounded by EXAMPLE_BUDGET, with a note saying how many are embedded
    (the first `n_selected` rows are those `selected` describes)."""
    kept = within_budget(rows)
    shown = min(n_selected, len(kept))
    note = (f"{len(kept)} of the {total} {what} are embedded: the {shown} {selected} and "
            f"{len(kept) - shown} more in a fixed random order" + (" (the rest did not fit the report's size budget)"
                                                                    if len(kept) < len(rows) else "") + ".")
    if len(kept) >= total:
        note = f"All {total} {what} are embedded."
    return dict(total=total, embedded=len(kept), note=note, fields=fill_values(fields, kept), methods=methods,
                roles=roles, stat=stat, rows=kept)

"""The history of an audit's runs: one Parquet file per finished run in a folder (append-only: a run adds its
own file and never touches another's, so concurrent runs and object stores need no locking), read as one
dataset. Plain functions; Prefect never imported.

Each run's rows: its identity (run id, audit name, time, model name / version / weights hash, data
fingerprint, verdict) and every overall and per-slice scalar metric with its interval. Before the report is
rendered, the rows of the audit's earlier runs (the last `last_runs`) are copied into the run directory as
`history.parquet`, so the report's "Since the last audit" section reads only the run's own files (and an
archived run re-renders the same).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import XAuditError
from .io import write_parquet

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("audit", pa.string()), ("created_utc", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("weights_sha256", pa.string()),
    ("data_fingerprint", pa.string()), ("verdict", pa.string()),
    ("slice_key", pa.string()), ("slice_value", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int64()),
    ("suppressed", pa.bool_()),
])
SNAPSHOT = "history.parquet"
FOLDER = "_history"          # under output_dir; a leading underscore, which no run id may have


def folder_for(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Where an audit's history lives: `history.path`, else `<output_dir>/_history` (never a run directory)."""
    return Path(path) if path else Path(output_dir) / FOLDER


def audit_name(name: str | None, title: str) -> str:
    """Which audit a run belongs to: `history.name`, else the report title."""
    return name or title


def run_rows(run_dir: str | Path, audit: str, run_id: str, created_utc: str, card: dict[str, Any],
             data_fingerprint: str, verdict: str) -> pa.Table:
    """Return this run's history rows: every scalar metric of metrics.parquet (overall and per slice)."""
    m = pq.read_table(Path(run_dir) / "metrics.parquet").to_pandas()
    m = m[(m.sub_key == "") & m.value.notna()]
    n = len(m)
    return pa.table({
        "run_id": [run_id] * n, "audit": [audit] * n, "created_utc": [created_utc] * n,
        "model_name": [str(card.get("name"))] * n, "model_version": [str(card.get("version"))] * n,
        "weights_sha256": [str(card.get("weights_sha256"))] * n, "data_fingerprint": [data_fingerprint] * n,
        "verdict": [verdict] * n, "slice_key": m.slice_key.astype(str).tolist(),
        "slice_value": m.slice_value.astype(str).tolist(), "metric": m.metric.astype(str).tolist(),
        "value": m.value.astype(float).tolist(), "ci_low": m.ci_low.astype(float).tolist(),
        "ci_high": m.ci_high.astype(float).tolist(), "n": m.n.astype("int64").tolist(),
        "suppressed": m.suppressed.astype(bool).tolist(),
    }, schema=SCHEMA)


def history_files(folder: str | Path) -> list[Path]:
    """Return the history files in `folder` (none when it does not exist), each checked to be an xaudit
    history table by its schema alone; anything else there is an error naming the file."""
    folder = Path(folder)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise XAuditError(f"history: {f} is not a Parquet file ({str(exc)[:120]}); the history folder holds "
                              f"only the runs' history files") from None
        missing = [n for n in SCHEMA.names if n not in schema.names]
        if missing:
            raise XAuditError(f"history: {f} lacks the columns {missing}; it is not an xaudit history file")
        wrong = [f"{n} is {schema.field(n).type}, not {SCHEMA.field(n).type}" for n in SCHEMA.names
                 if schema.field(n).type != SCHEMA.field(n).type]
        if wrong:
            raise XAuditError(f"history: {f}: the column {wrong[0]}; it is not an xaudit history file (the "
                              f"history folder holds only the runs' history files)")
    return files


def read_history(folder: str | Path, audit: str | None = None) -> pa.Table:
    """Return every run's rows in the history folder (of one audit, when named), oldest run first."""
    files = history_files(folder)
    if not files:
        return SCHEMA.empty_table()
    try:
        table = ds.dataset([str(f) for f in files], format="parquet", schema=SCHEMA).to_table(
            filter=(pc.field("audit") == audit) if audit is not None else None)
    except (pa.ArrowException, OSError) as exc:      # a file whose schema reads but whose pages do not
        raise XAuditError(f"history: a file in {str(folder)!r} cannot be read ({type(exc).__name__}: "
                          f"{str(exc)[:160]}); the history folder holds only the runs' history files") from None
    return table.sort_by([("created_utc", "ascending"), ("run_id", "ascending")])


def snapshot(run_dir: str | Path, folder: str | Path, rows: pa.Table, audit: str, last_runs: int) -> Path:
    """Write `history.parquet` into the run directory: the rows of the audit's last `last_runs - 1` earlier
    runs and this run's; returns its path."""
    this = rows.column("run_id")[0].as_py() if len(rows) else None
    past = read_history(folder, audit)
    past = past.filter(pc.field("run_id") != this) if this is not None and len(past) else past
    ids = list(dict.fromkeys(past.column("run_id").to_pylist()))[-(last_runs - 1):]
    past = past.filter(pc.is_in(past.column("run_id"), pa.array(ids, pa.string()))) if ids else SCHEMA.empty_table()
    return write_parquet(Path(run_dir) / SNAPSHOT, pa.concat_tables([past, rows]))


def append(folder: str | Path, rows: pa.Table) -> Path | None:
    """Add a finished run's rows to the history folder as `<run_id>.parquet` (atomic; a rerun of the same run
    id replaces its own file with the same rows)."""
    if not len(rows):
        return None
    run_id = rows.column("run_id")[0].as_py()
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_parquet(Path(folder) / f"{run_id}.parquet", rows)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool | None:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (*a, *b)):
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def since_last(table: pa.Table, run_id: str, metrics: list[str]) -> dict[str, Any] | None:
    """Return the comparison of run `run_id` with the audit's previous run in `table` (history rows): per
    slice and metric the two values and intervals, the change and whether the intervals overlap; None when
    there is no earlier run."""
    df = table.to_pandas()
    order = list(dict.fromkeys(df.run_id))
    if run_id not in order or order.index(run_id) == 0:
        return None
    prev_id = order[order.index(run_id) - 1]
    cur, prev = df[df.run_id == run_id], df[df.run_id == prev_id]
    p = prev.iloc[0]
    c = cur.iloc[0]
    merged = cur.merge(prev, on=["slice_key", "slice_value", "metric"], suffixes=("", "_prev"))
    merged = merged[merged.metric.isin(metrics)]
    rows = []
    for r in merged.itertuples():
        ov = overlap((r.ci_low, r.ci_high), (r.ci_low_prev, r.ci_high_prev))
        rows.append(dict(slice="overall" if r.slice_key == "overall" else f"{r.slice_key}={r.slice_value}",
                         metric=r.metric, value=r.value, lo=r.ci_low, hi=r.ci_high, n=int(r.n),
                         prev=r.value_prev, prev_lo=r.ci_low_prev, prev_hi=r.ci_high_prev, n_prev=int(r.n_prev),
                         change=r.value - r.value_prev, overlap=ov,
                         suppressed=bool(r.suppressed or r.suppressed_prev)))
    rows.sort(key=lambda d: (d["slice"] != "overall", d["slice"], metrics.index(d["metric"])))
    return dict(previous=dict(run_id=prev_id, created_utc=p.created_utc, verdict=p.verdict,
                              model=f"{p.model_name} {p.model_version}", weights_sha256=p.weights_sha256,
                              data_fingerprint=p.data_fingerprint),
                same_model=p.weights_sha256 == c.weights_sha256, same_data=p.data_fingerprint == c.data_fingerprint,
                rows=rows, changed=[d for d in rows if d["overlap"] is False and not d["suppressed"]])


def trend(table: pa.Table, metric: str) -> dict[str, Any]:
    """Return, for `metric`, the runs in order and each slice's values over them (None where absent)."""
    df = table.to_pandas()
    df = df[df.metric == metric]
    runs = list(dict.fromkeys(df.run_id))
    series: dict[str, list[float | None]] = {}
    for (key, value), g in df.groupby(["slice_key", "slice_value"], sort=False):
        label = "overall" if key == "overall" else f"{key}={value}"
        by_run = dict(zip(g.run_id, g.value))
        series[label] = [by_run.get(r) for r in runs]
    dates = df.drop_duplicates("run_id").set_index("run_id").created_utc.to_dict()
    return dict(metric=metric, runs=runs, dates=[dates[r] for r in runs], series=series)


def format_history(table: pa.Table, metric: str, last: int = 10) -> str:
    """Return the text `xaudit history` prints: per slice, the metric over the last runs and the change."""
    t = trend(table, metric)
    runs = t["runs"][-last:]
    if not runs:
        return f"no runs with metric {metric!r} in the history"
    df = table.to_pandas().drop_duplicates("run_id").set_index("run_id")
    models = {r: f"{df.loc[r, 'model_name']} {df.loc[r, 'model_version']}" for r in runs}
    wide = max([len("model"), *(len(m) for m in models.values())])        # never cut a model's name or version
    head = [f"{'run':<28} {'time (UTC)':<26} {'model':<{wide}} verdict"]
    head += [f"{r:<28} {df.loc[r, 'created_utc']:<26} {models[r]:<{wide}} {df.loc[r, 'verdict']}" for r in runs]
    width = max([7, *(len(s) for s in t["series"])])
    lines = ["", f"{metric} per slice, oldest to newest run:",
             f"{'slice':<{width}}  " + "  ".join(f"{i + 1:>7}" for i in range(len(runs))) + "   last change"]
    for label, values in t["series"].items():
        vals = values[-len(runs):]
        cells = "  ".join(f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in vals)
        known = [v for v in vals if v is not None]
        change = f"{known[-1] - known[-2]:+.4f}" if len(known) >= 2 else "-"
        lines.append(f"{label:<{width}}  {cells}   {change}")
    return "\n".join(head + lines)


def history_names(table: pa.Table) -> dict[str, int]:
    df = table.to_pandas()
    return {name: int(g.run_id.nunique()) for name, g in df.groupby("audit")}

"""Prefect tasks: thin wrappers over the pure functions. Between tasks travel paths, small dicts and hashes.

This is the only module of `tasks` that imports Prefect.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.runtime import flow_run

from . import outputs, progress, report, storage
from . import preflight as checks
from .config import AuditConfig, ReviewConfig, new_run_id
from .data import REJECT_SCHEMA, ingest, shard_rows
from .devices import device_pool
from .errors import XAuditError
from .estimate import last_estimate
from .stopping import RunInterrupted
from .io import sha256_file, sha256_json, write_json
from .attribution import METHODS
from .attribution.engine import layer_name
from .models import ModelCard, cached_model, pick_device, probe_inputs
from .scoring import score_shard

CODE_VERSION = "xaudit-scoring/6"   # bump when scoring output changes, so cached shards are recomputed
def _retry_unless_input_error(task, task_run, state) -> bool:
    """Retry a failed task (an I/O error may pass), but never an input error: it would fail the same way."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the failure could not be read back: treat it as I/O
        return True
    return not isinstance(error, (XAuditError, RunInterrupted))


# on top of the store operations' own retries (tasks/storage.py: retrying): the whole step again, later
IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_input_error)


@task(name="prepare-run")
def prepare_run(config: AuditConfig) -> dict[str, str]:
    """Create the run directory; returns {run_id, run_dir, started}."""
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id()
    run_dir = Path(config.output_dir) / run_id
    (run_dir / "inputs").mkdir(parents=True, exist_ok=True)
    (run_dir / "parts").mkdir(exist_ok=True)
    outputs.clear_previous_outputs(run_dir)
    return {"run_id": run_id, "run_dir": str(run_dir), "started": started.isoformat(),
            "flow_run_id": str(flow_run.get_id()) if flow_run.get_id() else None}


@task(name="stage-output", **IO_RETRIES)
def stage_output(config: AuditConfig) -> dict[str, Any]:
    """For an `output_dir` URL: stage the run in a local folder (a named run and the history pulled from the
    store first); returns {config: the config writing to that folder, remote: the URL or None}."""
    if not storage.is_url(config.output_dir):
        return {"config": config, "remote": None}
    history = config.history.enabled and config.history.path is None
    local = storage.stage_run(str(config.output_dir), config.run_id, history)
    return {"config": config.model_copy(update={"output_dir": local}), "remote": str(config.output_dir)}


def shard_resources(config: AuditConfig):
    """The Dask annotation shard tasks carry: one `GPU` resource each when the audit runs on CUDA (start GPU
    workers with `--resources GPU=1`); nothing otherwise, and nothing under the thread runner."""
    from contextlib import nullcontext
    wants_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if not wants_gpu:
        return nullcontext()
    try:
        import dask
    except ImportError:
        return nullcontext()
    return dask.annotate(resources={"GPU": 1})


@task(name="share-inputs", **IO_RETRIES)
def share_inputs(run_dir: str, remote: str | None) -> int:
    """For an output_dir URL: upload the input shards, so workers that share only the store can read them."""
    if remote is None:
        return 0
    return storage.publish(Path(run_dir) / "inputs", storage.join(remote, Path(run_dir).name, "inputs"))


@task(name="share-files", **IO_RETRIES)
def share_files(run_dir: str, names: list[str], remote: str | None) -> None:
    """For an output_dir URL: upload these files of the flow's run folder, for tasks running elsewhere."""
    if remote is not None:
        storage.push_files([Path(run_dir) / n for n in names], storage.join(remote, Path(run_dir).name))


@task(name="collect-files", **IO_RETRIES)
def collect_files(run_dir: str, names: list[str], remote: str | None) -> None:
    """For an output_dir URL: bring these files, written by tasks elsewhere, into the flow's run folder."""
    if remote is not None:
        for n in names:
            storage.pull_matching(storage.join(remote, Path(run_dir).name), Path(run_dir), n)


@task(name="collect-parts", **IO_RETRIES)
def collect_parts(run_dir: str, shard_outputs: list[dict[str, Any]], remote: str | None) -> int:
    """For an output_dir URL: bring the parts workers uploaded into the flow's staging folder (those not here)."""
    if remote is None:
        return 0
    url = storage.join(remote, Path(run_dir).name, "parts")
    n = 0
    for s in shard_outputs:
        stem = Path(s["predictions"]).name.split(".", 1)[0]
        n += storage.pull_matching(url, Path(run_dir) / "parts", f"{stem}.")
    return n


@task(name="log-to-mlflow", **IO_RETRIES)
def log_to_mlflow(run_dir: str, run_id: str, config: AuditConfig, card: dict[str, Any], verdict: str) -> list[str]:
    """With `log_to_mlflow`: the verdict, overall key metrics and reports to the registered version's run."""
    if not config.log_to_mlflow:
        return []
    import pyarrow.parquet as pq
    from .registry import log_audit
    from .report import KEY_METRICS
    m = pq.read_table(Path(run_dir) / "metrics.parquet").to_pandas()
    overall = m[(m.slice_key == "overall") & (m.sub_key == "") & m.metric.isin(KEY_METRICS) & m.value.notna()]
    return log_audit(card["extra"]["registry"]["run_id"], run_dir, run_id, verdict,
                     dict(zip(overall.metric, overall.value)))


@task(name="publish-run", **IO_RETRIES)
def publish_run(run_id: str, config: AuditConfig, remote: str | None) -> str | None:
    """Upload a staged run to its `output_dir` URL (manifest.json last) and the history; returns its URL."""
    if remote is None:
        return None
    return storage.publish_run(remote, run_id, config.history.enabled and config.history.path is None)


@task(name="preflight")
def preflight(config: AuditConfig) -> dict[str, Any]:
    """Check the whole config, the model (a probe forward) and the data's schema before any work; returns the
    model card as a dict. Nothing is written."""
    from prefect.logging import get_run_logger
    done = checks.preflight_audit(config, load=cached_model)
    line = done.estimates["model"].line()
    get_run_logger().info(line)
    progress.note("estimate", line)
    return done.cards["model"].to_dict()


@task(name="preflight-review")
def preflight_review(config: ReviewConfig) -> dict[str, dict[str, Any]]:
    """Check a review config (both models, the data, every threshold) before any work; returns both cards."""
    return {role: c.to_dict() for role, c in checks.preflight_review(config, load=cached_model).cards.items()}


@task(name="ingest-data", **IO_RETRIES)
def ingest_data(config: AuditConfig, run_dir: str) -> dict[str, Any]:
    """Filter the dataset into input shards under the run; returns counts and the content fingerprint."""
    result = ingest(config.data, Path(run_dir) / "inputs", config.shard_size)
    progress.start("scoring", sum(shard_rows(s) for s in result.shards))
    return asdict(result)


def _loaded(card: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """Return the card's model on `device`, loaded once per process (weights read and hashed once)."""
    from .devices import replica
    return cached_model(ModelCard.from_dict(card), device, replica())


@task(name="score-shard", **IO_RETRIES)
def score(shard: str, card: dict[str, Any], config: AuditConfig, run_dir: str, remote: str | None = None
          ) -> dict[str, Any]:
    """Predict and attribute one input shard; reuses the shard's parts when its cache key matches.

    With `remote` (an output_dir URL) the worker shares nothing with the flow but the store: it pulls the input
    shard and any earlier parts of it into its own staging folder, scores there, and uploads the parts; the
    paths it returns are the flow's (`run_dir`), where `collect_parts` brings them."""
    if not remote:
        return _score_here(shard, card, config, run_dir)
    here_shard, here_run = storage.pull_shard(remote, run_dir, shard)
    out = _score_here(here_shard, card, config, here_run)
    return {**out, **storage.push_parts(remote, here_run, run_dir, out)}


def _score_here(shard: str, card: dict[str, Any], config: AuditConfig, run_dir: str) -> dict[str, Any]:
    parts = Path(run_dir) / "parts"
    # everything the shard's outputs depend on: a rerun with another card (classes, mean/std, input size,
    # preprocessing) or other quality checks must not reuse them; the weights by hash, not by path
    key = sha256_json({"shard": sha256_file(shard), "weights": card["weights_sha256"], "code": CODE_VERSION,
                       "card": {k: v for k, v in card.items() if k != "weights"},
                       "attribution": config.attribution.model_dump(),
                       "quality": config.quality.model_dump(exclude={"sanity_images", "sanity_depths"}),
                       "seed": config.seed,
                       "data": config.data.model_dump(include={"roi_column", "id_column", "image_column",
                                                               "label_column"})})
    key_file = parts / f"{Path(shard).stem}.key.json"
    if key_file.is_file():
        done = json.loads(key_file.read_text())
        # the parts by name in this run's folder: a key file written on another machine holds its paths
        done.update({k: str(parts / Path(done[k]).name) for k in ("predictions", "explanations", "rejects") if k in done})
        if done.get("key") == key and all(Path(done[k]).is_file() for k in ("predictions", "explanations", "rejects")):
            progress.advance("scoring", shard_rows(shard))
            return {**done, "cached": True, "seconds": 0.0}
    c = ModelCard.from_dict(card)
    t0 = time.perf_counter()
    with device_pool(config.device, config.tasks_per_device).acquire() as device:
        model = _loaded(card, device)
        out = asdict(score_shard(shard, c, config, model, device, parts))
    timing = {k: out.pop(k) for k in ("method_seconds", "quality_seconds", "decode_wait_seconds")}
    write_json(key_file, {**out, "key": key})       # the run's files do not depend on how long it took, or where
    return {**out, "key": key, "cached": False, "seconds": time.perf_counter() - t0, "device": str(device),
            "host": socket.gethostname(), **timing}


@task(name="sanity-check")
def sanity(shard: str, card: dict[str, Any], config: AuditConfig, run_dir: str,
           shard_outputs: list[dict[str, Any]] | None = None, remote: str | None = None) -> str:
    """Model-randomisation sanity check of every attribution method; writes sanity.parquet. Logs its cost
    estimate first, from the scoring's measured cost per image (`shard_outputs`). With `remote` it runs
    where the task lands on the shard pulled from the store, and uploads its table there."""
    if remote:
        here_shard, here = storage.pull_shard(remote, run_dir, shard)
        _sanity_here(here_shard, card, config, here, shard_outputs)
        storage.push_run_files(remote, here, run_dir, ["sanity.parquet"])
        return str(Path(run_dir) / "sanity.parquet")
    return _sanity_here(shard, card, config, run_dir, shard_outputs)


def _sanity_here(shard: str, card: dict[str, Any], config: AuditConfig, run_dir: str,
                 shard_outputs: list[dict[str, Any]] | None) -> str:
    from prefect.logging import get_run_logger

    from .quality.sanity import cascade, parameter_layers
    from .scoring import cost_per_image, sanity_check
    with device_pool(config.device, config.tasks_per_device).acquire() as device:
        model = _loaded(card, device)
        rounds = 1 + len(cascade(parameter_layers(model), config.quality.sanity_depths))
        images = min(config.quality.sanity_images, shard_rows(shard))
        cost = cost_per_image(shard_outputs or [])
        seconds = rounds * images * sum(cost["methods"].values())
        estimate = (f", about {seconds:.0f} s" if seconds >= 1 else ", under a second") if cost["images"] else ""
        text = (f"randomisation check: {images} images x {rounds} rounds (the original model and "
                f"{rounds - 1} depths of the cascade) of {', '.join(config.attribution.methods)}{estimate}")
        get_run_logger().info(text)
        progress.note("randomisation check", text)
        progress.start("randomisation check", rounds)
        # the cached model is safe here: the check randomises a deep copy, never the model itself
        return str(sanity_check(shard, ModelCard.from_dict(card), config, model, device,
                                Path(run_dir) / "sanity.parquet"))


@task(name="permutation-importance")
def permutation(shards: list[str], card: dict[str, Any], config: AuditConfig, run_dir: str,
                remote: str | None = None) -> str:
    """Region importance per slice by permutation; writes permutation.parquet. With `remote` it runs where the
    task lands, on the shards and predictions.parquet pulled from the store, and uploads its table there."""
    if remote:
        here_shards = [storage.pull_shard(remote, run_dir, s)[0] for s in shards]
        here = storage.pull_run_files(remote, run_dir, ["predictions.parquet"])
        _permutation_here(here_shards, card, config, here)
        storage.push_run_files(remote, here, run_dir, ["permutation.parquet"])
        return str(Path(run_dir) / "permutation.parquet")
    return _permutation_here(shards, card, config, run_dir)


def _permutation_here(shards: list[str], card: dict[str, Any], config: AuditConfig, run_dir: str) -> str:
    from .scoring import slice_permutation
    c = ModelCard.from_dict(card)
    with device_pool(config.device, config.tasks_per_device).acquire() as device:
        model = _loaded(card, device)
        with progress.step("permutation"):
            return str(slice_permutation(shards, c, config, model, device, Path(run_dir) / "permutation.parquet",
                                         Path(run_dir) / "predictions.parquet"))


@task(name="merge-outputs", **IO_RETRIES)
def merge_outputs(run_dir: str, shard_outputs: list[dict[str, Any]], n_rows: int, max_reject_fraction: float) -> dict[str, int]:
    """Merge the shard parts into predictions/explanations/rejects.parquet; fail past the reject budget."""
    rd = Path(run_dir)
    outputs.prune_parts(rd, [Path(s["predictions"]).name.split(".", 1)[0] for s in shard_outputs])
    n_pred = outputs.merge_parquet([s["predictions"] for s in shard_outputs], rd / "predictions.parquet")
    outputs.merge_parquet([s["explanations"] for s in shard_outputs], rd / "explanations.parquet")
    n_rej = outputs.merge_parquet([rd / "inputs" / "ingest-rejects.parquet", *[s["rejects"] for s in shard_outputs]],
                                  rd / "rejects.parquet", REJECT_SCHEMA)
    if n_rows and n_rej / n_rows > max_reject_fraction:
        raise XAuditError(f"audit: {n_rej} of {n_rows} rows ({n_rej / n_rows:.1%}) were rejected, more than "
                          f"'max_reject_fraction' {max_reject_fraction:.1%}; see {rd / 'rejects.parquet'}")
    return {"scored": n_pred, "rejected": n_rej}


@task(name="compute-metrics")
def compute_metrics(run_dir: str, config: AuditConfig, card: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Per-slice metrics, intervals and checks; returns the verdict and counts."""
    with progress.step("metrics"):
        return asdict(outputs.compute_metrics(run_dir, config, ModelCard.from_dict(card), run_id))


@task(name="write-manifest", **IO_RETRIES)
def write_manifest(run: dict[str, str], config: AuditConfig, card: dict[str, Any], data: dict[str, Any],
                   verdict: str, remote: str | None = None, shard_outputs: list[dict[str, Any]] | None = None) -> str:
    """Write manifest.json with the hash of every artifact present (and, for inputs and outputs in a store,
    their URLs, ETags/version ids and sha256; where each shard was scored); returns its path."""
    data_identity = {k: data[k] for k in ("source", "source_format", "fingerprint", "n_rows", "metadata_columns")}
    data_identity["format"] = data_identity.pop("source_format")
    if Path(data["source"]).is_file():
        data_identity["source_sha256"] = sha256_file(data["source"])
    model_card, device = ModelCard.from_dict(card), pick_device(config.device)
    manifest = outputs.build_manifest(run["run_id"], datetime.fromisoformat(run["started"]), config, model_card,
                                      data_identity, run["flow_run_id"], str(device), run["run_dir"], verdict)
    model = cached_model(model_card, device)                           # (the preflight's, cached)
    if any(METHODS[m].layer for m in config.attribution.methods):      # which layer the CAM maps are of
        manifest["cam_layer"] = layer_name(model, model_card.target_layer, probe_inputs(model_card, 1, 1, device))
    estimate = last_estimate(model)
    if estimate is not None:                                           # what the preflight said it would cost
        manifest["estimate"] = estimate.to_dict()
    inputs = [(data["source"], "data.path"), (card["weights"], "model.weights")]
    if config.model.card is not None:
        inputs.append((str(config.model.card), "model.card"))
    remote_inputs = [storage.remote_identity(u, f) for u, f in inputs if storage.is_url(u)]
    if remote_inputs:
        manifest["remote_inputs"] = remote_inputs
    if remote:
        manifest["published_to"] = storage.join(remote, run["run_id"])
    if shard_outputs:
        manifest["shards"] = [{"shard": Path(s["predictions"]).name.split(".", 1)[0], "host": s.get("host"),
                               "device": s.get("device"), "cached": bool(s.get("cached"))} for s in shard_outputs]
    return str(write_json(Path(run["run_dir"]) / "manifest.json", manifest))


@task(name="render-report")
def render(run_dir: str, formats: list[str]) -> dict[str, str]:
    """Render report.html / report.pdf from the run's files."""
    with progress.step("render"):
        return report.render_report(run_dir, tuple(formats))


@task(name="seal-manifest", **IO_RETRIES)
def seal_manifest(run_dir: str, review: bool = False) -> str:
    """Add the reports' hashes to manifest.json (the PDF embeds the manifest as it was before rendering)."""
    outputs.seal(run_dir, review)
    return str(Path(run_dir) / "manifest.json")


@task(name="compare-audits")
def compare(baseline_dir: str, candidate_dir: str, config: ReviewConfig, review_dir: str, run_id: str) -> dict[str, Any]:
    """Paired deltas, flips, drift and checks of two audits; returns the review verdict."""
    from .review import review_runs
    return asdict(review_runs(baseline_dir, candidate_dir, config, review_dir, run_id))


@task(name="render-review")
def render_review(review_dir: str, formats: list[str]) -> dict[str, str]:
    """Render review.html / review.pdf from the review directory's files."""
    return report.render_review(review_dir, tuple(formats))


@task(name="write-review-manifest", **IO_RETRIES)
def write_review_manifest(review_dir: str, run_id: str, config: ReviewConfig, verdict: str, started: str,
                          flow_run_id: str | None) -> str:
    """Write the review's manifest.json: config, both audits' manifests by hash, every artifact's hash."""
    manifest = outputs.build_review_manifest(review_dir, run_id, config, verdict, started, flow_run_id)
    return str(write_json(Path(review_dir) / "manifest.json", manifest))


def history_folder(config: AuditConfig) -> Path:
    from . import history
    return history.folder_for(config.output_dir, config.history.path)


def history_name(config: AuditConfig | ReviewConfig) -> str:
    from . import history
    return history.audit_name(config.history.name if hasattr(config, "history") else None, config.report.title)


@task(name="snapshot-history", **IO_RETRIES)
def snapshot_history(run: dict[str, str], config: AuditConfig, card: dict[str, Any], data: dict[str, Any],
                     verdict: str) -> str | None:
    """Write history.parquet into the run: the audit's earlier runs and this one (for the report)."""
    from . import history
    if not config.history.enabled:
        return None
    rows = history.run_rows(run["run_dir"], history_name(config), run["run_id"],
                            datetime.fromisoformat(run["started"]).astimezone(timezone.utc).isoformat(timespec="seconds"),
                            card, data["fingerprint"], verdict)
    return str(history.snapshot(run["run_dir"], history_folder(config), rows, history_name(config),
                                config.history.last_runs))


@task(name="append-history", **IO_RETRIES)
def append_history(run_dir: str, config: AuditConfig) -> str | None:
    """Add the finished run's rows to the history folder (only now: a run that crashed is not history)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from . import history
    snap = Path(run_dir) / history.SNAPSHOT
    if not config.history.enabled or not snap.is_file():
        return None
    table = pq.read_table(snap)
    own = table.filter(pc.field("run_id") == Path(run_dir).name)
    return str(history.append(history_folder(config), own))


@task(name="sign-run")
def sign_run(run_dir: str, config: AuditConfig | ReviewConfig) -> dict[str, Any]:
    """Sign the run's PDF reports and every file of it, with the config's `signing` credentials."""
    from . import signing
    s = config.signing
    cred = signing.load_credentials(s.key, s.cert, s.pkcs12, s.chain, signing.passphrase_from_env(s.passphrase_env),
                                    passphrase_env=s.passphrase_env,
                                    where="signing")
    return signing.sign_run(run_dir, cred, s.tsa_url, s.reason, s.location)


@task(name="publish-artifacts")
def publish_artifacts(run_dir: str, run_id: str, kind: str = "audit", name: str | None = None,
                      remote: str | None = None) -> None:
    """Publish to Prefect: a markdown summary (verdict, failed checks, key metrics), a table of per-slice
    metrics, and a link to the report. The keys come from the audit's name (its history name), so each
    scheduled run adds a version under the same keys and the Prefect UI shows their history."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    markdown, rows, report_path = outputs.run_summary(run_dir, run_id, kind)
    key = "-".join("".join(ch if ch.isalnum() else "-" for ch in (name or run_id).lower()).split("-"))
    key = "-".join(p for p in key.split("-") if p)[:60] or "run"
    create_markdown_artifact(key=f"{kind}-summary-{key}", markdown=markdown, description=f"{kind} verdict")
    create_table_artifact(key=f"{kind}-slices-{key}", table=rows, description="per-slice metrics")
    link = storage.join(remote, run_id, report_path.name) if remote else report_path.as_uri()
    create_link_artifact(key=f"{kind}-report-{key}", link=link, link_text=report_path.name)

"""Models from an MLflow model registry: `model: {mlflow: "models:/name/3"}` or `"models:/name@champion"`.

The registry is the one MLflow's standard environment names (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`,
and its usual credentials variables). The registered version's artifacts are downloaded once into the cache
(`$XAUDIT_CACHE/mlflow/...`, written whole, then renamed). xaudit loads weights, never pickled objects: the
artifacts hold the weights (safetensors or a weights-only state dict, as `mlflow.pytorch.log_state_dict`
writes) and, usually, an xaudit model card `xaudit_card.json` (the same JSON as a local card; its `weights`
relative to the artifacts); without a card the config's `model` block gives factory, classes and input size.
A version saved with MLflow's pytorch flavour as a pickled module is refused with what to register instead.
Nothing here imports Prefect.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import StoreUnavailable, XAuditError, require_extra
from .storage import cache_root, redact, transient

REF = re.compile(r"^models:/(?P<name>[^/@\s][^/@]*)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_.-]+))$")
CARD = "xaudit_card.json"
WEIGHTS = (".safetensors", ".pt", ".pth", ".bin")


def check_ref(ref: str) -> re.Match:
    m = REF.match(ref or "")
    if not m:
        raise XAuditError(f"'model.mlflow' must be 'models:/<name>/<version>' or 'models:/<name>@<alias>'; got {ref!r}")
    return m


def _shown_uri(uri: str) -> str:
    """The registry's URI without any user:password in it (what the manifest records)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def resolve(ref: str) -> tuple[Path, dict[str, Any]]:
    """Return (the local folder of the registered version's artifacts, what identifies it: registry, name,
    version, alias, run id, source)."""
    m = check_ref(ref)
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        require_extra("mlflow", "'model.mlflow'")
        raise
    # fail in seconds, not after MLflow's default minutes of retries, when the registry cannot be reached
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    registry = mlflow.get_registry_uri()
    name, version, alias = m["name"], m["version"], m["alias"]
    try:
        client = MlflowClient()
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if transient(exc):                   # connection refused or reset, a timeout, a 5xx: not the user's input
            raise StoreUnavailable(f"'model.mlflow' {ref!r}: the registry {_shown_uri(registry)} cannot be "
                                   f"reached ({type(exc).__name__})") from None
        if not isinstance(exc, MlflowException):          # DNS, TLS, ...
            raise XAuditError(f"'model.mlflow' {ref!r}: the registry {_shown_uri(registry)} cannot be reached: "
                              f"{type(exc).__name__}") from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise XAuditError(f"'model.mlflow' {ref!r} is not in the registry {_shown_uri(registry)}: "
                          f"{redact(first)}") from None
    key = hashlib.sha256(f"{_shown_uri(registry)}\0{name}\0{mv.version}".encode()).hexdigest()[:24]
    target = cache_root() / "mlflow" / key
    if not (target / ".complete").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))
            (tmp / ".complete").write_text("ok")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = StoreUnavailable if transient(exc) else XAuditError
            raise error(f"'model.mlflow' {ref!r}: its artifacts could not be downloaded: "
                        f"{type(exc).__name__}: {redact(str(exc)[:200])}") from None
    return target, dict(registry=_shown_uri(registry), name=name, version=str(mv.version), alias=alias,
                        run_id=mv.run_id, source=mv.source)


def artifact_values(folder: Path, ref: str) -> dict[str, Any]:
    """Return the card values a registered version's artifacts give: its xaudit card (weights relative to the
    artifacts), else just the one weights file they hold."""
    import json
    card = next(iter(sorted(folder.rglob(CARD))), None)
    if card is not None:
        try:
            values = json.loads(card.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise XAuditError(f"'model.mlflow' {ref!r}: {CARD} is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(values, dict):
            raise XAuditError(f"'model.mlflow' {ref!r}: {CARD} must hold a JSON object")
        if values.get("weights") and not Path(values["weights"]).is_absolute():
            values["weights"] = str(card.parent / values["weights"])
        return values
    weights = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHTS and p.name != "model.pth")
    if len(weights) == 1:
        return {"weights": str(weights[0])}
    if (folder / "MLmodel").is_file() or any(folder.rglob("model.pth")):
        raise XAuditError(f"'model.mlflow' {ref!r} holds a pickled module (MLflow's pytorch flavour); xaudit loads "
                          f"weights only: register the state dict (mlflow.pytorch.log_state_dict) or a safetensors "
                          f"file, with an {CARD} naming the factory")
    raise XAuditError(f"'model.mlflow' {ref!r}: its artifacts hold {len(weights)} weights files and no {CARD}; "
                      f"register one weights file, or a card naming it")


def log_audit(registry_run_id: str, run_dir: str | Path, audit_run_id: str, verdict: str,
              metrics: dict[str, float]) -> list[str]:
    """Log an audit to the registered version's MLflow run: tags `xaudit.verdict` and `xaudit.run_id`, metrics
    `xaudit.<metric>` (overall values), and the reports and validation.json under `xaudit/<audit run id>/`;
    returns the artifact names logged."""
    from mlflow import MlflowClient
    client = MlflowClient()
    try:
        client.set_tag(registry_run_id, "xaudit.verdict", verdict)
        client.set_tag(registry_run_id, "xaudit.run_id", audit_run_id)
        for name, value in sorted(metrics.items()):
            client.log_metric(registry_run_id, f"xaudit.{name}", float(value))
        logged = []
        for name in ("report.html", "report.pdf", "validation.json"):
            f = Path(run_dir) / name
            if f.is_file():
                client.log_artifact(registry_run_id, str(f), artifact_path=f"xaudit/{audit_run_id}")
                logged.append(name)
        return logged
    except Exception as exc:
        # an unreachable registry is retried by the task and then ends the run resumable (exit 3): the audit's
        # outputs are complete, and the rerun with the same --run-id reuses them and logs again
        error = StoreUnavailable if transient(exc) else XAuditError
        raise error(f"log_to_mlflow: logging to the MLflow run {registry_run_id} failed: "
                    f"{type(exc).__name__}: {redact(str(exc)[:200])}") from None

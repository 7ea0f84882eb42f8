"""The project's error type: a `ValueError` whose message says what was expected and what arrived."""
from __future__ import annotations


class XAuditError(ValueError):
    """Bad input to an xaudit function: the message names the function, the argument, what was expected
    and what arrived. Input errors are never retried."""


def expect(condition: bool, where: str, message: str) -> None:
    """Raise `XAuditError(f"{where}: {message}")` unless `condition` holds."""
    if not condition:
        raise XAuditError(f"{where}: {message}")


class VerdictFailed(Exception):
    """A run that finished and wrote every output, with a verdict at or past the config's `flow_run_fails_on`.

    The flows end such a run in Prefect's Failed state (so the UI, notifications and automations see it)
    with this exception as its data: calling the flow raises it, and `.result` holds what the flow would
    have returned. It is not an input error: the audit itself succeeded.
    """

    def __init__(self, message: str, result: dict):
        super().__init__(message, result)
        self.message, self.result = message, result

    def __str__(self) -> str:
        return self.message


# Optional features and the extra that installs what each imports: the one place these names live.
EXTRAS = {"sign": ("pyhanko", "asn1crypto", "pyhanko_certvalidator"), "s3": ("s3fs",), "mlflow": ("mlflow",),
          "dask": ("prefect_dask",), "lrp": ("zennit",), "slic": ("skimage",)}


class MissingExtra(XAuditError):
    """A feature that needs an optional extra that is not installed (exit 2, naming the extra)."""


def require_extra(extra: str, what: str) -> None:
    """Raise `MissingExtra` naming `pip install 'xaudit[extra]'` unless every module of that extra imports."""
    import importlib.util
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(f"{what} needs the optional extra '{extra}' ({module} is not installed): "
                               f"pip install 'xaudit[{extra}]'")


class StoreUnavailable(Exception):
    """An object store or registry that could not be reached (connection reset or refused, a timeout, a 5xx
    answer, throttling), after retries with backoff. Not an input error: the tasks' retry policy retries it,
    and a run that still fails ends resumable (exit 3), naming the `--run-id` that resumes it."""

"""Prefect flows. Importing this package sets quiet, local Prefect defaults unless the caller set them:
an embedded (temporary) API server with a generous start-up timeout on small machines, state under
`.prefect/` in the working directory, no analytics."""
import logging
import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The embedded server lives and dies with this process and holds nothing the audit needs; its own errors
# (an event it retries flushing to its temporary SQLite as the process ends) are not the user's to read.
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING" if os.environ.get("PREFECT_API_URL") else "CRITICAL")


from contextlib import contextmanager  # noqa: E402


@contextmanager
def local_run_settings():
    """Prefect settings for a flow run in this process on the embedded server: no flow-run heartbeats.

    Heartbeats let a server mark a run whose process died as crashed; the embedded server lives and dies
    with this process, so nobody would read them. And Prefect 3.8's heartbeat thread sleeps in whole
    seconds before it notices the run ended, which made every flow (and subflow) end up to 1 s late
    (0.5 s on average: most of the orchestration overhead of a short audit). With PREFECT_API_URL set (a
    real server, as under a worker) or the frequency set explicitly, nothing changes.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    if PREFECT_API_URL.value() or any(k in os.environ for k in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
                                                                "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


# The embedded server's subprocess logs only CRITICAL records, from any library. A root level alone is not
# enough: SQLAlchemy sets its own logger to WARNING when imported, so its 'Exception during reset' traceback
# (the server writing to its SQLite as this process ends) still reached the user's terminal. Hence a whole
# logging configuration for that subprocess, in which SQLAlchemy's logger is named.
_SERVER_LOGGING = """\
# Written by xaudit (flows/__init__.py) for the embedded Prefect server's subprocess only.
version: 1
disable_existing_loggers: false
formatters:
  standard:
    format: "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
    datefmt: "%H:%M:%S"
handlers:
  console:
    level: 0
    class: logging.StreamHandler
    formatter: standard
    stream: ext://sys.stderr
loggers:
  prefect: {level: CRITICAL}
  uvicorn: {level: CRITICAL, handlers: [console], propagate: false}
  uvicorn.access: {level: CRITICAL, handlers: [console], propagate: false}
  fastapi: {level: CRITICAL}
  sqlalchemy: {level: CRITICAL}
  aiosqlite: {level: CRITICAL}
  alembic: {level: CRITICAL}
  asyncio: {level: CRITICAL}
root:
  level: CRITICAL
  handlers: [console]
"""
_USER_LOGGING = ("PREFECT_LOGGING_ROOT_LEVEL", "PREFECT_LOGGING_CONFIG_PATH", "PREFECT_LOGGING_SETTINGS_PATH")


def _server_logging_config() -> Path:
    """The embedded server's logging configuration, written (atomically) under PREFECT_HOME."""
    from xaudit.tasks.io import write_bytes
    path = Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect") / "xaudit-embedded-server-logging.yml"
    if not path.is_file() or path.read_text() != _SERVER_LOGGING:
        write_bytes(path, _SERVER_LOGGING.encode())
    return path


# what _embedded_server uses of Prefect's private server class (present in prefect 3.8.8-3.9)
_PRIVATE_SERVER_API = ("_instances", "_run_uvicorn_command", "start", "stop")


def _prefect_version() -> str:
    from importlib import metadata
    try:
        return "prefect " + metadata.version("prefect")
    except metadata.PackageNotFoundError:
        return "prefect"


def _embedded_server():
    """Prefect's temporary API server for this process (one per process: Prefect's own start finds this one),
    whose subprocess logs nothing below CRITICAL from any library (`_SERVER_LOGGING`).

    `PREFECT_SERVER_LOGGING_LEVEL` quiets Prefect's and uvicorn's loggers there, not the others: when this
    process ended while the server was writing (an audit that stops on an input error or a signal),
    SQLAlchemy logged 'Exception during reset' with a traceback on the user's terminal, after the one error
    message. The configuration is set for the server's subprocess only (for the moment it is spawned), so
    this process and any worker it starts keep their warnings; a logging configuration or root level the
    user set stands.
    """
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        SubprocessASGIServer = None
    missing = [a for a in _PRIVATE_SERVER_API if not hasattr(SubprocessASGIServer, a)]
    if missing:
        # a Prefect release outside the tested range changed its private server class: run without the
        # early start and the quiet server logging (Prefect starts its own server at the first flow)
        import warnings
        warnings.warn(f"xaudit: this Prefect ({_prefect_version()}) has no SubprocessASGIServer."
                      f"{missing[0]}; the embedded server starts with the first flow, with Prefect's own "
                      "logging (xaudit is tested with the prefect versions its package metadata allows)",
                      RuntimeWarning, stacklevel=2)
        return None

    class QuietServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            if any(k in os.environ for k in _USER_LOGGING):
                return super()._run_uvicorn_command()
            os.environ["PREFECT_LOGGING_CONFIG_PATH"] = str(_server_logging_config())
            os.environ["PREFECT_LOGGING_ROOT_LEVEL"] = "CRITICAL"
            try:
                return super()._run_uvicorn_command()
            finally:
                for k in ("PREFECT_LOGGING_CONFIG_PATH", "PREFECT_LOGGING_ROOT_LEVEL"):
                    os.environ.pop(k, None)

    existing = SubprocessASGIServer._instances.get(None)
    return existing if existing is not None else QuietServer()


@contextmanager
def api_server_starting():
    """Start Prefect's temporary API server now, in a thread, and wait for it when the block ends.

    With no `PREFECT_API_URL`, Prefect starts that server (a subprocess: uvicorn, its database) at the first
    flow's first API call, and waits for it: 3-4 s of the whole run on 2 cores, during which this process does
    nothing. Started at the top of the block it comes up on the other core while the block runs (the configs'
    preflight: torch, the model's build and probe, the data's schema). If the block raises (an input error),
    the server is stopped again before the error is reported. With a real server configured, nothing happens.
    """
    import threading
    import time

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    server = _embedded_server()
    if server is None:
        yield
        return

    def start() -> None:
        try:
            server.start()
        except Exception:       # noqa: BLE001 - the flow's own start tries again and reports why
            pass
    starter = threading.Thread(target=start, name="xaudit-prefect-api", daemon=True)
    starter.start()
    try:
        yield
    except BaseException:
        while starter.is_alive() and getattr(server, "server_process", 1) is None:     # (it is spawned within moments)
            time.sleep(0.01)
        server.stop()           # at once: an input error is reported without waiting for the server
        raise
    starter.join()


class _InputErrorFilter(logging.Filter):
    """Drop Prefect's log records about an `XAuditError` (its traceback, and the 'Finished in state Failed'
    line that repeats it): the command line prints the error once, as one message naming the field. The same
    for a requested stop (`RunInterrupted`, and the crash reports that follow a SIGTERM)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from xaudit.tasks.errors import XAuditError
        from xaudit.tasks.stopping import STOP, RunInterrupted
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (XAuditError, RunInterrupted)):
            return False
        try:
            text = record.getMessage()
        except Exception:
            return True
        # after a stop request, the tasks and the flow report their ends: the command line says it once
        if STOP.is_set() and record.levelno >= logging.WARNING:
            return False
        return "XAuditError" not in text and "RunInterrupted" not in text


@contextmanager
def quiet_input_errors():
    """While running a flow from the command line, keep Prefect from printing input errors' tracebacks."""
    import prefect  # noqa: F401  (sets up Prefect's handlers)
    filt = _InputErrorFilter()
    loggers = [logging.getLogger(n) for n in ("prefect", "prefect.flow_runs", "prefect.task_runs", "")]
    handlers = {h for lg in loggers for h in lg.handlers}
    for lg in loggers:
        lg.addFilter(filt)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)
        for h in handlers:
            h.removeFilter(filt)


_SEVERITY = {"PASS": 0, "WARN": 1, "FAIL": 2}


def final_state(result: dict, fails_on: str, n_failed: int):
    """Return the flow's result, or, when its verdict is `fails_on` or worse, Prefect's Failed state carrying
    `VerdictFailed(result)`: the run's outputs are all written; only the run's state tells the scheduler."""
    from prefect.states import Failed

    from xaudit.tasks.errors import VerdictFailed
    if fails_on == "never" or _SEVERITY[result["verdict"]] < _SEVERITY[fails_on]:
        return result
    message = (f"verdict {result['verdict']}: {n_failed} check(s) failed (flow_run_fails_on={fails_on}); "
               f"outputs in {result['run_dir']}")
    return Failed(message=message, data=VerdictFailed(message, result))

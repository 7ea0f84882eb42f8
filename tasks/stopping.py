"""Stopping a run cleanly: the command line's SIGINT/SIGTERM handler sets `STOP`; long loops call `check` at
their batch boundaries and raise `RunInterrupted` there, so no batch is left half-written (every file is
written atomically anyway) and the shards finished so far stay reusable by a rerun with the same run id."""
from __future__ import annotations

import threading

STOP = threading.Event()
_why: list[str] = []


class RunInterrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM); raised at a batch boundary."""


def request_stop(reason: str) -> None:
    if not STOP.is_set():
        _why.append(reason)
    STOP.set()


def reason() -> str:
    return _why[0] if _why else "a stop request"


def check(where: str) -> None:
    """Raise `RunInterrupted` if a stop was requested (call between batches)."""
    if STOP.is_set():
        raise RunInterrupted(f"stopped by {reason()} at a batch boundary ({where})")

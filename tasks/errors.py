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

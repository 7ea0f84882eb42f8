"""The project's error type: a `ValueError` whose message says what was expected and what arrived."""
from __future__ import annotations


class XAuditError(ValueError):
    """Bad input to an xaudit function: the message names the function, the argument, what was expected
    and what arrived. Input errors are never retried."""


def expect(condition: bool, where: str, message: str) -> None:
    """Raise `XAuditError(f"{where}: {message}")` unless `condition` holds."""
    if not condition:
        raise XAuditError(f"{where}: {message}")

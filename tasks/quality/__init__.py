"""Can these explanations be trusted? Per-example quality checks of attribution maps (no Prefect):
faithfulness (deletion/insertion), localisation, stability (max-sensitivity), agreement between methods,
and the model-randomisation sanity check. Every module registers itself on import."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import numpy as np

from ..attribution._registry import resolve_against
from ..errors import XAuditError
from ._registry import CHECKS, Check, QualityContext, register  # noqa: F401
from .sanity import randomisation_check  # noqa: F401

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def resolve_check_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Return the check's defaults updated with `params` (the checks' twin of `resolve_params`)."""
    return resolve_against(f"quality: check {name!r}", CHECKS[name].defaults, params)


def run_checks(ctx: QualityContext, names: list[str], params: dict[str, dict[str, Any]] | None = None
               ) -> dict[tuple[str | None, str], np.ndarray]:
    """Return {(method or None, column): (N,) values} of the named checks for one batch."""
    params = params or {}
    out: dict[tuple[str | None, str], np.ndarray] = {}
    for name in names:
        if name not in CHECKS:
            raise XAuditError(f"quality: 'checks' must name registered checks {sorted(CHECKS)}; got {name!r}")
        check = CHECKS[name]
        kw = resolve_check_params(name, params.get(name))
        if check.per_method:
            for method in ctx.maps:
                for col, values in check.fn(ctx, method=method, **kw).items():
                    out[(method, col)] = values
        else:
            for col, values in check.fn(ctx, **kw).items():
                out[(None, col)] = values
    return out


def quality_columns(names: list[str]) -> dict[str, tuple[bool, str]]:
    """Return {column: (higher_is_better, description)} of the named checks, in a stable order."""
    out: dict[str, tuple[bool, str]] = {}
    for name in names:
        if name not in CHECKS:
            raise XAuditError(f"quality: 'checks' must name registered checks {sorted(CHECKS)}; got {name!r}")
        out.update(CHECKS[name].columns)
    return out

"""Per-slice metrics with vectorised Poisson-bootstrap intervals, and threshold checks (no Prefect).

Every module in this package registers its metrics on import.
"""
from __future__ import annotations

import importlib
import pkgutil

from ._registry import METRICS, Metric, SliceData, get_metric, register  # noqa: F401
from .evaluate import Evaluation, ExampleStat, evaluate, slice_groups  # noqa: F401
from .thresholds import Check, Validation, validate  # noqa: F401

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in {"evaluate", "thresholds"}:
        importlib.import_module(f"{__name__}.{_info.name}")

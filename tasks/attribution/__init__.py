"""Pure-torch attribution methods (no Prefect). Every module in this package registers its method on import.

    from xaudit.tasks.attribution import attribute, display_heatmap, METHODS
"""
from __future__ import annotations

import importlib
import pkgutil

from ._registry import METHODS, Method, MethodOutput, get_method, register  # noqa: F401
from .engine import AttributionResult, attribute, display_heatmap, find_layer  # noqa: F401

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "engine":
        importlib.import_module(f"{__name__}.{_info.name}")

"""House style: the core never imports Prefect; every registered name lives in one place."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

CORE = ["xaudit.tasks.config", "xaudit.tasks.data", "xaudit.tasks.models", "xaudit.tasks.attribution", "xaudit.tasks.metrics", "xaudit.tasks.scoring",
        "xaudit.tasks.outputs", "xaudit.tasks.report", "xaudit.tasks.io", "xaudit.tasks.quality", "xaudit.tasks.review", "xaudit.tasks.permutation",
        "xaudit.tasks.devices"]


def test_core_modules_do_not_import_prefect():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
            "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_method_and_metric_file_registers_itself():
    from xaudit.tasks.attribution import METHODS
    from xaudit.tasks.metrics import METRICS
    method_files = {p.stem for p in (ROOT / "tasks" / "attribution").glob("*.py") if not p.stem.startswith("_")} - {"engine"}
    assert method_files == set(METHODS)       # one file per method, named after it
    assert len(METRICS) >= 12

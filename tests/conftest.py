"""Shared fixtures. Flow tests share one session-scoped Prefect test harness (a temporary API server)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def demo_card():
    from xaudit.tasks.config import ModelSpec
    from xaudit.tasks.models import resolve_card
    return resolve_card(ModelSpec(card=DATA / "models" / "baseline.json"))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tiny_parquet(tmp_path):
    """A 12-row digits-like Parquet file (from the demo data), to be altered by tests."""
    table = pq.read_table(DATA / "digits.parquet").slice(0, 12)
    path = tmp_path / "tiny.parquet"
    pq.write_table(table, path)
    return path


def demo_test_rows(n: int, folder: Path):
    """The first `n` test-split rows of the demo (id, image, label, site, split, ink_fraction, roi), as a
    DataFrame and written to `folder`/rows.parquet; returns both."""
    t = pq.read_table(DATA / "digits.parquet").to_pandas()
    t = t[t.split == "test"].head(n).reset_index(drop=True)
    path = folder / "rows.parquet"
    t.to_parquet(path)
    return t, path


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path

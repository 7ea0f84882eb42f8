"""Reruns are byte-identical: two runs with the same run id and config, and runs killed with SIGKILL at
three different points and resumed, write the same bytes in every table (and in every input shard and
per-shard part); only manifest.json (times, flow-run id), history.parquet (the history rows, which carry the
run's start time) and the reports (which print those times) may differ.

Each run is the installed command in its own process (`python -m flows.cli run`), against the session's
Prefect test server (so a process start costs seconds, not the embedded server's start-up).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, ROOT

RUN_ID = "determinism"


@pytest.fixture(scope="module")
def setup(prefect_harness, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL
    tmp = tmp_path_factory.mktemp("determinism")
    t = pq.read_table(DATA / "digits.parquet").to_pandas()
    t = t[t.split == "test"].head(64).reset_index(drop=True)
    t.loc[7, "image_png"] = b"corrupt"                    # a reject, whose reason must not vary either
    data = tmp / "data.parquet"
    t.to_parquet(data)
    cfg = {
        "model": {"card": str(DATA / "models" / "baseline.json")},
        "data": {"path": str(data), "roi_column": "roi_png", "metadata_columns": ["site", "ink_fraction"]},
        "attribution": {"methods": ["saliency", "gradcam", "smoothgrad"], "batch_size": 8,
                        "params": {"smoothgrad": {"n_samples": 3}}},
        "quality": {"checks": ["localisation", "faithfulness", "faithfulness_random", "stability", "agreement"],
                    "params": {"faithfulness": {"steps": 4}, "stability": {"samples": 2}}, "sanity_images": 4},
        "permutation": {"enabled": True, "grid": 2, "repeats": 1},
        "metrics": {"slices": [[], ["site"], ["ink_fraction:q4"], ["label_name"]], "bootstrap_replicates": 100,
                    "min_slice_size": 3, "thresholds": [{"metric": "accuracy", "lower": 0.9}]},
        "output_dir": str(tmp / "runs"), "run_id": RUN_ID, "shard_size": 16,
    }
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_LOGGING_LEVEL": "ERROR"}
    return {"tmp": tmp, "config": config, "env": env, "run_dir": tmp / "runs" / RUN_ID}


def _command(setup) -> list[str]:
    return [sys.executable, "-m", "xaudit.flows.cli", "run", str(setup["config"])]


def run_to_end(setup) -> None:
    proc = subprocess.run(_command(setup), capture_output=True, text=True, env=setup["env"], cwd=setup["tmp"],
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_and_kill_when(setup, path: str) -> None:
    """Start a run and SIGKILL it as soon as `path` (relative to the run directory) exists."""
    proc = subprocess.Popen(_command(setup), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=setup["env"], cwd=setup["tmp"])
    target = setup["run_dir"] / path
    deadline = time.monotonic() + 600
    try:
        while not target.exists():
            assert proc.poll() is None, f"the run ended before {path} appeared"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def tables(run_dir: Path) -> dict[str, bytes]:
    """Every table of a run: the Parquet files and validation.json, at the top and under inputs/ and parts/."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
             and p.name != "history.parquet"          # the run's identity and start time, like manifest.json
             and (p.suffix == ".parquet" or p.name == "validation.json" or p.name.endswith(".key.json"))]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(files)}


def set_aside(setup, name: str) -> dict[str, bytes]:
    """Move the finished run directory away (the next run starts from nothing) and return its tables."""
    dest = setup["tmp"] / name
    shutil.move(setup["run_dir"], dest)
    return tables(dest)


@pytest.fixture(scope="module")
def reference(setup):
    run_to_end(setup)
    out = set_aside(setup, "first")
    assert {"predictions.parquet", "explanations.parquet", "metrics.parquet", "validation.parquet",
            "rejects.parquet", "sanity.parquet", "permutation.parquet", "validation.json"} <= set(out)
    assert len([k for k in out if k.startswith("inputs/")]) == 5          # 4 shards and the ingest rejects
    return out


def _same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ


def test_two_clean_runs_write_identical_tables(setup, reference):
    run_to_end(setup)
    _same(reference, set_aside(setup, "second"))


@pytest.mark.parametrize("kill_at", [
    "inputs/shard-00001.parquet",          # during ingest
    "parts/shard-00001.key.json",          # after two of four shards were scored
    "predictions.parquet",                 # after the merge: in the sanity check, permutation or metrics
])
def test_a_run_killed_and_resumed_writes_identical_tables(setup, reference, kill_at):
    run_and_kill_when(setup, kill_at)
    assert setup["run_dir"].is_dir()
    run_to_end(setup)
    _same(reference, set_aside(setup, f"resumed-{kill_at.replace('/', '-')}"))

"""Stopping a run from outside: SIGINT (Ctrl-C) or SIGTERM stop `xaudit run` at a batch boundary with exit code
130 and a message saying how to resume; the finished shards are kept, and the rerun with the same run id
reuses them and produces what an uninterrupted run produces."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, ROOT

XAUDIT = [sys.executable, "-c", "import sys; from xaudit.flows.cli import main; sys.exit(main())"]


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((DATA / "demo_audit.yaml").read_text())
    cfg["model"]["card"] = str(DATA / "models" / "baseline.json")
    cfg["data"].update(path=str(DATA / "digits.parquet"), limit=400)
    cfg.update(shard_size=40, permutation={"enabled": False}, quality={"checks": ["localisation"], "sanity_images": 0},
               shortcuts={"enabled": False}, history={"enabled": False})
    cfg["attribution"].update(methods=["saliency", "integrated_gradients"], batch_size=8,
                              params={"integrated_gradients": {"n_steps": 32}})
    cfg["metrics"].update(bootstrap_replicates=50)
    cfg["report"] = {"title": "signal test", "formats": ["html"]}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_at_a_batch_boundary_and_the_rerun_resumes(tmp_path, sig):
    config, out = _config(tmp_path), tmp_path / "runs"
    run = out / "stopme"
    argv = [*XAUDIT, "run", str(config), "--run-id", "stopme", "--output-dir", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run / "parts").glob("*.key.json")):          # the first shard is finished
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard finished in 5 minutes"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert f"stopped by {sig.name} at a batch boundary" in stderr and "--run-id stopme to resume" in stderr, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    kept = len(list((run / "parts").glob("*.key.json")))
    assert 1 <= kept < 10 and not (run / "manifest.json").exists()
    assert not list(run.rglob("*.tmp")), "a half-written file was left behind"

    # the rerun reuses the finished shards and gives what an uninterrupted run gives
    again = subprocess.run([*argv[:-1], "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    fresh = subprocess.run([*XAUDIT, "run", str(config), "--run-id", "fresh", "--output-dir", str(out),
                            "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    for name in ("predictions.parquet", "explanations.parquet", "metrics.parquet"):
        a, b = pq.read_table(run / name), pq.read_table(out / "fresh" / name)
        drop = [c for c in ("run_id",) if c in a.column_names]
        assert a.drop(drop).equals(b.drop(drop)), name

"""Orchestration: device tokens, the real flow on a local Dask cluster, Prefect artifacts, progress."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from test_flow import config_for, small_data  # noqa: F401  (fixture)
from xaudit.tasks.devices import DevicePool


def test_device_pool_hands_out_each_device_at_most_per_device_times():
    pool = DevicePool(["cuda:0", "cuda:1"], per_device=1)
    held, peak, lock = [], [0], threading.Lock()

    def work():
        with pool.acquire() as device:
            with lock:
                held.append(str(device))
                peak[0] = max(peak[0], len(held))
                assert held.count(str(device)) == 1          # never two tasks on one device at once
            time.sleep(0.05)
            with lock:
                held.remove(str(device))
    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]
    [t.join(5) for t in threads]
    assert peak[0] == 2 and not held


def test_tasks_sharing_a_device_get_their_own_model_replica_and_the_maps_of_one_task_alone(demo_card):
    """tasks_per_device 2: two shard tasks explain at once on one device. The CAM layer's forward hook is per
    module, so on one shared model object each thread would read the other's activations (wrong maps, or
    autograd's 'not used in the graph'); each slot of the pool has its own replica instead."""
    from xaudit.tasks.attribution import attribute
    from xaudit.tasks.devices import replica
    from xaudit.tasks.models import cached_model
    pool = DevicePool(["cpu"], per_device=2)
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    alone = attribute(cached_model(demo_card, "cpu"), x, ["gradcam", "saliency"]).attributions
    got, models, errors, barrier = {}, {}, [], threading.Barrier(2)

    def work(half: int):
        try:
            with pool.acquire() as device:
                model = cached_model(demo_card, device, replica())
                models[half] = model
                barrier.wait(5)
                for _ in range(5):        # overlapping forwards on both threads
                    got[half] = attribute(model, x[half * 8:(half + 1) * 8], ["gradcam", "saliency"]).attributions
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(h,)) for h in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    assert models[0] is not models[1]
    for m in ("gradcam", "saliency"):
        torch.testing.assert_close(torch.cat([got[0][m], got[1][m]]), alone[m], rtol=1e-5, atol=1e-6)
    assert replica() == 0


_PAGE_FAULTS = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "keep":
    from xaudit.tasks.devices import keep_cpu_buffers
    assert keep_cpu_buffers()
def work(out):
    np.ones(8 << 20).sum()                              # one 64 MiB buffer, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        np.ones(8 << 20).sum()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
if sys.argv[2] == "thread":                             # as a shard task in the task runner's thread
    t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
else:
    work(out)
print(out[0])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc only")
def test_keep_cpu_buffers_reuses_large_buffers_instead_of_faulting_them_in_again():
    root = Path(__file__).resolve().parents[1]

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # glibc's own defaults

    def faults(mode: str, where: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode, where], cwd=root, capture_output=True,
                             text=True, check=True, env=env)
        return int(out.stdout.split()[-1])
    for where in ("main", "thread"):
        default, kept = faults("default", where), faults("keep", where)
        assert default >= 10 * 32, where   # glibc's default: each 64 MiB buffer mmapped afresh, >= 1 fault per 2 MiB page
        assert kept * 20 < default, where  # kept: the freed heap is reused, next to no new page faults


def test_flow_on_a_local_dask_cluster_matches_the_thread_runner(prefect_harness, small_data, tmp_path):  # noqa: F811
    pytest.importorskip("prefect_dask")
    from xaudit.flows import audit as audit_flow
    from xaudit.flows.cli import dask_runner
    from xaudit.tasks import progress
    calls, notes = [], []

    def sink(phase, n, total, note=None):
        if note:
            notes.append((phase, note))
        else:
            calls.append((phase, n, total))
    with progress.reporting_to(sink):
        threads = audit_flow.audit(config_for(small_data, tmp_path / "threads"))
    totals = {p: sum(t for q, _, t in calls if q == p and t) for p, _, _ in calls}
    done = {p: sum(n for q, n, _ in calls if q == p) for p, _, _ in calls}
    # progress per batch of every shard, then per phase; each phase ends where it said it would
    assert sum(1 for p, n, _ in calls if p == "scoring" and n) >= 3
    assert totals["scoring"] == done["scoring"] >= 39 and done == totals
    assert {"scoring", "metrics", "render", "randomisation check"} <= set(done)
    # the cost estimate comes first, before scoring (the 40 rows of the data); then the randomisation check
    # says its size before it runs (the demo CNN: every one of its 5 layers)
    assert notes and notes[0][0] == "estimate" and notes[0][1].startswith("estimate for 40 images on cpu")
    sanity_notes = [n for p, n in notes if p == "randomisation check"]
    assert sanity_notes and " x 6 rounds " in sanity_notes[0]
    cost = threads["cost_per_image"]
    assert cost["images"] == 39 and set(cost["methods"]) == {"saliency", "gradcam"}
    assert all(v > 0 for v in cost["methods"].values())
    dask = audit_flow.audit.with_options(task_runner=dask_runner(None))(config_for(small_data, tmp_path / "dask"))
    assert dask["verdict"] == threads["verdict"] and dask["scored"] == threads["scored"] == 39
    for name in ("predictions.parquet", "metrics.parquet"):
        a = pq.read_table(tmp_path / "threads" / "flow-test" / name)
        b = pq.read_table(tmp_path / "dask" / "flow-test" / name)
        assert a.drop_columns(["shard"] if "shard" in a.column_names else []).equals(
            b.drop_columns(["shard"] if "shard" in b.column_names else []))

    # the run published its artifacts to Prefect
    from prefect.client.orchestration import get_client

    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    async def artifacts():          # explicit filters: this FastAPI rejects the client's None defaults
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(),
                                               task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
                                               limit=200)
    keys = {a.key for a in asyncio.run(artifacts())}
    # keyed by the audit's name (the demo's report title), not the run id: scheduled runs version one key
    name = "digits-classifier-audit-bundled-demo"
    assert {f"audit-summary-{name}", f"audit-slices-{name}", f"audit-report-{name}"} <= keys


def test_local_runs_have_no_heartbeat_thread_but_server_runs_keep_it(monkeypatch):
    """Embedded runs skip flow heartbeats (Prefect's heartbeat thread delayed the end of every flow by up to
    1 s); against a real server (PREFECT_API_URL) or when the user set a frequency, nothing changes."""
    from prefect.settings import get_current_settings, temporary_settings, PREFECT_API_URL
    from xaudit.flows import local_run_settings
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    with temporary_settings(updates={PREFECT_API_URL: None}):      # as in `xaudit run` (the harness sets one)
        with local_run_settings():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == default
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with local_run_settings():
            assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with temporary_settings(updates={PREFECT_API_URL: None}), local_run_settings():
        assert get_current_settings().flows.heartbeat_frequency == 60          # the user's choice stands


def test_prefect_yaml_deployments_are_valid_flow_parameters():
    """Every deployment in prefect.yaml names a real flow entrypoint, and its parameters (paths relative to
    the repository, where the worker runs) validate as that flow's config; the scheduled ones fail their
    flow run on a FAIL verdict, so that Prefect can alert."""
    import importlib

    import yaml
    from xaudit.tasks.config import AuditConfig, ReviewConfig
    root = Path(__file__).resolve().parent.parent
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    kinds = {"flows/audit.py:audit": AuditConfig, "flows/review.py:review": ReviewConfig}
    seen = set()
    for dep in spec["deployments"]:
        module, fn = dep["entrypoint"].split(":")
        assert hasattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
        params = dep.get("parameters")
        seen.add(dep["name"])
        if params:
            config = kinds[dep["entrypoint"]].model_validate(params["config"])
            for model in ("model", "baseline", "candidate"):
                if getattr(config, model, None) is not None:
                    assert (root / getattr(config, model).card).is_file()
            assert (root / config.data.path).is_file()
            assert config.flow_run_fails_on == "FAIL", dep["name"]
        env = dep["work_pool"].get("job_variables", {}).get("env", {})
        assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 30, dep["name"]     # workers keep CPU buffers too
        assert env["MALLOC_ARENA_MAX"] == "1", dep["name"]                     # in the task runner's threads too
    assert {"nightly-audit", "release-review"} <= seen
    assert any(s.get("cron") for d in spec["deployments"] for s in d.get("schedules", []))


def test_the_embedded_server_logs_no_library_errors_and_this_process_keeps_its_root_level(tmp_path):
    """The command line's embedded Prefect server logs nothing below CRITICAL, SQLAlchemy included
    (SQLAlchemy printed a pool-reset traceback after an audit's one error message, as the process ended while
    the server wrote; it sets its own logger to WARNING, so a root level alone did not quiet it); the audit's
    own process, and what it spawns later, keep the levels they had. Read from the real server subprocess's
    environment, in a fresh interpreter with no API URL (as `xaudit run` starts), and then applied as the
    server applies it (Prefect's `setup_logging`, with SQLAlchemy imported) in another fresh interpreter."""
    script = (
        "import os, logging, json\n"
        "import flows\n"
        "from xaudit.flows import api_server_starting\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "with api_server_starting():\n"
        "    pass\n"
        "server = SubprocessASGIServer()\n"
        "pid = server.server_process.pid\n"
        "env = dict(kv.split('=', 1) for kv in open(f'/proc/{pid}/environ').read().split('\\0') if '=' in kv)\n"
        "import sqlalchemy.pool\n"
        "print(json.dumps({'env': env, 'own_root_env': os.environ.get('PREFECT_LOGGING_ROOT_LEVEL'),\n"
        "      'own_config_env': os.environ.get('PREFECT_LOGGING_CONFIG_PATH'),\n"
        "      'own_root': logging.getLevelName(logging.getLogger().level),\n"
        "      'own_sqlalchemy': logging.getLevelName(logging.getLogger('sqlalchemy.pool.impl').getEffectiveLevel()),\n"
        "      'kind': type(server).__name__}))\n"
        "server.stop()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["kind"] == "QuietServer"
    assert seen["own_root_env"] is None and seen["own_config_env"] is None
    assert seen["own_root"] == "WARNING" and seen["own_sqlalchemy"] == "WARNING"
    # the server's own configuration, applied as the server applies it
    server_env = seen["env"]
    assert server_env.get("PREFECT_LOGGING_CONFIG_PATH") and Path(server_env["PREFECT_LOGGING_CONFIG_PATH"]).is_file()
    check = ("import logging, sqlalchemy.pool\n"
             "from prefect.logging.configuration import setup_logging\n"
             "setup_logging()\n"
             "names = ['', 'sqlalchemy.pool.impl', 'prefect.server', 'uvicorn.error', 'aiosqlite']\n"
             "print(' '.join(logging.getLevelName(logging.getLogger(n).getEffectiveLevel()) for n in names))\n")
    levels = subprocess.run([sys.executable, "-c", check], cwd=root, env=server_env, capture_output=True, text=True,
                            timeout=180)
    assert levels.returncode == 0, levels.stderr
    assert levels.stdout.split() == ["CRITICAL"] * 5, levels.stdout

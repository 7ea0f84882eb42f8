"""Scale-out across processes that share nothing but an object store: a real Prefect server, a `dask scheduler`
and two `dask worker` processes, each in its own working directory with its own cache (as separate machines
would be), all started here on 127.0.0.1 and stopped by their process ids; the audit reads its data, card
and weights from moto's S3 server and writes its run there. The tables must equal the thread runner's byte
for byte, also when a worker is killed (SIGKILL) part-way through."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from xaudit.flows.audit import audit
from services import free_port, stop, wait_http
from test_flow import config_for, small_data  # noqa: F401
from test_storage import BUCKET, _remote_config, s3, uploaded  # noqa: F401

pytest.importorskip("prefect_dask")
TABLES = ("predictions.parquet", "explanations.parquet", "metrics.parquet", "rejects.parquet", "validation.json",
          "sanity.parquet", "permutation.parquet")


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):  # noqa: F811
    """A Prefect server, a Dask scheduler and two workers (own folders and caches, the store's credentials)."""
    root = tmp_path_factory.mktemp("cluster")
    bin_dir = Path(sys.executable).parent
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base_env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_LOGGING_LEVEL="WARNING")
    procs: list[subprocess.Popen] = []
    try:
        api_port, sched_port = free_port(), free_port()
        log = root / "prefect.log"
        procs.append(subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(api_port)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                      env=base_env, cwd=root))
        wait_http(f"http://127.0.0.1:{api_port}/api/health", procs[-1], log, "the Prefect server")
        env = {**base_env, "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api"}
        slog = root / "scheduler.log"
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                       str(sched_port), "--no-dashboard"], stdout=slog.open("wb"),
                                      stderr=subprocess.STDOUT, env=env, cwd=root))
        address = f"tcp://127.0.0.1:{sched_port}"
        workers = []
        for name in ("w1", "w2"):
            home = root / name
            home.mkdir()
            wlog = home / "worker.log"
            workers.append(subprocess.Popen(
                [str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--name", name, "--host", "127.0.0.1"],
                stdout=wlog.open("wb"), stderr=subprocess.STDOUT, cwd=home,
                # torch's threads as in this process (conftest): float sums depend on how a reduction is split,
                # and a nanny would set OMP_NUM_THREADS=1
                env={**env, "XAUDIT_CACHE": str(home / "cache"), "OMP_NUM_THREADS": str(torch.get_num_threads())}))
        procs += workers
        from distributed import Client
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        yield dict(address=address, env=env, root=root, workers=workers)
    finally:
        stop(procs)


def _config_file(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def _run_on_cluster(cluster, cfg_path: Path, run_id: str, out: str, wait: bool = True):
    env = {**cluster["env"], "XAUDIT_CACHE": str(cluster["root"] / "client-cache")}
    cmd = [str(Path(sys.executable).parent / "xaudit"), "run", str(cfg_path), "--run-id", run_id,
           "--dask-address", cluster["address"], "--output-dir", out, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cluster["root"])
    return proc.communicate(timeout=600) + (proc.returncode,) if wait else proc


def _parts_on(worker_home: Path, run_id: str) -> list[Path]:
    return sorted(worker_home.glob(f"cache/staging/*/{run_id}/parts/*.key.json"))


def test_an_audit_on_two_dask_workers_sharing_only_the_store_equals_the_thread_runner(
        prefect_harness, s3, uploaded, cluster, small_data, tmp_path):  # noqa: F811
    cfg = _remote_config(uploaded, small_data, tmp_path, shard_size=8)
    reference = audit(cfg.model_copy(update={"run_id": "dask-run", "output_dir": f"s3://{BUCKET}/threads"}))
    assert reference["run_dir"] == f"s3://{BUCKET}/threads/dask-run"
    out, err, rc = _run_on_cluster(cluster, _config_file(cfg, tmp_path / "cfg.yaml"), "dask-run", f"s3://{BUCKET}/dask")
    assert rc == 0, err[-2000:]
    for name in TABLES:
        assert s3.cat_file(f"{BUCKET}/dask/dask-run/{name}") == s3.cat_file(f"{BUCKET}/threads/dask-run/{name}"), name
    # both workers scored shards, each in its own folder: nothing but the store was shared
    done = [len(_parts_on(cluster["root"] / w, "dask-run")) for w in ("w1", "w2")]
    assert all(n >= 1 for n in done) and sum(done) >= 5, done
    # the randomisation check and permutation importance ran on a worker too, on inputs from the store
    for name in ("sanity.parquet", "permutation.parquet"):
        assert any((cluster["root"] / w).glob(f"cache/staging/*/dask-run/{name}") for w in ("w1", "w2")), name
    manifest = json.loads(s3.cat_file(f"{BUCKET}/dask/dask-run/manifest.json"))
    assert [s["shard"] for s in manifest["shards"]] == [f"shard-{i:05d}" for i in range(5)]
    assert all(s["device"] == "cpu" and s["host"] == socket.gethostname() for s in manifest["shards"])


def test_shard_tasks_ask_dask_for_a_gpu_only_on_cuda(small_data, tmp_path):  # noqa: F811
    import dask
    from xaudit.tasks.steps import shard_resources
    cfg = config_for(small_data, tmp_path)
    with shard_resources(cfg.model_copy(update={"device": "cuda"})):
        assert dask.get_annotations() == {"resources": {"GPU": 1}}
    with shard_resources(cfg.model_copy(update={"device": "cpu"})):
        assert dask.get_annotations() == {}


def test_killing_a_worker_mid_run_still_gives_identical_tables(
        prefect_harness, s3, uploaded, cluster, small_data, tmp_path):  # noqa: F811
    cfg = _remote_config(uploaded, small_data, tmp_path, shard_size=4)
    audit(cfg.model_copy(update={"run_id": "dask-kill", "output_dir": f"s3://{BUCKET}/threads"}))
    proc = _run_on_cluster(cluster, _config_file(cfg, tmp_path / "cfg.yaml"), "dask-kill", f"s3://{BUCKET}/dask",
                           wait=False)
    victim = cluster["workers"][0]
    deadline = time.time() + 300
    while not s3.glob(f"{BUCKET}/dask/dask-kill/parts/*.key.json"):     # the first shard is done somewhere
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
        s3.invalidate_cache()
    os.kill(victim.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    for name in TABLES:
        assert s3.cat_file(f"{BUCKET}/dask/dask-kill/{name}") == s3.cat_file(f"{BUCKET}/threads/dask-kill/{name}"), name

"""Starting and stopping the real local services tests use (moto's S3 server, an MLflow server, a Prefect
server, Dask): a free port on 127.0.0.1, waiting for its HTTP endpoint, stopping by process id."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    """Return once `url` answers; raise (killing `proc`) if it exits or `timeout` passes first."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start: {log.read_text()[-800:]}")
            time.sleep(0.3)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process by its id, then SIGKILL what has not exited after 20 s."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)

"""Benchmark: the audit flow at 1x, 2x, 4x and 8x the demo's test split (augmented copies).

    python benchmarks/scale.py [--scales 1 2 4 8] [--shard-size 256] [--s3]

Each scale runs in a fresh process (so peak memory is its own), after a warm-up flow that pays Prefect's
start-up. Orchestration overhead = the flow's wall time - the sum of its task runs' run time, as recorded
by Prefect. Settings: saliency + Grad-CAM, localisation only, 200 bootstrap replicates, HTML + PDF report.

`--s3` also runs every scale with the data, the model card and weights, and the outputs in S3 (moto's S3
server, started here as a process on 127.0.0.1): the second table gives its time and peak memory against the
local run of the same data (goal: <= 1.2x the time, the same memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from xaudit.flows import local_run_settings  # also sets the Prefect defaults
from xaudit.flows.audit import audit
from xaudit.tasks.config import load_config
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
warm = load_config(sys.argv[2], {**json.loads(sys.argv[3]), "run_id": "warm-up",
                                 "data": {**json.loads(sys.argv[3])["data"], "limit": 16}})
with local_run_settings():                   # as `xaudit run` does
    audit(warm)
    t0 = time.perf_counter()
    result = audit(cfg)
    wall = time.perf_counter() - t0
from prefect.client.orchestration import get_client
from uuid import UUID
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter
from prefect.client.schemas.sorting import TaskRunSort
import fsspec
with fsspec.open(result["run_dir"] + "/manifest.json", "rb") as f:     # a local path or the run's URL
    manifest = json.loads(f.read())
async def task_runs():
    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(manifest["prefect_flow_run_id"])])),
            task_run_filter=TaskRunFilter(), sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
mine = asyncio.run(task_runs())
busy = sum(r.total_run_time.total_seconds() for r in mine)
print(json.dumps({"wall": wall, "tasks": busy, "n_tasks": len(mine), "scored": result["scored"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make_data(scale: int, path: Path) -> None:
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    table = pq.read_table(ROOT / "data" / "digits.parquet").to_pandas()
    table = table[table.split == "test"].reset_index(drop=True)
    writer = None
    for k in range(scale):
        copy = table.copy()
        copy["example_id"] = copy.example_id + f"-aug{k}"
        if k:
            dy, dx = divmod(k, 3)

            def shift(b, dy=dy, dx=dx):
                arr = np.roll(np.asarray(Image.open(io.BytesIO(b))), (dy - 1, dx - 1), axis=(0, 1))
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                return buf.getvalue()
            copy["image_png"] = copy.image_png.map(shift)
            copy["roi_png"] = copy.roi_png.map(shift)
        t = pa.Table.from_pandas(copy, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def start_s3(tmp: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start moto's S3 server on a free port of 127.0.0.1; return it and the environment that points at it."""
    import socket
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            break
        except Exception:
            time.sleep(0.3)
    env = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", XAUDIT_CACHE=str(tmp / "cache"))
    return proc, env


def run_child(tmp: Path, overrides: dict, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_LOGGING_LEVEL": "ERROR", **extra_env}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ROOT / "data" / "demo_audit.yaml"),
                          json.dumps(overrides)], capture_output=True, text=True, env=env, cwd=tmp)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--s3", action="store_true", help="also run each scale from and to S3 (moto's server)")
    args = ap.parse_args()
    rows, remote_rows = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server, s3_env = start_s3(tmp) if args.s3 else (None, {})
        try:
            if server:
                import fsspec
                os.environ.update(s3_env)
                fs = fsspec.filesystem("s3", skip_instance_cache=True)
                fs.mkdir("xaudit-bench")
                for name in ("baseline.json", "baseline.safetensors"):
                    fs.put_file(str(ROOT / "data" / "models" / name), f"xaudit-bench/models/{name}")
            for scale in args.scales:
                data = tmp / f"digits-x{scale}.parquet"
                make_data(scale, data)
                overrides = {"data": {"path": str(data), "roi_column": "roi_png", "metadata_columns": ["site"]},
                             "output_dir": str(tmp / "runs"), "run_id": f"scale-{scale}",
                             "shard_size": args.shard_size,
                             "attribution": {"methods": ["saliency", "gradcam"]},
                             "quality": {"checks": ["localisation"], "sanity_images": 0},
                             "permutation": {"enabled": False},
                             "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 200}}
                r = run_child(tmp, overrides, {})
                rows.append((scale, r))
                print(f"scale {scale}: {r}", file=sys.stderr)
                if server:
                    fs.put_file(str(data), f"xaudit-bench/data/{data.name}")
                    remote = {**overrides, "data": {**overrides["data"], "path": f"s3://xaudit-bench/data/{data.name}"},
                              "model": {"card": "s3://xaudit-bench/models/baseline.json"},
                              "output_dir": "s3://xaudit-bench/runs"}
                    rs = run_child(tmp, remote, s3_env)
                    remote_rows.append((scale, r, rs))
                    print(f"scale {scale} on S3: {rs}", file=sys.stderr)
        finally:
            if server:
                server.terminate()
                server.wait(10)
    base = rows[0][1]
    print("| scale | images | shards | wall (s) | s per 1,000 images | task time (s) | overhead (s) | overhead % | "
          "peak RSS (MB) | peak / 1x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale, r in rows:
        shards = -(-r["scored"] // args.shard_size)
        over = r["wall"] - r["tasks"]
        print(f"| {scale}x | {r['scored']:,} | {shards} | {r['wall']:.1f} | {1000 * r['wall'] / r['scored']:.1f} | "
              f"{r['tasks']:.1f} | {over:.1f} | {100 * over / r['wall']:.1f}% | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f} |")
    if remote_rows:
        print()
        print("| scale | images | local wall (s) | S3 wall (s) | S3 / local time | local peak RSS (MB) | S3 peak RSS (MB) | "
              "S3 / local memory |")
        print("|---|---|---|---|---|---|---|---|")
        for scale, r, rs in remote_rows:
            print(f"| {scale}x | {r['scored']:,} | {r['wall']:.1f} | {rs['wall']:.1f} | {rs['wall'] / r['wall']:.2f} | "
                  f"{r['peak_mb']:.0f} | {rs['peak_mb']:.0f} | {rs['peak_mb'] / r['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()

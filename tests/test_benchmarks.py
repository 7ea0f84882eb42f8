"""The GPU benchmark's tiny CPU mode runs in the tests, so the script cannot rot before a GPU is at hand."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_tiny_mode_prints_its_table_on_the_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    header, measured = rows[0], [r for r in rows[1:] if "skipped" not in r[3]]
    assert [h.strip() for h in header[:6]] == ["model", "methods", "variant", "images/s", "limit images/s", "ratio"]
    got = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in measured}
    for arch in ("resnet50", "vit_b_16"):
        for methods in ("gradient family", "integrated_gradients", "gradcam"):
            for variant in ("fp32", "tasks_per_device 2"):
                assert (arch, methods, variant) in got
    for r in measured:
        ips, limit, ratio = (float(r[i]) for i in (3, 4, 5))
        assert ips > 0 and limit > 0 and abs(ratio - ips / limit) < 0.01 + 0.01 * ratio
    # on a CPU, bf16 autocast is not timed (the brief: 14x slower there), and the table says so
    assert any("bf16" in r[2] and "CUDA only" in r[3] for r in rows)

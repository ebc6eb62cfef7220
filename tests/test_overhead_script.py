"""benchmarks/overhead.py and the GPU check script stay runnable (their figures are
measured when they run, never asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, cli_env


def test_overhead_benchmark_runs_and_prints_the_ratio(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--steps", "4", "--warmup", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=180, env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = re.search(r"^trainer/bare = (\d+\.\d\d)x$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0, proc.stdout
    assert "4 interleaved steps each" in proc.stdout


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / "check.sh")]).returncode == 0

"""The benchmark scripts and the GPU check scripts stay runnable (their figures are
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


def test_loss_memory_benchmark_runs_and_the_fused_loss_is_the_same(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loss_memory.py"), "--vocab", "1024",
                           "--tokens", "1024", "--heads", "plain:0,fused:256"], capture_output=True, text=True,
                          timeout=180, env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if re.match(r"^\| [a-z]+ \| \d+ \|", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("plain", "0"), ("fused", "256")]
    assert rows[0][2] == rows[1][2]  # the same loss per token, to the printed digits


def test_gpu_check_scripts_parse():
    for name in ("check.sh", "advise_check.sh", "compare_check.sh", "memory_check.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / name)]).returncode == 0, name

"""Which recipes run here, as compare and bench ask before launching runs: the same answer in place
and from the child process that GPU machines use."""

from __future__ import annotations

import json
import subprocess
import sys

from fp8lab.precision.support import check_recipes_here
from helpers import cli_env

SPEC = {"recipes": ["bf16", "fp8-tensorwise", "mxfp8"], "device": "cpu", "emulate": "off", "compute_dtype": "auto"}


def test_emulate_off_on_cpu_refuses_every_fp8_recipe_with_the_reason():
    got = check_recipes_here(**SPEC)
    assert got["device"] == "cpu" and got["cuda"] is False
    assert set(got["unsupported"]) == {"fp8-tensorwise", "mxfp8"}
    assert all("precision.emulate" in why for why in got["unsupported"].values())
    assert check_recipes_here(**SPEC | {"emulate": "auto"})["unsupported"] == {}
    bf16_fp8 = check_recipes_here(**SPEC | {"emulate": "auto", "compute_dtype": "bf16"})["unsupported"]
    assert set(bf16_fp8) == {"fp8-tensorwise", "mxfp8"}  # CPU bf16 autocast breaks the emulation


def test_the_child_process_answers_the_same(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fp8lab.precision.support", json.dumps(SPEC)],
                          capture_output=True, text=True, env=cli_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == check_recipes_here(**SPEC)
    bad = subprocess.run([sys.executable, "-m", "fp8lab.precision.support", json.dumps(SPEC | {"device": "cuda"})],
                         capture_output=True, text=True, env=cli_env(tmp_path), timeout=120)
    assert bad.returncode == 2 and "train.device=cuda" in bad.stderr

"""bench/build_order.py: --smoke end to end (identical programs, consistent ratios), and argument errors."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "build_order.py"
EVENTS = tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 10)


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False, cwd=ROOT)


def test_smoke_times_the_same_program_against_itself(tmp_path):
  proc = _run("--smoke", "--kernels", "--timing-order", "reverse", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  (record,) = json.loads((tmp_path / "summary.json").read_text())["records"]
  assert (record["tree"], record["leaves"], record["rounds"]) == ("8", 8, 5)
  assert record["timing_order"] == "reverse"
  # The null arm: every arm compiles to the very same optimized program.
  assert record["same_program"] is True
  first = record["arms"][0]["times_ms"]
  assert [a["built"] for a in record["arms"]] == [1, 2]
  for arm in record["arms"]:
    assert len(arm["times_ms"]) == 5 and arm["median_ms"] == statistics.median(arm["times_ms"])
    assert arm["ratio"] == statistics.median(t / b for t, b in zip(arm["times_ms"], first))
    assert (arm["kernel_us"] > 0) if EVENTS else (arm["kernel_us"] == 0)
  assert record["arms"][0]["ratio"] == 1.0
  assert "| 8 arrays | 8 |" in proc.stdout


def test_bad_arguments_are_named():
  proc = _run("--trees", "3")
  assert proc.returncode == 2 and "--trees" in proc.stderr
  proc = _run("--arms", "1")
  assert proc.returncode == 2 and "--arms" in proc.stderr

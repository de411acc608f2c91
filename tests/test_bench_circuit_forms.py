"""bench/circuit_forms.py end to end: --smoke, and argument errors."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "circuit_forms.py"


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False, cwd=ROOT)


def test_smoke_writes_a_consistent_summary(tmp_path):
  proc = _run("--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  cases = json.loads((tmp_path / "summary.json").read_text())["cases"]
  assert [c["batch"] for c in cases] == [1, 8]
  for c in cases:
    assert c["pairs"] == len(c["old_times_ms"]) == len(c["new_times_ms"]) == 5
    assert abs(c["old_ms"] - statistics.median(c["old_times_ms"])) < 1e-9
    ratios = [b / a for a, b in zip(c["old_times_ms"], c["new_times_ms"])]
    assert abs(c["ratio"] - statistics.median(ratios)) < 1e-9
    # The two forms are the same circuit: float32 rounding apart only.
    assert c["max_abs_diff"] < 3e-6
  assert "| B |" in proc.stdout


def test_bad_arguments_are_named():
  proc = _run("--batches", "0,4")
  assert proc.returncode == 2 and "--batches" in proc.stderr
  proc = _run("--pairs", "0")
  assert proc.returncode == 2 and "--pairs" in proc.stderr

"""bench/inject_overhead.py end to end: --smoke, --help and argument errors."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "inject_overhead.py"


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False, cwd=ROOT)


def test_smoke_writes_a_consistent_summary_and_png(tmp_path):
  proc = _run("--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "ratio" in proc.stdout and "QNodes built: 1" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["runs"]
  assert [r["mode"] for r in runs] == ["eager", "jit"]
  for r in runs:
    assert r["optimizer"] == "qsgd" and r["quantum_weight"] == 0.5 and r["seed"] == 0
    assert len(r["ratios"]) == len(r["adamw_times_ms"]) == r["pairs"] == 10
    assert r["adamw_ms"] == statistics.median(r["adamw_times_ms"])
    pair = [q / a for a, q in zip(r["adamw_times_ms"], r["qsgd_times_ms"])]
    assert abs(r["ratio"] - statistics.median(pair)) < 1e-9
    # The factory ran on every update, the QNode was built once.
    assert r["qnodes_built"] == 1
  assert runs[0]["meets_target"] == (runs[0]["ratio"] <= 1.2)
  assert runs[1]["target"] is None
  assert (tmp_path / "inject_overhead.png").read_bytes()[:4] == b"\x89PNG"


def test_help_and_bad_arguments():
  proc = _run("--help")
  assert proc.returncode == 0 and "--leaves" in proc.stdout
  proc = _run("--leaves", "0")
  assert proc.returncode == 2 and "--leaves" in proc.stderr

"""bench/device_overhead.py end to end: --smoke, --help and argument errors."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_overhead.py"


def _has(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


pytestmark = pytest.mark.skipif(
    not all(_has(m) for m in ("pennylane_lightning", "pennylane_qiskit", "qiskit_aer", "flax")),
    reason='the device benchmark needs the devices extra: pip install "qsgd_optax[devices]" '
           '(and the examples extra)')


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False, cwd=ROOT)


def test_smoke_writes_a_consistent_summary_and_png(tmp_path):
  proc = _run("--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "overhead ms" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["runs"]
  assert [r["device"] for r in runs] == ["lightning.qubit", "qiskit.aer"]
  for r in runs:
    assert r["optimizer"] == "qsgd" and r["quantum_weight"] == 0.5 and r["seed"] == 0
    assert len(r["ratios"]) == len(r["host_times_ms"]) == r["pairs"] == 4
    assert r["host_ms"] == statistics.median(r["host_times_ms"])
    pair = [h / t for t, h in zip(r["traced_times_ms"], r["host_times_ms"])]
    assert abs(r["ratio"] - statistics.median(pair)) < 1e-9
    assert r["host_compile_s"] > 0 and r["traced_compile_s"] > 0
  # One traced arm, shared by every device's record.
  assert runs[0]["traced_times_ms"] == runs[1]["traced_times_ms"]
  assert summary["config"]["versions"]["qiskit-aer"]
  assert (tmp_path / "device_overhead.png").read_bytes()[:4] == b"\x89PNG"


def test_help_and_bad_arguments():
  proc = _run("--help")
  assert proc.returncode == 0 and "--devices" in proc.stdout
  proc = _run("--devices", "bogus.device")
  assert proc.returncode == 2 and "--devices" in proc.stderr
  proc = _run("--pairs", "0")
  assert proc.returncode == 2 and "--pairs" in proc.stderr

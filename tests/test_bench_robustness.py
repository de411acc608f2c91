"""bench/robustness.py: smoke run, outcome rules, and --from regeneration."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "robustness.py"


def _load():
  spec = importlib.util.spec_from_file_location("bench_robustness", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600, check=False)


def test_classify_rules():
  rob = _load()
  base = {"problem": "parabola", "final_loss": 1e-12}
  assert rob.classify({**base, "final_loss": None}, base) == "diverged"
  assert rob.classify({**base, "final_loss": 5e-11}, base) == "ok"        # below the floor
  assert rob.classify({**base, "final_loss": 2e-4}, base) == "stalled"
  assert rob.classify({**base, "final_loss": 2e-4}, {**base, "final_loss": 1e-4}) == "ok"
  cls = {"problem": "classifier", "final_loss": 0.3, "final_accuracy": 0.95}
  assert rob.classify({**cls, "final_accuracy": 0.80}, cls) == "stalled"
  assert rob.classify({**cls, "final_accuracy": 0.90}, cls) == "ok"


def test_analytic_runs_match_a_plain_loop():
  """The vmapped/scanned grid equals one optax loop per cell (second code path).

  8 steps: at weight 0.9 the paper form turns chaotic on Rosenbrock within
  tens of steps, where two float32 programs legitimately part ways.
  """
  rob = _load()
  import jax
  import optax
  import qsgd_optax
  grid = rob.run_analytic("rosenbrock", "gradient", [0.1, 0.9], [1.0, 100.0], [0, 1], 8, "sine")
  init, loss, lr = rob.analytic_problem("rosenbrock")
  for i, w in enumerate([0.1, 0.9]):
    for j, s in enumerate([1.0, 100.0]):
      for k, seed in enumerate([0, 1]):
        tx = qsgd_optax.qsgd(lr, quantum_weight=w, circuit="sine", modulate="gradient")
        p = rob._start(init, seed)
        state = tx.init(p)
        step = jax.jit(lambda p, st, s=s: tx.update(jax.grad(lambda q: s * loss(q))(p), st, p))
        for _ in range(8):
          u, state = step(p, state)
          p = optax.apply_updates(p, u)
        want = float(loss(p))
        if not math.isfinite(want) or want > 1e3:  # diverging: chaotic, compare the verdict
          assert not math.isfinite(grid[i, j, k]) or grid[i, j, k] > 1e3, (w, s, seed)
          continue
        assert grid[i, j, k] == pytest.approx(want, rel=1e-4, abs=1e-6), (w, s, seed)


def test_smoke_and_from(tmp_path):
  proc = _run("--smoke", "--out", str(tmp_path), "--no-progress")
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["runs"]
  problems = {"parabola", "rosenbrock", "least_squares"}
  assert {r["problem"] for r in runs} == problems
  # 2 weights x 2 scales x 2 seeds per form, 2 scales x 2 seeds for adamw.
  for p in problems:
    assert sum(r["problem"] == p and r["optimizer"] == "adamw" for r in runs) == 4
    for form in ("gradient", "preconditioned", "update"):
      assert sum(r["problem"] == p and r["modulate"] == form for r in runs) == 8
  for r in runs:
    assert {"optimizer", "quantum_weight", "seed"} <= set(r)
    assert r["final_loss"] is None or math.isfinite(r["final_loss"])
  # The table's counts are the rule applied to the records.
  rob = _load()
  counts = rob.tally(runs)
  assert sum(sum(c.values()) for c in counts.values()) == 3 * 3 * 8
  table = (tmp_path / "table.txt").read_text()
  png = (tmp_path / "robustness.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # --from regenerates the same table without training.
  again = tmp_path / "again"
  proc = _run("--from", str(tmp_path), "--out", str(again))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (again / "table.txt").read_text() == table


def test_bad_arguments():
  proc = _run("--problems", "parabola,nope")
  assert proc.returncode == 2 and "--problems" in proc.stderr and "Traceback" not in proc.stderr
  proc = _run("--weights", "0.1,-1")
  assert proc.returncode == 2 and "--weights" in proc.stderr

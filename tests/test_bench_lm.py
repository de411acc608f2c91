"""bench/lm.py: paired analysis on hand-made runs, smoke run and --from."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "lm.py"


def _load():
  spec = importlib.util.spec_from_file_location("bench_lm", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_analyse_pairs_by_seed():
  bench = _load()
  runs = [{"arm": a, "seed": s, "mean_loss": m, "eval_loss_after": e, "tokens_per_s": 100.0}
          for a, s, m, e in [("adamw", 0, 0.30, 0.40), ("adamw", 1, 0.32, 0.41),
                             ("qsgd:0.5", 1, 0.31, 0.42), ("qsgd:0.5", 0, 0.27, 0.40)]]
  rows = {r["arm"]: r for r in bench.analyse(runs)}
  assert rows["adamw"]["mean_loss_mean"] == pytest.approx(0.31)
  assert rows["adamw"]["paper_mean_loss"] == 0.2188
  d = rows["qsgd:0.5"]["mean_loss_vs_adamw"]
  assert d["n"] == 2 and d["mean_diff"] == pytest.approx(np.mean([0.27 - 0.30, 0.31 - 0.32]))
  assert d["p_value"] == pytest.approx(0.5)  # both negative: 2 of 4 sign flips
  assert rows["qsgd:0.5"]["eval_loss_after_vs_adamw"]["mean_diff"] == pytest.approx(0.005)
  assert "| qsgd:0.5 | 2 | 0.2097 |" in bench.table(bench.analyse(runs))


def test_null_arm_and_the_claim():
  bench = _load()
  runs = [{"arm": a, "seed": s, "mean_loss": m, "eval_loss_after": 0.4, "tokens_per_s": 100.0}
          for a, s, m in [("adamw", 0, 0.300), ("adamw", 1, 0.320), ("adamw", 2, 0.310),
                          ("qsgd:1e-06", 0, 0.301), ("qsgd:1e-06", 1, 0.319), ("qsgd:1e-06", 2, 0.310),
                          ("qsgd:0.5", 0, 0.300), ("qsgd:0.5", 1, 0.320), ("qsgd:0.5", 2, 0.311)]]
  rows = {r["arm"]: r for r in bench.analyse(runs)}
  assert rows["qsgd:1e-06"]["is_null"] and "claim_vs_null" not in rows["qsgd:1e-06"]
  assert rows["qsgd:0.5"]["mean_loss_vs_null"]["mean_diff"] == pytest.approx((-0.001 + 0.001 + 0.001) / 3)
  claim = rows["qsgd:0.5"]["claim_vs_null"]
  d = np.log([0.300 / 0.301, 0.320 / 0.319, 0.311 / 0.310])
  assert claim["bound"] == pytest.approx(np.expm1(d.mean() - 2.919986 * d.std(ddof=1) / np.sqrt(3)))
  assert claim["excluded"] is True  # the lower bound, about -0.5%, is above -4%
  assert "| qsgd:0.5 | +0.10% | -0.53% (n=3) | excluded |" in bench.table(bench.analyse(runs))


def test_resume_keeps_runs_and_refuses_other_settings(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path),
                                   "--no-progress", "--resume", *a], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=600, check=False)
  proc = run("--optimizers", "adamw,qsgd:0.5", "--seeds", "1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  first = json.loads((tmp_path / "summary.json").read_text())["runs"]
  qsgd = next(r for r in first if r["arm"] == "qsgd:0.5")
  assert len(qsgd["term_share_step"]) == 8 and all(0 < v < 1 for v in qsgd["term_share_global"])
  assert "term_share_step" not in next(r for r in first if r["arm"] == "adamw")
  assert not any((tmp_path / "checkpoints").iterdir())  # a finished run's checkpoints are removed
  proc = run("--optimizers", "adamw,qsgd:0.5", "--seeds", "2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resuming: 2 runs kept" in proc.stderr
  grown = json.loads((tmp_path / "summary.json").read_text())
  assert grown["runs"][:2] == first and [(r["arm"], r["seed"]) for r in grown["runs"][2:]] == [
      ("adamw", 1), ("qsgd:0.5", 1)]
  proc = run("--lr", "0.5")
  assert proc.returncode == 1 and "learning_rate=0.003" in proc.stderr and "Traceback" not in proc.stderr
  (tmp_path / "summary.json").write_text(json.dumps({"runs": first}))  # no config: not ours
  proc = run()
  assert proc.returncode == 1 and "does not say how its runs were made" in proc.stderr


def test_smoke_and_from(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True,
                                  text=True, env=env, cwd=ROOT, timeout=600, check=False)
  proc = run("--smoke", "--out", str(tmp_path), "--no-progress")
  assert proc.returncode == 0, proc.stderr[-4000:]
  runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
  assert sorted((r["arm"], r["seed"]) for r in runs) == [
      ("adamw", 0), ("adamw", 1), ("qsgd:0.5", 0), ("qsgd:0.5", 1)]
  for r in runs:
    assert r["mean_loss"] == pytest.approx(np.mean(r["loss_curve"]), rel=1e-6)
  table = (tmp_path / "table.md").read_text()
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
  proc = run("--from", str(tmp_path), "--out", str(tmp_path / "again"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (tmp_path / "again" / "table.md").read_text() == table

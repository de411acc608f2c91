"""bench/convergence.py and bench/_stats.py: statistics, smoke run, --from."""

import doctest
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


stats = _load("_stats")
from qsgd_optax.tasks import arms  # noqa: E402


def test_stats_doctests():
  assert doctest.testmod(stats).failed == 0


@pytest.mark.parametrize("n", [1, 3, 6, 9])
def test_sign_flip_pvalue_matches_brute_force(n):
  rng = np.random.default_rng(n)
  d = rng.normal(0.3, 1.0, size=n)
  count = 0
  for signs in itertools.product([1, -1], repeat=n):
    if abs(np.mean(np.asarray(signs) * d)) >= abs(np.mean(d)) - 1e-12:
      count += 1
  assert stats.sign_flip_pvalue(d) == pytest.approx(count / 2 ** n)


def test_sign_flip_monte_carlo_path_is_close_to_exact():
  d = np.random.default_rng(1).normal(0.4, 1.0, size=17)
  exact = stats.sign_flip_pvalue(d[:16])
  assert 0 < stats.sign_flip_pvalue(d) <= 1
  assert stats.sign_flip_pvalue(d[:16], n_resamples=10) == exact  # exact path ignores it


def test_bootstrap_ci_covers_the_mean_and_shrinks():
  rng = np.random.default_rng(0)
  small, large = rng.normal(1.0, 1.0, 10), rng.normal(1.0, 1.0, 1000)
  lo, hi = stats.bootstrap_ci(small)
  assert lo < small.mean() < hi
  lo2, hi2 = stats.bootstrap_ci(large)
  assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo)
  # Normal theory: the 95% interval of a mean of 1000 N(1, 1) is about +-0.062.
  assert hi2 - lo2 == pytest.approx(2 * 1.96 / np.sqrt(1000), rel=0.15)


def test_paired_uses_common_seeds_only():
  r = stats.paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 1: 0.8, 5: 0.1})
  assert r["n"] == 2 and r["mean_diff"] == pytest.approx(0.025)


def _handmade(rows):
  runs = []
  for seed, values in enumerate(rows):
    for arm, (acc, ett) in zip(("adamw", "qsgd:1e-6", "qsgd:0.5"), values):
      runs.append({"setting": "synthetic/standard", "arm": arms.parse_arm(arm).label, "seed": seed,
                   "epochs": 10, "final_accuracy": acc, "epochs_to_target": ett, "steps_per_epoch": 50,
                   "mean_step_time_s": 0.01, "target_accuracy": 0.9})
  return runs


def test_analyse_on_handmade_runs():
  conv = _load("convergence")
  runs = _handmade([((0.90, 7), (0.91, 7), (0.93, 5)), ((0.91, None), (0.90, 8), (0.92, 6)),
                    ((0.88, 8), (0.89, 9), (0.94, None))])
  rows = {r["arm"]: r for r in conv.analyse(runs, 0.9)}
  assert rows["adamw"]["never"] == 1 and rows["qsgd:0.5"]["never"] == 1
  assert rows["adamw"]["epochs_to_target_mean"] == pytest.approx(7.5)
  assert rows["adamw"]["time_to_target_s_mean"] == pytest.approx(7.5 * 50 * 0.01)
  acc = rows["qsgd:0.5"]["accuracy_vs_adamw"]
  assert acc["mean_diff"] == pytest.approx(np.mean([0.03, 0.01, 0.06]))
  assert acc["p_value"] == pytest.approx(2 / 8)  # all three positive: 2 of 8 flips
  d = np.array([0.02, 0.02, 0.05])  # against the null arm
  null = rows["qsgd:0.5"]["accuracy_vs_null"]
  half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
  assert null["mean_diff"] == pytest.approx(d.mean())
  assert (null["ci_low"], null["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
  assert rows["qsgd:1e-06"]["is_null"] and "accuracy_vs_null" not in rows["qsgd:1e-06"]
  # A never-reached run makes the epochs difference undefined, not a number.
  ett = rows["qsgd:0.5"]["epochs_to_target_vs_adamw"]
  assert ett["censored"] == 2 and np.isnan(ett["mean_diff"])
  claims = {c["claim"]: c for c in rows["qsgd:0.5"]["claims_vs_null"]}
  accuracy = claims["final accuracy"]
  assert accuracy["bound"] == pytest.approx(d.mean() + 2.919986 * d.std(ddof=1) / np.sqrt(3))  # t(0.95, 2)
  assert accuracy["excluded"] is False  # the bound, 0.067, lies above +2.3 points
  assert claims["epochs to target"]["method"] == "n/a" and claims["epochs to target"]["censored"] == 1
  table = conv.tables(conv.analyse(runs, 0.9))
  assert "n/a (2 of 3 pairs censored)" in table and "| qsgd:1e-06 (null) | 3 |" in table
  assert "| qsgd:0.5 | final accuracy | +2.3 points (93.8% vs 91.5%) | +3.00 points |" in table


def test_claims_excluded_when_the_bound_is_below_the_effect():
  conv = _load("convergence")
  runs = _handmade([((0.90, 7), (0.90, 7), (0.901, 7)), ((0.91, 6), (0.91, 6), (0.905, 6)),
                    ((0.88, 8), (0.88, 8), (0.882, 8)), ((0.90, 5), (0.90, 5), (0.90, 5.5))])
  row = {r["arm"]: r for r in conv.analyse(runs, 0.9)}["qsgd:0.5"]
  claims = {c["claim"]: c for c in row["claims_vs_null"]}
  assert claims["final accuracy"]["excluded"] is True
  assert claims["epochs to target"]["excluded"] is True  # lower bound near 0, above -2.8
  rel = claims["epochs to target, relative"]
  d = np.log(np.array([7 / 7, 6 / 6, 8 / 8, 5.5 / 5]))
  assert rel["mean"] == pytest.approx(np.expm1(d.mean())) and rel["excluded"] is True
  assert claims["time to target"]["excluded"] is True


def test_smoke_and_from(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, str(BENCH / "convergence.py"), *a],
                                  capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=600, check=False)
  proc = run("--smoke", "--out", str(tmp_path), "--no-progress", "--evals-per-epoch", "2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
  assert sorted((r["arm"], r["seed"]) for r in runs) == [
      ("adamw", 0), ("adamw", 1), ("qsgd:0.5", 0), ("qsgd:0.5", 1)]
  for r in runs:
    assert len(r["test_accuracy"]) == 2 * r["epochs"] == 4 and r["eval_epoch"] == [0.5, 1, 1.5, 2]
    assert (r["arm"] == "qsgd:0.5") == ("term_share_median" in r)
  table = (tmp_path / "table.md").read_text()
  assert "| qsgd:0.5 | 2 |" in table
  for png in ("curves_synthetic_standard.png", "epochs_to_target.png", "term_share.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  again = tmp_path / "again"
  proc = run("--from", str(tmp_path), "--out", str(again))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (again / "table.md").read_text() == table
  # --resume keeps the four runs and trains only the new seed.
  proc = run("--smoke", "--out", str(tmp_path), "--seeds", "3", "--resume", "--no-progress",
             "--evals-per-epoch", "2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "4 runs kept, 2 to train" in proc.stdout
  grown = json.loads((tmp_path / "summary.json").read_text())
  assert grown["runs"][:4] == runs and sorted((r["arm"], r["seed"]) for r in grown["runs"][4:]) == [
      ("adamw", 2), ("qsgd:0.5", 2)]
  assert grown["config"]["seeds"] == [0, 1, 2]
  for bad, message in ((["--epochs", "3"], "epochs=2"), (["--lr", "0.5"], "lr=0.001"),
                       (["--evals-per-epoch", "1"], "evals_per_epoch=2")):
    proc = run("--smoke", "--out", str(tmp_path), "--resume", "--no-progress",
               *(["--evals-per-epoch", "2"] if "--evals-per-epoch" not in bad else []), *bad)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
  proc = run("--tasks", "mnist")
  assert proc.returncode == 2 and "--tasks" in proc.stderr and "Traceback" not in proc.stderr


def test_final_accuracy_claim_is_untestable_at_the_ceiling():
  conv = _load("convergence")
  runs = _handmade([((1.0, 5), (0.99, 5), (1.0, 5)), ((1.0, 6), (0.985, 6), (1.0, 6))])
  row = {r["arm"]: r for r in conv.analyse(runs, 0.9)}["qsgd:0.5"]
  accuracy = next(c for c in row["claims_vs_null"] if c["claim"] == "final accuracy")
  assert accuracy["method"] == "ceiling" and accuracy["excluded"] is None
  assert "untestable" in conv.tables(conv.analyse(runs, 0.9))


def test_gradient_scale_smoke_and_from(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  script = str(BENCH / "gradient_scale.py")
  proc = subprocess.run([sys.executable, script, "--smoke", "--every", "1", "--out", str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
  assert [r["task"] for r in runs] == ["synthetic", "agreement"]
  for r in runs:  # 192 / 32 = 6 steps, each sampled; the touched coordinates are a subset of all
    assert len(r["max_abs_grad_touched"]) == r["steps"] == 6
    assert all(0 < t <= a for t, a in zip(r["max_abs_grad_touched"], r["max_abs_grad_all"]))
  again = subprocess.run([sys.executable, script, "--from", str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600, check=False)
  assert again.returncode == 0 and again.stdout.strip() == (tmp_path / "table.md").read_text().strip()


def test_claim_with_a_non_finite_difference_is_not_decided():
  r = stats.claim_test([float("nan"), 0.1, 0.2], -0.04, relative=True)
  assert r["excluded"] is None
  flat = stats.claim_test([0.0, 0.0, 0.0], -2.8)
  assert flat["excluded"] is True and "degenerate" in flat["method"]

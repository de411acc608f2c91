"""bench/step_overhead.py end to end: --smoke, --help and argument errors.

The benchmark runs in a subprocess exactly as a user would start it; the
tests check the summary.json fields against themselves (medians against the
recorded per-pair times, parameter counts against the pytree the script
builds and a closed form) and the PNG.
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "step_overhead.py"

CASE_FIELDS = {
    "name", "params", "leaves", "circuit", "scope", "modulate", "adamw_ms",
    "qsgd_ms", "ratio", "compile_s_adamw", "compile_s_qsgd", "device",
    "adamw_min_ms", "adamw_max_ms", "qsgd_min_ms", "qsgd_max_ms", "pairs",
    "target", "meets_target", "kernels_adamw", "kernels_qsgd",
}


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args],
                        capture_output=True, text=True, env=env,
                        timeout=timeout, check=False, cwd=ROOT)


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_step_overhead", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("step_overhead")
  proc = _run("--smoke", "--out", str(out))
  return proc, out


def test_smoke_exits_0_and_prints_table(smoke):
  proc, _ = smoke
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| case" in proc.stdout and "ratio" in proc.stdout


def test_smoke_summary_is_consistent(smoke):
  proc, out = smoke
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((out / "summary.json").read_text())
  cases, runs, config = summary["cases"], summary["runs"], summary["config"]
  # Two optimizer-only cases, one case of the leaf-count sweep, then the classifier's full train step.
  assert len(cases) == len(runs) == 4
  assert cases[2]["name"] == "8 leaves paper/leaf/gradient" and cases[2]["leaves"] == 8
  assert cases[2]["params"] == 4 * (64 * 96 + 96)
  assert cases[2]["target"] == "ratio <= 1.05"  # the compile target applies from 128 leaves on
  assert config["leaves"] == [8] and config["leaf_combos"] == ["paper/leaf/gradient"]
  assert cases[3]["name"] == "train classifier paper/leaf/gradient"
  assert cases[3]["target"] == "ratio <= 1.02"
  assert config["smoke"] is True and config["versions"]["jax"]
  assert "xla_flags" in config
  for case, run in zip(cases, runs):
    assert set(case) == CASE_FIELDS, set(case) ^ CASE_FIELDS
    assert case["name"].endswith(f"{case['circuit']}/{case['scope']}/{case['modulate']}")
    for arm in ("adamw", "qsgd"):
      med, lo, hi = case[f"{arm}_ms"], case[f"{arm}_min_ms"], case[f"{arm}_max_ms"]
      assert 0 < lo <= med <= hi and math.isfinite(hi)
      times = run[f"{arm}_times_ms"]
      assert len(times) == case["pairs"] >= 1
      assert med == pytest.approx(statistics.median(times))
      assert (lo, hi) == (min(times), max(times))
    ratios = [b / a for a, b in zip(run["adamw_times_ms"], run["qsgd_times_ms"])]
    assert run["pair_ratios"] == pytest.approx(ratios)
    # Both build orders, one after the other: the ratio is the geometric mean of theirs.
    n_first = run["order_pairs"]["adamw_first"]
    assert n_first + run["order_pairs"]["qsgd_first"] == case["pairs"] and n_first >= 1
    by_order = {"adamw_first": statistics.median(ratios[:n_first]),
                "qsgd_first": statistics.median(ratios[n_first:])}
    assert run["order_ratios"] == pytest.approx(by_order)
    assert case["ratio"] == pytest.approx(math.sqrt(by_order["adamw_first"] * by_order["qsgd_first"]))
    assert run["build_orders"] == [["adamw", "qsgd"], ["qsgd", "adamw"]]
    for arm in ("adamw", "qsgd"):
      assert len(run["compile_s"][arm]) == 2
      assert case[f"compile_s_{arm}"] == run["compile_s"][arm][0]  # the first, fresh build
    assert 0 < case["ratio"] and math.isfinite(case["ratio"])
    assert case["compile_s_adamw"] > 0 and case["compile_s_qsgd"] > 0
    # Distinct fused computations: the QNode adds its own kernels; the sine
    # closed form may fuse entirely into Adam's loops.
    assert 0 < case["kernels_adamw"] <= case["kernels_qsgd"]
    if case["circuit"] == "paper":
      assert case["kernels_qsgd"] > case["kernels_adamw"]
    assert "cpu" in case["device"]
    assert (case["target"] is None) == (case["meets_target"] is None)
    met = run["targets_met"]
    assert case["meets_target"] == (all(met.values()) if met else None)
    assert case["target"] == ("; ".join(met) if met else None)
    # The run record repeats the case and carries the DESIGN.md fields.
    assert run["optimizer"] == "qsgd" and run["quantum_weight"] == 0.5
    assert run["seed"] == 0
    assert {k: run[k] for k in CASE_FIELDS} == case


def test_smoke_param_counts_match_the_pytree(smoke):
  proc, out = smoke
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((out / "summary.json").read_text())
  bench = _load_script()
  for case, run in zip(summary["cases"], summary["runs"]):
    if run["size"].startswith(("train", "8 leaves")):
      continue
    d, n_layers, vocab = run["d_model"], run["n_layers"], run["vocab"]
    assert (d, n_layers, vocab) == bench.layout_for_size(
        summary["config"]["size_params"][run["size"]])
    shapes = bench.transformer_shapes(d, n_layers, vocab)
    leaves = []
    stack = [shapes]
    while stack:
      node = stack.pop()
      if isinstance(node, dict):
        stack.extend(node.values())
      else:
        leaves.append(node)
    assert case["params"] == sum(math.prod(s) for s in leaves)
    assert case["leaves"] == len(leaves) == 16 * n_layers + 3
    # Closed form: embedding, 4 attention d x d + bias, MLP d x 4d + 4d and
    # 4d x d + d, two LayerNorms per layer; a final LayerNorm.
    assert case["params"] == vocab * d + n_layers * (12 * d * d + 13 * d) + 2 * d
    # The smoke pytree is the "~64k parameter" one.
    assert 50_000 <= case["params"] <= 80_000


def test_smoke_png(smoke):
  proc, out = smoke
  assert proc.returncode == 0, proc.stderr[-4000:]
  png = out / "step_overhead.png"
  assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help():
  proc = _run("--help", timeout=60)
  assert proc.returncode == 0, proc.stderr
  for flag in ("--out", "--smoke", "--sizes", "--combos", "--pairs", "--warmup"):
    assert flag in proc.stdout


@pytest.mark.parametrize("bad, what", [
    (["--combos", "foo/bar/baz"], "--combos"),
    (["--combos", "paper/leaf"], "--combos"),
    (["--sizes", "lots"], "--sizes"),
    (["--pairs", "0"], "--pairs"),
    (["--train-steps", "resnet"], "--train-steps"),
    (["--leaves", "3"], "--leaves"),
    (["--leaf-combos", "paper/everything/gradient"], "--leaf-combos"),
])
def test_bad_arguments_exit_2_without_traceback(bad, what):
  proc = _run(*bad, timeout=60)
  assert proc.returncode == 2
  assert what in proc.stderr
  assert "Traceback" not in proc.stderr

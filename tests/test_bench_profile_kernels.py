"""bench/profile_kernels.py end to end: --smoke against the compiled programs, and argument errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "profile_kernels.py"
# XLA:CPU records one profiler event per kernel from jax 0.10 on.
EVENTS = tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 10)


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, check=False, cwd=ROOT)


def test_smoke_counts_every_kernel_of_the_compiled_programs_once_per_call(tmp_path):
  proc = _run("--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  records = [*summary["kernels"].values(), summary["circuit"]]
  assert summary["per_kernel_events"] is EVENTS
  for record in records:
    assert record["kernel_instructions"] > 0
    if EVENTS:
      # Straight-line programs (scope "leaf"): each kernel of the entry computation runs once
      # per call, and the profiler's events say so, kind by kind.
      assert record["launches_per_call"] == record["kernel_instructions"]
      assert all(r["launches_per_call"] == int(r["launches_per_call"]) >= 1 for r in record["rows"])
      assert abs(sum(r["us_per_call"] for r in record["rows"]) - record["us_per_call"]) < 1e-6
    else:
      assert record["rows"] == [] and "records no per-kernel profiler events" in proc.stdout
  adamw, qsgd = summary["kernels"].values()
  # The quantum term adds kernels (the circuit's among them) to AdamW's program.
  assert qsgd["kernel_instructions"] > adamw["kernel_instructions"] + summary["circuit"]["kernel_instructions"] // 2
  for runs in summary["compile"].values():
    assert len(runs) == 1 and all(r["compile_s"] > 0 and r["total_s"] >= r["compile_s"] for r in runs)
  assert "| kernel kind |" in proc.stdout and "| arm | trace s |" in proc.stdout


def test_bad_arguments_are_named():
  proc = _run("--leaves", "3")
  assert proc.returncode == 2 and "--leaves" in proc.stderr
  proc = _run("--combo", "paper/every/gradient")
  assert proc.returncode == 2 and "--combo" in proc.stderr
  proc = _run("--combo", "paper/leaf/gradient,sine/all/gradient")
  assert proc.returncode == 2 and "expected one circuit/scope/modulate" in proc.stderr
  proc = _run("--leaves", "4", "--size", "1M")
  assert proc.returncode == 2 and "not allowed with" in proc.stderr


def _profile_kernels_module():
  sys.path.insert(0, str(ROOT / "bench"))
  try:
    import profile_kernels  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(ROOT / "bench"))
  return profile_kernels


def test_kernels_inside_loops_are_found_and_counted_per_iteration():
  """A loop carrying six arrays (its tuple type prints /*index=5*/): the body's kernels count,
  once per iteration; the loop itself is a container, not a kernel of its own."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  pk = _profile_kernels_module()

  def body(i, carry):
    return tuple(jnp.sin(c) * (i + 1.5) for c in carry)

  fn = jax.jit(lambda *xs: jax.lax.fori_loop(0, 3, body, xs))
  xs = tuple(jnp.full((64, 64), float(k)) for k in range(6))
  compiled = fn.lower(*xs).compile()
  text = compiled.as_text()
  names = pk.kernel_names(text)
  assert "/*index=5*/" in text and " while(" in text
  assert not any(n.startswith("while") for n in names)
  sines = [n for n in names if pk._kind(n).startswith("sine")]  # pylint: disable=protected-access
  assert sines, "the loop body's kernels are found"
  entry = text[text.index("\nENTRY"):]
  assert not any(f"%{n} = " in entry for n in sines)  # they live in the body only
  if EVENTS:
    record = pk.profile(lambda: jax.block_until_ready(compiled(*xs)), names, 3)
    per_call = {r["kind"]: r["launches_per_call"] for r in record["rows"]}
    for kind in {pk._kind(n) for n in sines}:  # pylint: disable=protected-access
      instances = sum(pk._kind(n) == kind for n in sines)  # pylint: disable=protected-access
      assert per_call[kind] == 3 * instances, per_call

"""The LM example across processes: examples/launch_local.py on 127.0.0.1, 2 processes x 2 CPU devices.

Equal to one process on 4 devices (same global mesh, another program: float
rounding), resumable bit-identically across processes, and a failing
process makes the launcher fail fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch_local.py"
LM = ROOT / "examples" / "finetune_lm.py"
ARGS = ("--smoke", "--optimizers", "qsgd:0.5", "--examples", "16", "--mesh", "data=2,fsdp=2", "--batch-size", "4",
        "--no-progress")
TIMEOUT_S = 600


def _launch(*args, timeout=TIMEOUT_S):
  return subprocess.run([sys.executable, str(LAUNCH), *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _run_record(out: Path) -> dict:
  (run,) = json.loads((out / "summary.json").read_text())["runs"]
  return run


def _steps(checkpoints: Path) -> tuple[Path, list[int]]:
  """The one run's checkpoint directory under ``checkpoints`` and its step numbers."""
  run_dir = next(checkpoints.iterdir())
  return run_dir, sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit())


def _keep_first_checkpoint(checkpoints: Path) -> list[int]:
  """Removes every step but the first, as if the processes died right after it; returns the steps."""
  run_dir, steps = _steps(checkpoints)
  assert len(steps) >= 2
  for step in steps[1:]:
    shutil.rmtree(run_dir / str(step))
  return steps


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  out = tmp_path_factory.mktemp("lm_2x2")
  proc = _launch("--processes", "2", "--devices-per-process", "2", "--", str(LM), *ARGS,
                 "--checkpoint-every", "1", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc, out


def test_two_processes_equal_one_process_on_the_same_mesh(two_processes, tmp_path):
  proc, out = two_processes
  assert proc.stdout.count("optimizer  runs  mean loss") == 1  # one table: process 0's
  assert proc.stdout.count("wrote ") == 1
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  single = subprocess.run([sys.executable, str(LM), *ARGS, "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=TIMEOUT_S, env=env)
  assert single.returncode == 0, single.stderr[-4000:]
  got, want = _run_record(out), _run_record(tmp_path)
  assert len(got["loss_curve"]) == len(want["loss_curve"]) >= 3
  # Another program (collectives across processes): float32 rounding, measured ~1e-7.
  np.testing.assert_allclose(got["loss_curve"], want["loss_curve"], rtol=1e-4)
  np.testing.assert_allclose(got["eval_loss_after"], want["eval_loss_after"], rtol=1e-4)
  assert got["resumed_at"] == 0


def test_two_process_resume_is_bit_identical(two_processes, tmp_path):
  _, out = two_processes
  want = _run_record(out)
  shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
  steps = _keep_first_checkpoint(tmp_path / "checkpoints")
  proc = _launch("--processes", "2", "--devices-per-process", "2", "--", str(LM), *ARGS,
                 "--checkpoint-every", "1", "--resume", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = _run_record(tmp_path)
  assert got["resumed_at"] == steps[0]
  for key in ("loss_curve", "mean_loss", "final_loss", "eval_loss_before", "eval_loss_after", "train_tokens"):
    assert got[key] == want[key], key  # the same program on the same machine


def test_a_two_process_checkpoint_resumes_on_one_process(two_processes, tmp_path):
  """Another process count, the same 2 x 2 mesh: Orbax reshards, the files and arrays still verify."""
  _, out = two_processes
  want = _run_record(out)
  shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
  steps = _keep_first_checkpoint(tmp_path / "checkpoints")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, str(LM), *ARGS, "--checkpoint-every", "1", "--resume", "--out",
                         str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "skipped" not in proc.stderr
  got = _run_record(tmp_path)
  assert got["resumed_at"] == steps[0]
  # Another program for the steps after the resume (no cross-process reductions): float rounding.
  np.testing.assert_allclose(got["loss_curve"], want["loss_curve"], rtol=1e-4)


def test_a_damaged_shard_of_one_process_is_skipped_by_both(tmp_path):
  """FSDP over all 4 devices, so process 1 writes its own OCDBT files; one of them is truncated."""
  args = [a if a != "data=2,fsdp=2" else "data=1,fsdp=4" for a in ARGS]
  clean = _launch("--processes", "2", "--devices-per-process", "2", "--", str(LM), *args,
                  "--checkpoint-every", "1", "--out", str(tmp_path / "clean"))
  assert clean.returncode == 0, clean.stderr[-4000:]
  want = _run_record(tmp_path / "clean")
  run_dir, steps = _steps(tmp_path / "clean" / "checkpoints")
  shards = [f for f in (run_dir / str(steps[-1])).rglob("*") if f.is_file() and "ocdbt.process_1" in str(f)
            and f.parent.name == "d"]
  assert shards, "process 1 wrote no data files"
  big = max(shards, key=lambda f: f.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  resumed = _launch("--processes", "2", "--devices-per-process", "2", "--", str(LM), *args,
                    "--checkpoint-every", "1", "--resume", "--out", str(tmp_path / "clean"), timeout=TIMEOUT_S)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert (f"skipped step {steps[-1]}: process 1 found it damaged; resuming from step {steps[-2]}"
          in resumed.stderr)
  got = _run_record(tmp_path / "clean")
  assert got["resumed_at"] == steps[-2]
  for key in ("loss_curve", "mean_loss", "eval_loss_after"):
    assert got[key] == want[key], key  # the same program: bit-identical


def test_a_failing_process_fails_the_launcher_fast():
  script = ROOT / "tests" / "scripts" / "one_process_fails.py"
  proc = _launch("--processes", "2", "--timeout", "120", "--", str(script), timeout=150)
  assert proc.returncode == 7
  assert "process 1 exited with status 7" in proc.stderr and "failing on purpose" in proc.stderr


def test_the_launcher_stops_everything_at_its_timeout():
  script = ROOT / "tests" / "scripts" / "one_process_fails.py"
  proc = _launch("--processes", "1", "--timeout", "3", "--", str(script), timeout=60)  # process 0 sleeps
  assert proc.returncode == 124 and "timed out after 3 s" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator given without --num-processes, --process-id"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "not in 0 .. 1"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "1", "--process-id", "0"],
     "not allowed with"),
])
def test_partial_or_bad_cluster_flags_are_refused(flags, message):
  proc = subprocess.run([sys.executable, str(LM), "--smoke", *flags], capture_output=True, text=True, cwd=ROOT,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


CLF = ROOT / "examples" / "sequence_classification.py"
CLF_ARGS = ("--smoke", "--optimizers", "qsgd:0.5", "--seeds", "1", "--epochs", "2", "--no-progress")


def test_classification_across_two_processes_equals_one_process_on_two_devices(tmp_path):
  proc = _launch("--processes", "2", "--devices-per-process", "1", "--", str(CLF), *CLF_ARGS,
                 "--checkpoint-every", "4", "--out", str(tmp_path / "two"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "data parallel over 2 devices, 2 processes" in proc.stdout
  assert proc.stdout.count("final test acc") == 1
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  one = subprocess.run([sys.executable, str(CLF), *CLF_ARGS, "--data-parallel", "--out", str(tmp_path / "one")],
                       capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S, env=env)
  assert one.returncode == 0, one.stderr[-4000:]
  got, want = _run_record(tmp_path / "two"), _run_record(tmp_path / "one")
  # Another program (cross-process reductions): float32 rounding.
  np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
  np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-4)
  # A resume across the two processes from the middle of the run ends where the run ended.
  _keep_first_checkpoint(tmp_path / "two" / "checkpoints")
  again = _launch("--processes", "2", "--devices-per-process", "1", "--", str(CLF), *CLF_ARGS,
                  "--resume", "--out", str(tmp_path / "two"))
  assert again.returncode == 0, again.stderr[-4000:]
  resumed = _run_record(tmp_path / "two")
  for key in ("train_loss", "test_loss", "test_accuracy"):
    assert resumed[key] == got[key], key  # the same program on the same machine

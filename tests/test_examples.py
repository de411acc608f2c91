"""The example CLIs end to end: --smoke runs, --help, and argument errors.

Each CLI runs in a subprocess exactly as a user would start it; the tests
check the DESIGN.md output contract (summary.json, PNG) and that the numbers
in it are consistent with themselves (not just present).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                        capture_output=True, text=True, env=env,
                        timeout=timeout, check=False, cwd=ROOT)


def _png(path: Path) -> bool:
  return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _main(script):
  """The script's ``main``, imported in-process (argument handling needs no subprocess)."""
  spec = importlib.util.spec_from_file_location(script[:-3], EXAMPLES / script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.mark.parametrize("script", ["sequence_classification.py", "finetune_lm.py"])
def test_help(script, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _main(script)(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--out", "--smoke", "--optimizers", "--seeds"):
    assert flag in out


@pytest.mark.parametrize("script", ["sequence_classification.py", "finetune_lm.py"])
@pytest.mark.parametrize("bad, what", [
    (["--optimizers", "sgd"], "--optimizers"),
    (["--optimizers", "qsgd:x"], "--optimizers"),
    (["--seeds", "a,b"], "--seeds"),
])
def test_bad_arguments_exit_2_with_a_message(script, bad, what, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _main(script)(bad)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert what in err and "usage:" in err


@pytest.mark.parametrize("bad, what", [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--optimizers", "qsgd:0.5:bogus"], "--optimizers"),
    (["--max-nonfinite", "0"], "--max-nonfinite"),
])
def test_classification_bad_arguments(bad, what, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _main("sequence_classification.py")(bad)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert what in err and "usage:" in err


def test_finetune_lm_mesh_must_match_the_devices(capsys):
  import jax  # pylint: disable=import-outside-toplevel
  n = jax.device_count()  # 1, or 8 when another test module forced 8 CPU devices
  with pytest.raises(SystemExit) as exit_info:
    _main("finetune_lm.py")(["--mesh", f"data={n + 1},fsdp=1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"data*fsdp = {n + 1} does not match the {n} available devices" in err and "usage:" in err


@pytest.mark.parametrize("bad, what", [
    (["--mesh", "data=x"], "--mesh"),
    (["--examples", "-1"], "--examples"),
    (["--checkpoint-every", "2"], "needs --out DIR"),
    (["--resume"], "needs --out DIR"),
    (["--max-nonfinite", "0"], "--max-nonfinite"),
    (["--warmup", "1.5"], "--warmup"),
])
def test_finetune_lm_bad_arguments(bad, what, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _main("finetune_lm.py")(bad)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert what in err and "usage:" in err


def test_classification_smoke(tmp_path):
  proc = _run("sequence_classification.py", "--smoke", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "epochs to 90%" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["runs"]
  assert [r["optimizer"] for r in runs] == ["adamw", "qsgd"]
  assert runs[0]["quantum_weight"] is None and runs[1]["quantum_weight"] == 0.5
  epochs = summary["config"]["epochs"]
  for r in runs:
    assert r["seed"] == 0
    assert len(r["test_accuracy"]) == len(r["train_loss"]) == epochs
    assert r["final_accuracy"] == r["test_accuracy"][-1]
    assert 0.0 <= r["final_accuracy"] <= 1.0
    assert all(math.isfinite(x) for x in r["train_loss"])
    target = summary["config"]["target_accuracy"]
    reached = [i + 1 for i, a in enumerate(r["test_accuracy"]) if a >= target]
    assert r["epochs_to_target"] == (reached[0] if reached else None)
  assert _png(tmp_path / "curves.png")


def test_finetune_lm_smoke(tmp_path):
  proc = _run("finetune_lm.py", "--smoke", "--out", str(tmp_path), "--checkpoint-every", "1000",
              "--max-nonfinite", "3")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "mean loss" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  runs = summary["runs"]
  assert [r["optimizer"] for r in runs] == ["adamw", "qsgd"]
  for r in runs:
    curve = r["loss_curve"]
    assert len(curve) == r["micro_steps"] > 0
    assert r["mean_loss"] == pytest.approx(sum(curve) / len(curve), rel=1e-6)
    # One epoch of training lowers the held-out loss of the random tiny model.
    assert r["eval_loss_after"] < r["eval_loss_before"]
    assert math.isfinite(r["final_loss"]) and r["tokens_per_s"] > 0
    assert r["nonfinite_steps"] == 0 and r["resumed_at"] == 0
  assert _png(tmp_path / "loss.png")
  # Each run checkpointed its end; --resume finds them finished and only evaluates.
  again = _run("finetune_lm.py", "--smoke", "--out", str(tmp_path), "--resume", "--max-nonfinite", "3")
  assert again.returncode == 0, again.stderr[-4000:]
  resumed = json.loads((tmp_path / "summary.json").read_text())["runs"]
  assert len(resumed) == len(runs) == 2
  for r, first in zip(resumed, runs):
    assert r["resumed_at"] == first["micro_steps"]
    for key in ("loss_curve", "mean_loss", "eval_loss_after"):
      assert r[key] == first[key]
  # Without --resume the existing checkpoints are not overwritten: exit 1, the message says why.
  clash = _run("finetune_lm.py", "--smoke", "--out", str(tmp_path), "--checkpoint-every", "1000")
  assert clash.returncode == 1 and "already holds checkpoints" in clash.stderr
  assert "Traceback" not in clash.stderr


CLF_LONG = ("--smoke", "--optimizers", "qsgd:0.5", "--seeds", "1", "--no-progress")


def test_classification_resume_over_a_damaged_checkpoint_is_verified_and_equals_a_clean_run(tmp_path):
  """The issue's scenario: bytes flipped in the newest checkpoint, then --resume for one more epoch."""
  from test_checkpoint_faults import flip_bytes  # pylint: disable=import-outside-toplevel

  first = _run("sequence_classification.py", *CLF_LONG, "--epochs", "1", "--checkpoint-every", "4",
               "--out", str(tmp_path / "run"))
  assert first.returncode == 0, first.stderr[-4000:]
  run_dir = tmp_path / "run" / "checkpoints" / "qsgd_0.5-seed0"
  newest = max((p for p in run_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  flip_bytes(newest)
  resumed = _run("sequence_classification.py", *CLF_LONG, "--epochs", "2", "--resume",
                 "--out", str(tmp_path / "run"))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"skipped step {newest.name}: its file state/" in resumed.stderr
  assert "does not match its checksum" in resumed.stderr
  clean = _run("sequence_classification.py", *CLF_LONG, "--epochs", "2", "--out", str(tmp_path / "clean"))
  assert clean.returncode == 0, clean.stderr[-4000:]
  got = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"][0]
  want = json.loads((tmp_path / "clean" / "summary.json").read_text())["runs"][0]
  for key in ("train_loss", "test_loss", "test_accuracy", "final_accuracy"):
    assert got[key] == want[key], key  # the same program on the same machine: bit-identical


def test_classification_divergence_is_marked_warned_and_can_fail_the_exit_code(tmp_path):
  args = ("--smoke", "--optimizers", "adamw,qsgd:1e6", "--seeds", "1", "--epochs", "1", "--no-progress",
          "--out", str(tmp_path))
  loud = _run("sequence_classification.py", *args)
  assert loud.returncode == 0, loud.stderr[-4000:]
  assert "qsgd:1e+06 (1/1 diverged)" in loud.stdout
  assert "warning: qsgd:1e+06 seed 0 diverged" in loud.stderr and "adamw seed" not in loud.stderr
  strict = _run("sequence_classification.py", *args, "--fail-on-divergence")
  assert strict.returncode == 3 and "warning: qsgd:1e+06 seed 0 diverged" in strict.stderr


def test_finetune_lm_paper_preset_is_the_papers_recipe(tmp_path):
  spec = importlib.util.spec_from_file_location("finetune_lm", EXAMPLES / "finetune_lm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = module.parse_args(["--preset", "paper"])
  assert (args.model, args.examples, args.batch_size, args.lr, args.weight_decay, args.clip_norm,
          args.grad_accum) == ("smollm2-135m", 7473, 1, 2e-5, 0.01, 1.0, 1)
  assert round(args.warmup * 7473) == 500  # the schedule's warmup steps at one epoch of batch 1
  assert [a.label for a in args.optimizers] == ["adamw", "qsgd:0.1", "qsgd:0.5", "qsgd:1e-06"]
  assert module.parse_args(["--preset", "paper", "--examples", "3", "--lr", "1e-4"]).examples == 3
  # The whole preset path end to end, on the tiny model and three problems.
  proc = _run("finetune_lm.py", "--preset", "paper", "--model", "tiny", "--examples", "3",
              "--test-examples", "2", "--max-len", "256", "--optimizers", "adamw,qsgd:1e-6",
              "--out", str(tmp_path), "--no-progress")
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["config"]["warmup"] == pytest.approx(500 / 7473)
  assert [r["steps"] for r in summary["runs"]] == [3, 3]

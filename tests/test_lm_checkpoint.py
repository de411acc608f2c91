"""LM fine-tuning: Orbax checkpoint/resume and non-finite micro-batches.

The tiny random-init Llama (byte tokenizer, no model download) on a few
GSM-Symbolic problems, with gradient accumulation so that a checkpoint can
fall between optimizer updates, and a QSGD arm so that the optimizer state
holds more than Adam's moments.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsgd_optax.tasks import _checkpoints, arms, running
from qsgd_optax.tasks.lm import batching, experiment, loop, steps

ARM = arms.parse_arm("qsgd:0.5:update")
CONFIG = experiment.FinetuneConfig(model="tiny", examples=6, test_examples=1, max_len=256, grad_accum=2,
                           learning_rate=3e-3)


class _Interrupt(Exception):
  pass


def _run(config=CONFIG, **kwargs):
  runs, _ = experiment.run_finetune(config, [ARM], [0], progress=False, **kwargs)
  return runs[0]


def _final_arrays(checkpoint_dir):
  """The arrays of the latest checkpoint of the run, as NumPy, by leaf number."""
  directory = _checkpoints.run_directory(checkpoint_dir, ARM.label, 0)
  manager = _checkpoints.RunCheckpoints(directory, _identity(directory), keep=3, resume=True)
  try:
    tree, progress = manager.restore(None)
  finally:
    manager.close()
  return {k: np.asarray(v) for k, v in tree.items()}, progress


def _identity(directory):
  import json  # pylint: disable=import-outside-toplevel
  return json.loads((directory / _checkpoints.IDENTITY_FILE).read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run that checkpoints only at its end."""
  root = tmp_path_factory.mktemp("lm_reference")
  record = _run(checkpoint_dir=root)
  return record, root


def test_interrupted_run_resumes_bit_identical(reference, tmp_path):
  record, root = reference
  assert record["micro_steps"] >= 4 and record["resumed_at"] == 0  # problems whose answer is cut off are dropped

  def stop_at_3(done):
    if done == 3:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    _run(checkpoint_dir=tmp_path, checkpoint_every=1, on_step=stop_at_3)
  run_dir = _checkpoints.run_directory(tmp_path, ARM.label, 0)
  # Every optimizer step (2 micro-batches) was saved; micro-batch 3 was not.
  assert sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit()) == [2]
  resumed = _run(checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
  assert resumed["resumed_at"] == 2
  for key in ("loss_curve", "mean_loss", "final_loss", "eval_loss_before", "eval_loss_after",
              "train_tokens", "micro_steps", "steps"):
    assert resumed[key] == record[key], key
  want, want_progress = _final_arrays(root)
  got, got_progress = _final_arrays(tmp_path)
  n_params = len(jax.tree.leaves(experiment._load_model(CONFIG)[2](0)))  # pylint: disable=protected-access
  assert want.keys() == got.keys() and len(want) > 3 * n_params  # params, mu, nu and counters
  for k in want:
    assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k
  assert got_progress["losses"] == want_progress["losses"] == record["loss_curve"]


def test_incomplete_save_is_ignored_and_finished_run_trains_nothing(reference, tmp_path):
  record, root = reference
  shutil.copytree(root, tmp_path / "ckpt")
  run_dir = _checkpoints.run_directory(tmp_path / "ckpt", ARM.label, 0)
  partial = run_dir / str(record["micro_steps"] + 1)  # a save killed before Orbax wrote its commit marker
  shutil.copytree(run_dir / str(record["micro_steps"]), partial)
  (partial / "commit_success.txt").unlink()
  calls = []
  again = _run(checkpoint_dir=tmp_path / "ckpt", resume=True, on_step=calls.append)
  assert not partial.exists()
  assert calls == [] and again["resumed_at"] == record["micro_steps"]
  assert again["loss_curve"] == record["loss_curve"]
  assert again["eval_loss_after"] == record["eval_loss_after"]


def test_changed_configuration_or_unrequested_resume_is_refused(reference, tmp_path):
  _, root = reference
  shutil.copytree(root, tmp_path / "ckpt")
  changed = experiment.FinetuneConfig(**{**CONFIG.__dict__, "learning_rate": 1e-3, "max_len": 240})
  with pytest.raises(_checkpoints.CheckpointError,
                     match=r"max_len 256, this run asks for 240; .*learning_rate 0\.003, this run asks for 0\.001"):
    _run(changed, checkpoint_dir=tmp_path / "ckpt", resume=True)
  # max_nonfinite may change on resume, but turning it on wraps the optimizer state.
  guarded = experiment.FinetuneConfig(**{**CONFIG.__dict__, "max_nonfinite": 3})
  with pytest.raises(_checkpoints.CheckpointError, match="laid out differently"):
    _run(guarded, checkpoint_dir=tmp_path / "ckpt", resume=True)
  with pytest.raises(_checkpoints.CheckpointError, match="already holds checkpoints.*--resume"):
    _run(checkpoint_dir=tmp_path / "ckpt")
  with pytest.raises(ValueError, match="checkpoint_every"):
    _run(checkpoint_dir=tmp_path / "other", checkpoint_every=0)


# ----------------------------------------------------------------------------- non-finite


def _fake_batches(n):
  ones = np.ones((1, 4), np.int32)
  return [batching.Batch(ones, ones, ones.astype(np.float32), ones, ones) for _ in range(n)]


def _nan_at(steps):
  """A grad_fn whose gradient is NaN at the given (0-based) calls."""
  calls = []

  def grad_fn(params, batch):
    del batch
    bad = len(calls) in steps
    calls.append(bad)
    grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan if bad else 1.0), params)
    return jnp.float32(jnp.nan if bad else 1.0), grads
  return grad_fn


def _update_fn(tx):
  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return update


@pytest.mark.parametrize("arm", ["adamw", "qsgd:0.5", "qsgd:0.5:update"])
def test_nonfinite_micro_batches_are_skipped_counted_and_stop_the_run(arm):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
  tx = optax.apply_if_finite(
      steps.make_optimizer(arms.parse_arm(arm), learning_rate=1e-2, total_steps=10,
                        warmup_steps=0),
      max_consecutive_errors=4)
  # NaN at calls 1 and 2: skipped, counted; training goes on with finite updates.
  result = loop.train(params, tx.init(params), _fake_batches(5), grad_fn=_nan_at({1, 2}),
                    update_fn=_update_fn(tx), progress=False, max_nonfinite=3)
  assert int(result.opt_state.total_notfinite) == 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(result.params))
  assert np.isnan(result.losses[1]) and result.losses[0] == 1.0
  assert loop.finite_mean(result.losses) == 1.0  # what the run record reports
  # The same skipped steps leave the parameters where three finite steps take them.
  clean = loop.train(params, tx.init(params), _fake_batches(3), grad_fn=_nan_at(set()),
                   update_fn=_update_fn(tx), progress=False)
  for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(clean.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Three in a row: the run stops, naming the count and what to do.
  with pytest.raises(running.NonFiniteError, match=r"3 micro-batches in a row .*max_nonfinite=3"):
    loop.train(params, tx.init(params), _fake_batches(6), grad_fn=_nan_at({2, 3, 4}),
             update_fn=_update_fn(tx), progress=False, max_nonfinite=3, desc=arm)


def test_max_nonfinite_validated():
  with pytest.raises(ValueError, match="max_nonfinite"):
    experiment.FinetuneConfig(max_nonfinite=0)


def test_prompts_longer_than_max_len_are_an_error():
  with pytest.raises(ValueError, match="max_len=16"):
    _run(experiment.FinetuneConfig(model="tiny", examples=2, test_examples=1, max_len=16))


def test_term_share_points_survive_an_interruption(tmp_path):
  """Shares measured before the interruption come back from the checkpoint; the rest are re-measured."""
  config = dataclasses.replace(CONFIG, grad_accum=1)
  arm = arms.parse_arm("qsgd:0.5")
  run = lambda **kw: experiment.run_finetune(config, [arm], [0], progress=False, share_points=4, **kw)[0][0]
  whole = run()
  n = whole["micro_steps"]
  assert whole["term_share_step"] == sorted({min(n - 1, max(1, round((k + 0.5) * n / 4))) for k in range(4)})
  assert all(0 < v < 1 for v in whole["term_share_global"])

  def stop(done):
    if done == whole["term_share_step"][1] + 1:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    run(checkpoint_dir=tmp_path, checkpoint_every=1, on_step=stop)
  resumed = run(checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
  assert resumed["resumed_at"] == whole["term_share_step"][1] + 1
  for key in ("term_share_step", "term_share_median", "term_share_max", "term_share_global", "loss_curve"):
    assert resumed[key] == whole[key], key  # the same programs on the same states

"""Checkpoint and resume of the classification train loop (Orbax).

The guarantee: a run interrupted anywhere and resumed from its latest
complete checkpoint ends with bit-identical parameters, optimizer state and
metric histories to an uninterrupted run (same machine). Runs are tiny:
4 optimizer steps per epoch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from qsgd_optax.tasks import arms
from qsgd_optax.tasks.classification import experiment, text_data

pytest.importorskip("orbax.checkpoint")

SMALL = dict(n_train=128, n_test=32, seq_len=12, embed_dim=16, ff_dim=32, num_layers=1, epochs=2)
ARM = arms.parse_arm("qsgd:0.5")  # optimizer state: ScaleByAdamState plus the chain's other states
HISTORY = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


@pytest.fixture(scope="module")
def data() -> text_data.TextDataset:
  return text_data.make_synthetic(SMALL["n_train"], SMALL["n_test"], seq_len=SMALL["seq_len"], seed=0)


@pytest.fixture(scope="module")
def config() -> experiment.ClassificationConfig:
  return experiment.ClassificationConfig(**SMALL)


def _run(config, data, **kwargs):
  return experiment.train_and_evaluate(config, ARM, seed=0, dataset=data, return_state=True, **kwargs)


@pytest.fixture(scope="module")
def reference(config, data):
  """Two epochs, uninterrupted, no checkpoints."""
  return _run(config, data)


@pytest.fixture(scope="module")
def one_epoch(config, data, tmp_path_factory):
  """One epoch checkpointed every 2 steps (steps 2 and 4); the directory is copied by each user."""
  root = tmp_path_factory.mktemp("one_epoch")
  record, state = _run(dataclasses.replace(config, epochs=1), data, checkpoint_dir=root, checkpoint_every=2)
  return record, state, root


def _copy(root: Path, tmp_path: Path) -> Path:
  shutil.copytree(root, tmp_path / "ckpt")
  return tmp_path / "ckpt"


def _leaves(state) -> list[np.ndarray]:
  def raw(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

  return [np.asarray(raw(x)) for x in jax.tree.leaves(state)]


def _assert_same_run(a, b):
  (record_a, state_a), (record_b, state_b) = a, b
  for key in HISTORY:
    assert record_a[key] == record_b[key], key
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  leaves_a, leaves_b = _leaves(state_a), _leaves(state_b)
  assert len(leaves_a) > 20
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()  # bit-identical, params and optimizer state


class _Interrupt(Exception):
  pass


def test_interrupted_run_resumes_bit_identical(config, data, reference, tmp_path):
  def stop_after_7(step):
    if step == 7:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    _run(config, data, checkpoint_dir=tmp_path, checkpoint_every=3, on_step=stop_after_7)
  run_dir = experiment.checkpoint_path(tmp_path, ARM, 0)
  assert run_dir.name == "qsgd_0.5-seed0"
  assert sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit()) == [3, 4, 6]  # keep=3

  seen = []
  resumed = _run(config, data, checkpoint_dir=tmp_path, checkpoint_every=3, resume=True, on_step=seen.append)
  assert seen == [7, 8]  # from step 6, mid-way through epoch 2
  _assert_same_run(resumed, reference)
  assert resumed[0]["steps"] == reference[0]["steps"] == 8


def test_one_epoch_then_resume_to_two_equals_two_epochs(config, data, reference, one_epoch, tmp_path):
  record, _, root = one_epoch
  assert len(record["test_accuracy"]) == 1
  assert record["train_loss"] == reference[0]["train_loss"][:1]
  resumed = _run(config, data, checkpoint_dir=_copy(root, tmp_path), resume=True)
  _assert_same_run(resumed, reference)


def test_incomplete_save_is_ignored(config, data, one_epoch, tmp_path):
  record, state, root = one_epoch
  run_dir = experiment.checkpoint_path(_copy(root, tmp_path), ARM, 0)
  # A save of step 4 killed before its commit, and one killed while still in Orbax's temporary directory.
  (run_dir / "4" / "commit_success.txt").unlink()
  tmp = run_dir / "6.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(run_dir / "2", tmp)
  (tmp / "commit_success.txt").unlink()

  seen = []
  resumed = _run(dataclasses.replace(config, epochs=1), data, checkpoint_dir=tmp_path / "ckpt", resume=True,
                 checkpoint_every=2, on_step=seen.append)
  assert seen == [3, 4]  # from step 2, the latest complete checkpoint
  _assert_same_run(resumed, (record, state))
  assert not tmp.exists() and (run_dir / "4" / "commit_success.txt").is_file()


def test_resuming_a_finished_run_trains_nothing(config, data, one_epoch, tmp_path):
  record, state, root = one_epoch
  seen = []
  resumed = _run(dataclasses.replace(config, epochs=1), data, checkpoint_dir=_copy(root, tmp_path), resume=True,
                 on_step=seen.append)
  assert seen == []
  _assert_same_run(resumed, (record, state))


def test_incompatible_or_unrequested_resume_is_refused(config, data, one_epoch, tmp_path):
  _, _, root = one_epoch
  ckpt = _copy(root, tmp_path)
  one = dataclasses.replace(config, epochs=1)
  with pytest.raises(ValueError, match="already holds checkpoints .*resume"):
    _run(one, data, checkpoint_dir=ckpt)  # resume not asked for
  other = dataclasses.replace(config, embed_dim=32, task="polarity")
  with pytest.raises(ValueError) as info:
    _run(other, data, checkpoint_dir=ckpt, resume=True)
  message = str(info.value)
  assert message.startswith(f"cannot resume from {experiment.checkpoint_path(ckpt, ARM, 0).resolve()}: ")
  assert "checkpoint has task 'synthetic', this run asks for 'polarity'" in message
  assert "checkpoint has embed_dim 16, this run asks for 32" in message
  assert "ff_dim" not in message and "epochs" not in message
  # Another arm's directory holding these checkpoints (say, renamed by hand).
  adamw = arms.parse_arm("adamw")
  shutil.copytree(experiment.checkpoint_path(ckpt, ARM, 0), experiment.checkpoint_path(ckpt, adamw, 0))
  with pytest.raises(ValueError, match="checkpoint has optimizer 'qsgd:0.5', this run asks for 'adamw'"):
    experiment.train_and_evaluate(config, adamw, seed=0, dataset=data, checkpoint_dir=ckpt, resume=True)


@pytest.mark.parametrize("bad", [["--checkpoint-every", "0"], ["--checkpoint-every", "-2"], ["--keep", "0"]])
def test_cli_rejects_non_positive_checkpoint_options(bad, capsys):
  path = Path(__file__).resolve().parents[1] / "examples" / "sequence_classification.py"
  spec = importlib.util.spec_from_file_location("sequence_classification", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(SystemExit) as exit_info:
    module.main(bad)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert bad[0] in err and "usage:" in err

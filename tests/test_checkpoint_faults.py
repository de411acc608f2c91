"""Damaged checkpoints: every fault ends in a clear refusal or a verified fall-back.

Faults are made the way disks and users make them: bytes flipped inside an
array data file, a data file truncated or deleted, Orbax metadata emptied or
garbled, the run's identity file garbled, a save that runs out of room. A
fall-back must end bit-identical to an uninterrupted run (the same program
on the same machine); a refusal is a CheckpointError naming the run, the
step and what is wrong (never a raw TensorStore traceback, never a silent
start from scratch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsgd_optax.tasks import _checkpoints, arms
from qsgd_optax.tasks.classification import experiment, text_data

pytest.importorskip("orbax.checkpoint")

SMALL = dict(n_train=128, n_test=32, seq_len=12, embed_dim=16, ff_dim=32, num_layers=1, epochs=2)
ARM = arms.parse_arm("qsgd:0.5")


# ----------------------------------------------------------------------------- faults


def _data_files(step_dir: Path) -> list[Path]:
  """The array data files of a step (OCDBT chunks), largest first."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert files, f"no array data files under {step_dir}"
  return sorted(files, key=lambda f: -f.stat().st_size)


def flip_bytes(step_dir: Path) -> None:
  """64 bytes inverted in the middle of the largest array data file."""
  f = _data_files(step_dir)[0]
  raw = bytearray(f.read_bytes())
  mid = len(raw) // 2
  for i in range(mid, min(mid + 64, len(raw))):
    raw[i] ^= 0xFF
  f.write_bytes(bytes(raw))


def truncate(step_dir: Path) -> None:
  f = _data_files(step_dir)[0]
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete(step_dir: Path) -> None:
  _data_files(step_dir)[0].unlink()


def empty_metadata(step_dir: Path) -> None:
  (step_dir / "state" / "_METADATA").write_text("")


def garble_progress(step_dir: Path) -> None:
  (step_dir / "progress" / "metadata").write_text("{not json")


FAULTS = [flip_bytes, truncate, delete, empty_metadata, garble_progress]


# ----------------------------------------------------------------------------- RunCheckpoints


def _tree(offset: float) -> dict:
  return {"w": jnp.arange(4096, dtype=jnp.float32) / 7 + offset, "b": jnp.full((3, 5), offset, jnp.bfloat16),
          "n": jnp.asarray(3, jnp.int32)}


def _two_steps(directory: Path) -> None:
  ckpt = _checkpoints.RunCheckpoints(directory, {"run": 1}, keep=3, resume=False)
  ckpt.save(1, _tree(1.0), {"step": 1})
  ckpt.save(2, _tree(2.0), {"step": 2})
  ckpt.close()


_LIKE_SAVED = object()


def _restore(directory: Path, log=None, target=_LIKE_SAVED):
  """``restore(target)`` on a fresh handle (default target: a tree shaped like :func:`_tree`)."""
  ckpt = _checkpoints.RunCheckpoints(directory, {"run": 1}, keep=3, resume=True)
  try:
    return ckpt.restore(_tree(0.0) if target is _LIKE_SAVED else target, log=log)
  finally:
    ckpt.close()


_SHARDED_DIGESTS = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from qsgd_optax.tasks import _checkpoints
assert jax.device_count() == 4
x = {"w": jnp.arange(8 * 6 * 2, dtype=jnp.float32).reshape(8, 6, 2) / 3, "b": jnp.arange(12, dtype=jnp.bfloat16)}
want = _checkpoints.digests(x)
for kind in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(kind, kind))
  placed = {"w": jax.device_put(x["w"], NamedSharding(mesh, P(None, "b", "a"))),
            "b": jax.device_put(x["b"], NamedSharding(mesh, P(("a", "b"))))}
  assert _checkpoints.digests(placed) == want, (kind, _checkpoints.digests(placed), want)
print("SAME")
"""


def test_digest_is_the_same_for_any_sharding():
  """4 CPU devices, Auto and Explicit meshes, arrays sharded on inner dimensions."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", _SHARDED_DIGESTS], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0 and "SAME" in out.stdout, out.stderr[-3000:]


def test_digest_changes_with_one_bit_a_swap_a_shape_or_a_dtype():
  x = jnp.arange(8 * 64, dtype=jnp.float32).reshape(8, 64) / 3
  base = _checkpoints.digests({"x": x})["['x']"]
  assert base.startswith("float32[8, 64]:")
  bits = np.asarray(x).view(np.uint32).copy()
  bits[5, 7] ^= 1 << 13  # one bit of one value
  assert _checkpoints.digests({"x": jnp.asarray(bits.view(np.float32))})["['x']"] != base
  swapped = np.asarray(x).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert _checkpoints.digests({"x": jnp.asarray(swapped)})["['x']"] != base
  assert _checkpoints.digests({"x": x.reshape(64, 8)})["['x']"] != base
  assert (_checkpoints.digests({"z": jnp.zeros(3, jnp.float32)})
          != _checkpoints.digests({"z": jnp.zeros(3, jnp.int32)}))
  for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.uint16, jnp.complex64):  # narrow and wide types
    assert len(_checkpoints.digests({"y": jnp.ones(5, dtype)})["['y']"].split(":")[1]) == 16
  assert _checkpoints.digests({"k": jax.random.key(0), "e": jnp.zeros((0, 3))})


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, fault):
  _two_steps(tmp_path)
  fault(tmp_path / "2")
  notes = []
  tree, progress = _restore(tmp_path, log=notes.append)
  assert progress["step"] == 1
  for k, v in _tree(1.0).items():
    np.testing.assert_array_equal(np.asarray(tree[k]), np.asarray(v))
  assert len(notes) == 1 and "skipped step 2" in notes[0] and "resuming from step 1" in notes[0]
  assert (tmp_path / "corrupt-2").is_dir() and not (tmp_path / "2").exists()  # set aside, step 2 writable again
  ckpt = _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=True)
  assert ckpt.latest == 1
  ckpt.save(2, _tree(2.0), {"step": 2})
  ckpt.close()
  assert _restore(tmp_path)[1]["step"] == 2


def test_every_checkpoint_damaged_is_refused_naming_each(tmp_path):
  _two_steps(tmp_path)
  flip_bytes(tmp_path / "2")
  delete(tmp_path / "1")
  with pytest.raises(_checkpoints.CheckpointError,
                     match=r"no checkpoint reads and verifies \(step 2: .*; step 1: .*\)") as e:
    _restore(tmp_path)
  assert str(tmp_path) in str(e.value)
  assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()  # nothing moved when nothing verifies


def test_garbled_identity_file_is_refused(tmp_path):
  _two_steps(tmp_path)
  for text in ("", "[1, 2", "[]"):
    (tmp_path / _checkpoints.IDENTITY_FILE).write_text(text)
    with pytest.raises(_checkpoints.CheckpointError, match=r"run_identity\.json is unreadable"):
      _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=True)


def test_failed_save_is_an_error_and_leaves_the_previous_checkpoint(tmp_path):
  """A save past a file-size limit (a full disk, as the process sees it) fails cleanly."""
  script = textwrap.dedent(f"""
      import resource, signal, sys
      import jax.numpy as jnp
      from qsgd_optax.tasks import _checkpoints
      ckpt = _checkpoints.RunCheckpoints({str(tmp_path)!r}, {{"run": 1}}, keep=3, resume=False)
      ckpt.save(1, {{"w": jnp.zeros(16)}}, {{"step": 1}})
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
      try:
        ckpt.save(2, {{"w": jnp.arange(200_000, dtype=jnp.float32)}}, {{"step": 2}})
      except _checkpoints.CheckpointError as e:
        print("REFUSED", e)
        sys.exit(0)
      sys.exit("the save past the limit did not fail")
  """)
  # Without the test session's compilation cache: a cache write past the
  # limit would leave a truncated entry behind.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                  "JAX_PERSISTENT_CACHE"))}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**env, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "REFUSED could not save step 2" in out.stdout and "step 1 is intact" in out.stdout
  ckpt = _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=True)
  try:
    assert ckpt.latest == 1
    tree, progress = ckpt.restore({"w": jnp.ones(16)})
  finally:
    ckpt.close()
  assert progress["step"] == 1 and np.all(np.asarray(tree["w"]) == 0)


def test_an_edited_progress_record_is_damage(tmp_path):
  """Valid JSON with another value: the file checksum catches what the array digests cannot."""
  _two_steps(tmp_path)
  meta = tmp_path / "2" / "progress" / "metadata"
  meta.write_text(meta.read_text().replace('"step": 2', '"step": 7'))
  notes = []
  assert _restore(tmp_path, log=notes.append)[1]["step"] == 1
  assert "progress/metadata does not match its checksum" in notes[0]


def test_another_dtype_is_refused_as_another_configuration(tmp_path):
  _two_steps(tmp_path)
  ckpt = _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=True)
  target = {**_tree(0.0), "w": jnp.zeros(4096, jnp.bfloat16)}
  with pytest.raises(_checkpoints.CheckpointError,
                     match=r"do not fit this run's state \(\['w'\] is float32\[4096\] in the checkpoint, "
                           r"bfloat16\[4096\] in this run\)"):
    ckpt.restore(target)
  ckpt.close()
  assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()  # nothing set aside


@pytest.mark.parametrize("change, named", [
    ("shape", r"\['w'\] is float32\[4096\] in the checkpoint, float32\[2048\] in this run"),
    ("missing", r"\['b'\] is bfloat16\[3, 5\] in the checkpoint, absent in this run"),
    ("extra", r"\['extra'\] is absent in the checkpoint, float32\[2\] in this run"),
])
def test_another_layout_is_refused_from_the_record_not_orbax_text(tmp_path, monkeypatch, change, named):
  """Shapes and tree structure are compared with the digest record before anything is read.

  Orbax's own message is not consulted (its matcher is disabled here): the step is refused as
  another configuration, named by path, and nothing is set aside as damaged.
  """
  _two_steps(tmp_path)
  monkeypatch.setattr(_checkpoints, "_is_layout_error", lambda e: False)
  target = _tree(0.0)
  if change == "shape":
    target["w"] = jnp.zeros(2048, jnp.float32)
  elif change == "missing":
    del target["b"]
  else:
    target["extra"] = jnp.zeros(2, jnp.float32)
  with pytest.raises(_checkpoints.CheckpointError, match=r"do not fit this run's state \(" + named):
    _restore(tmp_path, target=target)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("corrupt")) == []
  assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()


def test_lost_commit_markers_are_refused_not_restarted(tmp_path):
  _two_steps(tmp_path)
  for step in ("1", "2"):
    (tmp_path / step / "commit_success.txt").unlink()
  with pytest.raises(_checkpoints.CheckpointError, match=r"steps \[1, 2\] have no commit_success.txt"):
    _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=True)
  assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()


def test_checkpoint_without_digests_is_resumed_with_a_note(tmp_path):
  _two_steps(tmp_path)
  meta = tmp_path / "2" / "progress" / "metadata"
  record = json.loads(meta.read_text())
  del record[_checkpoints.DIGEST_KEY]  # as written before digests and file checksums existed
  meta.write_text(json.dumps(record))
  for manifest in (tmp_path / "2").glob("qsgd_files.*.json"):
    manifest.unlink()
  notes = []
  assert _restore(tmp_path, log=notes.append)[1]["step"] == 2
  assert len(notes) == 1 and "no array digests" in notes[0] and "unverified" in notes[0]


# ----------------------------------------------------------------------------- the examples' runs


@pytest.fixture(scope="module")
def clf_data() -> text_data.TextDataset:
  return text_data.make_synthetic(SMALL["n_train"], SMALL["n_test"], seq_len=SMALL["seq_len"], seed=0)


@pytest.fixture(scope="module")
def clf_config() -> experiment.ClassificationConfig:
  return experiment.ClassificationConfig(**SMALL)


@pytest.fixture(scope="module")
def clf_reference(clf_config, clf_data):
  return experiment.train_and_evaluate(clf_config, ARM, 0, dataset=clf_data)


@pytest.fixture(scope="module")
def clf_one_epoch(clf_config, clf_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("faults_one_epoch")
  experiment.train_and_evaluate(dataclasses.replace(clf_config, epochs=1), ARM, 0, dataset=clf_data,
                                checkpoint_dir=root, checkpoint_every=2)  # steps 2 and 4
  return root


@pytest.mark.parametrize("fault", [flip_bytes, truncate], ids=lambda f: f.__name__)
def test_classification_resume_over_a_damaged_checkpoint_equals_an_uninterrupted_run(
    clf_config, clf_data, clf_reference, clf_one_epoch, tmp_path, fault):
  root = tmp_path / "ckpt"
  shutil.copytree(clf_one_epoch, root)
  fault(experiment.checkpoint_path(root, ARM, 0) / "4")
  notes = []
  resumed = experiment.train_and_evaluate(clf_config, ARM, 0, dataset=clf_data, checkpoint_dir=root,
                                          resume=True, log=notes.append)
  assert len(notes) == 1 and "skipped step 4" in notes[0] and "resuming from step 2" in notes[0]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "final_accuracy"):
    assert resumed[key] == clf_reference[key], key  # the same program: bit-identical
  assert not resumed["diverged"]


def test_lm_resume_over_a_damaged_checkpoint_equals_an_uninterrupted_run(tmp_path):
  from qsgd_optax.tasks.lm import experiment as lm  # pylint: disable=import-outside-toplevel

  arm = arms.parse_arm("qsgd:0.5:update")
  config = lm.FinetuneConfig(model="tiny", examples=6, test_examples=1, max_len=256, grad_accum=2,
                             learning_rate=3e-3)

  def run(**kwargs):
    return lm.run_finetune(config, [arm], [0], progress=False, **kwargs)[0][0]

  reference = run()

  class Stop(Exception):
    pass

  def stop_at(done):
    if done == 4:  # after the save at micro-batch 4
      raise Stop

  with pytest.raises(Stop):
    run(checkpoint_dir=tmp_path, checkpoint_every=1, on_step=stop_at)  # saved at micro-batches 2 and 4
  run_dir = _checkpoints.run_directory(tmp_path, arm.label, 0)
  flip_bytes(run_dir / "4")
  notes = []
  resumed = run(checkpoint_dir=tmp_path, checkpoint_every=1, resume=True, log=notes.append)
  assert any("skipped step 4" in n and "resuming from step 2" in n for n in notes), notes
  assert resumed["resumed_at"] == 2
  for key in ("loss_curve", "mean_loss", "final_loss", "eval_loss_after", "micro_steps"):
    assert resumed[key] == reference[key], key


def test_targets_that_restore_as_the_saved_layout_are_accepted(tmp_path):
  """No false refusal: no target, abstract leaves, and a float64 leaf that JAX (x64 off) reads as float32."""
  _two_steps(tmp_path)
  saved = _tree(2.0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
  wide = {**abstract, "w": jax.ShapeDtypeStruct((4096,), np.float64)}
  for target in (None, abstract, wide):
    tree, progress = _restore(tmp_path, target=target)
    assert progress["step"] == 2
    for key in saved:
      np.testing.assert_array_equal(np.asarray(tree[key]), np.asarray(saved[key]))


def test_an_optimizer_state_restores_without_a_target(tmp_path):
  """Orbax gives NamedTuple states back as dicts and tuples as lists: the same arrays, verified."""
  import optax  # pylint: disable=g-import-not-at-top

  params = {"w": jnp.arange(6, dtype=jnp.float32)}
  state = {"params": params, "opt": optax.adamw(1e-3).init(params)}
  ckpt = _checkpoints.RunCheckpoints(tmp_path, {"run": 1}, keep=3, resume=False)
  ckpt.save(1, state, {"step": 1})
  ckpt.close()
  tree, progress = _restore(tmp_path, target=None)
  assert progress["step"] == 1
  want = sorted(np.asarray(x).tobytes() for x in jax.tree.leaves(state))
  assert sorted(np.asarray(x).tobytes() for x in jax.tree.leaves(tree)) == want

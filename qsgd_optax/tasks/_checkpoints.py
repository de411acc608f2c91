"""Orbax checkpoints of one training run, shared by the classification and LM tasks.

A run's directory holds Orbax step directories (``CheckpointManager``,
synchronous saves, the last ``keep`` kept) and ``run_identity.json``: the
fields that shape the run's trajectory. Each checkpoint stores a pytree of
arrays (restored with the shapes, dtypes and shardings of a target tree) and
a JSON progress record (position in the data, losses so far, PRNG state).

Guarantees, tested by the tasks' tests:

* a save counts only once Orbax wrote its commit marker, so a run killed
  mid-save resumes from the previous complete checkpoint (the incomplete
  step directory is removed, and its step number can be written again);
* resuming with another configuration fails with a :class:`CheckpointError`
  naming every mismatching field;
* writing into a directory that holds checkpoints needs ``resume=True``.

Example:

  >>> run_directory("ckpt", "qsgd:0.5:update", 2).as_posix()
  'ckpt/qsgd_0.5_update-seed2'
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["CheckpointError", "RunCheckpoints", "run_directory"]

IDENTITY_FILE = "run_identity.json"
_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, before the atomic rename


class CheckpointError(ValueError):
  """A checkpoint directory that a run cannot resume from or write to."""


def run_directory(checkpoint_dir: str | os.PathLike[str], label: str, seed: int) -> Path:
  """``checkpoint_dir/<label>-seed<seed>``, with characters other than letters,
  digits, ``.``, ``_`` and ``-`` in ``label`` replaced by ``_``."""
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
  return Path(checkpoint_dir) / f"{safe}-seed{int(seed)}"


def _write_json_atomically(path: Path, payload: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2) + "\n")
  os.replace(tmp, path)


class RunCheckpoints:
  """One run's checkpoints: identity check, latest complete step, save and restore.

  Args:
    directory: the run's checkpoint directory (created if missing).
    identity: JSON-serialisable mapping of what must match to resume.
    keep: how many checkpoints to keep.
    resume: whether existing checkpoints may be resumed (else they are an
      error: nothing is overwritten silently).

  Attributes:
    latest: the latest complete step, or ``None``.
  """

  def __init__(self, directory: str | os.PathLike[str], identity: Mapping[str, Any], *,
               keep: int, resume: bool):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be a positive int, got {keep!r}")
    self._ocp = ocp
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.directory = directory.resolve()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            create=True))
    try:
      self._check(dict(identity), resume)
    except BaseException:
      self._manager.close()
      raise

  def _check(self, identity: dict[str, Any], resume: bool) -> None:
    complete = [s for s in self._manager.all_steps() if self._is_complete(s)]
    self.latest = max(complete) if complete else None
    if self.latest is not None and not resume:
      raise CheckpointError(
          f"{self.directory} already holds checkpoints (latest at step {self.latest}); resume them "
          "(resume=True, --resume) or remove the directory to start over")
    identity_file = self.directory / IDENTITY_FILE
    if self.latest is not None:
      if not identity_file.is_file():
        raise CheckpointError(f"cannot resume from {self.directory}: it has no {IDENTITY_FILE}")
      saved = json.loads(identity_file.read_text())
      diffs = [f"checkpoint has {k} {saved.get(k)!r}, this run asks for {v!r}"
               for k, v in identity.items() if saved.get(k) != v]
      if diffs:
        raise CheckpointError(f"cannot resume from {self.directory}: {'; '.join(diffs)}")
    # Steps after the one resumed (or any, on a fresh start) are incomplete saves: drop them,
    # so that this run can write those step numbers again.
    stale = [s for s in self._manager.all_steps() if self.latest is None or s > self.latest]
    if jax.process_index() == 0:  # one writer when several processes share the directory
      for s in stale:
        shutil.rmtree(self._step_dir(s))
      _write_json_atomically(identity_file, identity)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"qsgd_optax checkpoints {self.directory}")
    if stale:
      self._manager.reload()

  def _step_dir(self, step: int) -> Path:
    return self.directory / str(step)  # Orbax's default step name format

  def _is_complete(self, step: int) -> bool:
    return (self._step_dir(step) / _COMMIT_MARKER).is_file()

  def save(self, step: int, tree: Any, progress: Mapping[str, Any]) -> None:
    """Writes ``tree`` (a pytree of arrays) and ``progress`` (JSON) as ``step``; returns when done."""
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave(dict(progress))), force=True)
    self._manager.wait_until_finished()

  def progress(self) -> dict[str, Any]:
    """The progress record of the latest complete checkpoint (no arrays read)."""
    if self.latest is None:
      raise CheckpointError(f"{self.directory} holds no complete checkpoint")
    ocp = self._ocp
    restored = self._manager.restore(self.latest, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore()))
    return dict(restored.progress)

  def restore(self, target: Any) -> tuple[Any, dict[str, Any]]:
    """The latest complete checkpoint: ``(tree, progress)``.

    ``tree`` takes the structure, shapes, dtypes and shardings of ``target``.

    Raises:
      CheckpointError: when the saved arrays do not fit ``target``.
    """
    if self.latest is None:
      raise CheckpointError(f"{self.directory} holds no complete checkpoint")
    ocp = self._ocp
    try:
      restored = self._manager.restore(self.latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax's structure / shape mismatch
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"cannot resume from {self.directory}: the saved arrays do not fit "
                            f"this run's state ({first})") from e
    return restored.state, dict(restored.progress)

  def close(self) -> None:
    self._manager.close()

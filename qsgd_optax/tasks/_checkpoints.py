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
* writing into a directory that holds checkpoints needs ``resume=True``;
* every checkpoint records a digest of each array it holds (its dtype and
  shape and two 32-bit sums over its bits, computed on the devices, so any
  sharding and any number of processes give the same digest) and, per
  process, the SHA-256 of every file that process wrote; a restore checks
  the files before Orbax reads them (every process its own, then all agree)
  and every array before any is used, and walks back from the newest
  checkpoint to the newest one that verifies, saying which steps it skipped
  and why (the skipped ones are moved aside to ``corrupt-<step>``); when
  none does, it stops with a :class:`CheckpointError` naming each; saved
  arrays of another dtype or shape than the run's are refused as another
  configuration;
* a save that fails (disk full, permissions) raises a :class:`CheckpointError`
  and leaves the previous checkpoints as they were.

Example:

  >>> run_directory("ckpt", "qsgd:0.5:update", 2).as_posix()
  'ckpt/qsgd_0.5_update-seed2'
"""

from __future__ import annotations

import json
import os
import hashlib
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qsgd_optax import _scope

__all__ = ["CheckpointError", "RunCheckpoints", "run_directory"]

IDENTITY_FILE = "run_identity.json"
_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, before the atomic rename


class CheckpointError(ValueError):
  """A checkpoint directory that a run cannot resume from or write to."""


DIGEST_KEY = "digests"  # in the progress record: array path -> digest
_MIX = 0x9E3779B9  # golden-ratio constant: spreads indices over all 32 bits


def _bits(x: jax.Array) -> jax.Array:
  """``x``'s bits as uint32 (64-bit values as two words, narrower ones widened)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  width = x.dtype.itemsize
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _iota_like(b: jax.Array, axis: int) -> jax.Array:
  """``uint32`` iota along ``axis`` of ``b``'s shape, sharded like ``b`` under explicit sharding."""
  sharding = _scope._explicit_sharding(b)  # pylint: disable=protected-access
  if sharding is None:
    return jax.lax.broadcasted_iota(jnp.uint32, b.shape, axis)
  return jax.lax.broadcasted_iota(jnp.uint32, b.shape, axis, out_sharding=sharding)


def _digest_one(x: jax.Array) -> jax.Array:
  """``uint32[2]``: ``sum(b * (2i + 1))`` and ``sum(mix(b ^ i * c))`` over the bits ``b``.

  Wrapping uint32 sums are exact in any order, so the digest does not depend
  on the sharding or the device count. The first sum changes with every
  single flipped bit (odd weights); the second mixes each word with its
  position, so that reordered or swapped values change it too.
  """
  b = _bits(jnp.asarray(x))
  # Row-major positions from iotas, without a reshape (which an explicitly
  # sharded array would refuse).
  i = jnp.zeros((), jnp.uint32)
  for axis in range(b.ndim):
    stride = int(np.prod(b.shape[axis + 1:], dtype=np.int64)) & 0xFFFFFFFF
    i = i + _iota_like(b, axis) * jnp.uint32(stride)
  s1 = jnp.sum(b * (2 * i + 1), dtype=jnp.uint32)
  h = b ^ (i * jnp.uint32(_MIX))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  s2 = jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)
  return jnp.stack([s1, s2])


_digests_jit = jax.jit(lambda tree: jax.tree.map(_digest_one, tree))
_COMPILED: dict[Any, Any] = {}


def _compiled_digests(tree: Any) -> Any:
  """The digest program for ``tree``'s structure, shapes, dtypes and shardings, compiled once.

  Keyed without the arrays' commitment, so the arrays a restore returns
  (committed to their devices) reuse the program their save compiled.
  """
  leaves, treedef = jax.tree.flatten(tree)
  key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", None)), getattr(x, "sharding", None))
                        for x in leaves))
  fn = _COMPILED.get(key)
  if fn is None:
    if len(_COMPILED) >= 8:
      _COMPILED.clear()
    fn = _COMPILED[key] = _digests_jit.lower(tree).compile()
  return fn


def _kind(x: Any) -> str:
  """``dtype[shape]`` of an array, as recorded next to its digest."""
  return f"{np.dtype(x.dtype) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype}" \
         f"{list(np.shape(x))}"


def digests(tree: Any) -> dict[str, str]:
  """Array path -> ``"dtype[shape]:hexdigest"`` of every array in ``tree`` (see :func:`_digest_one`)."""
  out = _compiled_digests(tree)(tree)
  flat = jax.tree_util.tree_flatten_with_path(out)[0]
  kinds = [_kind(x) for x in jax.tree.leaves(tree)]
  return {jax.tree_util.keystr(path): kind + ":" + "".join(f"{int(w):08x}" for w in np.asarray(d.addressable_data(0)))
          for (path, d), kind in zip(flat, kinds)}


def run_directory(checkpoint_dir: str | os.PathLike[str], label: str, seed: int) -> Path:
  """``checkpoint_dir/<label>-seed<seed>``, with characters other than letters,
  digits, ``.``, ``_`` and ``-`` in ``label`` replaced by ``_``."""
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
  return Path(checkpoint_dir) / f"{safe}-seed{int(seed)}"


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _is_layout_error(e: ValueError) -> bool:
  """Orbax's refusal of a target whose tree structure or shapes differ from the saved one.

  (Not a damaged file: TensorStore's read errors carry a status code.)
  """
  text = str(e)
  if any(code in text for code in ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND",
                                   "INVALID_ARGUMENT", "Error reading", "Error opening")):
    return False
  return "tree structures do not match" in text or "not compatible with the stored shape" in text


def _layout_mismatches(saved: Mapping[str, str], target: Any) -> list[str]:
  """Where ``target``'s arrays differ in path, dtype or shape from the digest record ``saved``.

  Read from the record and the target alone (nothing is restored or hashed), so another
  configuration is told apart from damage without depending on Orbax's error messages.
  """
  flat = jax.tree_util.tree_flatten_with_path(target)[0]
  kinds = {jax.tree_util.keystr(path): _target_kind(x) for path, x in flat}
  layout = []
  for path, kind in kinds.items():
    want = saved.get(path)
    if want is None or want.split(":")[0] != kind:
      layout.append(f"{path} is {want.split(':')[0] if want else 'absent'} in the checkpoint, "
                    f"{kind} in this run")
  layout += [f"{path} is {want.split(':')[0]} in the checkpoint, absent in this run"
             for path, want in saved.items() if path not in kinds]
  return layout


def _target_kind(x: Any) -> str:
  """:func:`_kind` of a restore target's leaf, as the restored array will be.

  A ``ShapeDtypeStruct`` or NumPy leaf may name a dtype JAX does not use (float64 with x64
  off): it restores as the canonical one. A Python scalar leaf has no ``dtype`` of its own.
  """
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  return f"{dtype}{list(np.shape(x))}"


def _plain_path(path: str) -> str:
  """A key path with attribute keys written as dict keys: ``.count`` -> ``['count']``.

  Restored without a target, Orbax gives NamedTuples, dataclasses and flax structs back as
  dicts (and tuples as lists), whose paths then differ from the saved ones only in this.
  """
  return re.sub(r"\.([A-Za-z_]\w*)", r"['\1']", path)


def _damaged(saved: Mapping[str, str], tree: Any) -> list[str]:
  """Paths of ``tree`` whose digest differs from the record (the layout already agrees)."""
  record = {_plain_path(path): d for path, d in saved.items()}
  return [path for path, d in digests(tree).items() if record.get(_plain_path(path)) != d]


# The files of a step, hashed after the save by the process that wrote them
# (OCDBT keeps each process's data under ocdbt.process_<i>; the rest is
# process 0's), so that each process can check its own files before Orbax
# reads them and all processes agree on a step before any restores it.
_MANIFEST = "qsgd_files.process_{}.json"
_OWNER = re.compile(r"ocdbt\.process_(\d+)$")


def _owner(rel: Path) -> int:
  for part in rel.parts[:-1]:
    m = _OWNER.match(part)
    if m:
      return int(m.group(1))
  return 0


def _own_files(step_dir: Path, process: int) -> dict[str, Path]:
  out = {}
  for f in sorted(step_dir.rglob("*")):
    rel = f.relative_to(step_dir)
    if f.is_file() and not rel.name.startswith("qsgd_files.") and _owner(rel) == process:
      out[rel.as_posix()] = f
  return out


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _write_manifest(step_dir: Path) -> None:
  process = jax.process_index()
  files = {rel: _sha256(f) for rel, f in _own_files(step_dir, process).items()}
  _write_json_atomically(step_dir / _MANIFEST.format(process),
                         {"files": files, "processes": jax.process_count()})


def _check_manifest(step_dir: Path) -> str | None:
  """Why this process's files of a step are damaged, or None when they are intact (or unrecorded)."""
  process = jax.process_index()
  path = step_dir / _MANIFEST.format(process)
  if not path.exists():
    others = sorted(step_dir.glob("qsgd_files.process_*.json"))
    if not others:
      return None  # written before file checksums existed
    try:
      writers = int(json.loads(others[0].read_text())["processes"])
    except (ValueError, KeyError, TypeError, OSError):
      writers = None
    if writers is not None and process >= writers:
      return None  # fewer processes wrote the step than read it: this one wrote nothing
    return f"its file manifest {path.name} is missing"
  try:
    files = json.loads(path.read_text())["files"]
    if not isinstance(files, dict):
      raise ValueError("no file list")
  except (ValueError, KeyError, TypeError, OSError) as e:
    return f"its file manifest {path.name} is unreadable ({_first_line(e)})"
  present = _own_files(step_dir, process)
  for rel, digest in files.items():
    if rel not in present:
      return f"its file {rel} is missing"
    if _sha256(present[rel]) != digest:
      return f"its file {rel} does not match its checksum"
  extra = sorted(set(present) - set(files))
  if extra:
    return f"it holds a file the save did not write ({extra[0]})"
  return None


def _agree(reason: str | None) -> str | None:
  """The first process's reason when any process has one (every process gets the same answer)."""
  if jax.process_count() == 1:
    return reason
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  bad = np.asarray(multihost_utils.process_allgather(np.int32(reason is not None)))
  if not bad.any():
    return None
  first = int(np.argmax(bad))
  return reason if jax.process_index() == first else f"process {first} found it damaged"


def _sync(name: str) -> None:
  """A barrier across processes (nothing with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


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
      try:
        saved = json.loads(identity_file.read_text())
        if not isinstance(saved, dict):
          raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
      except (ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot resume from {self.directory}: its {IDENTITY_FILE} is unreadable ({_first_line(e)}), "
            "so it cannot be told which configuration wrote the checkpoints; restore the file or remove "
            "the directory to start over") from e
      diffs = [f"checkpoint has {k} {saved.get(k)!r}, this run asks for {v!r}"
               for k, v in identity.items() if saved.get(k) != v]
      if diffs:
        raise CheckpointError(f"cannot resume from {self.directory}: {'; '.join(diffs)}")
    # Steps after the one resumed (or any, on a fresh start) are incomplete saves: drop them,
    # so that this run can write those step numbers again.
    stale = [s for s in self._manager.all_steps() if self.latest is None or s > self.latest]
    if resume and self.latest is None and stale:
      # Orbax renames a finished save into place and marks it: numbered steps
      # without a marker and none with one are not an interrupted first save.
      raise CheckpointError(
          f"cannot resume from {self.directory}: its steps {sorted(stale)} have no {_COMMIT_MARKER} "
          "(their saves never finished, or the markers were lost), so none can be trusted; remove "
          "the directory to start over")
    if jax.process_index() == 0:  # one writer when several processes share the directory
      for s in stale:
        if self.latest is not None:
          warnings.warn(f"{self.directory}: removing step {s}, an unfinished save (no {_COMMIT_MARKER}); "
                        f"resuming from step {self.latest}", RuntimeWarning, stacklevel=3)
        shutil.rmtree(self._step_dir(s))
      _write_json_atomically(identity_file, identity)
    _sync(f"qsgd_optax checkpoints {self.directory}")
    if stale:
      self._manager.reload()

  def _step_dir(self, step: int) -> Path:
    return self.directory / str(step)  # Orbax's default step name format

  def _is_complete(self, step: int) -> bool:
    return (self._step_dir(step) / _COMMIT_MARKER).is_file()

  def save(self, step: int, tree: Any, progress: Mapping[str, Any]) -> None:
    """Writes ``tree`` (a pytree of arrays) and ``progress`` (JSON) as ``step``; returns when done.

    The progress record gains the digest of every array; every process then
    records the checksums of the files it wrote.

    Raises:
      CheckpointError: the save failed (disk full, permissions, ...); the
        checkpoints written before it are untouched.
    """
    ocp = self._ocp
    try:
      record = {**progress, DIGEST_KEY: digests(tree)}
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave(record)), force=True)
      self._manager.wait_until_finished()
      if self._is_complete(step):
        _write_manifest(self._step_dir(step))
    except Exception as e:  # pylint: disable=broad-except
      before = "no earlier checkpoint" if self.latest is None else f"step {self.latest} is intact"
      raise CheckpointError(
          f"could not save step {step} to {self.directory} ({type(e).__name__}: {_first_line(e)}); "
          f"{before}. Free space or fix the permissions, then resume") from e
    _sync(f"qsgd_optax saved {self.directory} {step}")
    if not self._is_complete(step):
      raise CheckpointError(f"saving step {step} to {self.directory} did not complete (no "
                            f"{_COMMIT_MARKER}); the earlier checkpoints are untouched")
    self.latest = step

  def restore(self, target: Any, *, check: Callable[[dict[str, Any]], None] | None = None,
              log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The newest complete checkpoint that reads and verifies: ``(tree, progress)``.

    ``tree`` takes the structure, shapes, dtypes and shardings of ``target``.
    Steps are tried from the newest down. A step is used only when every
    process finds the files it wrote matching their checksums, its progress
    record reads, and every restored array matches its digest; otherwise it
    is skipped (one line to ``log`` per skipped step says which and why) and
    moved aside to ``corrupt-<step>``, so that the run can write that step
    again. Every process takes the same decision.

    Args:
      target: a pytree like the saved one (arrays or ``jax.ShapeDtypeStruct``
        leaves); its paths, dtypes and shapes are compared with the step's
        digest record before any array is read. ``None`` restores the arrays
        as saved.
      check: called with a step's progress record before its arrays are
        read; a CheckpointError it raises (a checkpoint of another layout)
        is not a damaged checkpoint: it stops the restore.
      log: where the one-line notes on skipped steps go (default: a
        ``RuntimeWarning``).

    Raises:
      CheckpointError: no complete checkpoint reads and verifies (every
        step is named with its fault), or the saved arrays' dtypes or
        shapes differ from ``target``'s (another configuration), or
        ``check`` refused one.
    """
    complete = sorted((s for s in self._manager.all_steps() if self._is_complete(s)), reverse=True)
    if not complete:
      raise CheckpointError(f"{self.directory} holds no complete checkpoint")
    ocp = self._ocp
    note = log or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
    faults = []
    for step in complete:
      reason = _agree(_check_manifest(self._step_dir(step)))
      if reason is not None:
        faults.append((step, reason))
        continue
      progress, local = None, None
      try:
        progress = dict(self._manager.restore(step, args=ocp.args.Composite(
            progress=ocp.args.JsonRestore())).progress)
        saved = progress.get(DIGEST_KEY)
        if saved is not None and not (isinstance(saved, dict)
                                      and all(isinstance(v, str) for v in saved.values())):
          local = "its progress record holds no valid array digests"
      except Exception as e:  # pylint: disable=broad-except
        local = f"its progress record cannot be read ({type(e).__name__}: {_first_line(e)})"
      reason = _agree(local)
      if reason is not None:
        faults.append((step, reason))
        continue
      if check is not None:
        check(progress)
      if saved is not None and target is not None:  # None: restore as saved, any layout
        layout = _layout_mismatches(saved, target)
        if layout:
          raise CheckpointError(
              f"cannot resume from {self.directory}: the saved arrays do not fit this run's state "
              f"({layout[0]}" + (f"; {len(layout) - 1} more" if len(layout) > 1 else "") + ")")
      tree, local = None, None
      try:
        tree = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
      except Exception as e:  # pylint: disable=broad-except
        # Without a digest record (older checkpoints) only Orbax's message tells another
        # configuration from damage.
        if isinstance(e, ValueError) and _is_layout_error(e):
          raise CheckpointError(f"cannot resume from {self.directory}: the saved arrays do not fit "
                                f"this run's state ({_first_line(e)})") from e
        local = f"its arrays cannot be read ({type(e).__name__}: {_first_line(e)})"
      reason = _agree(local)
      if reason is not None:
        faults.append((step, reason))
        continue
      if DIGEST_KEY not in progress:  # written before digests existed: readable, not verifiable
        note(f"{self.directory}: step {step} has no array digests (an older qsgd_optax wrote it); "
             "resuming from it unverified")
      else:
        damaged = _damaged(progress[DIGEST_KEY], tree)
        if damaged:
          faults.append((step, f"array {damaged[0]} does not match its digest"
                               + (f" ({len(damaged) - 1} more)" if len(damaged) > 1 else "")))
          continue
      for skipped, why in faults:
        note(f"{self.directory}: skipped step {skipped}: {why}; resuming from step {step}")
      self._set_aside([s for s, _ in faults])
      self.latest = step
      progress.pop(DIGEST_KEY, None)  # the record as the caller saved it
      return tree, progress
    listing = "; ".join(f"step {s}: {why}" for s, why in faults)
    raise CheckpointError(f"cannot resume from {self.directory}: no checkpoint reads and verifies "
                          f"({listing}). Remove the directory to start over")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps to ``corrupt-<step>`` (kept for inspection, out of Orbax's view)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        dest, n = self.directory / f"corrupt-{step}", 1
        while dest.exists():  # an earlier incident's evidence stays
          n += 1
          dest = self.directory / f"corrupt-{step}.{n}"
        os.replace(self._step_dir(step), dest)
    _sync(f"qsgd_optax set aside {self.directory}")
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()

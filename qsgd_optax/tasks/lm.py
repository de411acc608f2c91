"""Causal-LM fine-tuning: batching, loss, train step, sharding and train loop.

The recipe (Pamuk et al.'s GSM8K experiment, scaled): one epoch, a batch of
one example by default with gradient accumulation through
:class:`optax.MultiSteps`, linear warmup then linear decay to zero,
``optax.clip_by_global_norm`` chained before the optimizer, decoupled weight
decay, and mixed precision (bfloat16 compute through the model's ``dtype``,
float32 master weights and optimizer state).

Loss: token-level cross-entropy on the completion tokens only (the mask of
:class:`~qsgd_optax.tasks.gsm_data.TokenizedExample`); a batch's loss is
the mean over its completion tokens.

Batching (:func:`make_batches`): ``pack=False`` puts one example per row,
padded to a multiple of ``bucket`` tokens, so there are only a few distinct
shapes (each compiled once) and little padding; ``pack=True`` packs several
examples into each row of ``max_len`` tokens, with segment ids so that no
token attends across examples and positions restarting at 0 per example.

Train step: the gradient and the optimizer update are two jitted programs
(:func:`make_grad_fn`, :func:`make_update_fn`). The gradient program depends
only on the model and the batch shape, so several optimizer arms reuse one
compiled executable per shape; both are compiled ahead of time by
:class:`Compiled`, whose compile times are reported apart from the run.

Sharding (:func:`make_mesh`, :func:`param_shardings`): a ``Mesh`` with axes
``("data", "fsdp")``. The batch axis is split over both axes; every large
parameter is split along its largest axis divisible by the ``fsdp`` size
(ZeRO-3 / FSDP style) and replicated over ``data``; optimizer state follows
the parameter it belongs to (:func:`state_shardings`). Over several hosts,
call ``jax.distributed.initialize()`` first (``--distributed`` in the CLI),
then build the mesh over ``jax.devices()``: every process builds the same
global batch (the data are seeded) and :func:`shard_batch` materializes only
its own shards with ``jax.make_array_from_callback``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsgd_optax.tasks import _checkpoints, _common

__all__ = [
    "DTYPES",
    "MESH_AXES",
    "MODELS",
    "Batch",
    "Compiled",
    "FinetuneConfig",
    "TrainResult",
    "batch_sharding",
    "comparison_table",
    "device_summary",
    "evaluate",
    "loss_fn",
    "make_batches",
    "make_eval_fn",
    "make_grad_fn",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "finite_mean",
    "make_update_fn",
    "nonfinite_in_a_row",
    "pack_examples",
    "pad_examples",
    "param_shardings",
    "parse_mesh",
    "run_finetune",
    "shard_batch",
    "smooth_curve",
    "split_params",
    "state_shardings",
    "train",
    "train_step",
]

MESH_AXES = ("data", "fsdp")


class Batch(NamedTuple):
  """A batch of token rows; every field is ``[rows, seq]``.

  Attributes:
    inputs: int32 input token ids.
    targets: int32 next-token ids (``inputs`` shifted by one).
    weights: float32, 1 where the target is a completion token, else 0.
    positions: int32 position of each token inside its own example.
    segment_ids: int32 example id inside the row (1, 2, ...), 0 on padding.
  """

  inputs: Any
  targets: Any
  weights: Any
  positions: Any
  segment_ids: Any


def _empty(rows: int, seq: int) -> Batch:
  return Batch(np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32),
               np.zeros((rows, seq), np.float32),
               np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32))


def _put(batch: Batch, row: int, start: int, ex: Any, segment: int) -> int:
  ids, mask = ex.ids, ex.completion
  n = ids.shape[0] - 1
  sl = slice(start, start + n)
  batch.inputs[row, sl] = ids[:-1]
  batch.targets[row, sl] = ids[1:]
  batch.weights[row, sl] = mask[1:]
  batch.positions[row, sl] = np.arange(n)
  batch.segment_ids[row, sl] = segment
  return start + n


def _check_sizes(max_len: int, batch_size: int) -> None:
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")


def pad_examples(examples: Sequence[Any], max_len: int, *, batch_size: int = 1,
                 bucket: int = 64, pad_rows_to: int = 1) -> list[Batch]:
  """One example per row, rows padded to a multiple of ``bucket`` tokens.

  Consecutive examples form a batch (order is kept); the row length is the
  longest example of the batch rounded up to ``bucket`` and capped at
  ``max_len``. The last batch is padded with empty rows up to a multiple of
  ``pad_rows_to`` (the number of batch shards).

  Args:
    examples: :class:`~qsgd_optax.tasks.gsm_data.TokenizedExample` items,
      at most ``max_len + 1`` tokens each.
    max_len: the longest row.
    batch_size: examples per batch.
    bucket: row lengths are multiples of this.
    pad_rows_to: row count multiple for the last batch.
  """
  _check_sizes(max_len, batch_size)
  if bucket < 1:
    raise ValueError(f"bucket must be >= 1, got {bucket}.")
  out = []
  for i in range(0, len(examples), batch_size):
    group = examples[i:i + batch_size]
    longest = max(len(ex) - 1 for ex in group)
    if longest > max_len:
      raise ValueError(f"an example has {longest + 1} tokens, more than "
                       f"max_len + 1 = {max_len + 1}.")
    seq = min(max_len, bucket * math.ceil(longest / bucket))
    rows = len(group) + (-len(group)) % pad_rows_to
    batch = _empty(rows, seq)
    for r, ex in enumerate(group):
      _put(batch, r, 0, ex, 1)
    out.append(batch)
  return out


def pack_examples(examples: Sequence[Any], max_len: int, *, batch_size: int = 1,
                  pad_rows_to: int = 1) -> list[Batch]:
  """Packs examples in order into rows of exactly ``max_len`` tokens.

  An example that does not fit into the current row starts the next one
  (examples are never split). Rows are grouped ``batch_size`` at a time; the
  last batch is padded with empty rows up to a multiple of ``pad_rows_to``.
  """
  _check_sizes(max_len, batch_size)
  rows: list[list[Any]] = []
  used = max_len
  for ex in examples:
    n = len(ex) - 1
    if n > max_len:
      raise ValueError(f"an example has {n + 1} tokens, more than "
                       f"max_len + 1 = {max_len + 1}.")
    if used + n > max_len:
      rows.append([])
      used = 0
    rows[-1].append(ex)
    used += n
  out = []
  for i in range(0, len(rows), batch_size):
    group = rows[i:i + batch_size]
    batch = _empty(len(group) + (-len(group)) % pad_rows_to, max_len)
    for r, row in enumerate(group):
      start = 0
      for s, ex in enumerate(row):
        start = _put(batch, r, start, ex, s + 1)
    out.append(batch)
  return out


def make_batches(examples: Sequence[Any], max_len: int, *, batch_size: int = 1,
                 pack: bool = False, bucket: int = 64,
                 pad_rows_to: int = 1) -> list[Batch]:
  """:func:`pack_examples` if ``pack`` else :func:`pad_examples`."""
  if pack:
    return pack_examples(examples, max_len, batch_size=batch_size,
                         pad_rows_to=pad_rows_to)
  return pad_examples(examples, max_len, batch_size=batch_size, bucket=bucket,
                      pad_rows_to=pad_rows_to)


# ----------------------------------------------------------------------------
# Model as (graphdef, params) and the loss.


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """``(graphdef, params)`` with ``params`` a pure dict of arrays.

  ``nnx.merge(graphdef, params)`` rebuilds the model; optax and the sharding
  helpers see plain nested dicts.
  """
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _token_stats(graphdef: nnx.GraphDef, params: Any,
                 batch: Batch) -> tuple[jax.Array, jax.Array]:
  model = nnx.merge(graphdef, params)
  logits = model(batch.inputs, batch.positions, batch.segment_ids)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, batch.targets[..., None], axis=-1)[..., 0]
  weights = jnp.asarray(batch.weights, jnp.float32)
  return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def loss_fn(graphdef: nnx.GraphDef, params: Any,
            batch: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean cross-entropy over the batch's completion tokens.

  Returns:
    ``(loss, (sum_nll, n_tokens))``; ``loss`` is 0 for a batch without
    completion tokens.
  """
  total, count = _token_stats(graphdef, params, batch)
  return total / jnp.maximum(count, 1.0), (total, count)


def make_grad_fn(graphdef: nnx.GraphDef,
                 param_sharding: Any = None) -> Callable[..., Any]:
  """Jitted ``(params, batch) -> (loss, grads)``; grads take ``param_sharding``."""
  def grad_fn(params, batch):
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, p, batch), has_aux=True)(params)
    return loss, grads

  out = None if param_sharding is None else (None, param_sharding)
  return jax.jit(grad_fn, out_shardings=out)


def make_update_fn(tx: optax.GradientTransformation, param_sharding: Any = None,
                   opt_sharding: Any = None) -> Callable[..., Any]:
  """Jitted ``(params, opt_state, grads) -> (params, opt_state)``.

  ``params`` and ``opt_state`` are donated; pass fresh copies.
  """
  def update_fn(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out = None
  if param_sharding is not None:
    out = (param_sharding, opt_sharding)
  return jax.jit(update_fn, donate_argnums=(0, 1), out_shardings=out)


def make_eval_fn(graphdef: nnx.GraphDef) -> Callable[..., Any]:
  """Jitted ``(params, batch) -> (sum_nll, n_tokens)`` over completion tokens."""
  return jax.jit(lambda params, batch: _token_stats(graphdef, params, batch))


def train_step(grad_fn: Callable[..., Any], update_fn: Callable[..., Any],
               params: Any, opt_state: Any,
               batch: Batch) -> tuple[Any, Any, jax.Array]:
  """One micro-step: gradients of ``batch``, then the (accumulating) update.

  Returns:
    ``(params, opt_state, loss)``.
  """
  loss, grads = grad_fn(params, batch)
  params, opt_state = update_fn(params, opt_state, grads)
  return params, opt_state, loss


class Compiled:
  """Ahead-of-time compiled executables of a jitted function, one per shape.

  Calling it compiles on the first use of a new argument signature (shapes,
  dtypes, shardings) and records the compile time in ``compile_seconds``.
  """

  def __init__(self, jitted: Callable[..., Any]):
    self._jitted = jitted
    self._cache: dict[Any, Any] = {}
    self.compile_seconds = 0.0

  @staticmethod
  def _key(args: Any) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
        for x in leaves)

  def __call__(self, *args: Any) -> Any:
    key = self._key(args)
    fn = self._cache.get(key)
    if fn is None:
      start = time.perf_counter()
      fn = self._jitted.lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
      self._cache[key] = fn
    return fn(*args)


# ----------------------------------------------------------------------------
# Optimizer.


def make_schedule(learning_rate: float, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then linear decay to 0.

  The learning rate reaches ``learning_rate`` at step ``warmup_steps`` and
  0 at step ``total_steps`` (counted in optimizer updates).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"warmup_steps must be in [0, total_steps={total_steps}], got "
        f"{warmup_steps}.")
  decay = optax.linear_schedule(learning_rate, 0.0,
                                max(1, total_steps - warmup_steps))
  if warmup_steps == 0:
    return decay
  warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warm, decay], [warmup_steps])


def make_optimizer(arm: _common.Arm, *, learning_rate: float, total_steps: int,
                   warmup_steps: int, weight_decay: float = 0.01,
                   clip_norm: float | None = 1.0, accum_steps: int = 1,
                   n_qubits: int = 4) -> optax.GradientTransformation:
  """The fine-tuning optimizer of an arm.

  ``MultiSteps(chain(clip_by_global_norm(clip_norm), arm_optimizer(schedule)))``:
  gradients of ``accum_steps`` micro-batches are averaged, clipped, then
  given to AdamW or QSGD (decoupled weight decay on every parameter). The
  schedule counts optimizer updates, ``total_steps`` of them.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
  schedule = make_schedule(learning_rate, total_steps, warmup_steps)
  inner = _common.make_optimizer(arm, schedule, weight_decay=weight_decay,
                                 n_qubits=n_qubits)
  if clip_norm is not None:
    if not clip_norm > 0:
      raise ValueError(f"clip_norm must be positive or None, got {clip_norm}.")
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  if accum_steps == 1:
    return inner
  return optax.MultiSteps(inner, every_k_schedule=accum_steps)


# ----------------------------------------------------------------------------
# Sharding.


def parse_mesh(text: str) -> dict[str, int]:
  """Parses ``"data=N,fsdp=M"`` (either part optional) to ``{"data": N, "fsdp": M}``."""
  sizes = {"data": 1, "fsdp": 1}
  seen = set()
  for part in text.split(","):
    part = part.strip()
    if not part:
      continue
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in sizes or name in seen:
      raise ValueError(
          f"bad mesh {text!r}: expected data=N,fsdp=M with axes {MESH_AXES}, "
          "each at most once.")
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f"bad mesh {text!r}: {name} must be a positive int.")
    sizes[name] = size
    seen.add(name)
  if not seen:
    raise ValueError(f"bad mesh {text!r}: expected data=N,fsdp=M.")
  return sizes


def make_mesh(data: int = 1, fsdp: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices).

  Raises:
    ValueError: when ``data * fsdp`` differs from the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or fsdp < 1 or data * fsdp != len(devices):
    raise ValueError(
        f"mesh data={data},fsdp={fsdp} needs {data * fsdp} devices, but "
        f"{len(devices)} are available; data * fsdp must equal the device "
        "count.")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def _param_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  axes = sorted(range(len(shape)), key=lambda a: (-shape[a], a))
  for a in axes:
    if shape[a] % fsdp == 0:
      spec: list[Any] = [None] * len(shape)
      spec[a] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(params: Any, mesh: Mesh, *,
                    min_size: int = 1024) -> Any:
  """``NamedSharding`` per parameter: FSDP over the largest divisible axis.

  Arrays with fewer than ``min_size`` entries, or with no axis divisible by
  the ``fsdp`` size, are replicated. Everything is replicated over ``data``.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _param_spec(x.shape, fsdp, min_size)),
      params)


def state_shardings(opt_state: Any, params: Any, param_sharding: Any,
                    mesh: Mesh) -> Any:
  """Shardings for an optimizer state: each per-parameter leaf as its parameter.

  A state leaf belongs to a parameter when its tree path ends with the
  parameter's path and the shapes agree (Adam's ``mu``/``nu``, MultiSteps'
  accumulators, ...); every other leaf (step counts, scalars) is replicated.
  ``opt_state`` may be abstract (``jax.eval_shape(tx.init, params)``).
  """
  by_path = {}
  for path, (p, s) in zip(
      (kp for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
      zip(jax.tree.leaves(params), jax.tree.leaves(param_sharding))):
    by_path[tuple(path)] = (tuple(p.shape), s)
  lengths = sorted({len(k) for k in by_path}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    for n in lengths:
      hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over both mesh axes, sequence replicated."""
  return NamedSharding(mesh, P(MESH_AXES, None))


def shard_batch(batch: Batch, mesh: Mesh | None) -> Batch:
  """Places a host batch: on the default device, or split over ``mesh``.

  With a mesh, each process materializes only its addressable shards, so
  the same code runs on one host or many.
  """
  if mesh is None:
    return Batch(*(jnp.asarray(x) for x in batch))
  sharding = batch_sharding(mesh)
  rows = batch.inputs.shape[0]
  if rows % mesh.size:
    raise ValueError(f"a batch of {rows} rows cannot be split over "
                     f"{mesh.size} devices.")
  return Batch(*(jax.make_array_from_callback(x.shape, sharding,
                                              lambda idx, x=x: x[idx])
                 for x in batch))


# ----------------------------------------------------------------------------
# Loops.


def evaluate(eval_fn: Callable[..., Any], params: Any, batches: Iterable[Batch],
             mesh: Mesh | None = None) -> float:
  """Mean cross-entropy per completion token over ``batches``."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = eval_fn(params, shard_batch(batch, mesh))
    total += float(s)
    count += float(n)
  return total / count if count else float("nan")


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  Attributes:
    params: the trained parameters.
    losses: the loss of every micro-batch, in order.
    tokens: the input tokens of every micro-batch (padding excluded).
    seconds: wall time of the loop (compilation and ``on_step`` excluded).
    compile_seconds: time spent compiling inside the loop.
    opt_state: the optimizer state after the last micro-batch.
  """

  params: Any
  losses: list[float]
  tokens: list[int]
  seconds: float
  compile_seconds: float
  opt_state: Any = None

  @property
  def tokens_per_second(self) -> float:
    """Input tokens (padding excluded) per second of the loop."""
    return sum(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def nonfinite_in_a_row(opt_state: Any) -> int:
  """``notfinite_count`` of an ``optax.apply_if_finite`` state (the outermost)."""
  return int(opt_state.notfinite_count)


def train(params: Any, opt_state: Any, batches: Sequence[Batch], *,
          grad_fn: Callable[..., Any], update_fn: Callable[..., Any],
          mesh: Mesh | None = None, progress: bool = True,
          desc: str = "train", ema: float = 0.9, start: int = 0,
          losses: Sequence[float] = (), tokens: Sequence[int] = (),
          seconds: float = 0.0,
          on_step: Callable[[int, Any, Any, list[float], list[int], float], None] | None = None,
          max_nonfinite: int | None = None) -> TrainResult:
  """Runs ``batches[start:]``; shows loss (smoothed) and tokens/s.

  ``grad_fn`` and ``update_fn`` are typically :class:`Compiled` wrappers of
  :func:`make_grad_fn` and :func:`make_update_fn`; their compile time is
  taken out of the reported wall time.

  Args:
    start: micro-batches already done (a resumed run); ``losses``, ``tokens``
      and ``seconds`` are what those micro-batches recorded.
    on_step: called after every micro-batch as ``on_step(done, params,
      opt_state, losses, tokens, seconds)`` (checkpointing, interruption);
      its own time is not counted.
    max_nonfinite: ``opt_state`` is an ``optax.apply_if_finite`` state;
      :class:`~qsgd_optax.tasks._common.NonFiniteError` is raised once this
      many micro-batches in a row had a non-finite gradient.
  """
  if not 0 <= start <= len(batches):
    raise ValueError(f"start must be in [0, {len(batches)}], got {start}.")
  losses, tokens = list(losses), list(tokens)
  if len(losses) != start or len(tokens) != start:
    raise ValueError(f"a run resumed at micro-batch {start} needs {start} losses and "
                     f"token counts, got {len(losses)} and {len(tokens)}.")
  compiles = [f for f in (grad_fn, update_fn) if isinstance(f, Compiled)]
  compile_before = sum(f.compile_seconds for f in compiles)
  smooth = None

  def smoothed(loss: float) -> float | None:  # the bar's EMA; skipped (non-finite) losses leave it
    if not math.isfinite(loss):
      return smooth
    return loss if smooth is None else ema * smooth + (1 - ema) * loss

  for loss in losses:
    smooth = smoothed(loss)
  loop_start, outside = time.perf_counter(), 0.0

  def elapsed() -> float:
    return (seconds + time.perf_counter() - loop_start - outside
            - (sum(f.compile_seconds for f in compiles) - compile_before))

  with _common.progress_bar(total=len(batches), initial=start, desc=desc,
                            disable=not progress, leave=False) as bar:
    for done, batch in enumerate(batches[start:], start + 1):
      params, opt_state, loss = train_step(
          grad_fn, update_fn, params, opt_state, shard_batch(batch, mesh))
      loss = float(loss)
      losses.append(loss)
      tokens.append(int(np.count_nonzero(batch.segment_ids)))
      smooth = smoothed(loss)
      shown = float("nan") if smooth is None else smooth
      rate = sum(tokens[start:]) / max(elapsed() - seconds, 1e-9)
      bar.set_postfix_str(f"loss={shown:.4f} tok/s={rate:.0f}")
      bar.update(1)
      if max_nonfinite is not None:
        in_a_row = nonfinite_in_a_row(opt_state)
        if in_a_row >= max_nonfinite:
          raise _common.NonFiniteError(
              f"{desc}: {in_a_row} micro-batches in a row with a non-finite gradient (up to "
              f"micro-batch {done}, max_nonfinite={max_nonfinite}); the parameters were left as "
              "they were before them. Lower the learning rate or quantum_weight, or use "
              "modulate='update' (in a new checkpoint directory: a resumed run keeps its "
              "configuration).")
      if on_step is not None:
        jax.block_until_ready(params)
        hook_start = time.perf_counter()
        total = elapsed()
        on_step(done, params, opt_state, losses, tokens, total)
        outside += time.perf_counter() - hook_start
  jax.block_until_ready(params)
  compile_seconds = sum(f.compile_seconds for f in compiles) - compile_before
  return TrainResult(params, losses, tokens, elapsed(), compile_seconds, opt_state)


def smooth_curve(values: Sequence[float], weight: float = 0.9) -> list[float]:
  """Bias-corrected exponential moving average (as TensorBoard draws it).

  Non-finite values (skipped micro-batches) leave the average unchanged.

  >>> [round(v, 3) for v in smooth_curve([1.0, float("nan"), 2.0], 0.5)]
  [1.0, 1.0, 1.667]
  """
  out, acc, n = [], 0.0, 0
  for v in values:
    if math.isfinite(v):
      acc = weight * acc + (1 - weight) * v
      n += 1
    out.append(acc / (1 - weight ** n) if n else float("nan"))
  return out


def finite_mean(values: Sequence[float]) -> float:
  """Mean of the finite values (NaN when there are none).

  >>> finite_mean([1.0, float("nan"), 3.0])
  2.0
  """
  finite = [v for v in values if math.isfinite(v)]
  return float(np.mean(finite)) if finite else float("nan")


def device_summary(mesh: Mesh | None) -> Mapping[str, Any]:
  """Platform and device counts, for run configs."""
  return {"platform": jax.default_backend(),
          "devices": jax.device_count(),
          "processes": jax.process_count(),
          "mesh": None if mesh is None else dict(mesh.shape)}


# ----------------------------------------------------------------------------
# The experiment: every arm and seed on one model and one data set.

MODELS = ("smollm2-135m", "tiny")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass
class FinetuneConfig:
  """Configuration of :func:`run_finetune` (the CLI's options).

  Attributes:
    model: ``"smollm2-135m"`` (the pretrained GGUF) or ``"tiny"`` (a small
      random-init Llama with a byte-level tokenizer, no download).
    examples: training problems, one epoch over them.
    test_examples: held-out problems (from templates unseen in training).
    max_len: tokens per row; longer examples are cut at the end.
    batch_size: examples (or packed rows) per micro-batch.
    grad_accum: micro-batches per optimizer update (``optax.MultiSteps``).
    learning_rate: peak learning rate.
    warmup: warmup length as a fraction of the optimizer updates.
    weight_decay: decoupled weight decay.
    clip_norm: global-norm gradient clipping (``None``: off).
    dtype: compute dtype name; parameters and optimizer state stay float32.
    format: ``"chat"``, ``"plain"`` or ``"auto"`` (chat for SmolLM2, plain
      for the tiny model).
    pack: pack several examples per row instead of one padded example.
    bucket: padded row lengths are multiples of this (``pack=False``).
    data_seed: seed of the problem set (each run's seed only shuffles order
      and, for the tiny model, initializes the weights).
    eval_rows: rows per evaluation batch.
    mesh: ``{"data": N, "fsdp": M}`` or ``None`` for one device.
    n_qubits: QSGD register size.
    cache: cache directory for downloads (``None``: the default).
    max_nonfinite: when set, the optimizer is wrapped in
      ``optax.apply_if_finite``: a micro-batch with a non-finite gradient
      changes nothing and is counted (``nonfinite_steps`` in the record), and
      the run stops with :class:`~qsgd_optax.tasks._common.NonFiniteError`
      once ``max_nonfinite`` of them came in a row.
  """

  model: str = "smollm2-135m"
  examples: int = 48
  test_examples: int = 16
  max_len: int = 512
  batch_size: int = 1
  grad_accum: int = 1
  learning_rate: float = 2e-5
  warmup: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float | None = 1.0
  dtype: str = "bfloat16"
  format: str = "auto"
  pack: bool = False
  bucket: int = 64
  data_seed: int = 0
  eval_rows: int = 4
  mesh: dict[str, int] | None = None
  n_qubits: int = 4
  cache: str | None = None
  max_nonfinite: int | None = None

  def __post_init__(self) -> None:
    if self.max_nonfinite is not None and (not isinstance(self.max_nonfinite, int)
                                           or self.max_nonfinite < 1):
      raise ValueError(f"max_nonfinite must be None or a positive int, got {self.max_nonfinite!r}.")
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got "
                       f"{self.dtype!r}.")
    if self.format not in ("auto", "chat", "plain"):
      raise ValueError(f"format must be 'auto', 'chat' or 'plain', got "
                       f"{self.format!r}.")
    for name in ("examples", "max_len", "batch_size", "grad_accum", "bucket",
                 "eval_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.test_examples < 0:
      raise ValueError(f"test_examples must be >= 0, got {self.test_examples}.")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"warmup must be in [0, 1), got {self.warmup}.")

  @property
  def style(self) -> str:
    """The prompt format actually used."""
    if self.format != "auto":
      return self.format
    return "chat" if self.model == "smollm2-135m" else "plain"


def _abstract_model(cfg: Any, dtype: Any) -> nnx.GraphDef:
  from qsgd_optax.tasks.llama import Llama  # pylint: disable=import-outside-toplevel

  abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype,
                                          param_dtype=jnp.float32,
                                          rngs=nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def _load_model(config: FinetuneConfig) -> tuple[Any, Any, Callable[[int], Any]]:
  """``(graphdef, tokenizer, init(seed) -> host float32 params)``."""
  from qsgd_optax.tasks import gguf_loader, llama  # pylint: disable=import-outside-toplevel

  dtype = DTYPES[config.dtype]
  if config.model == "smollm2-135m":
    loaded = gguf_loader.load_gguf(gguf_loader.fetch_smollm2(config.cache))
    graphdef = _abstract_model(loaded.config, dtype)
    return graphdef, loaded.tokenizer, lambda seed: loaded.params
  tokenizer = gguf_loader.byte_level_tokenizer()
  cfg = llama.LlamaConfig.tiny(vocab_size=tokenizer.get_vocab_size())
  graphdef = _abstract_model(cfg, dtype)

  def init(seed: int) -> Any:
    model = llama.Llama(cfg, dtype=dtype, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(seed))
    return jax.device_get(split_params(model)[1])

  return graphdef, tokenizer, init


# What a resumed run may change: where files are cached, how evaluation is
# batched and how many non-finite micro-batches in a row stop it (none of
# them shapes the trajectory; whether apply_if_finite wraps the optimizer at
# all shows in the state's layout, which is checked on restore).
_NOT_IDENTITY = ("cache", "eval_rows", "max_nonfinite")


def _state_tree(params: Any, opt_state: Any) -> dict[str, Any]:
  """Parameters and optimizer state as one flat dict for Orbax.

  Optax states hold namedtuples and empty nodes; numbering the leaves keeps
  the checkpoint independent of how Orbax would name them. The leaves' key
  paths are saved with the progress record and compared on restore.
  """
  leaves = jax.tree.leaves((params, opt_state))
  return {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}


def _state_paths(params: Any, opt_state: Any) -> list[str]:
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path((params, opt_state))[0]]


def _check_state_paths(progress: Mapping[str, Any], like: Any, directory: Any) -> None:
  """Refuses a checkpoint whose saved leaf paths differ from ``like``'s."""
  paths = _state_paths(*like)
  saved = progress.get("state_paths") or []
  if saved != paths:
    missing = sorted(set(paths) - set(saved))[:3]
    extra = sorted(set(saved) - set(paths))[:3]
    raise _checkpoints.CheckpointError(
        f"cannot resume from {directory}: its optimizer state is laid out differently "
        f"(another optax or qsgd_optax version, or max_nonfinite on/off): this run has "
        f"{len(paths)} arrays, the checkpoint {len(saved)}; e.g. missing {missing}, "
        f"unexpected {extra}")


def run_finetune(config: FinetuneConfig, arms: Sequence[_common.Arm],
                 seeds: Sequence[int], *, progress: bool = True,
                 log: Callable[[str], None] | None = None,
                 checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_every: int | None = None, keep: int = 3,
                 resume: bool = False,
                 on_step: Callable[[int], None] | None = None,
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Fine-tunes the model once per (arm, seed); one epoch each.

  Args:
    config: the experiment.
    arms: optimizer arms.
    seeds: seeds; each fixes the batch order (and the tiny model's init).
    progress: show progress bars.
    log: called with one line per finished run.
    checkpoint_dir: when given, each run writes Orbax checkpoints to
      ``checkpoint_dir/<arm label>-seed<seed>`` (parameters, the whole
      optimizer state, the losses so far and the position in the batch
      order, which with the seed fixes the data still to come; the run
      has no other randomness): every ``checkpoint_every`` optimizer steps
      and at the end of the epoch, the last ``keep`` kept.
    checkpoint_every: optimizer steps between checkpoints (``None``: only
      at the end).
    keep: checkpoints kept per run.
    resume: continue every run from its latest complete checkpoint (a
      finished run is only evaluated). The resumed run ends bit-identical
      to an uninterrupted one on the same devices. A checkpoint written
      with another configuration is refused with a
      :class:`~qsgd_optax.tasks._checkpoints.CheckpointError` naming the
      fields that differ; without ``resume`` existing checkpoints are an
      error too.
    on_step: called with the number of micro-batches done after each one
      (and after its checkpoint, if any); raising stops the run.

  Returns:
    ``(runs, info)``: one record per run (see the CLI's docs for the keys)
    and facts about data and devices for the summary's config.
  """
  if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                       or checkpoint_every < 1):
    raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}.")
  from qsgd_optax.tasks import gsm_data  # pylint: disable=import-outside-toplevel

  log = log or (lambda msg: None)
  mesh = None
  if config.mesh is not None:
    mesh = make_mesh(config.mesh.get("data", 1), config.mesh.get("fsdp", 1))
  n_shards = 1 if mesh is None else mesh.size
  if config.batch_size % n_shards:
    raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of "
                     f"the mesh size ({n_shards}).")

  start = time.perf_counter()
  graphdef, tokenizer, init_params = _load_model(config)
  train_p, test_p = gsm_data.load_gsm_symbolic(
      config.examples, config.test_examples, seed=config.data_seed,
      cache=config.cache)
  train_ex, cut_train = gsm_data.tokenize(tokenizer, train_p,
                                          style=config.style,
                                          max_len=config.max_len)
  test_ex, cut_test = gsm_data.tokenize(tokenizer, test_p, style=config.style,
                                        max_len=config.max_len)
  eval_batches = pack_examples(
      test_ex, config.max_len,
      batch_size=config.eval_rows + (-config.eval_rows) % n_shards,
      pad_rows_to=n_shards)
  if not train_ex:
    raise ValueError(f"none of the {len(train_p)} training problems keeps an answer token "
                     f"within max_len={config.max_len} tokens (prompts are longer); raise "
                     "max_len.")
  lengths = [len(ex) for ex in train_ex]
  info: dict[str, Any] = {
      "n_train": len(train_ex), "n_test": len(test_ex),
      "train_truncated": cut_train, "test_truncated": cut_test,
      "train_templates": len({p.template for p in train_p}),
      "test_templates": len({p.template for p in test_p}),
      "tokens_per_example_mean": float(np.mean(lengths)) if lengths else 0.0,
      "completion_tokens": int(sum(int(ex.completion[1:].sum())
                                   for ex in train_ex)),
      "setup_seconds": 0.0,
      **device_summary(mesh),
  }
  log(f"data: {len(train_ex)} train / {len(test_ex)} held-out examples "
      f"(templates {info['train_templates']} / {info['test_templates']}, "
      f"disjoint), {info['tokens_per_example_mean']:.0f} tokens per example, "
      f"{cut_train + cut_test} cut to max_len={config.max_len}")

  host0 = init_params(0)
  if mesh is not None:
    p_shard = param_shardings(host0, mesh)
    place = lambda host: jax.device_put(host, p_shard)  # pylint: disable=unnecessary-lambda-assignment
  else:
    p_shard = None
    place = lambda host: jax.tree.map(jnp.asarray, host)  # pylint: disable=unnecessary-lambda-assignment
  grad_fn = Compiled(make_grad_fn(graphdef, p_shard))
  eval_fn = Compiled(make_eval_fn(graphdef))
  info["setup_seconds"] = time.perf_counter() - start
  eval_before: dict[int, float] = {}
  shared_init = config.model == "smollm2-135m"

  def run_one(arm: _common.Arm, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    host = host0 if (shared_init or seed == 0) else init_params(seed)
    order = np.random.default_rng(seed).permutation(len(train_ex))
    batches = make_batches([train_ex[i] for i in order], config.max_len,
                           batch_size=config.batch_size, pack=config.pack,
                           bucket=config.bucket, pad_rows_to=n_shards)
    total_steps = math.ceil(len(batches) / config.grad_accum)
    warmup = int(round(config.warmup * total_steps))
    tx = make_optimizer(arm, learning_rate=config.learning_rate,
                        total_steps=total_steps, warmup_steps=warmup,
                        weight_decay=config.weight_decay,
                        clip_norm=config.clip_norm,
                        accum_steps=config.grad_accum,
                        n_qubits=config.n_qubits)
    if config.max_nonfinite is not None:
      # One more than the stop threshold: apply_if_finite never lets a
      # non-finite update through before the run is stopped.
      tx = optax.apply_if_finite(tx, max_consecutive_errors=config.max_nonfinite + 1)
    params = place(host)
    key = 0 if shared_init else seed
    if key not in eval_before:
      eval_before[key] = evaluate(eval_fn, params, eval_batches, mesh)
    if mesh is not None:
      o_shard = state_shardings(jax.eval_shape(tx.init, params), params,
                                p_shard, mesh)
      opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    else:
      o_shard = None
      opt_state = jax.jit(tx.init)(params)
    update_fn = Compiled(make_update_fn(tx, p_shard, o_shard))

    checkpoints, prior = None, {"micro_step": 0, "losses": [], "tokens": [], "seconds": 0.0}
    if checkpoint_dir is not None:
      identity = {"optimizer": arm.label, "seed": int(seed),
                  **{k: v for k, v in dataclasses.asdict(config).items()
                     if k not in _NOT_IDENTITY},
                  "n_train": len(train_ex), "micro_batches": len(batches)}
      checkpoints = _checkpoints.RunCheckpoints(
          _checkpoints.run_directory(checkpoint_dir, arm.label, seed), identity,
          keep=keep, resume=resume)
    every = None if checkpoint_every is None else checkpoint_every * config.grad_accum

    def after_step(done, params, opt_state, losses, tokens, seconds):
      if checkpoints is not None and (done == len(batches) or (every and done % every == 0)):
        checkpoints.save(done, _state_tree(params, opt_state),
                         {"micro_step": done, "losses": losses, "tokens": tokens,
                          "seconds": seconds, "state_paths": _state_paths(params, opt_state)})
      if on_step is not None:
        on_step(done)

    try:
      if checkpoints is not None and checkpoints.latest is not None:
        _check_state_paths(checkpoints.progress(), (params, opt_state), checkpoints.directory)
        tree, prior = checkpoints.restore(_state_tree(params, opt_state))
        params, opt_state = jax.tree.unflatten(jax.tree.structure((params, opt_state)),
                                               [tree[k] for k in sorted(tree)])
        log(f"{arm.label} seed={seed}: resumed at micro-batch {prior['micro_step']} "
            f"of {len(batches)} from {checkpoints.directory}")
      result = train(params, opt_state, batches, grad_fn=grad_fn,
                     update_fn=update_fn, mesh=mesh, progress=progress,
                     desc=f"{arm.label} seed={seed}", start=prior["micro_step"],
                     losses=prior["losses"], tokens=prior["tokens"],
                     seconds=prior["seconds"],
                     on_step=after_step if checkpoints is not None or on_step is not None else None,
                     max_nonfinite=config.max_nonfinite)
    finally:
      if checkpoints is not None:
        checkpoints.close()
    after = evaluate(eval_fn, result.params, eval_batches, mesh)
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):]
    record = {  # skipped (non-finite) micro-batches are left out of the means
        "final_loss": finite_mean(tail),
        "mean_loss": finite_mean(losses),
        "eval_loss_before": eval_before[key],
        "eval_loss_after": after,
        "steps": total_steps,
        "micro_steps": len(losses),
        "warmup_steps": warmup,
        "train_tokens": int(sum(result.tokens)),
        "tokens_per_s": result.tokens_per_second,
        "train_seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "wall_time": time.perf_counter() - t0,
        "nonfinite_steps": (int(result.opt_state.total_notfinite)
                            if config.max_nonfinite is not None else None),
        "resumed_at": prior["micro_step"] if checkpoints is not None else None,
        "loss_curve": losses,
        "loss_smooth": smooth_curve(losses),
    }
    log(f"{arm.label} seed={seed}: mean loss {record['mean_loss']:.4f}, "
        f"held-out {record['eval_loss_before']:.4f} -> {after:.4f}, "
        f"{record['tokens_per_s']:.0f} tok/s, {record['wall_time']:.0f} s")
    return record

  runs = _common.run_arms(arms, seeds, run_one, progress=progress,
                          desc="runs")
  info["grad_compile_seconds"] = grad_fn.compile_seconds
  info["eval_compile_seconds"] = eval_fn.compile_seconds
  return runs, info


def comparison_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """The paper-style table: mean training loss per arm and change vs AdamW."""
  groups = _common.group_runs(runs)
  base = groups.get("adamw")
  base_mean = (_common.mean_std(r["mean_loss"] for r in base)[0]
               if base else float("nan"))
  rows = []
  for label, group in groups.items():
    m, s, n = _common.mean_std(r["mean_loss"] for r in group)
    fin = _common.mean_std(r["final_loss"] for r in group)[0]
    before = _common.mean_std(r["eval_loss_before"] for r in group)[0]
    after = _common.mean_std(r["eval_loss_after"] for r in group)[0]
    tps = _common.mean_std(r["tokens_per_s"] for r in group)[0]
    wall = _common.mean_std(r["wall_time"] for r in group)[0]
    rel = ("" if label == "adamw" or not math.isfinite(base_mean)
           else f"{100 * (m - base_mean) / base_mean:+.2f}%")
    mean = f"{m:.4f}" + (f" +- {s:.4f}" if n > 1 else "")
    rows.append([label, n, mean, rel, f"{fin:.4f}", f"{before:.4f}",
                 f"{after:.4f}", f"{tps:.0f}", f"{wall:.0f}"])
  return _common.format_table(
      ["optimizer", "runs", "mean loss", "vs adamw", "final loss",
       "held-out before", "held-out after", "tok/s", "wall s"], rows)

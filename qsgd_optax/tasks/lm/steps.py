"""The LM train step: loss, the jitted gradient/update/eval programs, the optimizer.

Loss: token-level cross-entropy on the completion tokens only (the mask of
:class:`~qsgd_optax.tasks.lm.gsm_data.TokenizedExample`); a batch's loss is
the mean over its completion tokens.

The gradient and the optimizer update are two jitted programs
(:func:`make_grad_fn`, :func:`make_update_fn`). The gradient program depends
only on the model and the batch shape, so several optimizer arms reuse one
compiled executable per shape; both are compiled ahead of time by
:class:`Compiled`, whose compile times are reported apart from the run.

Optimizer (:func:`make_optimizer`): the paper's recipe, linear warmup then
linear decay to zero, ``optax.clip_by_global_norm`` chained before AdamW or
QSGD, gradient accumulation through :class:`optax.MultiSteps`. No loops,
no data loading, no files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from qsgd_optax.tasks import arms
from qsgd_optax.tasks.lm.batching import Batch

__all__ = [
    "Compiled",
    "loss_fn",
    "make_eval_fn",
    "make_grad_fn",
    "make_optimizer",
    "make_schedule",
    "make_share_fn",
    "make_update_fn",
    "split_params",
    "train_step",
]


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
  """Jitted ``(params, batch) -> (loss, grads)``; grads take ``param_sharding``.

  With ``param_sharding`` (FSDP), the parameters are gathered whole for the
  forward and backward pass (ZeRO-3: each device holds its shard between
  steps, the whole model while computing) and the gradients are
  reduce-scattered back to the shards. Left to itself, the partitioner
  would instead reshard the batch-sharded activations to the parameters'
  layout, which it can only do by replicating them ("Involuntary full
  rematerialization").
  """
  def gathered(params):
    if param_sharding is None:
      return params
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, s.update(spec=P())),
                        params, param_sharding)

  def grad_fn(params, batch):
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, gathered(p), batch), has_aux=True)(params)
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


def make_share_fn(tx: optax.GradientTransformation, twin: optax.GradientTransformation,
                  n_qubits: int, scope: str) -> Callable[..., Any]:
  """Jitted ``(params, opt_state, grads) -> {median, max, global}``: the quantum term's share.

  ``tx`` is a run's optimizer and ``twin`` the same one with
  ``quantum_weight=0`` (AdamW's chain); both updates are taken from the
  same state, their difference is the term's part of ``tx``'s update, and
  :func:`qsgd_optax.diagnostics.term_share` compares it with that update. Nothing is
  donated or changed. The float32 difference resolves shares down to about
  1e-7.
  """
  import qsgd_optax  # pylint: disable=import-outside-toplevel

  def share(params, opt_state, grads):
    updates, _ = tx.update(grads, opt_state, params)
    base, _ = twin.update(grads, opt_state, params)
    term = jax.tree.map(jnp.subtract, updates, base)
    return qsgd_optax.diagnostics.term_share(term, updates, params, n_qubits, scope=scope)

  return jax.jit(share)


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


def make_optimizer(arm: arms.Arm, *, learning_rate: float, total_steps: int,
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
  inner = arms.make_optimizer(arm, schedule, weight_decay=weight_decay,
                                 n_qubits=n_qubits)
  if clip_norm is not None:
    if not clip_norm > 0:
      raise ValueError(f"clip_norm must be positive or None, got {clip_norm}.")
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  if accum_steps == 1:
    return inner
  return optax.MultiSteps(inner, every_k_schedule=accum_steps)

"""The LM train loop: micro-batches through the compiled step, losses, timing, evaluation.

:func:`train` runs the batches from a start position (a resumed run) with
a progress bar, takes compile time out of the reported wall time, calls an
``on_step`` hook (checkpoints, interruption) and stops on too many
non-finite gradients in a row; :func:`evaluate` is the held-out loss. Gets
its compiled programs and data from the caller; reads and writes no files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qsgd_optax.tasks import running
from qsgd_optax.tasks.lm.batching import Batch
from qsgd_optax.tasks.lm.sharding import shard_batch
from qsgd_optax.tasks.lm.steps import Compiled, train_step

__all__ = [
    "TrainResult",
    "evaluate",
    "finite_mean",
    "nonfinite_in_a_row",
    "smooth_curve",
    "train",
]


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
          on_step_when: Callable[[int], bool] | None = None,
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
      its own time is not counted (compilations inside it are counted
      once, as compile time).
    on_step_when: when given, ``on_step`` runs only after the micro-batches
      ``done`` for which it returns true (the loop waits for the device only
      then, so a run with a rare hook is timed like one without).
    max_nonfinite: ``opt_state`` is an ``optax.apply_if_finite`` state;
      :class:`~qsgd_optax.tasks.running.NonFiniteError` is raised once this
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

  with running.progress_bar(total=len(batches), initial=start, desc=desc,
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
          raise running.NonFiniteError(
              f"{desc}: {in_a_row} micro-batches in a row with a non-finite gradient (up to "
              f"micro-batch {done}, max_nonfinite={max_nonfinite}); the parameters were left as "
              "they were before them. Lower the learning rate or quantum_weight, or use "
              "modulate='update' (in a new checkpoint directory: a resumed run keeps its "
              "configuration).")
      if on_step is not None and (on_step_when is None or on_step_when(done)):
        jax.block_until_ready(params)
        hook_start = time.perf_counter()
        compiled_before = sum(f.compile_seconds for f in compiles)
        total = elapsed()
        on_step(done, params, opt_state, losses, tokens, total)
        # elapsed() already takes compile time out; do not take it out twice
        outside += (time.perf_counter() - hook_start
                    - (sum(f.compile_seconds for f in compiles) - compiled_before))
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

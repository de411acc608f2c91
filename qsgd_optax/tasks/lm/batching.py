"""Token batches for causal-LM fine-tuning: padding one example per row, or packing.

:func:`make_batches`: ``pack=False`` puts one example per row, padded to a
multiple of ``bucket`` tokens, so there are only a few distinct shapes (each
compiled once) and little padding; ``pack=True`` packs several examples into
each row of ``max_len`` tokens, with segment ids so that no token attends
across examples and positions restarting at 0 per example. Host NumPy only:
no devices, no sharding (:mod:`~qsgd_optax.tasks.lm.sharding` places them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Batch",
    "make_batches",
    "pack_examples",
    "pad_examples",
]


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
    examples: :class:`~qsgd_optax.tasks.lm.gsm_data.TokenizedExample` items,
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

"""Running many (arm, seed) runs: the loop over them, progress bars, the divergence error.

A run record (one ``dict`` per (arm, seed)) starts with the keys of
:meth:`~qsgd_optax.tasks.arms.Arm.record` plus ``seed``; the task adds its
own metrics. Knows nothing about models or data; writes no files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from qsgd_optax.tasks.arms import Arm

__all__ = [
    "NonFiniteError",
    "progress_bar",
    "run_arms",
]


class NonFiniteError(RuntimeError):
  """Too many non-finite training steps in a row (the tasks' ``max_nonfinite``)."""


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str | None = None,
    disable: bool = False,
    leave: bool = True,
) -> Any:
  """A ``tqdm`` progress bar on stderr with the project's settings."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(
      iterable, total=total, initial=initial, desc=desc, disable=disable, leave=leave,
      file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def run_arms(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    run_one: Callable[[Arm, int], Mapping[str, Any]],
    *,
    progress: bool = True,
    desc: str = "runs",
    seed_major: bool = False,
    skip: Iterable[tuple[str, int]] = (),
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
  """Runs ``run_one(arm, seed)`` for every arm and seed, arm-major.

  Returns one record per run: ``arm.record()``, then ``"seed"``, then the
  mapping ``run_one`` returned (its keys win on clashes). A progress bar
  counts finished runs and shows the current arm and seed.

  Args:
    seed_major: every arm of the first seed first (an interrupted
      benchmark then holds complete pairs).
    skip: ``(arm label, seed)`` pairs not to run (done earlier); they get
      no record.
    on_record: called with each record as soon as its run ends.
  """
  skipped = {(label, int(seed)) for label, seed in skip}
  jobs = ([(a, s) for s in seeds for a in arms] if seed_major else [(a, s) for a in arms for s in seeds])
  jobs = [(a, s) for a, s in jobs if (a.label, int(s)) not in skipped]
  records: list[dict[str, Any]] = []
  with progress_bar(total=len(jobs), desc=desc, disable=not progress) as bar:
    for arm, seed in jobs:
      bar.set_postfix_str(f"{arm.label} seed={seed}")
      record: dict[str, Any] = {**arm.record(), "seed": int(seed)}
      record.update(run_one(arm, seed))
      records.append(record)
      if on_record is not None:
        on_record(record)
      bar.update(1)
  return records

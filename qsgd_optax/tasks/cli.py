"""Command-line pieces shared by the examples' and benchmarks' CLIs.

argparse ``type=`` converters that fail with a message naming the value and
the accepted form (:func:`int_arg`, :func:`names_arg`), the flag groups every
task CLI shares (:func:`add_common_args`, :func:`add_long_run_args`) and
:func:`docstring_parser`. Parsing only: no training, no files written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from qsgd_optax.tasks.arms import ARM_FORM, parse_arms, parse_seeds

T = TypeVar("T")

__all__ = [
    "add_distributed_args",
    "add_common_args",
    "add_long_run_args",
    "checked",
    "docstring_parser",
    "init_distributed",
    "int_arg",
    "names_arg",
]


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
  """An argparse ``type`` from a parser that raises ValueError (its message becomes argparse's).

  >>> checked(int)("3")
  3
  """
  def convert(text: str) -> T:
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  convert.__name__ = getattr(parse, "__name__", "value")
  return convert


_arms_arg = checked(parse_arms)
_seeds_arg = checked(parse_seeds)


def _positive_float_arg(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def int_arg(minimum: int) -> Callable[[str], int]:
  """An argparse ``type`` accepting integers ``>= minimum`` (argparse error otherwise).

  >>> int_arg(1)("3")
  3
  """
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = minimum - 1
    if value < minimum:
      noun = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
      raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}")
    return value
  parse.__name__ = "int"
  return parse


_positive_int_arg = int_arg(1)


def names_arg(accepted: Sequence[str], *, empty: str | None = None) -> Callable[[str], tuple[str, ...]]:
  """An argparse ``type`` accepting a comma list of names from ``accepted``.

  ``empty`` names a word that stands for the empty list (e.g. ``"none"``).

  >>> names_arg(("a", "b"))("b, a")
  ('b', 'a')
  >>> names_arg(("a", "b"), empty="none")("none")
  ()
  """
  def parse(text: str) -> tuple[str, ...]:
    if empty is not None and text.strip() == empty:
      return ()
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names or any(n not in accepted for n in names):
      alternative = f" or {empty!r}" if empty is not None else ""
      raise argparse.ArgumentTypeError(
          f"expected a comma list from {', '.join(accepted)}{alternative}, got {text!r}")
    return names
  parse.__name__ = "names"
  return parse


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
  """Adds ``--coordinator HOST:PORT``, ``--num-processes N``, ``--process-id I`` and ``--distributed``.

  The three name a ``jax.distributed`` cluster explicitly (all three or
  none); ``--distributed`` lets ``jax.distributed.initialize()`` detect it
  (SLURM, TPU pods, Open MPI, ...). :func:`init_distributed` acts on them.
  """
  group = parser.add_argument_group("several processes (jax.distributed)")
  group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="address of process 0's coordinator service; with --num-processes and "
                          "--process-id (all three or none)")
  group.add_argument("--num-processes", type=int_arg(1), default=None, metavar="N",
                     help="how many processes take part")
  group.add_argument("--process-id", type=int_arg(0), default=None, metavar="I",
                     help="this process's id, 0 .. N-1 (0 writes the summary, plots and tables)")
  group.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() with the cluster it detects "
                          "(SLURM, TPU pod, Open MPI)")


def init_distributed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
  """Joins the processes named by :func:`add_distributed_args`' flags; returns whether it did.

  Must run before anything touches a JAX backend. A partial set of the three
  flags, or a process id outside ``0 .. N-1``, exits with an argparse error
  naming them. On CPU the collectives across processes use gloo.
  """
  given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
           "--process-id": args.process_id}
  named = [k for k, v in given.items() if v is not None]
  if named and len(named) < 3:
    missing = [k for k in given if k not in named]
    parser.error(f"argument {named[0]}: {', '.join(named)} given without {', '.join(missing)}; "
                 "pass all three (or --distributed to detect the cluster)")
  if named and args.distributed:
    parser.error("argument --distributed: not allowed with --coordinator/--num-processes/--process-id")
  if named and not 0 <= args.process_id < args.num_processes:
    parser.error(f"argument --process-id: {args.process_id} is not in 0 .. {args.num_processes - 1}")
  if named and args.coordinator.rpartition(":")[2].isdigit() is False:
    parser.error(f"argument --coordinator: expected HOST:PORT, got {args.coordinator!r}")
  if not named and not args.distributed:
    return False
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if named:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  else:
    jax.distributed.initialize()
  return True


def docstring_parser(doc: str) -> argparse.ArgumentParser:
  """An ArgumentParser whose description is ``doc``'s first paragraph and epilog the rest."""
  return argparse.ArgumentParser(
      description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    optimizers: str = "adamw,qsgd:0.1,qsgd:0.5",
    seeds: str = "0,1,2",
    learning_rate: float = 1e-3,
    batch_size: int = 32,
) -> argparse.ArgumentParser:
  """Adds the options every task CLI shares and returns ``parser``.

  Adds ``--optimizers`` (parsed to ``tuple[Arm, ...]``), ``--seeds`` (parsed
  to ``tuple[int, ...]``), ``--lr``, ``--batch-size``, ``--out`` (a
  ``Path`` or ``None``), ``--smoke`` and ``--no-progress``. Bad values exit
  with status 2 and a message naming the value and the accepted form.
  Task-specific options (``--epochs``, ``--steps``, ...) are the caller's.
  """
  parser.add_argument(
      "--optimizers", type=_arms_arg, default=_arms_arg(optimizers), metavar="ARMS",
      help=f"comma list of optimizer arms, each {ARM_FORM} (default: {optimizers})")
  parser.add_argument(
      "--seeds", type=_seeds_arg, default=_seeds_arg(seeds), metavar="SEEDS",
      help=f"a seed count N (seeds 0..N-1) or a comma list like 0,1,2 (default: {seeds})")
  parser.add_argument(
      "--lr", type=_positive_float_arg, default=learning_rate,
      help=f"peak learning rate (default: {learning_rate:g})")
  parser.add_argument(
      "--batch-size", type=_positive_int_arg, default=batch_size,
      help=f"batch size (default: {batch_size})")
  parser.add_argument(
      "--out", type=Path, default=None, metavar="DIR",
      help="write DIR/summary.json and the PNG of the curves there")
  parser.add_argument(
      "--smoke", action="store_true",
      help="a tiny configuration that finishes in well under a minute on a 2-core CPU")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  return parser


def add_long_run_args(parser: argparse.ArgumentParser, *, skipped: str = "optimizer steps") -> None:
  """Adds the examples' ``--checkpoint-every``, ``--keep``, ``--resume``, ``--fail-on-divergence`` and ``--max-nonfinite``.

  ``skipped`` names what a non-finite gradient skips (steps or micro-batches).
  """
  parser.add_argument("--checkpoint-every", type=int_arg(1), default=None, metavar="N",
                      help="Orbax checkpoint every N optimizer steps and at the end of every epoch "
                           "or run, under DIR/checkpoints (default: no checkpoints unless --resume)")
  parser.add_argument("--keep", type=int_arg(1), default=3, metavar="N",
                      help="checkpoints kept per run (default: %(default)s)")
  parser.add_argument("--resume", action="store_true",
                      help="continue every run from its latest complete checkpoint under "
                           "DIR/checkpoints")
  parser.add_argument("--fail-on-divergence", action="store_true",
                      help="exit with status 3 when a run ends with a non-finite loss (it is always "
                           "marked in the table and warned about)")
  parser.add_argument("--max-nonfinite", type=int_arg(1), default=None, metavar="N",
                      help=f"skip {skipped} with a non-finite gradient (optax.apply_if_finite), "
                           "count them in summary.json (nonfinite_steps) and stop after N in a "
                           "row (default: off)")

"""Plumbing shared by the task CLIs in ``examples/`` and the benchmarks in ``bench/``.

Everything here is task-agnostic: it knows about optimizer *arms*, seeds,
result records, ``summary.json``, learning-curve plots and progress bars, and
nothing about models or data.

Arms
----
An *arm* is one optimizer configuration. On the command line it is written
``name[:quantum_weight[:modulate[:circuit[:scope]]]]``:

* ``adamw`` -- :func:`optax.adamw` (with ``weight_decay=0`` this is exactly
  Adam, the paper's baseline); takes no further fields.
* ``qsgd`` -- :func:`qsgd_optax.qsgd`; ``quantum_weight`` defaults to 0.5,
  ``modulate`` to ``gradient``, ``circuit`` to ``paper``, ``scope`` to
  ``leaf`` (the paper's form). Examples: ``qsgd:0.1``, ``qsgd:0.5:update``,
  ``qsgd:0.5:gradient:sine:all``.

A run record (one ``dict`` per (arm, seed)) always starts with the keys of
:meth:`Arm.record` plus ``seed``; the task adds its own metrics. Lists of
per-epoch (or per-step) values are plain lists of floats.

Public API (stable; keep it small):

* :class:`Arm`, :func:`parse_arm`, :func:`parse_arms`, :func:`parse_seeds`
* :func:`make_optimizer`
* :func:`add_common_args`
* :func:`run_arms`, :func:`group_runs`, :func:`mean_std`, :func:`format_table`
* :func:`write_summary`, :func:`plot_curves`, :func:`progress_bar`

Example:

  >>> arms = parse_arms("adamw,qsgd:0.1,qsgd:0.5:update")
  >>> [arm.label for arm in arms]
  ['adamw', 'qsgd:0.1', 'qsgd:0.5:update']
  >>> parse_seeds("3"), parse_seeds("4,7")
  ((0, 1, 2), (4, 7))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optax

__all__ = [
    "ARM_FORM",
    "Arm",
    "CIRCUITS",
    "MODULATES",
    "NonFiniteError",
    "OPTIMIZERS",
    "SCOPES",
    "add_common_args",
    "add_long_run_args",
    "format_table",
    "group_runs",
    "int_arg",
    "make_optimizer",
    "mean_std",
    "names_arg",
    "parse_arm",
    "parse_arms",
    "parse_seeds",
    "plot_curves",
    "progress_bar",
    "run_arms",
    "write_summary",
]


class NonFiniteError(RuntimeError):
  """Too many non-finite training steps in a row (the tasks' ``max_nonfinite``)."""


OPTIMIZERS: tuple[str, ...] = ("adamw", "qsgd")
MODULATES: tuple[str, ...] = ("gradient", "preconditioned", "update")
CIRCUITS: tuple[str, ...] = ("paper", "entangled", "sine")
SCOPES: tuple[str, ...] = ("leaf", "model", "all")

ARM_FORM = (
    "adamw or qsgd[:quantum_weight[:modulate[:circuit[:scope]]]] with modulate in "
    f"{{{','.join(MODULATES)}}}, circuit in {{{','.join(CIRCUITS)}}}, scope in "
    f"{{{','.join(SCOPES)}}} (e.g. qsgd:0.5, qsgd:0.5:update, qsgd:0.5:gradient:sine:all)"
)

_QSGD_DEFAULTS = {"quantum_weight": 0.5, "modulate": "gradient", "circuit": "paper", "scope": "leaf"}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer configuration of an experiment.

  Attributes:
    name: ``"adamw"`` or ``"qsgd"``.
    quantum_weight: the QSGD ``quantum_weight`` (``None`` for ``adamw``).
    modulate: the QSGD ``modulate`` mode (``None`` for ``adamw``).
    circuit: the QSGD ``circuit`` name (``None`` for ``adamw``).
    scope: the QSGD ``scope`` name (``None`` for ``adamw``).
  """

  name: str
  quantum_weight: float | None = None
  modulate: str | None = None
  circuit: str | None = None
  scope: str | None = None

  def __post_init__(self) -> None:
    if self.name not in OPTIMIZERS:
      raise ValueError(f"name must be one of {OPTIMIZERS}, got {self.name!r}")
    fields = {f: getattr(self, f) for f in _QSGD_DEFAULTS}
    if self.name == "adamw":
      given = [f for f, v in fields.items() if v is not None]
      if given:
        raise ValueError(f"adamw takes no {', '.join(given)}")
      return
    for f, default in _QSGD_DEFAULTS.items():
      if fields[f] is None:
        object.__setattr__(self, f, default)
    qw = float(self.quantum_weight)  # type: ignore[arg-type]
    if not math.isfinite(qw):
      raise ValueError(f"quantum_weight must be finite, got {self.quantum_weight!r}")
    object.__setattr__(self, "quantum_weight", qw)
    for f, accepted in (("modulate", MODULATES), ("circuit", CIRCUITS), ("scope", SCOPES)):
      if getattr(self, f) not in accepted:
        raise ValueError(f"{f} must be one of {accepted}, got {getattr(self, f)!r}")

  @property
  def label(self) -> str:
    """Canonical short spelling: trailing default fields are dropped.

    ``parse_arm(arm.label) == arm`` holds for every arm.
    """
    if self.name == "adamw":
      return "adamw"
    parts = [self.name, f"{self.quantum_weight:g}", self.modulate, self.circuit, self.scope]
    defaults = [None, None, *(_QSGD_DEFAULTS[f] for f in ("modulate", "circuit", "scope"))]
    while len(parts) > 2 and parts[-1] == defaults[len(parts) - 1]:
      parts.pop()
    return ":".join(str(p) for p in parts)

  def record(self) -> dict[str, Any]:
    """The keys every run record starts with (JSON-ready)."""
    return {
        "arm": self.label,
        "optimizer": self.name,
        "quantum_weight": self.quantum_weight,
        "modulate": self.modulate,
        "circuit": self.circuit,
        "scope": self.scope,
    }


def parse_arm(text: str) -> Arm:
  """Parses one arm, ``name[:quantum_weight[:modulate[:circuit[:scope]]]]``.

  Raises:
    ValueError: naming the bad arm and the accepted form.
  """
  parts = [p.strip() for p in text.strip().split(":")]
  try:
    if parts[0] == "adamw" and len(parts) == 1:
      return Arm("adamw")
    if parts[0] != "qsgd" or len(parts) > 5 or "" in parts:
      raise ValueError("unknown name or wrong number of fields")
    qw = float(parts[1]) if len(parts) > 1 else None
    rest = dict(zip(("modulate", "circuit", "scope"), parts[2:]))
    return Arm("qsgd", quantum_weight=qw, **rest)
  except ValueError as e:
    raise ValueError(f"bad optimizer arm {text!r} ({e}); expected {ARM_FORM}") from None


def parse_arms(text: str) -> tuple[Arm, ...]:
  """Parses a comma list of arms; duplicates (same canonical label) are an error."""
  arms = tuple(parse_arm(t) for t in text.split(",") if t.strip())
  if not arms:
    raise ValueError(f"no optimizer arm given in {text!r}; expected a comma list of {ARM_FORM}")
  labels = [a.label for a in arms]
  dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
  if dupes:
    raise ValueError(f"duplicate optimizer arm(s) {dupes} in {text!r}")
  return arms


def parse_seeds(text: str) -> tuple[int, ...]:
  """Parses seeds: a bare count ``N`` means ``0..N-1``; a comma list lists them.

  A single explicit seed is written with a comma, e.g. ``"5,"``.

  Raises:
    ValueError: for non-integers, negatives, duplicates, or a zero count.
  """
  text = text.strip()
  try:
    if "," not in text:
      count = int(text)
      if count < 1:
        raise ValueError("a seed count must be >= 1")
      return tuple(range(count))
    seeds = tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError as e:
    raise ValueError(f"bad seeds {text!r} ({e}); expected a count like 3 or a list like 0,1,2") from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f"bad seeds {text!r}: expected distinct non-negative integers like 0,1,2")
  return seeds


def make_optimizer(
    arm: Arm,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    n_qubits: int = 4,
) -> optax.GradientTransformation:
  """Builds the optax transformation of an arm.

  ``qsgd`` arms need ``params`` in ``update`` (``nnx.Optimizer`` passes them).
  """
  if arm.name == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  import qsgd_optax  # pylint: disable=import-outside-toplevel

  return qsgd_optax.qsgd(
      learning_rate,
      quantum_weight=arm.quantum_weight,
      n_qubits=n_qubits,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      circuit=arm.circuit,
      scope=arm.scope,
      modulate=arm.modulate,
  )


def _arms_arg(text: str) -> tuple[Arm, ...]:
  try:
    return parse_arms(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _seeds_arg(text: str) -> tuple[int, ...]:
  try:
    return parse_seeds(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


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
  """Adds the examples' ``--checkpoint-every``, ``--keep``, ``--resume`` and ``--max-nonfinite``.

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
  parser.add_argument("--max-nonfinite", type=int_arg(1), default=None, metavar="N",
                      help=f"skip {skipped} with a non-finite gradient (optax.apply_if_finite), "
                           "count them in summary.json (nonfinite_steps) and stop after N in a "
                           "row (default: off)")


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
) -> list[dict[str, Any]]:
  """Runs ``run_one(arm, seed)`` for every arm and seed, arm-major.

  Returns one record per run: ``arm.record()``, then ``"seed"``, then the
  mapping ``run_one`` returned (its keys win on clashes). A progress bar
  counts finished runs and shows the current arm and seed.
  """
  records: list[dict[str, Any]] = []
  with progress_bar(total=len(arms) * len(seeds), desc=desc, disable=not progress) as bar:
    for arm in arms:
      for seed in seeds:
        bar.set_postfix_str(f"{arm.label} seed={seed}")
        record: dict[str, Any] = {**arm.record(), "seed": int(seed)}
        record.update(run_one(arm, seed))
        records.append(record)
        bar.update(1)
  return records


def group_runs(runs: Iterable[Mapping[str, Any]], key: str = "arm") -> dict[str, list[Mapping[str, Any]]]:
  """Groups run records by ``run[key]``, keeping first-appearance order."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(str(run[key]), []).append(run)
  return groups


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
  """Mean, sample std (0 for one value) and count of the non-``None`` finite values.

  Returns ``(nan, nan, 0)`` when no value is usable.
  """
  xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
  if xs.size == 0:
    return float("nan"), float("nan"), 0
  std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
  return float(xs.mean()), std, int(xs.size)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with left-aligned columns.

  >>> print(format_table(["arm", "acc"], [["adamw", "0.91"], ["qsgd:0.5", "0.94"]]))
  arm       acc
  --------  ----
  adamw     0.91
  qsgd:0.5  0.94
  """
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  if any(len(r) != len(headers) for r in cells):
    raise ValueError("rows must have as many cells as headers")
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
  """Converts numpy/Path/dataclass values to JSON; non-finite floats become ``None``."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return _jsonable(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, (str, type(None))):
    return obj
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, "label"):  # an Arm inside a config
    return obj.label
  if hasattr(obj, "shape") and hasattr(obj, "tolist"):  # a jax.Array
    return _jsonable(np.asarray(obj))
  raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_summary(out_dir: str | os.PathLike[str], runs: Sequence[Mapping[str, Any]], config: Any) -> Path:
  """Writes ``out_dir/summary.json`` = ``{"runs": [...], "config": {...}}`` and returns its path.

  ``config`` may be a mapping or a dataclass. NumPy and JAX scalars/arrays
  become JSON numbers/lists; NaN and infinities become ``null`` (so the file
  is strict JSON); arms become their labels.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "summary.json"
  payload = {"runs": _jsonable(list(runs)), "config": _jsonable(config)}
  path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
  return path


def plot_curves(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, str]],
    *,
    xlabel: str = "epoch",
    x_key: str | None = None,
    band: str = "minmax",
    group_key: str = "arm",
    title: str | None = None,
) -> Path:
  """Plots per-run curves as one line per group (mean over seeds) with a band.

  Args:
    runs: run records; ``run[key]`` is a list of floats for every panel key.
    path: the PNG to write (parent directories are created).
    panels: ``(key, y-axis label)`` per subplot, side by side.
    xlabel: x-axis label.
    x_key: record key holding the x values (a list as long as the curves);
      default ``1, 2, ...``.
    band: ``"minmax"`` (range over seeds), ``"std"`` (mean +- one std) or
      ``"none"``.
    group_key: record key that names a line (default ``"arm"``).
    title: figure title.

  Curves of different lengths in a group are cut to the shortest; ``None``
  values (non-finite in JSON) are drawn as gaps.
  """
  if band not in ("minmax", "std", "none"):
    raise ValueError(f"band must be 'minmax', 'std' or 'none', got {band!r}")
  if not panels:
    raise ValueError("panels must name at least one (key, label)")
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (key, ylabel) in zip(axes, panels):
    for label, group in group_runs(runs, group_key).items():
      curves = [np.asarray([np.nan if v is None else v for v in r[key]], dtype=np.float64) for r in group]
      n = min(len(c) for c in curves)
      if n == 0:
        continue
      ys = np.stack([c[:n] for c in curves])
      xs = np.asarray(group[0][x_key][:n], dtype=np.float64) if x_key else np.arange(1, n + 1)
      with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(All-NaN slice|Mean of empty slice|Degrees of freedom)")
        mean = np.nanmean(ys, axis=0)
        if band == "minmax":
          lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
        else:
          std = np.nanstd(ys, axis=0)
          lo, hi = mean - std, mean + std
      (line,) = ax.plot(xs, mean, label=f"{label} (n={len(group)})", marker="o" if n <= 30 else None, ms=3)
      if band != "none" and len(group) > 1:
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  return out


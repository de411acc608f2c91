"""Optimizer arms: one optimizer configuration of an experiment, parsed and built.

An *arm* is written ``name[:quantum_weight[:modulate[:circuit[:scope]]]]``:

* ``adamw`` -- :func:`optax.adamw` (with ``weight_decay=0`` this is exactly
  Adam, the paper's baseline); takes no further fields.
* ``qsgd`` -- :func:`qsgd_optax.qsgd`; ``quantum_weight`` defaults to 0.5,
  ``modulate`` to ``gradient``, ``circuit`` to ``paper``, ``scope`` to
  ``leaf`` (the paper's form). Examples: ``qsgd:0.1``, ``qsgd:0.5:update``,
  ``qsgd:0.5:gradient:sine:all``.

Holds the :class:`Arm` record, its parsers and :func:`make_optimizer`; knows
nothing about models, data, the command line or files.

Example:

  >>> arms = parse_arms("adamw,qsgd:0.1,qsgd:0.5:update")
  >>> [arm.label for arm in arms]
  ['adamw', 'qsgd:0.1', 'qsgd:0.5:update']
  >>> parse_seeds("3"), parse_seeds("4,7")
  ((0, 1, 2), (4, 7))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optax

__all__ = [
    "ARM_FORM",
    "CIRCUITS",
    "MODULATES",
    "OPTIMIZERS",
    "SCOPES",
    "Arm",
    "make_optimizer",
    "parse_arm",
    "parse_arms",
    "parse_seeds",
]


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

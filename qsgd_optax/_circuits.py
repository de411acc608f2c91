"""Built-in modulation circuits and name -> circuit resolution.

A *circuit* here is a function ``f(theta: float[B, n]) -> float[B, n]`` that
maps a batch of ``B`` registers of ``n`` coordinates to their modulation
``M``. QSGD multiplies the quantum term by ``M`` on the selected coordinates.

Three circuits are built in:

``"paper"``
  A PennyLane QNode on ``default.qubit`` (``interface="jax"``,
  ``diff_method="backprop"``), so it is traced into the surrounding XLA
  program. On each qubit ``i``: Hadamard, ``RY(pi * theta_i)``,
  ``RZ(pi * theta_i)``; then a CNOT ladder ``CNOT(i, i + 1)``. For one qubit,
  ``H`` then ``RY(a)`` gives ``<Z> = -sin(a)``; the ladder maps ``Z_i`` (before)
  to ``Z_{i-1} Z_i`` (after), and ``RZ`` commutes with every Z-basis readout.
  The readout is therefore ``M_0 = -<Z_0>`` and ``M_i = -<Z_{i-1} Z_i>``, which
  equals ``sin(pi * theta_i)`` to float precision: the paper's eq. 2.

``"entangled"``
  The same gates with the local readout ``M_i = -<Z_i>`` after the ladder.
  Qubit ``i`` then carries the parity of qubits ``0..i``, so
  ``M_i = (-1)**i * prod_{k <= i} sin(pi * theta_k)``: the coordinates of one
  register interfere. This is an extension, not in the paper.

``"sine"``
  The closed form ``sin(pi * theta)`` (:func:`sinpi`), no PennyLane. It must agree with
  ``"paper"`` to float tolerance (the test suite proves it) and is the oracle
  the QNode is tested against. It is elementwise, so scope ``"all"`` needs no
  registers at all.

Any callable with the signature above is accepted too (for example a user's
own QNode); its output shape is checked once, at construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CIRCUIT_NAMES = ("paper", "entangled", "sine")

# Largest register simulated as a statevector by the built-in QNodes. Each
# register holds 2**n complex64 amplitudes; scope "all" evaluates one register
# per n coordinates, so the simulation costs 2**n / n amplitudes per parameter.
MAX_QNODE_QUBITS = 12

Circuit = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Modulator:
  """A resolved circuit: what computes ``M`` for a batch of registers.

  Attributes:
    fn: ``float32[B, n_qubits] -> float32[B, n_qubits]``.
    n_qubits: the register size.
    name: ``"paper"``, ``"entangled"``, ``"sine"`` or ``"callable"``.
    elementwise: True when ``M_i`` depends on ``theta_i`` alone and ``fn`` may
      be applied directly to arrays of any shape (the closed form), so scope
      ``"all"`` needs no register reshaping.
  """

  fn: Callable[[jax.Array], jax.Array]
  n_qubits: int
  name: str
  elementwise: bool = False

  def __call__(self, theta: jax.Array) -> jax.Array:
    """Evaluates the modulation on ``theta: float[..., n_qubits]``."""
    theta = jnp.asarray(theta)
    if theta.shape[-1] != self.n_qubits:
      raise ValueError(
          f"theta must have a last axis of size n_qubits={self.n_qubits}, "
          f"got shape {theta.shape}."
      )
    dtype = jnp.promote_types(theta.dtype, jnp.float32)
    theta = theta.astype(dtype)
    if self.elementwise:
      return self.fn(theta).astype(dtype)
    flat = theta.reshape((-1, self.n_qubits))
    if flat.shape[0] == 0:
      return jnp.zeros(theta.shape, dtype)
    out = self.fn(flat)
    return out.reshape(theta.shape).astype(dtype)


# Odd Taylor coefficients of sin(t) up to t**13: on |t| <= pi/2 the
# truncation error is below 6e-8, under float32's resolution.
_SIN_COEFFS = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(7))


def sinpi(theta: jax.Array) -> jax.Array:
  """``sin(pi * theta)`` with exact argument reduction.

  ``theta`` is reduced to ``[-1/2, 1/2]`` in its own units (no rounding of
  ``pi * theta``), then a degree-13 odd polynomial is evaluated. Against a
  float64 ``numpy.sin(numpy.pi * theta)`` it is within 1.4e-7 in float32
  (``jnp.sin(jnp.pi * theta)``: 2.9e-6), and it is a few multiply-adds, so
  XLA:CPU vectorises it inside the optimizer's fused loop (3.6x faster than
  ``jnp.sin`` on 8M entries).
  """
  y = theta - 2 * jnp.round(0.5 * theta)  # [-1, 1], same sine
  a = jnp.abs(y)
  z = jnp.copysign(jnp.where(a > 0.5, 1 - a, a), y)  # sin(pi(1-a)) = sin(pi a)
  t = jnp.pi * z
  t2 = t * t
  poly = jnp.asarray(_SIN_COEFFS[-1], t.dtype)
  for c in reversed(_SIN_COEFFS[:-1]):
    poly = poly * t2 + c
  return t * poly


def _sine(theta: jax.Array) -> jax.Array:
  return sinpi(theta)


# PennyLane 0.45 supports jax 0.7; on the pinned jax 0.10 its JAX interface
# works but warns. Both warnings below are expected and harmless, and are
# ignored only around our own QNode calls:
#  * jax deprecations touched inside PennyLane's jax interface;
#  * the statevector is requested as complex128 and JAX (x64 off) keeps it
#    complex64, which is the precision we want on accelerators.
_EXPECTED_QNODE_WARNINGS = (
    (DeprecationWarning, r"jax\.core\..* is deprecated"),
    (UserWarning, r"Explicitly requested dtype complex128"),
)


def _quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with warnings.catch_warnings():
      for category, message in _EXPECTED_QNODE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
      return fn(*args, **kwargs)

  return wrapped


def make_qnode(n_qubits: int, readout: str = "paper"):
  """Builds the paper's circuit as a PennyLane QNode on ``n_qubits`` wires.

  Args:
    n_qubits: number of wires (register size).
    readout: ``"paper"`` (``-<Z_{i-1} Z_i>``, equal to ``sin(pi*theta_i)``)
      or ``"entangled"`` (``-<Z_i>`` after the CNOT ladder).

  Returns:
    A QNode ``qnode(theta)`` with ``theta: float[B, n_qubits]`` (PennyLane
    parameter broadcasting over ``B``) returning a tuple of ``n_qubits``
    expectation values of shape ``[B]``. The minus sign of the readout is
    applied by :func:`resolve_circuit`, not here.
  """
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  if readout not in ("paper", "entangled"):
    raise ValueError(f"readout must be 'paper' or 'entangled', got {readout!r}.")
  device = qml.device("default.qubit", wires=n_qubits)

  @qml.qnode(device, interface="jax", diff_method="backprop")
  def qnode(theta):
    for i in range(n_qubits):
      angle = jnp.pi * theta[..., i]
      qml.Hadamard(wires=i)
      qml.RY(angle, wires=i)
      qml.RZ(angle, wires=i)
    for i in range(n_qubits - 1):
      qml.CNOT(wires=[i, i + 1])
    if readout == "paper":
      observables = [qml.PauliZ(0)] + [
          qml.PauliZ(i - 1) @ qml.PauliZ(i) for i in range(1, n_qubits)
      ]
    else:
      observables = [qml.PauliZ(i) for i in range(n_qubits)]
    return tuple(qml.expval(o) for o in observables)

  return qnode


def _qnode_modulation(n_qubits: int, readout: str) -> Circuit:
  qnode = _quietly(make_qnode(n_qubits, readout))

  # jit caches the traced QNode per batch shape: leaves of equal shape (every
  # layer of a transformer) trace the circuit once. Inside an outer jit the
  # call is inlined into the same XLA program.
  @jax.jit
  def fn(theta: jax.Array) -> jax.Array:
    expvals = qnode(theta.astype(jnp.float32))
    out = -jnp.stack([jnp.reshape(e, theta.shape[:1]) for e in expvals], -1)
    return out.astype(theta.dtype)

  return fn


def _check_callable(fn: Callable[..., Any], n_qubits: int) -> None:
  probe = jax.ShapeDtypeStruct((3, n_qubits), jnp.float32)
  try:
    out = jax.eval_shape(fn, probe)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "circuit: a callable circuit must map float[B, n_qubits] to "
        f"float[B, n_qubits]; calling it on float32[3, {n_qubits}] raised "
        f"{type(e).__name__}: {e}"
    ) from e
  shape = getattr(out, "shape", None)
  dtype = getattr(out, "dtype", None)
  if shape != (3, n_qubits) or dtype is None or not jnp.issubdtype(
      dtype, jnp.floating
  ):
    raise ValueError(
        "circuit: a callable circuit must map float[B, n_qubits] to "
        f"float[B, n_qubits]; on float32[3, {n_qubits}] it returned "
        f"{out!r}, expected a float array of shape (3, {n_qubits})."
    )


def resolve_circuit(circuit: str | Circuit, n_qubits: int) -> Modulator:
  """Turns the ``circuit`` argument into a :class:`Modulator`.

  Args:
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable mapping
      ``float[B, n_qubits]`` to ``float[B, n_qubits]``.
    n_qubits: the register size, already validated.

  Returns:
    The modulator. QNodes are built here, once.

  Raises:
    ValueError: unknown name, ``n_qubits`` above :data:`MAX_QNODE_QUBITS` for
      a built-in QNode, or a callable whose output shape is wrong.
  """
  if isinstance(circuit, str):
    if circuit == "sine":
      return Modulator(_sine, n_qubits, "sine", elementwise=True)
    if circuit in ("paper", "entangled"):
      if n_qubits > MAX_QNODE_QUBITS:
        raise ValueError(
            f"n_qubits must be at most {MAX_QNODE_QUBITS} for the "
            f"{circuit!r} circuit (a statevector of 2**n_qubits amplitudes "
            f"per register), got {n_qubits}. Use circuit='sine' for larger "
            "registers."
        )
      return Modulator(_qnode_modulation(n_qubits, circuit), n_qubits, circuit)
    raise ValueError(
        f"circuit must be one of {CIRCUIT_NAMES} or a callable "
        f"float[B, n_qubits] -> float[B, n_qubits], got {circuit!r}."
    )
  if callable(circuit):
    _check_callable(circuit, n_qubits)
    return Modulator(circuit, n_qubits, "callable")
  raise ValueError(
      f"circuit must be one of {CIRCUIT_NAMES} or a callable "
      f"float[B, n_qubits] -> float[B, n_qubits], got {circuit!r}."
  )


def sine_reference(theta: np.ndarray, readout: str = "paper") -> np.ndarray:
  """NumPy closed form of the built-in circuits, for tests and docs.

  Args:
    theta: ``float[..., n]``.
    readout: ``"paper"`` (``sin(pi*theta)``) or ``"entangled"`` (signed
      running products of the sines along the last axis).

  Returns:
    ``float64[..., n]``.
  """
  s = np.sin(np.pi * np.asarray(theta, np.float64))
  if readout == "paper":
    return s
  n = s.shape[-1]
  signs = (-1.0) ** np.arange(n)
  return signs * np.cumprod(s, axis=-1)

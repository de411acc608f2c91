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
  The closed form ``sin(pi * theta)`` (:func:`sinpi`), no PennyLane. It must
  agree with ``"paper"`` to float tolerance (the test suite proves it) and is
  the oracle the QNode is tested against. It is elementwise, so scope
  ``"all"`` needs no registers at all.

Any callable with the signature above is accepted too (for example a user's
own QNode); its output shape is checked once per callable and register size.
The paper's circuit on another PennyLane device (``lightning.qubit``,
``qiskit.aer``, finite shots) is built by ``_devices.make_device_qnode`` from
the same gate sequence (:func:`paper_gates`).

Both gates take the angle ``pi * y`` with ``y = theta - 2 * round(theta / 2)``
in ``[-1, 1]``: the rotations are ``4 pi``-periodic up to a global phase, so
every readout is 2-periodic in ``theta``, and the reduction is exact in
floating point. The angle is then accurate at any ``|theta|``.

The QNodes run in the parameters' precision (float32, or float64 when
``jax_enable_x64`` is on and the parameters are float64). Built-in QNodes
are built once per ``(readout, n_qubits)`` and reused, so factories that are
called again and again (``optax.inject_hyperparams`` calls its factory on
every update) neither rebuild nor retrace the circuit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CIRCUIT_NAMES = ("paper", "entangled", "sine")
READOUT_NAMES = ("paper", "entangled")

# Largest register simulated as a statevector by the built-in QNodes. Each
# register holds 2**n complex amplitudes; scope "all" evaluates one register
# per n coordinates, so the simulation costs 2**n / n amplitudes per parameter.
MAX_QNODE_QUBITS = 12

# Registers are simulated in chunks of at most this many amplitudes (8 MiB
# of complex64, 16 MiB of complex128 per statevector), so scope "all" on a
# large leaf needs temporaries of a few chunks, not of the whole leaf.
MAX_CHUNK_AMPLITUDES = 2**20

Circuit = Callable[[jax.Array], jax.Array]


def check_n_qubits(n_qubits: Any) -> int:
  """Returns ``n_qubits`` as an int, or raises a ValueError naming it."""
  if isinstance(n_qubits, (bool, np.bool_)) or not isinstance(
      n_qubits, numbers.Integral
  ):
    raise ValueError(
        f"n_qubits must be a Python int >= 1, got {n_qubits!r} "
        f"({type(n_qubits).__name__})."
    )
  if n_qubits < 1:
    raise ValueError(f"n_qubits must be a Python int >= 1, got {n_qubits}.")
  return int(n_qubits)


def _real_dtype(theta: Any, name: str = "theta"):
  try:
    dtype = jnp.result_type(theta)
  except TypeError:
    dtype = None
  if dtype is None or not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(
        f"{name} must be a real (floating-point or integer) array, got "
        f"{theta!r:.80}" + ("" if dtype is None else f" of dtype {dtype}") + "."
    )
  return jnp.promote_types(dtype, jnp.float32)


def chunk_registers(n_qubits: int) -> int:
  """How many registers of ``n_qubits`` one circuit call evaluates at most."""
  return max(1, MAX_CHUNK_AMPLITUDES >> n_qubits)


def _chunking(batch: int, chunk: int) -> tuple[int, int]:
  """``(count, size)`` of chunks covering ``batch`` registers, size <= chunk.

  Prefers a count that divides ``batch`` (no padding copy), up to twice the
  fewest chunks; otherwise the fewest chunks of equal size, padded by fewer
  registers than there are chunks.
  """
  fewest = -(-batch // chunk)
  for count in range(fewest, 2 * fewest + 1):
    if batch % count == 0:
      return count, batch // count
  return fewest, -(-batch // fewest)  # pad fewer than `fewest` registers


@dataclasses.dataclass(frozen=True)
class Modulator:
  """A resolved circuit: what computes ``M`` for registers of any batch shape.

  Attributes:
    fn: the circuit, ``float[B, n_qubits] -> float[B, n_qubits]``.
    n_qubits: the register size.
    name: ``"paper"``, ``"entangled"``, ``"sine"`` or ``"callable"``.
    elementwise: True when ``M_i`` depends on ``theta_i`` alone and ``fn`` may
      be applied directly to arrays of any shape (the closed form), so scope
      ``"all"`` needs no register reshaping.
  """

  fn: Circuit
  n_qubits: int
  name: str
  elementwise: bool = False

  def __call__(self, theta: jax.Array) -> jax.Array:
    """Evaluates the modulation on ``theta: float[..., n_qubits]``.

    Returns an array of ``theta``'s shape in
    ``promote_types(theta.dtype, float32)``. Large batches are evaluated in
    chunks of :func:`chunk_registers` registers (one ``lax.map`` step each),
    which bounds the statevector temporaries.
    """
    dtype = _real_dtype(theta)
    theta = jnp.asarray(theta, dtype)
    if theta.ndim == 0 or theta.shape[-1] != self.n_qubits:
      raise ValueError(
          f"theta must have a last axis of size n_qubits={self.n_qubits}, "
          f"got shape {theta.shape}."
      )
    if self.elementwise:
      return self.fn(theta).astype(dtype)
    batch = math.prod(theta.shape[:-1])
    if batch == 0:
      return jnp.zeros(theta.shape, dtype)
    flat = theta.reshape((batch, self.n_qubits))
    chunk = chunk_registers(self.n_qubits)
    if batch <= chunk:
      out = self.fn(flat)
    else:
      count, chunk = _chunking(batch, chunk)
      padded = flat
      if count * chunk != batch:
        padded = jnp.pad(flat, ((0, count * chunk - batch), (0, 0)))
      out = jax.lax.map(self.fn, padded.reshape(count, chunk, self.n_qubits))
      out = out.reshape(count * chunk, self.n_qubits)[:batch]
    return out.reshape(theta.shape).astype(dtype)


# Odd Taylor coefficients of sin(t) up to t**13: on |t| <= pi/2 the
# truncation error is below 6e-8, under float32's resolution.
_SIN_COEFFS = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(7))


def reduce_period2(theta: jax.Array) -> jax.Array:
  """``theta - 2 * round(theta / 2)``: the same point of a 2-periodic function.

  The result lies in ``[-1, 1]`` and is exact in floating point (the
  subtraction of two nearby floats is exact), so ``pi`` times it is an
  accurate angle at any ``|theta|``.
  """
  return theta - 2 * jnp.round(0.5 * theta)


def sinpi(theta: jax.Array) -> jax.Array:
  """``sin(pi * theta)`` with exact argument reduction.

  ``theta`` (a real array; integers are promoted to float32) is reduced to
  ``[-1/2, 1/2]`` in its own units (no rounding of ``pi * theta``), then a
  degree-13 odd polynomial is evaluated: a few multiply-adds that XLA fuses
  into the optimizer's elementwise loop (float64 input: ``jnp.sin`` of the
  reduced angle). Accuracy against the float64 closed
  form is within float32 resolution (``tests/test_circuits.py``); numbers in
  ``bench/RESULTS.md``.

  Raises:
    ValueError: for complex or boolean ``theta``.
  """
  theta = jnp.asarray(theta, _real_dtype(theta))
  y = reduce_period2(theta)  # [-1, 1], same sine
  a = jnp.abs(y)
  z = jnp.copysign(jnp.where(a > 0.5, 1 - a, a), y)  # sin(pi(1-a)) = sin(pi a)
  t = jnp.pi * z
  if jnp.finfo(t.dtype).bits > 32:  # the polynomial is float32-accurate only
    return jnp.sin(t)
  t2 = t * t
  poly = jnp.asarray(_SIN_COEFFS[-1], t.dtype)
  for c in reversed(_SIN_COEFFS[:-1]):
    poly = poly * t2 + c
  return t * poly


def sinpi_circuit(theta: jax.Array) -> jax.Array:
  """The ``"sine"`` circuit: :func:`sinpi`, elementwise."""
  return sinpi(theta)


# PennyLane 0.45 is tested on jax 0.7; its JAX interface works on newer jax
# but warns. The warnings below are expected and harmless, and are ignored
# only around our own QNode calls, each from the jax version that emits it
# (tests/test_circuits.py checks that every active filter still matches):
#  * jax.core deprecations touched inside PennyLane's jax interface (jax
#    >= 0.10);
#  * the statevector is requested as complex128 and JAX (x64 off) keeps it
#    complex64, which is the precision we want on accelerators.
_JAX_VERSION = tuple(int(v) for v in jax.__version__.split(".")[:2])
EXPECTED_QNODE_WARNINGS = tuple(
    (category, message) for category, message, since in (
        (DeprecationWarning, r"jax\.core\..* is deprecated", (0, 10)),
        (UserWarning, r"Explicitly requested dtype .*complex128", (0, 0)),
    ) if _JAX_VERSION >= since
)


def _quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with warnings.catch_warnings():
      for category, message in EXPECTED_QNODE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
      return fn(*args, **kwargs)

  return wrapped


@dataclasses.dataclass(frozen=True, eq=False)
class QNodeCircuit:
  """The paper's circuit as a ``circuit=`` callable around a PennyLane QNode.

  Calling it maps ``theta: float[B, n_qubits]`` to the signed readouts
  ``float[B, n_qubits]`` (``sin(pi * theta)`` for the ``"paper"`` readout),
  in ``theta``'s precision (at least float32), jitted. On ``default.qubit``
  (:func:`make_qnode`, or :func:`make_device_qnode` without shots) it is
  traced into any enclosing XLA program; on any other device
  (:func:`make_device_qnode`) it is one host callback per call.

  Attributes:
    qnode: the underlying QNode (:func:`make_qnode`: ``default.qubit``,
      ``interface="jax"``, ``diff_method="backprop"``); it takes the reduced
      ``theta`` and returns the raw expectation values, one ``float[B]`` per
      wire, before the sign.
    n_qubits: the number of wires.
    readout: ``"paper"`` or ``"entangled"``.
    device: the PennyLane device the QNode runs on.
    shots: the shots the readouts are sampled with, or ``None`` (analytic).
  """

  qnode: Any
  n_qubits: int
  readout: str
  _fn: Callable[[jax.Array], jax.Array] = dataclasses.field(repr=False)
  device: Any = dataclasses.field(default=None, repr=False)
  shots: int | None = None

  def __call__(self, theta: jax.Array) -> jax.Array:
    dtype = _real_dtype(theta)
    theta = jnp.asarray(theta, dtype)
    if theta.ndim != 2 or theta.shape[-1] != self.n_qubits:
      raise ValueError(
          f"theta must have shape (batch, n_qubits={self.n_qubits}), got "
          f"shape {theta.shape}."
      )
    if theta.shape[0] == 0:
      return jnp.zeros(theta.shape, dtype)
    return self._fn(theta)


def _check_readout(readout: Any) -> str:
  if not isinstance(readout, str) or readout not in READOUT_NAMES:
    raise ValueError(f"readout must be one of {READOUT_NAMES}, got {readout!r}.")
  return readout


def _check_qnode_qubits(n_qubits: Any, what: str) -> int:
  n_qubits = check_n_qubits(n_qubits)
  if n_qubits > MAX_QNODE_QUBITS:
    raise ValueError(
        f"n_qubits must be at most {MAX_QNODE_QUBITS} for the {what} "
        f"(a statevector of 2**n_qubits amplitudes per register), got "
        f"{n_qubits}. Use circuit='sine' for larger registers."
    )
  return n_qubits


def make_qnode(n_qubits: int, readout: str = "paper") -> QNodeCircuit:
  """The paper's circuit as a PennyLane QNode, ready to pass as ``circuit=``.

  On each qubit ``i``: Hadamard, ``RY(pi y_i)``, ``RZ(pi y_i)`` with
  ``y = theta - 2 round(theta / 2)`` (the same rotations up to a global
  phase); then ``CNOT(i, i + 1)`` for every ``i``. The result is cached: the
  same ``(n_qubits, readout)`` returns the same object, so its jit cache
  (one trace per batch shape) is shared by every optimizer that uses it.

  Args:
    n_qubits: number of wires, a Python int in ``[1, MAX_QNODE_QUBITS]``.
    readout: ``"paper"`` (``M_0 = -<Z_0>``, ``M_i = -<Z_{i-1} Z_i>``, equal
      to ``sin(pi theta_i)``) or ``"entangled"`` (``M_i = -<Z_i>`` after the
      ladder: signed running products of the sines).

  Returns:
    A :class:`QNodeCircuit`: ``float[B, n_qubits] -> float[B, n_qubits]``,
    signs applied; ``.qnode`` is the PennyLane QNode itself.

  Raises:
    ValueError: ``n_qubits`` not an int in range, or an unknown readout.

  Examples:
    >>> import numpy as np
    >>> import qsgd_optax
    >>> circuit = qsgd_optax.circuits.make_qnode(2)
    >>> print(np.round(circuit(np.array([[0.5, 1 / 6]], np.float32)), 4))
    [[1.  0.5]]
    >>> tx = qsgd_optax.qsgd(1e-3, n_qubits=2, circuit=circuit)
  """
  return _qnode_circuit(_check_qnode_qubits(n_qubits, "paper circuit"),
                        _check_readout(readout))


def register_entry(y: jax.Array, i: int) -> jax.Array:
  """``y[..., i]``, written as a masked sum over the last axis (same values).

  A slice ``y[..., i]`` is an HLO slice to ``[..., 1]`` and a reshape that
  drops the 1; XLA's simplifier then moves that reshape down through every
  elementwise operation of the gate that uses the angle, one operation per
  round of its fixed-point loop, and each round walks the whole program
  (every parameter array's update included). The sum over the last axis of
  ``where(one_hot, y, 0)`` has no reshape to move. The same values: one
  entry plus zeros (``-0.0`` comes back as ``+0.0``, the same angle); a NaN
  elsewhere in the register does not leak in.
  """
  one_hot = jnp.arange(jnp.shape(y)[-1]) == i
  return jnp.sum(jnp.where(one_hot, y, 0), axis=-1)


def paper_gates(y: jax.Array, wires: Sequence[Any], readout: str) -> tuple[Any, ...]:
  """Queues the paper's gates on ``wires`` and returns the readout's expvals.

  On each wire ``i``: Hadamard, ``RY(pi y_i)``, ``RZ(pi y_i)``; then
  ``CNOT(i, i + 1)``. Returns ``qml.expval`` of ``Z_0`` and of ``Z_{i-1} Z_i``
  (``"paper"``) or of every ``Z_i`` (``"entangled"``): the raw values, before
  the sign. ``y: [..., n]`` holds the reduced angles (:func:`reduce_period2`):
  one register (``[n]``, under ``jax.vmap``) or a batch of them with
  PennyLane's parameter broadcasting. To be called inside a QNode's quantum
  function.

  The Hadamards of all wires are queued first (gates on different wires
  commute: the same circuit): the state they prepare does not depend on the
  angles, so a traced simulation starts from a constant state instead of
  applying each Hadamard to a batch of states.
  """
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  wires = list(wires)
  for wire in wires:
    qml.Hadamard(wires=wire)
  for i, wire in enumerate(wires):
    angle = jnp.pi * register_entry(y, i)
    qml.RY(angle, wires=wire)
    qml.RZ(angle, wires=wire)
  for a, b in zip(wires[:-1], wires[1:]):
    qml.CNOT(wires=[a, b])
  if readout == "paper":
    observables = [qml.PauliZ(wires[0])] + [
        qml.PauliZ(a) @ qml.PauliZ(b) for a, b in zip(wires[:-1], wires[1:])
    ]
  else:
    observables = [qml.PauliZ(w) for w in wires]
  return tuple(qml.expval(o) for o in observables)


def build_circuit(device: Any, n_qubits: int, readout: str, *, traced: bool,
                  shots: int | None = None) -> QNodeCircuit:
  """The paper's circuit on ``device`` as a :class:`QNodeCircuit` (no checks).

  ``traced``: an ``interface="jax"``, ``diff_method="backprop"`` QNode, traced
  into the caller's XLA program (``default.qubit``). Otherwise an
  ``interface="jax-jit"`` QNode without a gradient method: PennyLane runs the
  device from a host callback, and the angles enter it through
  ``lax.stop_gradient``, so no derivative is ever requested of the device.
  ``shots``: the QNode's shots (``None``: the device's own).
  """
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  wires = list(device.wires) if device.wires else list(range(n_qubits))
  kwargs = ({"interface": "jax", "diff_method": "backprop"} if traced
            else {"interface": "jax-jit", "diff_method": None})
  if shots is not None:
    kwargs["shots"] = shots

  def quantum_function(y):
    return paper_gates(y, wires, readout)

  qnode = qml.QNode(quantum_function, device, **kwargs)
  quiet = _quietly(qnode)

  # jit caches the traced QNode per batch shape and dtype: leaves of equal
  # shape trace the circuit once. Inside an outer jit the call is inlined.
  @jax.jit
  def fn(theta: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(theta.dtype, jnp.float32)
    y = reduce_period2(theta.astype(dtype))
    if not traced:
      y = jax.lax.stop_gradient(y)
      # One register runs unbroadcast: a broadcast of size 1 with finite
      # shots comes back from default.qubit with the batch axis dropped.
      if y.shape[0] == 1:
        y = y[0]
    # default.qubit's parameter broadcasting reshapes every batched angle to
    # [B, 1, ..., 1] before its trigonometry, a reshape XLA's simplifier then
    # moves down one operation per round of its fixed-point loop (each round
    # walking the whole program); vmap over single registers has none.
    expvals = jax.vmap(quiet)(y) if traced else quiet(y)
    out = -jnp.stack([jnp.reshape(e, theta.shape[:1]) for e in expvals], -1)
    return out.astype(dtype)

  return QNodeCircuit(qnode, n_qubits, readout, fn, device=device, shots=shots)


@functools.lru_cache(maxsize=None)
def _qnode_circuit(n_qubits: int, readout: str) -> QNodeCircuit:
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  device = qml.device("default.qubit", wires=n_qubits)
  circuit = build_circuit(device, n_qubits, readout, traced=True)
  BUILT_IN.add(circuit)
  return circuit


# The circuits make_qnode built (their behaviour is fixed by readout and
# n_qubits, so traces of them may be cached), as opposed to user callables.
BUILT_IN: "weakref.WeakSet[QNodeCircuit]" = weakref.WeakSet()


# Callables already checked, per register size: a factory re-called with the
# same callable (inject_hyperparams) does not trace it again.
_CHECKED_CALLABLES: "weakref.WeakKeyDictionary[Any, set[int]]" = (
    weakref.WeakKeyDictionary()
)


def _check_callable(fn: Callable[..., Any], n_qubits: int) -> None:
  try:
    if n_qubits in _CHECKED_CALLABLES.get(fn, ()):
      return
  except TypeError:  # not weak-referenceable or not hashable: check each time
    pass
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
  try:
    _CHECKED_CALLABLES.setdefault(fn, set()).add(n_qubits)
  except TypeError:
    pass


def _unknown(circuit: Any) -> ValueError:
  return ValueError(
      f"circuit must be one of {CIRCUIT_NAMES} or a callable "
      f"float[B, n_qubits] -> float[B, n_qubits], got {circuit!r}."
  )


def resolve_circuit(circuit: str | Circuit, n_qubits: int) -> Modulator:
  """Turns a ``circuit=`` argument into a :class:`Modulator`.

  Args:
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable mapping
      ``float[B, n_qubits]`` to ``float[B, n_qubits]`` (for example the
      result of :func:`make_qnode`).
    n_qubits: the register size, a Python int >= 1.

  Returns:
    The modulator, callable on ``float[..., n_qubits]``. Built-in QNodes are
    built once per ``(circuit, n_qubits)`` and shared.

  Raises:
    ValueError: unknown name, ``n_qubits`` not an int >= 1 or above
      :data:`MAX_QNODE_QUBITS` for a built-in QNode, or a callable whose
      output shape is wrong.

  Examples:
    >>> import numpy as np
    >>> import qsgd_optax
    >>> m = qsgd_optax.circuits.resolve_circuit("sine", 2)
    >>> print(np.round(np.asarray(m(np.array([[0.5, -0.5]], np.float32))), 6))
    [[ 1. -1.]]
  """
  n_qubits = check_n_qubits(n_qubits)
  if isinstance(circuit, str):
    if circuit == "sine":
      return Modulator(sinpi_circuit, n_qubits, "sine", elementwise=True)
    if circuit in READOUT_NAMES:
      _check_qnode_qubits(n_qubits, f"{circuit!r} circuit")
      return Modulator(_qnode_circuit(n_qubits, circuit), n_qubits, circuit)
    raise _unknown(circuit)
  if isinstance(circuit, QNodeCircuit):
    if circuit.n_qubits != n_qubits:
      raise ValueError(
          f"circuit: this QNode circuit has {circuit.n_qubits} wires but "
          f"n_qubits={n_qubits}; build it with make_qnode({n_qubits}) or "
          f"make_device_qnode(device, {n_qubits})."
      )
    return Modulator(circuit, n_qubits, circuit.readout)
  if callable(circuit):
    _check_callable(circuit, n_qubits)
    return Modulator(circuit, n_qubits, "callable")
  raise _unknown(circuit)


"""The paper's circuit on any PennyLane device, with or without shot noise.

:func:`make_device_qnode` builds the same gates and readouts as
:func:`qsgd_optax.circuits.make_qnode` on a device the caller chose. Two
paths, decided once at construction:

* traced: an analytic device that PennyLane can differentiate by backprop
  under JAX (``default.qubit``, ``default.mixed``) gets an
  ``interface="jax"``, ``diff_method="backprop"`` QNode, traced into the
  caller's XLA program exactly like ``circuit="paper"``: no callback.
* host: every other device (``lightning.qubit``, ``qiskit.aer``, hardware
  plugins) and every device with finite shots gets an ``interface="jax-jit"``
  QNode with ``diff_method=None``. PennyLane wraps the device execution in a
  ``jax.pure_callback``: the compiled step stops, hands the angles to Python,
  the device runs, and the results come back. That is a host round trip per
  circuit call, i.e. per optimizer step for scopes ``"leaf"`` and ``"model"``.
  The angles enter the QNode through ``lax.stop_gradient``: QSGD's term is
  never differentiated, and no derivative is ever requested of the device.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import numpy as np

from qsgd_optax import _circuits


def _is_device(device: Any) -> bool:
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  return isinstance(device, (qml.devices.Device, qml.devices.LegacyDevice))


def _check_shots(shots: Any) -> int | None:
  if shots is None:
    return None
  if isinstance(shots, (bool, np.bool_)) or not isinstance(shots, numbers.Integral) or shots < 1:
    raise ValueError(
        f"shots must be None (the device's own setting, analytic unless the "
        f"device was created with shots) or a Python int >= 1, got {shots!r}."
    )
  return int(shots)


def _device_shots(device: Any) -> int | None:
  """The total shots a device was created with, ``None`` when analytic."""
  shots = getattr(device, "shots", None)
  total = getattr(shots, "total_shots", shots)
  return None if total is None else int(total)


def _supports_jax_backprop(device: Any) -> bool:
  from pennylane.devices import ExecutionConfig  # pylint: disable=g-import-not-at-top

  try:
    return bool(device.supports_derivatives(
        ExecutionConfig(gradient_method="backprop", interface="jax")))
  except Exception:  # pylint: disable=broad-except
    return False


def _lacks_expval(device: Any) -> bool:
  """True when the device declares its measurements and expval is not one."""
  capabilities = getattr(device, "capabilities", None)
  processes = getattr(capabilities, "measurement_processes", None)
  return isinstance(processes, dict) and "ExpectationMP" not in processes


# What the circuit needs of an old-API device (whose facade does not check it
# when the circuit is traced): these gates, and PauliZ.
_GATES = ("Hadamard", "RY", "RZ", "CNOT")


def _legacy_gaps(target: Any) -> list[str]:
  """The gates and observables an old-API device lacks for the circuit."""
  operations = getattr(target, "operations", None)
  observables = getattr(target, "observables", None)
  gaps = []
  if isinstance(operations, (set, frozenset)):
    gaps += [g for g in _GATES if g not in operations]
  if isinstance(observables, (set, frozenset)) and "PauliZ" not in observables:
    gaps.append("PauliZ")
  return gaps


def _accepted(n_qubits: int) -> str:
  return (f"a PennyLane device with n_qubits={n_qubits} wires (or none) that "
          f"measures expectation values, e.g. qml.device('lightning.qubit', "
          f"wires={n_qubits})")


def make_device_qnode(device: Any, n_qubits: int, readout: str = "paper", *,
                      shots: int | None = None) -> _circuits.QNodeCircuit:
  """The paper's circuit on a PennyLane device of your choice, as ``circuit=``.

  The gates and readouts of :func:`make_qnode` (same signs: the ``"paper"``
  readout equals ``sin(pi * theta)``, ``"entangled"`` the signed running
  products of the sines), run on ``device``:

  * ``default.qubit`` (and any analytic device PennyLane differentiates by
    backprop under JAX) stays traced into your XLA program, as
    ``circuit="paper"`` does: no callback, no host round trip.
  * Any other device, and any device with finite shots, runs through
    PennyLane's JAX-jit path (``interface="jax-jit"``, ``diff_method=None``):
    PennyLane wraps the execution in a ``jax.pure_callback``, so it works
    under ``jax.jit``, ``optax.chain`` and ``flax.nnx.Optimizer`` steps, but
    every call leaves the compiled program and costs a host round trip (with
    scopes ``"leaf"`` and ``"model"``: one per optimizer step). The angles
    pass through ``lax.stop_gradient``: no derivative is asked of the device
    (QSGD never differentiates its term; a gradient through this circuit is
    zero).

  Batches: on a traced device the ``B`` registers of one call are
  ``jax.vmap`` of the QNode over single registers (as for
  ``circuit="paper"``). On any other device they are one broadcast QNode
  execution (PennyLane parameter broadcasting); devices without native
  broadcasting (``lightning.qubit``, ``qiskit.aer``) get it split by
  PennyLane into ``B`` circuits, executed in one device batch inside the
  same callback.

  Shots: with ``shots`` (or a device created with shots) the modulation is
  the sampled estimate of each expectation value: noisy, within
  ``[-1, 1]``, with a standard error of at most ``1 / sqrt(shots)``. The
  noise comes from the device, so the seed is the device's (measured on
  PennyLane 0.45, pennylane-qiskit 0.45):

  * ``lightning.qubit`` and ``default.qubit`` with ``seed=s`` (an int): one
    generator, seeded when the device is created and advanced at every
    execution: fresh noise at every step, the same sequence on a rerun from
    a freshly created device.
  * ``qiskit.aer`` (its default ``aer_simulator`` backend) with
    ``seed_simulator=s``: every execution is seeded with ``s``, so equal
    angles give the same estimate at every step; without it, fresh and
    unseeded noise. ``qiskit.aer`` with ``method="statevector"`` samples the
    exact state with NumPy's global generator (``np.random.seed``), fresh at
    every step.
  * ``default.qubit`` seeded with a ``jax.random`` key samples inside the
    compiled program with a key fixed when it is traced: the same noise at
    every step of one jitted program.

  Without shots, ``qiskit.aer`` needs ``method="statevector"`` (its default
  backend samples anyway): a ValueError says so.

  The result is not cached: each call builds a new QNode (keep the circuit
  and pass the same object to every optimizer that should share it).

  Args:
    device: a PennyLane device (``qml.device(...)``) with ``n_qubits`` wires
      or without wires; wire labels are used in their order.
    n_qubits: the register size, a Python int >= 1 (at most
      :data:`MAX_QNODE_QUBITS` on the traced path).
    readout: ``"paper"`` or ``"entangled"``, as in :func:`make_qnode`.
    shots: ``None`` (the device's own setting: analytic unless the device
      was created with shots) or a Python int >= 1, set on the QNode.

  Returns:
    A :class:`QNodeCircuit`: ``float[B, n_qubits] -> float[B, n_qubits]``,
    signs applied; ``.qnode`` is the PennyLane QNode (its ``interface`` says
    the path: ``"jax"`` traced, ``"jax-jit"`` host), ``.device`` the device
    and ``.shots`` the shots it samples with (``None``: analytic).

  Raises:
    ValueError: ``device`` not a PennyLane device, with another number of
      wires than ``n_qubits``, without expectation values, or unable to run
      the circuit's gates; ``n_qubits``, ``readout`` or ``shots`` out of
      range.

  Examples:
    >>> import numpy as np
    >>> import pennylane as qml
    >>> import qsgd_optax
    >>> dev = qml.device("lightning.qubit", wires=2)
    >>> circuit = qsgd_optax.circuits.make_device_qnode(dev, 2)
    >>> circuit.qnode.interface
    'jax-jit'
    >>> print(np.round(circuit(np.array([[0.5, 1 / 6]], np.float32)), 4))
    [[1.  0.5]]
    >>> tx = qsgd_optax.qsgd(1e-3, n_qubits=2, circuit=circuit)
  """
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  n_qubits = _circuits.check_n_qubits(n_qubits)
  readout = _circuits._check_readout(readout)  # pylint: disable=protected-access
  shots = _check_shots(shots)
  if not _is_device(device):
    raise ValueError(f"device must be {_accepted(n_qubits)}; got {device!r:.120} "
                     f"({type(device).__name__}).")
  if not isinstance(device, qml.devices.Device):  # an old-API plugin device
    device = qml.devices.LegacyDeviceFacade(device)
  if device.wires is not None and len(device.wires) != n_qubits:
    raise ValueError(
        f"device: {device.name} has {len(device.wires)} wires "
        f"{list(device.wires)} but n_qubits={n_qubits}; expected "
        f"{_accepted(n_qubits)}.")
  if _lacks_expval(device):
    raise ValueError(
        f"device: {device.name} does not measure expectation values (it "
        f"declares {sorted(device.capabilities.measurement_processes)}); "
        f"expected {_accepted(n_qubits)}.")
  target = getattr(device, "target_device", None)  # an old-API device
  gaps = _legacy_gaps(target) if target is not None else []
  if gaps:
    raise ValueError(
        f"device: {device.name} cannot run the paper circuit: it lacks "
        f"{', '.join(gaps)}; expected {_accepted(n_qubits)}.")
  effective_shots = shots if shots is not None else _device_shots(device)
  # pennylane-qiskit: without shots, a backend that is not a statevector
  # simulator still samples (a default number of shots), silently.
  if effective_shots is None and getattr(target, "_is_state_backend", True) is False:
    raise ValueError(
        f"device: {device.name} on backend {getattr(target, 'backend_name', '?')!r} "
        f"estimates expectation values from samples even without shots; create "
        f"it with method='statevector' for exact values (qml.device("
        f"'qiskit.aer', wires={n_qubits}, method='statevector')), or pass "
        f"shots=... for sampled estimates.")
  traced = effective_shots is None and _supports_jax_backprop(device)
  if traced:
    _circuits._check_qnode_qubits(n_qubits, f"traced {device.name} circuit")  # pylint: disable=protected-access
  circuit = dataclasses.replace(
      _circuits.build_circuit(device, n_qubits, readout, traced=traced, shots=shots),
      shots=effective_shots)
  # One trace on a probe register: PennyLane validates the gates and the
  # measurements against the device here (nothing is executed).
  probe = jax.ShapeDtypeStruct((1, n_qubits), np.float32)
  try:
    jax.eval_shape(circuit, probe)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"device: {device.name} cannot run the paper circuit (Hadamard, RY, RZ, "
        f"CNOT; expectation values of PauliZ products); expected "
        f"{_accepted(n_qubits)}. Tracing it raised {type(e).__name__}: {e}"
    ) from e
  return circuit

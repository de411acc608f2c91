"""The circuits behind QSGD's modulation, and which coordinates they touch.

A circuit maps registers ``theta: float[B, n_qubits]`` to their modulation
``M: float[B, n_qubits]``; anything with that signature is a valid
``circuit=`` argument of :func:`qsgd_optax.qsgd`,
:func:`qsgd_optax.scale_by_qsgd` and :func:`qsgd_optax.superpose`.

* :data:`CIRCUIT_NAMES`: the built-in circuits by name (``"paper"``,
  ``"entangled"``, ``"sine"``); :func:`resolve_circuit` turns a name or a
  callable into a :class:`Modulator` usable on any batch shape.
* :func:`make_qnode`: the paper's circuit as a PennyLane QNode wrapped into
  a ``circuit=`` callable (signs applied), cached per ``(n_qubits,
  readout)``.
* :func:`make_device_qnode`: the same circuit on a PennyLane device of your
  choice (``lightning.qubit``, ``qiskit.aer``, ...), optionally with finite
  shots. ``default.qubit`` stays traced into XLA; any other device runs
  through PennyLane's JAX-jit host callback, a host round trip per step.
* :func:`sinpi`: the closed form ``sin(pi * theta)``, the oracle of the
  ``"paper"`` circuit.
* :data:`MAX_QNODE_QUBITS`: the largest register the built-in QNodes
  simulate; :data:`MAX_CHUNK_AMPLITUDES`: the statevector size one circuit
  call holds at most (scope ``"all"`` evaluates larger leaves in chunks).
* :func:`selected_mask`: which coordinates a ``scope`` selects;
  :data:`SCOPE_NAMES` and :data:`MODULATE_NAMES`: the accepted ``scope=``
  and ``modulate=`` values.
"""

from qsgd_optax._circuits import CIRCUIT_NAMES as CIRCUIT_NAMES
from qsgd_optax._circuits import make_qnode as make_qnode
from qsgd_optax._circuits import MAX_CHUNK_AMPLITUDES as MAX_CHUNK_AMPLITUDES
from qsgd_optax._circuits import MAX_QNODE_QUBITS as MAX_QNODE_QUBITS
from qsgd_optax._circuits import Modulator as Modulator
from qsgd_optax._circuits import QNodeCircuit as QNodeCircuit
from qsgd_optax._circuits import READOUT_NAMES as READOUT_NAMES
from qsgd_optax._circuits import resolve_circuit as resolve_circuit
from qsgd_optax._circuits import sinpi as sinpi
from qsgd_optax._devices import make_device_qnode as make_device_qnode
from qsgd_optax._scope import SCOPE_NAMES as SCOPE_NAMES
from qsgd_optax._scope import selected_mask as selected_mask
from qsgd_optax._transform import MODULATE_NAMES as MODULATE_NAMES

__all__ = (
    "CIRCUIT_NAMES",
    "MAX_CHUNK_AMPLITUDES",
    "MAX_QNODE_QUBITS",
    "MODULATE_NAMES",
    "Modulator",
    "QNodeCircuit",
    "READOUT_NAMES",
    "SCOPE_NAMES",
    "make_device_qnode",
    "make_qnode",
    "resolve_circuit",
    "selected_mask",
    "sinpi",
)

"""qsgd_optax: Superpositional Gradient Descent as an Optax transformation.

The superposition step is a PennyLane QNode run through PennyLane's JAX
interface, so it is traced into the same XLA program as the train step.
"""

from importlib import metadata as _metadata

from qsgd_optax._alias import qsgd as qsgd
from qsgd_optax._circuits import CIRCUIT_NAMES as CIRCUIT_NAMES
from qsgd_optax._circuits import make_qnode as make_qnode
from qsgd_optax._circuits import MAX_QNODE_QUBITS as MAX_QNODE_QUBITS
from qsgd_optax._circuits import resolve_circuit as resolve_circuit
from qsgd_optax._scope import SCOPE_NAMES as SCOPE_NAMES
from qsgd_optax._scope import selected_mask as selected_mask
from qsgd_optax._transform import MODULATE_NAMES as MODULATE_NAMES
from qsgd_optax._transform import scale_by_qsgd as scale_by_qsgd
from qsgd_optax._transform import superpose as superpose

try:
  __version__ = _metadata.version("qsgd_optax")
except _metadata.PackageNotFoundError:  # running from a source tree
  __version__ = "0.0.0+local"

__all__ = (
    "CIRCUIT_NAMES",
    "MAX_QNODE_QUBITS",
    "MODULATE_NAMES",
    "SCOPE_NAMES",
    "make_qnode",
    "qsgd",
    "resolve_circuit",
    "scale_by_qsgd",
    "selected_mask",
    "superpose",
)

"""qsgd_optax: Superpositional Gradient Descent as an Optax transformation.

The superposition step is a PennyLane QNode run through PennyLane's JAX
interface, so it is traced into the same XLA program as the train step.
The optimizers are :func:`qsgd`, :func:`scale_by_qsgd` and :func:`superpose`;
the circuit helpers live in :mod:`qsgd_optax.circuits`; :mod:`qsgd_optax.diagnostics`
(``quantum_term``, ``term_share``) measures the term in your own train step.
"""

import warnings as _warnings
from importlib import metadata as _metadata

from qsgd_optax import circuits as circuits
from qsgd_optax._alias import qsgd as qsgd
from qsgd_optax import diagnostics as diagnostics
from qsgd_optax._transform import scale_by_qsgd as scale_by_qsgd
from qsgd_optax._transform import superpose as superpose

try:
  __version__ = _metadata.version("qsgd_optax")
except _metadata.PackageNotFoundError:  # running from a source tree
  __version__ = "0.0.0+local"

__all__ = (
    "circuits",
    "qsgd",
    "scale_by_qsgd",
    "superpose",
)

# Names that lived at the top level before 0.2.0, now in qsgd_optax.circuits.
# make_qnode is not forwarded: it now returns a circuit (signs applied), not
# the raw QNode, so old code must be changed rather than silently re-read.
_MOVED = ("CIRCUIT_NAMES", "MAX_QNODE_QUBITS", "MODULATE_NAMES",
          "SCOPE_NAMES", "resolve_circuit", "selected_mask")


def __getattr__(name):
  if name in _MOVED:
    _warnings.warn(
        f"qsgd_optax.{name} moved to qsgd_optax.circuits.{name} in 0.2.0; "
        "the top-level name will be removed.",
        DeprecationWarning, stacklevel=2)
    return getattr(circuits, name)
  if name == "make_qnode":
    raise AttributeError(
        "qsgd_optax.make_qnode moved to qsgd_optax.circuits.make_qnode in "
        "0.2.0 and now returns a circuit= callable (signs applied); the raw "
        "QNode is its .qnode attribute.")
  raise AttributeError(f"module 'qsgd_optax' has no attribute {name!r}")

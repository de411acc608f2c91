r"""Quantum attention: ``softmax(Q K^T / sqrt(d_k) + Phi) V`` (paper eq. 3-5).

Every attention logit gets an additive term ``Phi`` produced by a small
parametrised circuit, a PennyLane QNode on ``default.qubit`` through the JAX
interface (``diff_method="backprop"``), so the circuit is traced into the same
XLA program as the rest of the model and its angles are trained by the same
optimizer as every other parameter.

Encoding (our choice; the paper does not specify it)
----------------------------------------------------
For head ``h`` with learned angles ``theta[h], varphi[h]`` (``n_qubits`` each)
and the attention score ``s = q_i . k_j / sqrt(d_k)`` of the pair ``(i, j)``,
the circuit ``C_h(s)`` acts on ``|0...0>`` as

* on each qubit ``k``: Hadamard, then ``RY(theta[h, k] + s)``, then
  ``RZ(varphi[h, k])`` -- the score is *added to every RY angle*;
* then CNOTs between adjacent qubits, ``CNOT(k, k + 1)`` for
  ``k = 0 .. n_qubits - 2``;

and ``Phi[b, h, i, j] = sum_{r < n_qubits} Re <r| C_h(s) |0...0>``: the real
parts of the first ``n_qubits`` amplitudes of the final state (PennyLane's
wire order, wire 0 most significant), summed. ``|Phi| <= 2`` for 4 qubits.

Two exact evaluations of the same function
------------------------------------------
``method="direct"`` runs the QNode once per score, batched over every
``(batch, head, i, j)`` with PennyLane parameter broadcasting. It is the
literal reading of the paper and the reference, but it simulates a
``2**n_qubits`` state per score: on a 2-core CPU with batch 32, 4 heads and
length 32 it costs about 0.3 s per layer for the forward pass alone.

``method="spectral"`` (default) uses the circuit's structure. Rotations about
one axis compose, ``RY(theta + s) = RY(theta) RY(s)``, so
``C_h(s)|0> = U_h (RY(s) H|0>)^{(x) n}`` with ``U_h`` independent of ``s``,
and ``RY(s) H|0> = (cos b, sin b)`` with ``b = s / 2 + pi / 4``. Every
amplitude is therefore a homogeneous polynomial of degree ``n = n_qubits`` in
``(cos b, sin b)``, i.e. a trigonometric polynomial spanned by
``cos(f b), sin(f b)`` for ``f = n, n - 2, ...`` (``n + 1`` functions).
Running the *same* QNode at ``n + 1`` fixed node scores per head and solving a
fixed ``(n + 1) x (n + 1)`` linear system recovers ``Phi_h`` exactly; all
scores are then evaluated in closed form, fused by XLA. Gradients reach the
angles through the QNode and reach the scores through the closed form. The
tests check both methods against an independent NumPy statevector simulation.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsgd_optax import _circuits

__all__ = [
    "METHODS",
    "MultiHeadSelfAttention",
    "QuantumScoreBias",
    "circuit_phi",
    "phi_direct",
    "phi_spectral",
]

METHODS: tuple[str, ...] = ("spectral", "direct")
MAX_QUBITS = 10  # a 2**10 statevector per score is the most we let anyone ask for

# Known, harmless warnings PennyLane raises while tracing (per jax version,
# checked by the core's tests); silenced only around our QNode calls.
_QNODE_WARNINGS = _circuits.EXPECTED_QNODE_WARNINGS


def _check_n_qubits(n_qubits: int) -> None:
  if not isinstance(n_qubits, int) or isinstance(n_qubits, bool) or not 1 <= n_qubits <= MAX_QUBITS:
    raise ValueError(f"n_qubits must be an int in [1, {MAX_QUBITS}], got {n_qubits!r}")


@functools.lru_cache(maxsize=None)
def _qnode(n_qubits: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The encoding circuit as a QNode returning the statevector (built once per size)."""
  import pennylane as qml  # pylint: disable=import-outside-toplevel

  device = qml.device("default.qubit", wires=n_qubits)

  @qml.qnode(device, interface="jax", diff_method="backprop")
  def circuit(ry: jax.Array, rz: jax.Array) -> jax.Array:
    for k in range(n_qubits):
      qml.Hadamard(wires=k)
      qml.RY(ry[..., k], wires=k)
      qml.RZ(rz[..., k], wires=k)
    for k in range(n_qubits - 1):
      qml.CNOT(wires=[k, k + 1])
    return qml.state()

  return circuit


def circuit_phi(ry: jax.Array, rz: jax.Array) -> jax.Array:
  """Runs the circuit with explicit angles; returns the summed real amplitudes.

  Args:
    ry: RY angles (score already added), shape ``(..., n_qubits)``.
    rz: RZ angles, same shape as ``ry``.

  Returns:
    ``sum_{r < n_qubits} Re <r|C|0>``, shape ``ry.shape[:-1]``, ``float32``.
  """
  if ry.shape != rz.shape or ry.ndim < 1:
    raise ValueError(f"ry and rz must have the same shape (..., n_qubits), got {ry.shape} and {rz.shape}")
  n_qubits = ry.shape[-1]
  _check_n_qubits(n_qubits)
  batch_shape = ry.shape[:-1]
  flat_ry = ry.reshape(-1, n_qubits)
  flat_rz = rz.reshape(-1, n_qubits)
  with warnings.catch_warnings():
    for category, message in _QNODE_WARNINGS:
      warnings.filterwarnings("ignore", message=message, category=category)
    state = _qnode(n_qubits)(flat_ry, flat_rz)
  state = state.reshape(flat_ry.shape[0], 2**n_qubits)
  phi = jnp.sum(jnp.real(state[:, :n_qubits]), axis=-1)
  return phi.reshape(batch_shape).astype(jnp.float32)


def _check_angles(scores: jax.Array, ry: jax.Array, rz: jax.Array) -> None:
  if scores.ndim != 4:
    raise ValueError(f"scores must have shape (batch, heads, q_len, k_len), got {scores.shape}")
  if ry.ndim != 2 or ry.shape != rz.shape or ry.shape[0] != scores.shape[1]:
    raise ValueError(
        f"ry and rz must have shape (heads={scores.shape[1]}, n_qubits), got {ry.shape} and {rz.shape}")


def phi_direct(scores: jax.Array, ry: jax.Array, rz: jax.Array) -> jax.Array:
  """``Phi`` by running the QNode on every score (broadcast over all of them).

  Args:
    scores: attention scores, shape ``(batch, heads, q_len, k_len)``.
    ry: learned RY angles per head, shape ``(heads, n_qubits)``.
    rz: learned RZ angles per head, shape ``(heads, n_qubits)``.

  Returns:
    ``Phi`` with the shape of ``scores``.
  """
  _check_angles(scores, ry, rz)
  ry_all = ry[None, :, None, None, :] + scores[..., None]
  rz_all = jnp.broadcast_to(rz[None, :, None, None, :], ry_all.shape)
  return circuit_phi(ry_all, rz_all).astype(scores.dtype)


def _frequencies(n_qubits: int) -> tuple[int, ...]:
  """``n, n - 2, ...`` down to 0 or 1: the frequencies (in ``b``) of every amplitude."""
  return tuple(range(n_qubits, -1, -2))


def _basis(b, n_qubits: int, xp=jnp) -> list:
  """The ``n + 1`` functions ``cos(f b)``, ``sin(f b)`` (``sin(0 b)`` left out).

  One ``cos``/``sin`` pair is evaluated; higher harmonics follow by the
  angle-addition recurrence (cheap, elementwise, fused by XLA).
  """
  c1, s1 = xp.cos(b), xp.sin(b)
  harmonics = {0: (xp.ones_like(b), xp.zeros_like(b)), 1: (c1, s1)}
  for f in range(2, n_qubits + 1):
    c, s = harmonics[f - 1]
    harmonics[f] = (c * c1 - s * s1, s * c1 + c * s1)
  terms = []
  for f in _frequencies(n_qubits):
    c, s = harmonics[f]
    terms.append(c)
    if f:
      terms.append(s)
  return terms


@functools.lru_cache(maxsize=None)
def _spectral_nodes(n_qubits: int) -> tuple[np.ndarray, np.ndarray]:
  """Node scores and the matrix mapping circuit values at them to basis coefficients."""
  b = np.pi * np.arange(n_qubits + 1) / (n_qubits + 1) + np.pi / (2 * (n_qubits + 1))
  design = np.stack(_basis(b, n_qubits, xp=np), axis=1)  # (nodes, functions)
  solve = np.linalg.inv(design)
  nodes = 2.0 * (b - np.pi / 4)  # s with b = s / 2 + pi / 4
  return nodes.astype(np.float32), solve.astype(np.float32)


def phi_spectral(scores: jax.Array, ry: jax.Array, rz: jax.Array) -> jax.Array:
  """``Phi`` exactly, from ``n_qubits + 1`` QNode runs per head (see module docs).

  Same arguments and result as :func:`phi_direct`.
  """
  _check_angles(scores, ry, rz)
  n_qubits = ry.shape[-1]
  _check_n_qubits(n_qubits)
  nodes, solve = _spectral_nodes(n_qubits)
  heads = ry.shape[0]
  node_ry = ry[:, None, :] + jnp.asarray(nodes)[None, :, None]  # (heads, nodes, n)
  node_rz = jnp.broadcast_to(rz[:, None, :], node_ry.shape)
  values = circuit_phi(node_ry, node_rz)  # (heads, nodes)
  coeffs = values @ jnp.asarray(solve).T  # (heads, functions)
  b = scores / 2 + math.pi / 4
  terms = _basis(b, n_qubits)
  coeffs = coeffs.astype(scores.dtype).reshape(1, heads, 1, 1, -1)
  return sum(coeffs[..., m] * term for m, term in enumerate(terms))


class QuantumScoreBias(nnx.Module):
  """The ``Phi`` term of quantum attention, with its learned circuit angles.

  Args:
    num_heads: attention heads; every head has its own angles.
    n_qubits: qubits of the circuit (the paper uses 4).
    method: ``"spectral"`` (exact, cheap; default) or ``"direct"`` (the QNode
      run on every score; exact, costly). See the module docstring.
    rngs: draws the initial angles, uniform in ``[0, 2 pi)``.
  """

  def __init__(self, num_heads: int, n_qubits: int = 4, *, method: str = "spectral", rngs: nnx.Rngs):
    if not isinstance(num_heads, int) or num_heads < 1:
      raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    _check_n_qubits(n_qubits)
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    self.method = method
    init = nnx.initializers.uniform(scale=2 * math.pi)
    self.ry = nnx.Param(init(rngs.params(), (num_heads, n_qubits), jnp.float32))
    self.rz = nnx.Param(init(rngs.params(), (num_heads, n_qubits), jnp.float32))

  def __call__(self, scores: jax.Array) -> jax.Array:
    fn = phi_spectral if self.method == "spectral" else phi_direct
    return fn(scores, self.ry[...], self.rz[...])


class MultiHeadSelfAttention(nnx.Module):
  """Multi-head self-attention, optionally with the quantum score bias.

  ``softmax(Q K^T / sqrt(d_k) [+ Phi] + mask) V``, then an output projection.

  Args:
    embed_dim: model width; must be divisible by ``num_heads``.
    num_heads: attention heads.
    dropout: dropout rate on the attention weights.
    quantum: add :class:`QuantumScoreBias` to the logits.
    n_qubits: qubits of the quantum circuit.
    method: evaluation method of the quantum bias.
    rngs: parameter and dropout randomness.
  """

  def __init__(
      self,
      embed_dim: int,
      num_heads: int,
      *,
      dropout: float = 0.0,
      quantum: bool = False,
      n_qubits: int = 4,
      method: str = "spectral",
      rngs: nnx.Rngs,
  ):
    if embed_dim % num_heads:
      raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    self.num_heads = num_heads
    self.head_dim = embed_dim // num_heads
    self.qkv = nnx.Linear(embed_dim, 3 * embed_dim, rngs=rngs)
    self.out = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.bias = QuantumScoreBias(num_heads, n_qubits, method=method, rngs=rngs) if quantum else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attends ``x`` (``(batch, length, embed_dim)``); ``mask`` marks real keys (``(batch, length)``)."""
    batch, length, _ = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (batch, heads, length, head_dim)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(self.head_dim)
    logits = scores if self.bias is None else scores + self.bias(scores)
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = self.dropout(jax.nn.softmax(logits, axis=-1))
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    return self.out(context)

"""Tests for the quantum attention score bias and the self-attention layer."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsgd_optax.tasks.classification import quantum_attention as qa

# --------------------------------------------------------------------------- NumPy statevector oracle

_H = np.array([[1, 1], [1, -1]], dtype=np.complex128) / math.sqrt(2)


def _ry(a: float) -> np.ndarray:
  return np.array([[math.cos(a / 2), -math.sin(a / 2)], [math.sin(a / 2), math.cos(a / 2)]], dtype=np.complex128)


def _rz(a: float) -> np.ndarray:
  return np.diag([np.exp(-0.5j * a), np.exp(0.5j * a)])


def _on_wire(gate: np.ndarray, wire: int, n: int) -> np.ndarray:
  """``gate`` on ``wire`` of ``n`` qubits, wire 0 the most significant bit."""
  return functools.reduce(np.kron, [gate if w == wire else np.eye(2) for w in range(n)])


def _cnot(control: int, target: int, n: int) -> np.ndarray:
  dim = 2**n
  matrix = np.zeros((dim, dim))
  for index in range(dim):
    bits = [(index >> (n - 1 - w)) & 1 for w in range(n)]
    if bits[control]:
      bits[target] ^= 1
    matrix[sum(b << (n - 1 - w) for w, b in enumerate(bits)), index] = 1
  return matrix


def np_phi(score: float, ry: np.ndarray, rz: np.ndarray) -> float:
  """Phi for one score by explicit 2**n statevector simulation in float64."""
  n = len(ry)
  state = np.zeros(2**n, dtype=np.complex128)
  state[0] = 1
  for k in range(n):
    for gate in (_H, _ry(ry[k] + score), _rz(rz[k])):
      state = _on_wire(gate, k, n) @ state
  for k in range(n - 1):
    state = _cnot(k, k + 1, n) @ state
  return float(np.sum(state[:n].real))


def _problem(rng: np.random.Generator, n_qubits: int, shape=(2, 3, 4, 4)):
  scores = rng.normal(scale=2.0, size=shape).astype(np.float32)
  ry = rng.uniform(0, 2 * np.pi, size=(shape[1], n_qubits)).astype(np.float32)
  rz = rng.uniform(0, 2 * np.pi, size=(shape[1], n_qubits)).astype(np.float32)
  return scores, ry, rz


def _np_phi_all(scores, ry, rz) -> np.ndarray:
  out = np.zeros(scores.shape)
  for index in np.ndindex(*scores.shape):
    head = index[1]
    out[index] = np_phi(float(scores[index]), ry[head].astype(np.float64), rz[head].astype(np.float64))
  return out


# --------------------------------------------------------------------------- Phi


def test_oracle_reduces_to_known_single_qubit_state():
  # One qubit, no entanglement: H then RY(a) gives (cos(a/2+pi/4), sin(a/2+pi/4)); Phi = first amplitude.
  for a in (-1.3, 0.0, 0.7, 2.9):
    assert np_phi(a, np.zeros(1), np.zeros(1)) == pytest.approx(math.cos(a / 2 + math.pi / 4), abs=1e-12)


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in qa.METHODS])
def test_phi_matches_numpy_statevector(rng, method):
  scores, ry, rz = _problem(rng, 4)
  fn = jax.jit(qa.phi_direct if method == "direct" else qa.phi_spectral)
  got = np.asarray(fn(scores, ry, rz))
  assert got.shape == scores.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, _np_phi_all(scores, ry, rz), atol=2e-5)
  assert np.std(got) > 0.05  # a non-trivial function of the scores


@pytest.mark.parametrize("n_qubits", [pytest.param(n, id=f"{n}q") for n in (2, 3)])
def test_spectral_equals_direct_for_other_sizes(rng, n_qubits):
  # odd sizes have half-integer frequencies in the score; both parities are covered
  scores, ry, rz = _problem(rng, n_qubits, shape=(1, 2, 3, 5))
  both = jax.jit(lambda *a: (qa.phi_spectral(*a), qa.phi_direct(*a)))
  spectral, direct = both(scores, ry, rz)
  np.testing.assert_allclose(spectral, direct, atol=3e-6)


def test_spectral_and_direct_gradients_agree(rng):
  scores, ry, rz = _problem(rng, 4)
  weights = rng.normal(size=scores.shape).astype(np.float32)

  def loss(fn, s, a, b):
    return jnp.sum(weights * fn(s, a, b))

  g_direct = jax.jit(jax.grad(functools.partial(loss, qa.phi_direct), argnums=(0, 1, 2)))(scores, ry, rz)
  g_spectral = jax.jit(jax.grad(functools.partial(loss, qa.phi_spectral), argnums=(0, 1, 2)))(scores, ry, rz)
  for d, s in zip(g_direct, g_spectral):
    assert np.all(np.isfinite(d)) and np.abs(d).max() > 1e-3
    np.testing.assert_allclose(s, d, atol=2e-4, rtol=1e-4)


def test_qnode_call_is_warning_free_and_filters_are_local():
  scores = jnp.zeros((1, 1, 2, 2))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(qa.phi_direct)(scores, jnp.ones((1, 4)), jnp.ones((1, 4)))
    # the filters do not leak: the same warning raised by us still surfaces
    with pytest.raises(UserWarning):
      warnings.warn("Explicitly requested dtype complex128 requested in astype is not available", UserWarning)


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda: qa.phi_spectral(jnp.zeros((2, 2, 2)), jnp.zeros((2, 4)), jnp.zeros((2, 4))), "scores",
                     id="scores-rank"),
        pytest.param(lambda: qa.phi_direct(jnp.zeros((1, 2, 2, 2)), jnp.zeros((3, 4)), jnp.zeros((3, 4))), "heads=2",
                     id="heads-mismatch"),
        pytest.param(lambda: qa.circuit_phi(jnp.zeros((2, 4)), jnp.zeros((2, 3))), "same shape", id="angle-shapes"),
        pytest.param(lambda: qa.QuantumScoreBias(2, 0, rngs=nnx.Rngs(0)), "n_qubits", id="n_qubits"),
        pytest.param(lambda: qa.QuantumScoreBias(2, 4, method="exact", rngs=nnx.Rngs(0)), "method", id="method"),
        pytest.param(lambda: qa.MultiHeadSelfAttention(10, 4, rngs=nnx.Rngs(0)), "divisible", id="embed-heads"),
    ],
)
def test_invalid_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# --------------------------------------------------------------------------- attention layer


def _reference_attention(layer: qa.MultiHeadSelfAttention, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Standard attention written out in NumPy from the layer's weights."""
  heads, dim = layer.num_heads, layer.head_dim
  qkv = x @ np.asarray(layer.qkv.kernel[...]) + np.asarray(layer.qkv.bias[...])
  b, length, _ = x.shape
  q, k, v = (qkv.reshape(b, length, 3, heads, dim)[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
  return context @ np.asarray(layer.out.kernel[...]) + np.asarray(layer.out.bias[...])


def test_standard_attention_matches_numpy_reference(rng):
  layer = qa.MultiHeadSelfAttention(16, 4, rngs=nnx.Rngs(0))
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=bool)
  np.testing.assert_allclose(layer(jnp.asarray(x), jnp.asarray(mask)), _reference_attention(layer, x, mask),
                             atol=1e-5)


@pytest.mark.parametrize("quantum", [pytest.param(False, id="standard"), pytest.param(True, id="quantum")])
def test_padded_keys_do_not_change_the_output(rng, quantum):
  layer = qa.MultiHeadSelfAttention(16, 4, quantum=quantum, rngs=nnx.Rngs(1))
  x = rng.normal(size=(1, 6, 16)).astype(np.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0]], dtype=bool)
  y = rng.normal(size=(1, 2, 16)).astype(np.float32)
  x2 = x.copy()
  x2[:, 4:] = y  # different content at padded positions
  apply = nnx.jit(lambda layer, x: layer(x, mask))
  out1, out2 = apply(layer, jnp.asarray(x)), apply(layer, jnp.asarray(x2))
  np.testing.assert_allclose(out1[:, :4], out2[:, :4], atol=1e-5)


def test_quantum_attention_shapes_bias_and_gradients_to_angles(rng):
  layer = qa.MultiHeadSelfAttention(16, 4, quantum=True, rngs=nnx.Rngs(2))
  assert layer.bias.ry.shape == (4, 4) and layer.bias.rz.shape == (4, 4)
  x = jnp.asarray(rng.normal(size=(3, 7, 16)).astype(np.float32))
  standard = qa.MultiHeadSelfAttention(16, 4, rngs=nnx.Rngs(2))  # same weights, no bias

  @nnx.jit
  def outputs_and_grads(layer, standard):
    loss = lambda layer: jnp.sum(layer(x) ** 2)
    return layer(x), standard(x), nnx.grad(loss)(layer)

  out, out_standard, grads = outputs_and_grads(layer, standard)
  assert out.shape == (3, 7, 16)
  assert float(jnp.abs(out - out_standard).max()) > 1e-3
  for name in ("ry", "rz"):
    g = np.asarray(getattr(grads.bias, name)[...])
    assert g.shape == (4, 4) and np.all(np.isfinite(g))
    assert np.all(np.abs(g).max(axis=1) > 0), f"every head's {name} angles get gradient"


def test_direct_and_spectral_layers_agree(rng):
  spectral = qa.MultiHeadSelfAttention(8, 2, quantum=True, method="spectral", rngs=nnx.Rngs(3))
  direct = qa.MultiHeadSelfAttention(8, 2, quantum=True, method="direct", rngs=nnx.Rngs(3))
  x = jnp.asarray(rng.normal(size=(2, 4, 8)).astype(np.float32))
  both = nnx.jit(lambda a, b: (a(x), b(x)))
  out_spectral, out_direct = both(spectral, direct)
  np.testing.assert_allclose(out_spectral, out_direct, atol=2e-5)

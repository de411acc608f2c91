"""The built-in circuits against closed forms, and the QNode inside XLA."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax
from qsgd_optax import _circuits

from helpers import np_modulation


@pytest.mark.parametrize("circuit", ["paper", "entangled", "sine"])
@pytest.mark.parametrize("n_qubits", [1, 3, 4, 6])
def test_circuit_matches_closed_form(circuit, n_qubits, rng):
  theta = rng.uniform(-3, 3, size=(17, n_qubits)).astype(np.float32)
  mod = qsgd_optax.resolve_circuit(circuit, n_qubits)
  got = np.asarray(jax.jit(mod)(theta), np.float64)
  want = np_modulation(theta, circuit)
  # float32 statevector: pi * theta rounds to ~3e-7 relative.
  np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


def test_paper_qnode_equals_sine_circuit(rng):
  """The closed form is the oracle of the paper's QNode (PAPER.md sec. 2)."""
  theta = rng.normal(size=(64, 4)).astype(np.float32)
  paper = qsgd_optax.resolve_circuit("paper", 4)(theta)
  sine = qsgd_optax.resolve_circuit("sine", 4)(theta)
  np.testing.assert_allclose(paper, sine, atol=3e-6)


def test_entangled_differs_from_paper(rng):
  theta = rng.uniform(0.1, 0.4, size=(5, 4)).astype(np.float32)
  paper = np.asarray(qsgd_optax.resolve_circuit("paper", 4)(theta))
  ent = np.asarray(qsgd_optax.resolve_circuit("entangled", 4)(theta))
  np.testing.assert_allclose(paper[:, 0], ent[:, 0], atol=3e-6)
  assert np.all(np.abs(paper[:, 1:] - ent[:, 1:]) > 1e-3)


def test_sinpi_accuracy_and_periodicity():
  theta = np.linspace(-40, 40, 200_001).astype(np.float32)
  got = np.asarray(_circuits.sinpi(jnp.asarray(theta)), np.float64)
  want = np.sin(np.pi * theta.astype(np.float64))
  assert np.max(np.abs(got - want)) < 2e-7
  # Exact zeros at integers, exact +-1 at half integers.
  ints = np.arange(-5, 6, dtype=np.float32)
  assert np.all(np.asarray(_circuits.sinpi(ints)) == 0)
  halves = ints + np.float32(0.5)
  np.testing.assert_allclose(_circuits.sinpi(halves),
                             np.cos(np.pi * ints), atol=1e-7)


@pytest.mark.parametrize("circuit", ["paper", "sine"])
def test_gradient_through_circuit(circuit, rng):
  theta = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
  mod = qsgd_optax.resolve_circuit(circuit, 4)
  grad = jax.grad(lambda t: jnp.sum(mod(t)))(jnp.asarray(theta))
  np.testing.assert_allclose(grad, np.pi * np.cos(np.pi * theta), atol=2e-5)


def test_batched_leading_axes_and_empty_batch(rng):
  mod = qsgd_optax.resolve_circuit("paper", 4)
  theta = rng.uniform(-1, 1, size=(2, 3, 4)).astype(np.float32)
  out = mod(theta)
  assert out.shape == (2, 3, 4)
  np.testing.assert_allclose(out, np.sin(np.pi * theta), atol=3e-6)
  assert mod(np.zeros((0, 4), np.float32)).shape == (0, 4)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_qnode_is_traced_into_the_step_no_host_round_trip():
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
  tx = qsgd_optax.qsgd(1e-2, 0.5, circuit="paper")
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  eqns = list(_all_eqns(jax.make_jaxpr(step)(params, state, params).jaxpr))
  names = {e.primitive.name for e in eqns}
  assert not {n for n in names if "callback" in n}, names
  # The statevector simulation itself is in the program: complex arithmetic.
  complex_outs = [
      v for e in eqns for v in e.outvars
      if jnp.issubdtype(v.aval.dtype, jnp.complexfloating)
  ]
  assert len(complex_outs) > 10, "expected the QNode's statevector in the jaxpr"
  hlo = jax.jit(step).lower(params, state, params).as_text()
  assert "callback" not in hlo.lower()
  assert "complex<f32>" in hlo


def test_make_qnode_is_a_pennylane_qnode():
  import pennylane as qml
  qnode = qsgd_optax.make_qnode(4)
  assert isinstance(qnode, qml.QNode)
  assert qnode.interface == "jax"
  assert qnode.diff_method == "backprop"
  with pytest.raises(ValueError, match="readout"):
    qsgd_optax.make_qnode(4, readout="bogus")


def test_user_callable_circuit(rng):
  calls = []

  def cosine(theta):
    calls.append(theta.shape)
    return jnp.cos(theta)

  theta = rng.normal(size=(5, 4)).astype(np.float32)
  mod = qsgd_optax.resolve_circuit(cosine, 4)
  np.testing.assert_allclose(mod(theta), np.cos(theta), rtol=1e-6)
  assert calls[0] == (3, 4)  # the construction-time shape check


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda t: t[..., :2], r"shape \(3, 4\)"),
        (lambda t: jnp.sum(t), r"shape \(3, 4\)"),
        (lambda t: (t > 0), "float array"),
        (lambda t: t.reshape(-1, 5), "raised"),
    ],
    ids=["narrow", "scalar", "bool", "raises"],
)
def test_callable_with_wrong_output_is_rejected(bad, match):
  with pytest.raises(ValueError, match="circuit") as e:
    qsgd_optax.qsgd(1e-3, circuit=bad)
  assert e.match(match)


def test_unknown_circuit_name():
  with pytest.raises(ValueError, match=r"circuit must be one of \('paper'"):
    qsgd_optax.qsgd(1e-3, circuit="qiskit")
  with pytest.raises(ValueError, match="circuit must be one of"):
    qsgd_optax.qsgd(1e-3, circuit=3)


def test_qnode_qubit_bound():
  bound = qsgd_optax.MAX_QNODE_QUBITS
  with pytest.raises(ValueError, match=f"n_qubits must be at most {bound}"):
    qsgd_optax.qsgd(1e-3, n_qubits=bound + 1, circuit="paper")
  # The closed form has no such bound.
  qsgd_optax.qsgd(1e-3, n_qubits=bound + 1, circuit="sine")

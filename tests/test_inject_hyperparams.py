"""Factories called again and again: optax.inject_hyperparams.

inject_hyperparams calls the factory on every update (eagerly, or while
tracing). The circuit must be built once and traced once per shape, and the
validation of the numeric hyperparameters must not read device values back
to the host.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pennylane as qml
import pytest

import qsgd_optax
from qsgd_optax import _circuits
from qsgd_optax import _scope

STATIC = ("n_qubits", "circuit", "scope", "modulate")


@pytest.fixture
def qnode_counts(monkeypatch):
  """Counts QNodes built and QNode calls (a call is a trace inside jit)."""
  _circuits._qnode_circuit.cache_clear()  # start from nothing built
  counts = {"built": 0, "called": 0}
  init, call = qml.QNode.__init__, qml.QNode.__call__

  def counting_init(self, *args, **kwargs):
    counts["built"] += 1
    init(self, *args, **kwargs)

  def counting_call(self, *args, **kwargs):
    counts["called"] += 1
    return call(self, *args, **kwargs)

  monkeypatch.setattr(qml.QNode, "__init__", counting_init)
  monkeypatch.setattr(qml.QNode, "__call__", counting_call)
  yield counts
  _circuits._qnode_circuit.cache_clear()  # drop the counting QNode ...
  _scope._cached_term_fn.cache_clear()  # ... and the traces holding it


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6),
          "b": jnp.linspace(0.1, 0.4, 6), "s": jnp.float32(0.3)}


def test_factory_called_100_times_builds_one_qnode(qnode_counts):
  for _ in range(100):
    tx = qsgd_optax.qsgd(1e-3, 0.5, circuit="paper")
  assert qnode_counts["built"] == 1
  for _ in range(100):
    qsgd_optax.scale_by_qsgd(circuit="entangled")
    qsgd_optax.superpose(optax.adam(1e-3), 0.1, circuit="paper")
  assert qnode_counts["built"] == 2  # one per (readout, n_qubits)
  del tx


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_inject_hyperparams_traces_the_circuit_once(qnode_counts, jit):
  params = _params()
  tx = optax.inject_hyperparams(qsgd_optax.qsgd, static_args=STATIC)(
      learning_rate=1e-2, quantum_weight=0.5)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for i in range(100):
    grads = jax.tree.map(lambda x: jnp.cos(x * (i + 1.0)), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # One QNode, traced once: every leaf's register goes through one batched
  # call, and the jitted term is cached across the 100 factory calls.
  assert qnode_counts["built"] == 1
  assert qnode_counts["called"] == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_validation_reads_no_device_value(qnode_counts, monkeypatch):
  """A JAX-array hyperparameter is checked by shape and dtype, on device."""
  from jax._src import array as jax_array

  params = _params()
  tx = optax.inject_hyperparams(qsgd_optax.qsgd, static_args=STATIC)(
      learning_rate=1e-2, quantum_weight=0.5)
  state = tx.init(params)
  grads = jax.tree.map(jnp.cos, params)
  tx.update(grads, state, params)  # warm: nothing left to build

  def no_host_read(*args, **kwargs):
    raise AssertionError("a device value was read back to the host")

  with monkeypatch.context() as m:
    # (jax.transfer_guard does not guard CPU arrays: patch the reads.)
    for name in ("__array__", "__float__", "__bool__", "__index__", "item", "tolist"):
      m.setattr(jax_array.ArrayImpl, name, no_host_read)
    qsgd_optax.qsgd(1e-2, jnp.asarray(0.5))
    qsgd_optax.scale_by_qsgd(quantum_weight=jnp.asarray(0.5, jnp.bfloat16))
    tx.update(grads, state, params)
  # Not read, so not checked for finiteness (documented): the old code read
  # it and raised here.
  qsgd_optax.qsgd(1e-2, jnp.asarray(jnp.nan))


@pytest.mark.parametrize(
    "weight",
    [np.float32(np.nan), float("inf"), "0.5", "big", True, np.bool_(False), 1 + 1j,
     jnp.ones(2), jnp.asarray(1 + 1j), jnp.asarray(True), [0.1]],
    ids=["np-nan", "inf", "str-number", "str", "bool", "np-bool", "complex", "jnp-vector",
         "jnp-complex", "jnp-bool", "list"],
)
def test_bad_quantum_weights_are_refused_at_construction(weight):
  with pytest.raises(ValueError, match="quantum_weight must be a finite real scalar"):
    qsgd_optax.qsgd(1e-2, weight)


def test_user_callable_is_checked_once():
  calls = []

  def cosine(theta):
    calls.append(theta.shape)
    return jnp.cos(theta)

  for _ in range(50):
    qsgd_optax.qsgd(1e-3, circuit=cosine)
  assert len(calls) == 1  # the construction-time shape check, once
  qsgd_optax.qsgd(1e-3, n_qubits=3, circuit=cosine)
  assert len(calls) == 2  # another register size is checked again

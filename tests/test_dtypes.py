"""Parameter dtypes beyond float32: complex leaves and float64 (x64 on)."""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax

from helpers import NumpyQSGD, mixed_tree

FORMS = [("sine", "all"), ("paper", "leaf"), ("paper", "model"),
         ("entangled", "all")]


@contextlib.contextmanager
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("circuit, scope", FORMS, ids=lambda v: v)
def test_complex_leaves_pass_through_untouched(circuit, scope, rng):
  """A complex leaf gets exactly Adam's update; real leaves get the term."""
  z = (rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))).astype(
      np.complex64)
  params = {"a_complex": jnp.asarray(z), "w": jnp.asarray(
      rng.uniform(-1, 1, size=(3, 4)).astype(np.float32))}
  grads = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
  tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope)
  adamw = optax.adamw(1e-2, weight_decay=0.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no complex -> real cast warning
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)
  assert u["a_complex"].dtype == jnp.complex64
  # Two programs (qsgd's and adamw's) compute the same Adam ops: equal to
  # float32 rounding.
  np.testing.assert_allclose(u["a_complex"], ref["a_complex"], rtol=1e-6,
                             atol=1e-9)
  assert np.all(np.isfinite(np.asarray(state[0].mu["a_complex"])))
  # The real leaf is modulated (for "model" it is the only float leaf, so
  # it holds the whole register even though the complex leaf comes first).
  assert not np.allclose(u["w"], ref["w"], rtol=1e-3, atol=0)
  mask = qsgd_optax.circuits.selected_mask(params, 4, scope)
  assert not mask["a_complex"].any() and mask["w"].any()


@pytest.mark.parametrize("circuit, scope", FORMS, ids=lambda v: v)
@pytest.mark.parametrize("modulate", ["gradient", "update"])
def test_float64_keeps_its_precision(circuit, scope, modulate, rng):
  """With x64 on, float64 params get a float64 term (QNode in complex128)."""
  with x64():
    params = mixed_tree(rng, np.float64)
    targets = mixed_tree(rng, np.float64)
    kw = dict(quantum_weight=0.7, circuit=circuit, scope=scope,
              modulate=modulate)
    tx = qsgd_optax.qsgd(0.05, **kw)
    ref = NumpyQSGD(0.05, **kw)

    def grad_fn(p):
      return jax.tree.map(lambda x, t: jnp.cos(x) * (x - t), p, targets)

    @jax.jit
    def step(p, s):
      u, s = tx.update(grad_fn(p), s, p)
      return optax.apply_updates(p, u), s

    state = tx.init(params)
    leaves_ref = [np.asarray(x) for x in jax.tree.leaves(params)]
    treedef = jax.tree.structure(params)
    for _ in range(5):
      grads = jax.tree.leaves(grad_fn(jax.tree.unflatten(
          treedef, [jnp.asarray(x) for x in leaves_ref])))
      leaves_ref = ref.step(leaves_ref, [np.asarray(g) for g in grads])
      params, state = step(params, state)
    for got, want in zip(jax.tree.leaves(params), leaves_ref):
      assert got.dtype == jnp.float64
      # float64 throughout: a float32 circuit or register would leave
      # errors of ~1e-7 here (measured 1.5e-7 before the registers kept the
      # parameters' precision).
      np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_float64_circuits_agree_with_the_closed_form():
  with x64():
    theta = np.linspace(-3, 3, 40).reshape(10, 4)
    for name in ("paper", "entangled", "sine"):
      got = qsgd_optax.circuits.resolve_circuit(name, 4)(jnp.asarray(theta))
      assert got.dtype == jnp.float64, name
      s = np.sin(np.pi * theta)
      want = s if name != "entangled" else (
          (-1.0) ** np.arange(4) * np.cumprod(s, -1))
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-13, rtol=0,
                                 err_msg=name)
  assert not jax.config.jax_enable_x64  # restored

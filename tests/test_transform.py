"""QSGD against an independent NumPy reference, and argument validation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax

from helpers import NumpyQSGD, mixed_tree

CIRCUITS = ("paper", "entangled", "sine")
SCOPES = ("leaf", "model", "all")
MODULATES = ("gradient", "preconditioned", "update")


def _grad_fn(targets):
  def loss(params):
    return sum(
        jnp.sum(jnp.cos(p) * (p - t) ** 2)
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets))
    )
  return jax.grad(loss)


# A Latin square over (circuit, scope, modulate): every pair of values of any
# two of the three dimensions occurs once (9 compiles instead of 27); the
# shared battery runs the full product on other properties.
LATIN = [(c, s, MODULATES[(i + j) % len(MODULATES)])
         for i, c in enumerate(CIRCUITS) for j, s in enumerate(SCOPES)]


@pytest.mark.parametrize("circuit, scope, modulate", LATIN, ids=lambda v: v)
def test_matches_numpy_reference(circuit, scope, modulate, rng):
  params = mixed_tree(rng)
  targets = mixed_tree(rng)
  grad_fn = _grad_fn(targets)
  kw = dict(quantum_weight=0.7, n_qubits=4, circuit=circuit, scope=scope,
            modulate=modulate)
  tx = qsgd_optax.qsgd(0.05, weight_decay=0.01, **kw)
  ref = NumpyQSGD(0.05, weight_decay=0.01, **kw)

  @jax.jit
  def step(p, s):
    u, s = tx.update(grad_fn(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  leaves_ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  for _ in range(8):
    grads_ref = jax.tree.leaves(grad_fn(
        jax.tree.unflatten(jax.tree.structure(params),
                           [jnp.asarray(x, jnp.float32) for x in leaves_ref])))
    leaves_ref = ref.step(leaves_ref, grads_ref)
    params, state = step(params, state)
    for got, want in zip(jax.tree.leaves(params), leaves_ref):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("modulate", ["gradient", "update"])
@pytest.mark.parametrize("scope", SCOPES)
def test_superpose_of_adam_equals_scale_by_qsgd(modulate, scope, rng):
  """Two code paths: superpose(scale_by_adam) and scale_by_qsgd."""
  params = mixed_tree(rng)
  grads = mixed_tree(rng)
  a = qsgd_optax.superpose(optax.scale_by_adam(), 0.5, scope=scope,
                           modulate=modulate, circuit="sine")
  b = qsgd_optax.scale_by_qsgd(quantum_weight=0.5, scope=scope,
                               modulate=modulate, circuit="sine")
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    ua, sa = a.update(grads, sa, params)
    ub, sb = b.update(grads, sb, params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), ua, ub)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, ua))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("modulate", MODULATES)
def test_first_step_differs_from_adamw_only_on_selected(scope, modulate, rng):
  params = mixed_tree(rng)
  grads = mixed_tree(rng)
  tx = qsgd_optax.qsgd(0.1, 0.5, circuit="paper", scope=scope,
                       modulate=modulate)
  u, _ = tx.update(grads, tx.init(params), params)
  ua, _ = optax.adamw(0.1, weight_decay=0.0).update(
      grads, optax.adamw(0.1, weight_decay=0.0).init(params), params)
  masks = qsgd_optax.circuits.selected_mask(params, 4, scope)
  for key in params:
    diff = np.asarray(u[key]) != np.asarray(ua[key])
    mask = masks[key]
    assert not np.any(diff & ~mask), key
    assert np.all(diff[mask]), key  # uniform(-2, 2) params: sin != 0


def test_quantum_weight_zero_is_adamw(rng):
  params = mixed_tree(rng)
  grads = mixed_tree(rng)
  for circuit, scope in itertools.product(CIRCUITS, SCOPES):
    tx = qsgd_optax.qsgd(1e-2, 0.0, circuit=circuit, scope=scope,
                         weight_decay=1e-2)
    ref = optax.adamw(1e-2, weight_decay=1e-2)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    ur, _ = ref.update(grads, ref.init(params), params)
    # Equal up to XLA's fusion/FMA choices between two different programs.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-12), u, ur)


def test_scope_model_register_spans_leaves():
  params = {"a": jnp.array([0.25]), "b": jnp.array([[0.5, -0.25], [1.5, 0.1]]),
            "c": jnp.array([0.3, 0.3])}
  masks = qsgd_optax.circuits.selected_mask(params, 4, "model")
  assert masks["a"].tolist() == [True]
  assert masks["b"].tolist() == [[True, True], [True, False]]
  assert masks["c"].tolist() == [False, False]


def test_scope_all_simulates_every_leaf_of_a_precision_in_one_circuit_call(rng):
  """The registers of all (unsharded) leaves go through the circuit together, once.

  Counted on a user callable (traced afresh on every update); the values are checked against
  the closed form sin(pi * theta), which the paper QNode equals, leaf by leaf, including
  leaves whose size is not a multiple of the register (their last register zero-padded).
  """
  qnode = qsgd_optax.circuits.make_qnode(4)
  calls = []

  def counting(theta):
    calls.append(theta.shape)
    return qnode(theta)

  params = mixed_tree(rng)
  params["half"] = jnp.asarray(rng.uniform(-2, 2, size=(3, 3)), jnp.bfloat16)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  tx = qsgd_optax.superpose(optax.identity(), 0.5, 4, circuit=counting, scope="all",
                            modulate="gradient")
  calls.clear()  # the factory's own check of the callable's output shape
  updates, _ = tx.update(grads, tx.init(params), params)
  # One call: every leaf is float32 or bfloat16 (registers in float32), padded per leaf; with
  # several devices (Auto-sharded leaves are not visible as such) one call per leaf.
  per_leaf = [(-(-p.size // 4), 4) for p in jax.tree.leaves(params)]
  if jax.device_count() == 1:
    assert calls == [(sum(b for b, _ in per_leaf), 4)]
  else:
    assert sorted(calls) == sorted(per_leaf)
  for key, p in params.items():
    theta = np.asarray(p, np.float64)
    want = np.asarray(grads[key], np.float64) * (1 + 0.5 * np.sin(np.pi * theta))
    # float32 circuit (atol 3e-6 on M) times |g| <= 5; bfloat16 leaves round to 8 bits.
    tol = 3e-2 if p.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(updates[key], np.float64), want, atol=tol, err_msg=key)


def test_integer_and_empty_leaves_pass_through(rng):
  params = {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
            "steps": jnp.arange(3), "empty": jnp.zeros((0, 4))}
  grads = {"w": jnp.ones((3, 3)), "steps": jnp.zeros(3, jnp.int32),
           "empty": jnp.zeros((0, 4))}
  tx = qsgd_optax.scale_by_qsgd(scope="model", circuit="sine")
  u, _ = tx.update(grads, tx.init(params), params)
  adam = optax.scale_by_adam()
  ua, _ = adam.update(grads, adam.init(params), params)
  # Non-float and empty leaves get Adam's update, untouched by the term.
  np.testing.assert_array_equal(u["steps"], ua["steps"])
  assert u["steps"].dtype == ua["steps"].dtype
  assert u["empty"].shape == (0, 4)
  assert np.all(np.isfinite(u["w"]))


def test_gradient_form_is_not_scale_invariant_update_form_is(rng):
  """The paper's raw-gradient term grows with the gradient; Adam does not."""
  params = {"w": jnp.asarray(rng.uniform(0.1, 0.4, size=(8,)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  big = jax.tree.map(lambda g: 100.0 * g, grads)
  for modulate, invariant in [("gradient", False), ("update", True),
                              ("preconditioned", True)]:
    tx = qsgd_optax.scale_by_qsgd(quantum_weight=0.5, modulate=modulate,
                                  circuit="sine", eps=0.0)
    u1, _ = tx.update(grads, tx.init(params), params)
    u100, _ = tx.update(big, tx.init(params), params)
    close = np.allclose(u1["w"], u100["w"], rtol=1e-5)
    assert close == invariant, modulate


def test_paper_form_can_reverse_the_adam_step():
  """Where quantum_weight * |sin| * |g| > 1 the update points uphill."""
  params = jnp.array([0.5])  # sin(pi/2) = 1
  grads = jnp.array([4.0])
  tx = qsgd_optax.scale_by_qsgd(quantum_weight=0.5, circuit="paper")
  u, _ = tx.update(grads, tx.init(params), params)
  # Adam direction is +1, the term is 0.5 * 1 * 4 = 2: total 3, same sign as
  # the gradient (descent), but with gradient -4 at theta=-0.5 ...
  np.testing.assert_allclose(u, [3.0], rtol=1e-5)
  params = jnp.array([-0.5])  # sin = -1: the term opposes the Adam step
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u, [1.0 - 2.0], rtol=1e-5)
  assert float(u[0]) < 0  # the step moves along +g: uphill


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_qubits=0), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits=-3), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits=2.0), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits=True), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits="4"), "n_qubits must be a Python int >= 1"),
        (dict(quantum_weight=float("nan")), "quantum_weight must be a finite"),
        (dict(quantum_weight=float("inf")), "quantum_weight must be a finite"),
        (dict(quantum_weight="big"), "quantum_weight must be a finite"),
        (dict(quantum_weight=[0.1, 0.2]), "quantum_weight must be a finite"),
        (dict(scope="layer"), r"scope must be one of \('leaf', 'model', 'all'\)"),
        (dict(modulate="adam"), "modulate must be one of"),
        (dict(circuit="qiskit"), "circuit must be one of"),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("factory", ["qsgd", "scale_by_qsgd", "superpose"])
def test_bad_arguments_raise_naming_the_argument(kwargs, match, factory):
  if factory == "qsgd":
    make = lambda: qsgd_optax.qsgd(1e-3, **kwargs)
  elif factory == "scale_by_qsgd":
    make = lambda: qsgd_optax.scale_by_qsgd(**kwargs)
  else:
    make = lambda: qsgd_optax.superpose(optax.scale_by_adam(), **kwargs)
  with pytest.raises(ValueError, match=match):
    make()


def test_superpose_rejects_preconditioned():
  with pytest.raises(ValueError, match="preconditioned.*scale_by_qsgd"):
    qsgd_optax.superpose(optax.sgd(0.1), modulate="preconditioned")


@pytest.mark.parametrize("make", [
    lambda: qsgd_optax.qsgd(1e-3),
    lambda: qsgd_optax.scale_by_qsgd(),
    lambda: qsgd_optax.superpose(optax.sgd(1e-3), modulate="update"),
], ids=["qsgd", "scale_by_qsgd", "superpose"])
def test_update_without_params_raises_optax_message(make):
  from optax._src import base
  tx = make()
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"requires the current value of param"):
    tx.update(params, tx.init(params))
  assert "params" in base.NO_PARAMS_MSG


def test_superpose_update_wraps_any_optimizer(rng):
  """modulate='update' on a full optimizer scales its step by (1 + w M)."""
  params = {"w": jnp.asarray(rng.uniform(-1, 1, size=(2, 6)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)}
  inner = optax.sgd(0.1, momentum=0.9)
  tx = qsgd_optax.superpose(inner, 0.3, modulate="update", circuit="paper")
  u, _ = tx.update(grads, tx.init(params), params)
  ui, _ = inner.update(grads, inner.init(params), params)
  scale = np.ones((2, 6))
  scale[0, :4] += 0.3 * np.sin(np.pi * np.asarray(params["w"][0, :4]))
  np.testing.assert_allclose(u["w"], np.asarray(ui["w"]) * scale, rtol=1e-5)


def test_superpose_default_is_safe_on_a_complete_optimizer():
  """DESIGN.md: superpose defaults to modulate='update'.

  With "gradient" on a complete optimizer the term would be +0.5 * M * g =
  +0.5 against Adam's -1e-3 at theta = 0.5, g = 1: uphill and 500x larger.
  """
  params, grads = jnp.array([0.5]), jnp.array([1.0])
  inner = optax.adam(1e-3)
  tx = qsgd_optax.superpose(inner, 0.5, circuit="sine")
  u, _ = tx.update(grads, tx.init(params), params)
  ui, _ = inner.update(grads, inner.init(params), params)
  np.testing.assert_allclose(ui, [-1e-3], rtol=1e-5)
  np.testing.assert_allclose(u, 1.5 * np.asarray(ui), rtol=1e-5)
  explicit = qsgd_optax.superpose(inner, 0.5, circuit="sine",
                                  modulate="update")
  v, _ = explicit.update(grads, explicit.init(params), params)
  np.testing.assert_array_equal(u, v)  # same program twice
  # The descent-direction form, opted into, does what its docstring warns.
  uphill = qsgd_optax.superpose(inner, 0.5, circuit="sine",
                                modulate="gradient")
  w, _ = uphill.update(grads, uphill.init(params), params)
  assert float(w[0]) > 0.4

"""NaN and Inf in gradients and parameters, and degenerate parameter trees.

What is pinned here is documented in the "Non-finite values" paragraphs of
``scale_by_qsgd`` and ``qsgd``:

* A non-finite gradient entry stays on its coordinate, exactly as in
  ``optax.adamw``: Adam's moments and the update are NaN/Inf there and
  nowhere else, for every form of the quantum term.
* ``optax.apply_if_finite(qsgd(...), max_consecutive_errors)`` skips such a
  step and the run then continues as if the step had never happened.
* A non-finite parameter on a selected coordinate makes the modulation NaN:
  only that coordinate for ``"sine"``, its whole register (which for scope
  ``"model"`` spans leaves) for the QNode circuits, whose statevector is then
  NaN. Adam's state is untouched, and ``apply_if_finite``, which checks the
  gradients, does not skip the step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax

MODULATES = ("gradient", "preconditioned", "update")
SCOPES = ("leaf", "model", "all")
LR, WEIGHT, DECAY = 0.1, 0.5, 1e-2


@functools.cache
def _qsgd(modulate="gradient", scope="leaf", circuit="paper", weight=WEIGHT,
          decay=DECAY):
  """One optimizer (and so one QNode to compile) per configuration."""
  return qsgd_optax.qsgd(LR, weight, 4, weight_decay=decay, circuit=circuit,
                         scope=scope, modulate=modulate)


def _params():
  # "w" has 6 entries (its first 4 selected under scope "leaf"), "b" 3.
  return {"w": jnp.array([[0.3, -0.2, 0.7], [1.1, 0.45, 0.25]]),
          "b": jnp.array([0.1, -0.4, 0.8])}


def _grads(params, i):
  fn = (jnp.cos, jnp.sin, jnp.tanh, lambda x: 1.0 - x)[i % 4]
  return jax.tree.map(fn, params)


def _with(tree, key, index, value):
  return tree | {key: tree[key].at[index].set(value)}


def _nonfinite(tree):
  return {k: ~np.isfinite(np.asarray(v)) for k, v in tree.items()}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------ non-finite gradients


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", [(0, 1), (1, 2)],
                         ids=["selected", "unselected"])
@pytest.mark.parametrize("modulate", MODULATES)
def test_nonfinite_gradient_stays_on_its_coordinate(modulate, index, bad):
  params = _params()
  grads = _with(_grads(params, 0), "w", index, bad)
  tx, adamw = _qsgd(modulate), optax.adamw(LR, weight_decay=DECAY)
  u, state = tx.update(grads, tx.init(params), params)
  ua, state_a = adamw.update(grads, adamw.init(params), params)
  # Non-finite exactly where optax.adamw is: the update, mu and nu at that
  # coordinate (an Inf gradient gives Inf / Inf = NaN in the update).
  only_there = {"w": np.zeros((2, 3), bool), "b": np.zeros(3, bool)}
  only_there["w"][index] = True
  for got, ref in [(u, ua), (state[0].mu, state_a[0].mu),
                   (state[0].nu, state_a[0].nu)]:
    jax.tree.map(np.testing.assert_array_equal, _nonfinite(got), only_there)
    jax.tree.map(np.testing.assert_array_equal, _nonfinite(ref), only_there)
  assert np.isnan(u["w"][index])
  # Every other coordinate is what a finite gradient there would give.
  u_ok, _ = tx.update(_with(grads, "w", index, 1.0), tx.init(params), params)
  for key in u:
    np.testing.assert_array_equal(u[key][~only_there[key]],
                                  u_ok[key][~only_there[key]])


@pytest.mark.parametrize("modulate", MODULATES)
def test_apply_if_finite_skips_the_step_and_resumes_exactly(modulate):
  """A NaN-gradient step is a no-op; later steps are as if it never was."""
  tx = optax.apply_if_finite(_qsgd(modulate), max_consecutive_errors=3)
  step = jax.jit(tx.update)
  params = _params()

  def run(schedule):
    p, state, updates = params, tx.init(params), []
    for bad in schedule:
      g = _grads(p, len(updates))
      if bad:
        g = _with(g, "w", (0, 1), np.nan)
      u, new_state = step(g, state, p)
      if bad:  # skipped: zero update, inner state untouched, count + 1
        jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0), u)
        _assert_trees_equal(optax.apply_updates(p, u), p)
        _assert_trees_equal(new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == int(state.notfinite_count) + 1
        assert int(new_state.total_notfinite) == int(state.total_notfinite) + 1
        assert not bool(new_state.last_finite)
      else:
        assert int(new_state.notfinite_count) == 0
        updates.append(u)
      p, state = optax.apply_updates(p, u), new_state
    return p, state, updates

  p_bad, s_bad, u_bad = run([False, True, True, False, False])
  p_ok, s_ok, u_ok = run([False, False, False])
  # Same program, same finite gradients: bit for bit.
  _assert_trees_equal(u_bad, u_ok)
  _assert_trees_equal(p_bad, p_ok)
  _assert_trees_equal(s_bad.inner_state, s_ok.inner_state)
  assert int(s_bad.total_notfinite) == 2 and int(s_ok.total_notfinite) == 0
  # And the same as QSGD alone (eagerly, so to float32 rounding).
  inner = _qsgd(modulate)
  p, state = params, inner.init(params)
  for i, want in enumerate(u_ok):
    u, state = inner.update(_grads(p, i), state, p)
    # The wrapped step is another program (jitted, fused with FMAs) than
    # this eager one: equal to float32 rounding (2.5e-7 relative measured).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-9), u, want)
    p = optax.apply_updates(p, u)


# ----------------------------------------------------- non-finite parameters


def _theta_params():
  # Tree order a, b. Scope "model" takes a's 3 entries and b[0, 0].
  return {"a": jnp.array([0.3, -0.2, 0.7]),
          "b": jnp.array([[1.1, 0.45, 0.25], [0.6, -0.35, 0.15]])}


def _spread(circuit, scope):
  """Where a non-finite a[1] makes the update non-finite."""
  spread = {"a": np.zeros(3, bool), "b": np.zeros((2, 3), bool)}
  if circuit == "sine":  # the closed form is elementwise
    spread["a"][1] = True
  else:  # the QNode's statevector is NaN: the whole register is
    spread["a"][:] = True  # a's register under every scope
    spread["b"][0, 0] = scope == "model"  # ... which "model" extends into b
  return spread


@pytest.mark.parametrize("circuit", ["paper", "entangled", "sine"])
@pytest.mark.parametrize("scope", SCOPES)
def test_nonfinite_parameter_poisons_its_register(scope, circuit):
  tx = _qsgd(scope=scope, circuit=circuit, decay=0.0)
  # Adam without any weight-decay transform: optax < 0.2.6 applies
  # add_decayed_weights(0.0) as 0 * theta, which is NaN at a NaN theta.
  adam = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(LR))
  grads = _grads(_theta_params(), 0)
  selected = qsgd_optax.circuits.selected_mask(_theta_params(), 4, scope)
  for bad in (np.nan, np.inf, -np.inf):
    params = _with(_theta_params(), "a", 1, bad)
    u, state = tx.update(grads, tx.init(params), params)
    ua, state_a = adam.update(grads, adam.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, _nonfinite(u),
                 _spread(circuit, scope))
    # Adam stays finite, and Adam's state never sees theta: QSGD's state is
    # Adam's, finite.
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ua))
    _assert_trees_equal(state[0], state_a[0])
    for key in u:
      np.testing.assert_array_equal(u[key][~selected[key]],
                                    ua[key][~selected[key]])


def test_apply_if_finite_does_not_guard_parameters():
  """It checks the gradients: a NaN parameter's step is not skipped."""
  tx = optax.apply_if_finite(_qsgd(circuit="sine", decay=0.0), 3)
  params = _with(_theta_params(), "a", 1, np.nan)
  grads = _grads(_theta_params(), 0)  # finite
  u, state = tx.update(grads, tx.init(params), params)
  assert np.isnan(u["a"][1])
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)


@pytest.mark.parametrize("modulate", MODULATES)
def test_quantum_weight_zero_is_adamw_even_for_a_nonfinite_parameter(
    modulate):
  tx = _qsgd(modulate, circuit="sine", weight=0.0, decay=0.0)
  adamw = optax.adamw(LR, weight_decay=0.0)
  params = _with(_theta_params(), "a", 1, np.nan)
  grads = _grads(_theta_params(), 0)
  u, _ = tx.update(grads, tx.init(params), params)
  ua, _ = adamw.update(grads, adamw.init(params), params)
  _assert_trees_equal(u, ua)


# ---------------------------------------------------------- degenerate trees


DEGENERATE = {
    "empty_dict": lambda: {},
    "empty_list": lambda: [],
    "ints_only": lambda: {"step": jnp.array(3, jnp.int32),
                          "ids": jnp.arange(4, dtype=jnp.int32)},
    "zero_size_only": lambda: {"a": jnp.zeros((0,)),
                               "b": jnp.zeros((2, 0, 3), jnp.bfloat16)},
    "scalar": lambda: jnp.array(0.3),
    "bf16_scalar_in_tuple": lambda: (jnp.array(-0.7, jnp.bfloat16),),
}


def _zero_or_cos(x):
  return jnp.cos(x) if jnp.issubdtype(x.dtype, jnp.floating) else (
      jnp.zeros_like(x))


def _has_selected(params):
  return any(m.any() for m in
             jax.tree.leaves(qsgd_optax.circuits.selected_mask(params, 4, "all")))


@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("modulate", MODULATES)
def test_degenerate_tree_init_and_update(name, scope, modulate):
  params = DEGENERATE[name]()
  grads = jax.tree.map(_zero_or_cos, params)
  tx, adamw = _qsgd(modulate, scope), optax.adamw(LR, weight_decay=DECAY)
  state = tx.init(params)
  state_a = adamw.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(state_a)
  u, new_state = tx.update(grads, state, params)
  ua, new_state_a = adamw.update(grads, state_a, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  assert jax.tree.structure(new_state) == jax.tree.structure(new_state_a)
  for x, y, p in zip(jax.tree.leaves(u), jax.tree.leaves(ua),
                     jax.tree.leaves(params)):
    assert x.shape == p.shape and x.dtype == y.dtype
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  if not _has_selected(params):  # nothing for the quantum term: AdamW
    _assert_trees_equal(u, ua)
    _assert_trees_equal(new_state, new_state_a)
  else:  # a scalar: its one entry is its register, and is modulated
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ua)):
      assert x != y


@pytest.mark.parametrize("name", ["empty_dict", "empty_list", "ints_only",
                                  "zero_size_only"])
@pytest.mark.parametrize("scope", SCOPES)
def test_degenerate_tree_under_jit(name, scope):
  """(Scalar leaves under jit: test_battery's mixed tree has one.)"""
  params = DEGENERATE[name]()
  grads = jax.tree.map(_zero_or_cos, params)
  tx = _qsgd("preconditioned", scope)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ue, state_e = tx.update(grads, tx.init(params), params)
  # jit and eager are two programs: equal to float32 rounding (the float
  # values here are Adam's zeros and -lr * decay * p).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  jax.tree.map(close, u, ue)
  jax.tree.map(close, state, state_e)


@pytest.mark.parametrize("modulate", MODULATES)
def test_none_gradient_of_an_int_leaf_is_handled_like_adamw(modulate):
  """optax 0.2.8's Adam rejects None here; QSGD does exactly what it does."""
  params = {"w": jnp.array([0.3, -0.2]), "step": jnp.array(2, jnp.int32)}
  grads = {"w": jnp.array([1.0, -2.0]), "step": None}

  def outcome(tx):
    try:
      u, _ = tx.update(grads, tx.init(params), params)
    except ValueError as e:
      return type(e), str(e).splitlines()[0]
    return jax.tree.structure(u, is_leaf=lambda x: x is None)

  assert outcome(_qsgd(modulate, circuit="sine")) == outcome(
      optax.adamw(LR, weight_decay=DECAY))


@pytest.mark.parametrize("where", ["params", "grads"])
def test_python_float_leaves_are_accepted_like_adamw(where):
  params = {"w": jnp.array([0.3, -0.2]), "t": 0.25}
  grads = {"w": jnp.array([1.0, -2.0]), "t": jnp.array(1.0)}
  if where == "grads":
    params, grads = params | {"t": jnp.array(0.25)}, grads | {"t": 1.0}
  tx = _qsgd(circuit="sine")
  u, _ = tx.update(grads, tx.init(params), params)
  ua, _ = optax.adamw(LR, weight_decay=DECAY).update(
      grads, optax.adamw(LR, weight_decay=DECAY).init(params), params)
  assert jax.tree.structure(u) == jax.tree.structure(ua)
  assert u["t"].dtype == ua["t"].dtype

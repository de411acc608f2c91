"""The shared battery: every circuit x scope x form through optax's habits.

In the spirit of optax's contrib/_common_test.py: convergence inside
lax.scan, compilation counts, inject_hyperparams, MultiSteps, masking,
schedules, dtypes, lax.cond stability, and flax.nnx.Optimizer.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax

from helpers import PROBLEMS, STEPS, converged_loss, mixed_tree, run_scan

CIRCUITS = ("paper", "entangled", "sine")
SCOPES = ("leaf", "model", "all")
COMBOS = list(itertools.product(CIRCUITS, SCOPES))
STATIC = ("n_qubits", "circuit", "scope", "modulate")


# --------------------------------------------------------------- convergence


@pytest.mark.parametrize("circuit, scope", COMBOS, ids=lambda v: v)
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_update_form_converges(problem, circuit, scope):
  """The 'update' form reaches optax's targets (lr 1e-2, helpers.STEPS)."""
  tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope,
                       modulate="update")
  loss = converged_loss(tx, PROBLEMS[problem], STEPS[problem])
  assert float(loss) < 1e-4, float(loss)


@pytest.mark.parametrize("quantum_weight", [0.1, 0.9])
def test_update_form_converges_over_weights(quantum_weight):
  tx = qsgd_optax.qsgd(1e-2, quantum_weight, modulate="update")
  for name, problem in PROBLEMS.items():
    loss = converged_loss(tx, problem, STEPS[name])
    assert float(loss) < 1e-4, (name, float(loss))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_paper_and_preconditioned_forms_converge_at_small_weight(problem):
  for modulate in ("preconditioned",) + (
      ("gradient",) if problem == "rosenbrock" else ()):
    tx = qsgd_optax.qsgd(1e-2, 0.1, modulate=modulate)
    loss = converged_loss(tx, PROBLEMS[problem], STEPS[problem])
    assert float(loss) < 1e-4, (modulate, float(loss))


# Characterisation: the paper's raw-gradient form, measured, pinned.


@pytest.mark.parametrize("quantum_weight", [0.1, 0.5])
def test_paper_form_stalls_on_parabola(quantum_weight):
  """AdamW reaches 0; the paper form stalls where w|sin||g| >= 1 cancels Adam.

  On the parabola sum((p - [1, -1, 1])**2) from [-1, 10, 1], the second
  coordinate has gradient ~22: the term 0.1 * sin * 22 outweighs Adam's
  unit step, so the iterate is pinned near 10 for 30k steps.
  """
  _, adam_loss = run_scan(optax.adamw(1e-2, weight_decay=0.0),
                          PROBLEMS["parabola"], 30_000)
  params, loss = run_scan(qsgd_optax.qsgd(1e-2, quantum_weight),
                          PROBLEMS["parabola"], 30_000)
  assert float(adam_loss) < 1e-6
  assert float(loss) > 100.0
  assert float(params[1]) > 9.0  # stuck next to its start, 10


def test_paper_form_diverges_on_rosenbrock_at_half():
  _, loss = run_scan(qsgd_optax.qsgd(1e-2, 0.5), PROBLEMS["rosenbrock"],
                     30_000)
  assert not np.isfinite(float(loss)) or float(loss) > 1e10


# ---------------------------------------------------------- optax contracts


def _update_once(tx, params, grads):
  return tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("circuit, scope", COMBOS, ids=lambda v: v)
def test_jit_does_not_recompile_and_accepts_extra_args(circuit, scope, rng):
  params = mixed_tree(rng)
  tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p, unused_extra_arg=1.0)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for i in range(3):
    grads = jax.tree.map(lambda x: x * (i + 1.0), params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("modulate", ["gradient", "preconditioned", "update"])
def test_inject_hyperparams_gives_identical_updates(modulate, rng):
  params = mixed_tree(rng)
  kw = dict(circuit="paper", scope="leaf", modulate=modulate, n_qubits=4)
  plain = qsgd_optax.qsgd(1e-2, 0.5, weight_decay=1e-3, **kw)
  injected = optax.inject_hyperparams(qsgd_optax.qsgd, static_args=STATIC)(
      learning_rate=1e-2, quantum_weight=0.5, weight_decay=1e-3, **kw)
  sp, si = plain.init(params), injected.init(params)
  step_p, step_i = jax.jit(plain.update), jax.jit(injected.update)
  for i in range(3):
    grads = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), params)
    up, sp = step_p(grads, sp, params)
    ui, si = step_i(grads, si, params)
    # Equal to float32 rounding: hyperparameters become f32 arrays, so Adam's
    # bias corrections round differently (optax.adamw itself differs by the
    # same ~5e-6 relative under inject_hyperparams).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-5, atol=1e-7), up, ui)
    params = optax.apply_updates(params, up)
  # The quantum weight is a real, changeable hyperparameter.
  si.hyperparams["quantum_weight"] = jnp.asarray(0.0)
  u0, _ = step_i(grads, si, params)
  assert not np.allclose(u0["w"], up["w"])


def test_multisteps_first_update_is_zero_and_accumulates(rng):
  params = mixed_tree(rng)
  tx = optax.MultiSteps(qsgd_optax.qsgd(1e-2, 0.5), every_k_schedule=2)
  state = tx.init(params)
  g1 = jax.tree.map(jnp.cos, params)
  g2 = jax.tree.map(jnp.sin, params)
  u1, state = tx.update(g1, state, params)
  assert all(np.all(x == 0) for x in jax.tree.leaves(u1))
  u2, state = tx.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, _ = _update_once(qsgd_optax.qsgd(1e-2, 0.5), params, mean)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), u2, ref)


def test_masked_and_weight_decay_mask(rng):
  params = mixed_tree(rng)
  grads = jax.tree.map(jnp.cos, params)
  only_w = jax.tree.map(lambda _: False, params) | {"w": True}
  tx = optax.masked(qsgd_optax.qsgd(1e-2, 0.5), only_w)
  u, _ = _update_once(tx, params, grads)
  ref, _ = _update_once(qsgd_optax.qsgd(1e-2, 0.5), {"w": params["w"]},
                        {"w": grads["w"]})
  np.testing.assert_array_equal(u["w"], ref["w"])
  for key in params:
    if key != "w":  # untouched: masked-out updates pass the gradient through
      np.testing.assert_array_equal(u[key], grads[key])
  # mask= restricts weight decay only.
  decay_w = qsgd_optax.qsgd(1e-2, 0.5, weight_decay=0.5, mask=only_w)
  no_decay = qsgd_optax.qsgd(1e-2, 0.5)
  ud, _ = _update_once(decay_w, params, grads)
  un, _ = _update_once(no_decay, params, grads)
  np.testing.assert_allclose(ud["w"] - un["w"], -1e-2 * 0.5 * params["w"],
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(ud["b"], un["b"])


def test_schedule_equals_constant(rng):
  params = mixed_tree(rng)
  a = qsgd_optax.qsgd(optax.constant_schedule(3e-3), 0.5)
  b = qsgd_optax.qsgd(3e-3, 0.5)
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    grads = jax.tree.map(jnp.sin, params)
    ua, sa = a.update(grads, sa, params)
    ub, sb = b.update(grads, sb, params)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    params = optax.apply_updates(params, ua)
  # A schedule really drives the step: lr 1 at step 0, then 0.
  c = qsgd_optax.qsgd(optax.linear_schedule(1.0, 0.0, 1), 0.5)
  u_first, sc = c.update(grads, c.init(params), params)
  u_second, _ = c.update(grads, sc, params)
  assert all(np.any(u != 0) for u in jax.tree.leaves(u_first))
  assert all(np.all(u == 0) for u in jax.tree.leaves(u_second))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32],
                         ids=["bf16", "f32"])
@pytest.mark.parametrize("circuit, scope", COMBOS, ids=lambda v: v)
def test_dtypes_kept_and_state_stable_under_cond(dtype, circuit, scope, rng):
  params = jax.tree.map(lambda x: x.astype(dtype), mixed_tree(rng))
  tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope)
  state = tx.init(params)
  grads = jax.tree.map(jnp.cos, params)

  @jax.jit
  def maybe_step(pred, s):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1],
                        lambda s: s, s)

  state = maybe_step(True, state)
  state = maybe_step(False, state)
  updates, _ = tx.update(grads, state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
    assert np.all(np.isfinite(np.asarray(u, np.float32)))


def test_flax_nnx_optimizer_matches_optax_and_trains():
  from flax import nnx

  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = x @ (jnp.arange(1.0, 9.0)[:, None] / 4) + 0.5
  tx = qsgd_optax.qsgd(3e-2, 0.5, modulate="update")  # on the paper QNode
  model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
  # A detached copy: nnx's State shares the model's variables.
  params0 = {"bias": jnp.array(model.bias[...]),
             "kernel": jnp.array(model.kernel[...])}
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  # Second code path: plain optax on the same parameters.
  def loss_of(params):
    return jnp.mean((x @ params["kernel"] + params["bias"] - y) ** 2)

  params, state = params0, tx.init(params0)
  losses = []
  for _ in range(20):
    losses.append(float(train_step(model, optimizer)))
    grads = jax.grad(loss_of)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  trained = {"bias": model.bias[...], "kernel": model.kernel[...]}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               trained, params)
  losses += [float(train_step(model, optimizer)) for _ in range(280)]
  assert losses[-1] < 1e-6 * losses[0]

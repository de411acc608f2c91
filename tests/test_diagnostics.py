"""quantum_term and term_share against NumPy references and against qsgd minus adamw."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax

from helpers import mixed_tree, np_full_modulation

def test_diagnostics_is_a_public_submodule_outside_the_top_level_contract():
  assert qsgd_optax.diagnostics.quantum_term is not None and "diagnostics" not in qsgd_optax.__all__
  assert not hasattr(qsgd_optax, "quantum_term") and not hasattr(qsgd_optax, "term_share")


CASES = [("paper", "leaf"), ("entangled", "model"), ("sine", "all"), ("paper", "all"),
         ("sine", "leaf")]


@pytest.mark.parametrize("circuit, scope", CASES, ids=lambda v: v)
def test_quantum_term_matches_numpy(circuit, scope, rng):
  params = mixed_tree(rng)
  x = mixed_tree(rng)
  got = qsgd_optax.diagnostics.quantum_term(x, params, 0.7, 4, circuit=circuit, scope=scope)
  leaves, treedef = jax.tree.flatten(params)
  m = np_full_modulation(leaves, 4, circuit, scope)
  want = [0.7 * mi * np.asarray(xi, np.float64) for mi, xi in zip(m, treedef.flatten_up_to(x))]
  assert jax.tree.structure(got) == treedef
  for g, w in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)  # float32 sin vs float64 NumPy


def test_quantum_term_leaves_that_take_no_part_are_zero():
  params = {"w": jnp.linspace(-1.0, 1.0, 6), "i": jnp.arange(3), "c": jnp.ones(2, jnp.complex64),
            "e": jnp.zeros((0,))}
  x = {"w": jnp.ones(6), "i": jnp.ones(3, jnp.int32), "c": jnp.ones(2, jnp.complex64),
       "e": jnp.zeros((0,))}
  got = qsgd_optax.diagnostics.quantum_term(x, params, 0.5, 4, circuit="sine")
  np.testing.assert_array_equal(got["i"], 0)
  np.testing.assert_array_equal(got["c"], 0)
  assert got["c"].dtype == jnp.complex64 and got["e"].shape == (0,)
  np.testing.assert_allclose(got["w"][:4], 0.5 * np.sin(np.pi * np.linspace(-1, 1, 6)[:4]), atol=1e-6)
  np.testing.assert_array_equal(got["w"][4:], 0)
  zero = qsgd_optax.diagnostics.quantum_term(x, params, 0.0, 4)
  np.testing.assert_array_equal(zero["w"], 0)


@pytest.mark.parametrize("modulate", ["gradient", "update", "preconditioned"])
@pytest.mark.parametrize("scope", ["leaf", "all"])
def test_quantum_term_is_qsgd_minus_adamw(modulate, scope, rng):
  """Three steps of qsgd and adamw from the same state: the updates differ by -lr * term."""
  lr, wd = 0.05, 0.01
  params = mixed_tree(rng)
  kw = dict(quantum_weight=0.7, n_qubits=4, circuit="paper", scope=scope)
  qsgd = qsgd_optax.qsgd(lr, weight_decay=wd, modulate=modulate, **kw)
  adamw = optax.adamw(lr, weight_decay=wd)
  adam = optax.scale_by_adam()
  state = qsgd.init(params)
  for _ in range(3):
    grads = mixed_tree(rng)
    u_q, new_state = qsgd.update(grads, state, params)
    u_a, _ = adamw.update(grads, state, params)  # the same chain of states
    direction, adam_state = adam.update(grads, state[0], params)
    x = {"gradient": grads, "update": direction}.get(modulate)
    if x is None:
      nu_hat = optax.tree.bias_correction(adam_state.nu, 0.999, adam_state.count)
      x = jax.tree.map(lambda g, v: g / (jnp.sqrt(v) + 1e-8), grads, nu_hat)
    term = qsgd_optax.diagnostics.quantum_term(x, params, **kw)
    for a, b, t in zip(jax.tree.leaves(u_q), jax.tree.leaves(u_a), jax.tree.leaves(term)):
      # u_q - u_a loses ~1 float32 ulp of |u| to cancellation: tolerance 4 ulp of the largest.
      atol = 4 * np.finfo(np.float32).eps * float(np.max(np.abs(a), initial=1.0))
      np.testing.assert_allclose(a - b, -lr * np.asarray(t), rtol=1e-5, atol=atol)
    state = new_state
    params = optax.apply_updates(params, u_q)


def _np_share(term, updates, masks):
  t = np.concatenate([np.abs(np.asarray(a)).reshape(-1)[np.asarray(m).reshape(-1)]
                      for a, m in zip(term, masks)])
  u = np.concatenate([np.abs(np.asarray(a)).reshape(-1)[np.asarray(m).reshape(-1)]
                      for a, m in zip(updates, masks)])
  r = t[u > 0] / u[u > 0]
  norm = lambda leaves: np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in leaves))
  return {"median": np.median(r), "max": np.max(r), "global": norm(term) / norm(updates)}


@pytest.mark.parametrize("scope", ["leaf", "model", "all"])
def test_term_share_matches_numpy(scope, rng):
  params = mixed_tree(rng)
  updates = mixed_tree(rng)
  term = qsgd_optax.diagnostics.quantum_term(mixed_tree(rng), params, 0.01, 4, circuit="sine", scope=scope)
  masks = jax.tree.leaves(qsgd_optax.circuits.selected_mask(params, 4, scope))
  want = _np_share(jax.tree.leaves(term), jax.tree.leaves(updates), masks)
  got = qsgd_optax.diagnostics.term_share(term, updates, params, 4, scope=scope)
  jitted = jax.jit(lambda t, u, p: qsgd_optax.diagnostics.term_share(t, u, p, 4, scope=scope))(term, updates, params)
  for key in ("median", "max", "global"):
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5)
    np.testing.assert_allclose(float(jitted[key]), want[key], rtol=1e-5)


def test_term_share_skips_zero_updates_and_reports_nan_when_empty():
  params = jnp.zeros(4)
  share = qsgd_optax.diagnostics.term_share(jnp.array([0.1, 0.2, 0.0, 0.0]), jnp.array([1.0, 0.0, 0.0, 0.0]),
                                params, 4)
  assert float(share["median"]) == pytest.approx(0.1) and float(share["max"]) == pytest.approx(0.1)
  empty = qsgd_optax.diagnostics.term_share({"i": jnp.arange(3)}, {"i": jnp.arange(3)}, {"i": jnp.arange(3)})
  assert all(np.isnan(float(v)) for v in empty.values())


@pytest.mark.parametrize("call, match", [
    (lambda: qsgd_optax.diagnostics.term_share(jnp.ones(3), jnp.ones(3), jnp.ones(3), scope="row"), "scope"),
    (lambda: qsgd_optax.diagnostics.term_share(jnp.ones(3), jnp.ones(3), jnp.ones(3), 0), "n_qubits"),
    (lambda: qsgd_optax.diagnostics.quantum_term(jnp.ones(3), jnp.ones(3), float("nan")), "quantum_weight"),
    (lambda: qsgd_optax.diagnostics.quantum_term(jnp.ones(3), jnp.ones(3), circuit="cosine"), "circuit"),
])
def test_bad_arguments_name_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_term_share_on_sharded_leaves_matches_one_device():
  """4 CPU devices in a subprocess: Explicit and Auto axes, every scope, eager and jitted."""
  script = Path(__file__).parent / "scripts" / "sharded_share.py"
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(report) == 12
  for case, error in report.items():
    assert error < 1e-6, case  # another program (sharded reductions): a tolerance, measured 0

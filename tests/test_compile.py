"""Compiled structure of the quantum term: leaves of one shape share kernels.

XLA:CPU compiles each distinct fused computation once. The term must not
make the fused loop of every parameter array different (what made compile
time grow with the number of arrays, bench/RESULTS.md "Compile time at many
parameter arrays"): the count of distinct fused computations of a jitted
step is checked to be the same for 24 and for 48 arrays.
"""

import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax
from qsgd_optax import _scope

from helpers import NumpyQSGD

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _hlo import distinct_fusions  # noqa: E402  pylint: disable=g-import-not-at-top


def _tree(pairs, rng):
  return {f"layer_{i:02d}": {"kernel": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32)}
          for i in range(pairs)}


def _fusions(tx, pairs, rng):
  params, grads = _tree(pairs, rng), _tree(pairs, rng)
  state = tx.init(params)

  @partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return distinct_fusions(step.lower(params, state, grads).compile().as_text())


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="counts XLA:CPU's fused computations")
@pytest.mark.parametrize("circuit, modulate", [("paper", "gradient"), ("paper", "update"),
                                               ("sine", "gradient")])
def test_leaves_of_one_shape_share_kernels(circuit, modulate, rng):
  tx = qsgd_optax.qsgd(1e-3, 0.5, weight_decay=1e-4, circuit=circuit, modulate=modulate)
  # 24 and 48 arrays (XLA:CPU fuses a concatenation of the heads of at
  # most 8 arrays into one kernel, so both counts stay above 8).
  total_24, distinct_24 = _fusions(tx, 12, rng)
  total_48, distinct_48 = _fusions(tx, 24, rng)
  assert total_48 > total_24  # the parser sees the per-array fusions ...
  assert distinct_48 == distinct_24  # ... and they are the same computation
  adamw_24, _ = _fusions(optax.adamw(1e-3, weight_decay=1e-4), 12, rng)
  adamw_48, adamw_distinct = _fusions(optax.adamw(1e-3, weight_decay=1e-4), 24, rng)
  assert adamw_distinct < distinct_48 <= adamw_distinct + 40  # the circuit, once
  # Kernels run per step: 24 more arrays add fewer than 24 kernels to what
  # they add to AdamW's step (the heads are read 8 arrays per kernel; 0.4.1
  # gave every array's head a kernel: 36 here).
  assert (total_48 - total_24) - (adamw_48 - adamw_24) < 24


@pytest.mark.parametrize("count", [1, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("n", [1, 4])
def test_stack_heads_is_stack(count, n, rng):
  heads = [jnp.asarray(rng.normal(size=(n,)), jnp.float32) for _ in range(count)]
  got = jax.jit(_scope.stack_heads)(heads)
  # Concatenation and padding copy entries: exact on any CPU.
  np.testing.assert_array_equal(got, np.stack([np.asarray(h) for h in heads]))


def test_row_picks_a_run_of_entries(rng):
  flat = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  for start, count in [(0, 1), (5, 1), (11, 1), (0, 4), (8, 4), (3, 2)]:
    got = jax.jit(lambda v, s=start, c=count: _scope.row(v, s, c))(flat)
    np.testing.assert_array_equal(got, np.asarray(flat)[start:start + count])


@pytest.mark.parametrize("n_qubits", [1, 3])
def test_one_and_odd_qubit_registers_match_numpy(n_qubits, rng):
  # One entry per array (a two-entry index, first entry kept) and heads
  # that end inside a row; leaves smaller than the register included.
  shapes = [(8, 12), (12,), (2,), (), (3, 1, 5)]
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  grads = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  kw = dict(quantum_weight=0.7, n_qubits=n_qubits, circuit="paper")
  tx = qsgd_optax.qsgd(0.05, **kw)
  ref = NumpyQSGD(0.05, **kw)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  want = ref.step([np.asarray(p) for p in params], [np.asarray(g) for g in grads])
  updates, _ = step(params, state, grads)
  for p, u, w in zip(params, optax.apply_updates(params, updates), want):
    np.testing.assert_allclose(u, w, rtol=2e-5, atol=2e-6)

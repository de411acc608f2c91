"""Property-based tests: QSGD on random pytrees, shapes and dtypes.

Hypothesis draws parameter trees (nested dicts, lists and tuples of 1-6
leaves; scalars and 1-3 dims with 0-9 entries, so leaves smaller than a
register and zero-size arrays occur; float32 and bfloat16 leaves with some
int32 leaves, whose gradients are zeros as optax expects) and one
(circuit, scope, modulate, n_qubits) per example, and checks:

(a) finite inputs give finite updates;
(b) updates have the params' structure, shapes and (float) dtypes, and the
    state keeps its dtypes;
(c) quantum_weight=0 is optax.adamw with the same weight decay;
(d) on the first step only the coordinates ``selected_mask`` marks differ
    from AdamW, and there the update equals a closed form.

Profiles: "default" (25 examples, derandomized so CI is reproducible) and
"long" (500 examples), chosen with ``QSGD_HYPOTHESIS_PROFILE=long``.

Cost: XLA compiles a QNode once per register batch shape, ~2 s on a 2-core
CPU, while the rest of an eager update is cheap. The optimizers are cached,
the updates run eagerly (a jit would recompile the whole step, QNode
included, for every new tree), leaves hold at most 9 entries, and every
optimizer of one (circuit, n_qubits) shares one resolved QNode (see
``_circuit``).
"""

import functools
import math
import os

import hypothesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qsgd_optax

# The project's only property-based tests, so the profiles live here.
hypothesis.settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True,
    print_blob=True,
)
hypothesis.settings.register_profile(
    "long", max_examples=500, deadline=None, print_blob=True,
)
hypothesis.settings.load_profile(
    os.environ.get("QSGD_HYPOTHESIS_PROFILE", "default")
)

CIRCUITS = ("paper", "entangled", "sine")
SCOPES = ("leaf", "model", "all")
MODULATES = ("gradient", "preconditioned", "update")
N_QUBITS = (1, 4)
LR = 0.1
EPS = 1e-8  # qsgd's and adamw's default
MAX_ENTRIES = 9  # per leaf


# ------------------------------------------------------------------ helpers


@functools.cache
def _circuit(name: str, n_qubits: int):
  """The ``circuit`` argument for ``name``, built once per register size.

  ``"sine"`` is passed by name (it is elementwise, which changes the "all"
  code path). ``"paper"`` and ``"entangled"`` are resolved once with the
  public ``resolve_circuit`` and the resulting callable is shared by every
  optimizer: by name, each optimizer would build its own QNode and XLA would
  compile it again for every register batch. The updates are identical
  (``test_shared_circuit_equals_circuit_by_name``).
  """
  if name == "sine":
    return name
  return qsgd_optax.circuits.resolve_circuit(name, n_qubits)


@functools.cache
def _qsgd(circuit, scope, modulate, n_qubits, quantum_weight, weight_decay):
  return qsgd_optax.qsgd(
      LR, quantum_weight, n_qubits, weight_decay=weight_decay,
      circuit=_circuit(circuit, n_qubits), scope=scope, modulate=modulate,
  )


@functools.cache
def _adamw(weight_decay):
  return optax.adamw(LR, weight_decay=weight_decay)


def _first_update(tx, params, grads):
  return tx.update(grads, tx.init(params), params)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


# --------------------------------------------------------------- strategies


@st.composite
def shapes(draw):
  """Rank 0-3, each dim 0-9, at most ``MAX_ENTRIES`` entries in all."""
  shape, size = [], 1
  for _ in range(draw(st.integers(0, 3))):
    dim = draw(st.integers(0, MAX_ENTRIES // size if size else MAX_ENTRIES))
    shape.append(dim)
    size *= dim
  return tuple(shape)


def _f32_floats(bound):
  bound = float(np.float32(bound))  # hypothesis wants exact float32 bounds
  return st.floats(-bound, bound, width=32)


# Parameters stay in [-4, 4], where the float32 QNode matches sin(pi theta)
# to 5e-6 (test_circuits). Gradients reach 1e12 (|g|**2 stays finite, so
# the closed form holds); test (a) also draws up to 1e30, where it overflows.
_THETA = _f32_floats(4)
_GRAD = st.one_of(_f32_floats(10), _f32_floats(1e12))
_WIDE_GRAD = _f32_floats(1e30)


@st.composite
def leaves(draw, grad_elements):
  dtype = draw(st.sampled_from(["float32", "float32", "bfloat16", "int32"]))
  shape = draw(shapes())
  if dtype == "int32":
    p = draw(hnp.arrays(np.int32, shape, elements=st.integers(-100, 100)))
    return jnp.asarray(p), jnp.zeros(shape, jnp.int32)
  p = draw(hnp.arrays(np.float32, shape, elements=_THETA))
  g = draw(hnp.arrays(np.float32, shape, elements=grad_elements))
  return jnp.asarray(p, dtype), jnp.asarray(g, dtype)


@st.composite
def _nest(draw, items, depth=0):
  """A random nesting of ``items`` in dicts, lists and tuples."""
  if len(items) == 1 and (depth >= 3 or draw(st.booleans())):
    return items[0]
  if depth >= 3:
    groups = [[x] for x in items]
  elif len(items) == 1:
    groups = [items]
  else:
    cuts = draw(st.sets(st.integers(1, len(items) - 1)))
    bounds = [0, *sorted(cuts), len(items)]
    groups = [items[a:b] for a, b in zip(bounds, bounds[1:])]
  children = [draw(_nest(g, depth + 1)) for g in groups]
  kind = draw(st.sampled_from(["dict", "list", "tuple"]))
  if kind == "dict":
    return {f"k{i}": c for i, c in enumerate(children)}
  return list(children) if kind == "list" else tuple(children)


@st.composite
def trees(draw, grad_elements=_GRAD):
  """``(params, grads)``: one tree of 1-6 (param, grad) pairs, split apart."""
  pairs = draw(st.lists(leaves(grad_elements), min_size=1, max_size=6))
  nested = draw(_nest(list(range(len(pairs)))))
  params = jax.tree.map(lambda i: pairs[i][0], nested)
  grads = jax.tree.map(lambda i: pairs[i][1], nested)
  return params, grads


configs = st.tuples(
    st.sampled_from(CIRCUITS), st.sampled_from(SCOPES),
    st.sampled_from(MODULATES), st.sampled_from(N_QUBITS),
)
quantum_weights = st.sampled_from([0.1, 0.5, 0.9])
weight_decays = st.sampled_from([0.0, 1e-2])


# ------------------------------------------------------------------- tests


def test_shared_circuit_equals_circuit_by_name(rng):
  """What ``_circuit`` relies on: a resolved circuit acts as its name.

  Passed as ``circuit=``, the Modulator is a callable (traced in the step,
  not the cached jit of the name): another program, equal to float32
  rounding.
  """
  params = [jnp.asarray(rng.uniform(-2, 2, (2, 3)), jnp.float32)]
  grads = jax.tree.map(jnp.cos, params)
  by_name = qsgd_optax.qsgd(LR, 0.5, 4, circuit="paper", scope="leaf")
  shared = qsgd_optax.qsgd(LR, 0.5, 4, circuit=_circuit("paper", 4),
                           scope="leaf")
  u, _ = _first_update(by_name, params, grads)
  v, _ = _first_update(shared, params, grads)
  np.testing.assert_allclose(u[0], v[0], rtol=1e-6, atol=1e-9)
  assert np.any(u[0] != _first_update(_adamw(0.0), params, grads)[0][0])


@given(tree=trees(_WIDE_GRAD), config=configs, quantum_weight=quantum_weights,
       weight_decay=weight_decays)
def test_finite_inputs_give_finite_updates_of_the_params_type(
    tree, config, quantum_weight, weight_decay):
  """(a) and (b), over two steps so that the state is not the initial one."""
  params, grads = tree
  tx = _qsgd(*config, quantum_weight, weight_decay)
  adamw = _adamw(weight_decay)
  state = tx.init(params)
  state_dtypes = _dtypes(state)
  adamw_updates, adamw_state = _first_update(adamw, params, grads)
  # What optax itself gives an int leaf after apply_updates differs across
  # optax versions (0.2.5 keeps the float32 sum): QSGD's params follow it.
  want_params = _dtypes(optax.apply_updates(params, adamw_updates))
  for step in range(2):
    updates, state = tx.update(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape
      assert np.all(np.isfinite(np.asarray(u, np.float32))), (step, u)
      if _is_float(p):
        assert u.dtype == p.dtype
    # Float leaves keep their state dtypes. optax.adamw turns the first
    # moment of an int32 leaf (and its update) into float32; QSGD's state
    # follows optax exactly.
    assert _dtypes(state) == _dtypes(adamw_state)
    for got, init, p in zip(jax.tree.leaves(_dtypes(state[0].mu)),
                            jax.tree.leaves(state_dtypes[0].mu),
                            jax.tree.leaves(params)):
      assert got == init or not _is_float(p)
    for got, init, p in zip(jax.tree.leaves(_dtypes(state[0].nu)),
                            jax.tree.leaves(state_dtypes[0].nu),
                            jax.tree.leaves(params)):
      assert got == init or not _is_float(p)  # optax 0.2.5: int nu -> f32
    params = optax.apply_updates(params, updates)
    assert _dtypes(params) == want_params
    for got, p in zip(jax.tree.leaves(_dtypes(params)),
                      jax.tree.leaves(tree[0])):
      assert got == p.dtype or not _is_float(p)  # float leaves keep theirs


@given(tree=trees(), config=configs, weight_decay=weight_decays)
def test_quantum_weight_zero_is_adamw(tree, config, weight_decay):
  """(c): the quantum term vanishes; what is left is optax.adamw."""
  params, grads = tree
  u, state = _first_update(_qsgd(*config, 0.0, weight_decay), params, grads)
  ua, state_a = _first_update(_adamw(weight_decay), params, grads)
  assert jax.tree.structure(u) == jax.tree.structure(ua)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ua)):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=1e-6, atol=0)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state_a)):
    np.testing.assert_array_equal(x, y)


@given(tree=trees(), config=configs, quantum_weight=quantum_weights,
       weight_decay=weight_decays)
def test_first_step_changes_only_selected_coordinates_by_the_closed_form(
    tree, config, quantum_weight, weight_decay):
  """(d): first step, against AdamW and a float64 closed form.

  On the first step Adam's direction is m_hat / (sqrt(v_hat) + eps), i.e.
  g / (|g| + eps), and the paper and sine circuits give sin(pi theta). So on
  a selected coordinate the update is -lr * (d + w * sin(pi theta) * x +
  decay * theta) with d = g / (|g| + eps) and x = g ("gradient") or d
  ("preconditioned", "update"). Everywhere else it is AdamW's, bit for bit.
  """
  circuit, scope, modulate, n_qubits = config
  params, grads = tree
  u, _ = _first_update(_qsgd(*config, quantum_weight, weight_decay),
                       params, grads)
  ua, _ = _first_update(_adamw(weight_decay), params, grads)
  masks = qsgd_optax.circuits.selected_mask(params, n_qubits, scope)
  for p, g, got, adamw, mask in zip(
      *map(jax.tree.leaves, (params, grads, u, ua, masks))):
    assert got.dtype == adamw.dtype
    got, adamw = np.asarray(got, np.float64), np.asarray(adamw, np.float64)
    np.testing.assert_array_equal(got[~mask], adamw[~mask])
    if circuit == "entangled" or not mask.any():
      continue  # entangled: M mixes the register; see test_transform.
    theta = np.asarray(p, np.float64)[mask]
    g = np.asarray(g, np.float64)[mask]
    d = g / (np.abs(g) + EPS)
    x = g if modulate == "gradient" else d
    term = quantum_weight * np.sin(np.pi * theta) * x
    want = -LR * (d + term + weight_decay * theta)
    # Relative: float32 Adam's bias corrections round to ~7e-6; bfloat16
    # Adam runs in bfloat16 (~2%). Absolute: the float32 QNode's M is within
    # 5e-6 of sin(pi theta) (pi * theta rounds), times |w x|, which can be
    # large where sin(pi theta) = 0.
    scale = LR * (np.abs(d) + np.abs(term) + weight_decay * np.abs(theta))
    rtol = 4e-2 if p.dtype == jnp.bfloat16 else 2e-5
    tol = rtol * scale + 5e-6 * LR * quantum_weight * np.abs(x)
    np.testing.assert_array_less(np.abs(got[mask] - want), tol + 1e-30)


def test_strategies_reach_the_edge_cases():
  """The strategies do produce what the module docstring promises."""
  seen = set()

  @hypothesis.settings(max_examples=200, derandomize=True, database=None)
  @given(tree=trees())
  def collect(tree):
    params, _ = tree
    for p in jax.tree.leaves(params):
      size = math.prod(p.shape)
      seen.add(("dtype", str(p.dtype)))
      seen.add(("rank", p.ndim))
      seen.add(("empty", size == 0))
      seen.add(("below_register", 0 < size < 4))
    seen.add(("n_leaves", len(jax.tree.leaves(params))))
    seen.add(("top", type(params).__name__))

  collect()
  for item in [("dtype", "float32"), ("dtype", "bfloat16"), ("dtype", "int32"),
               ("rank", 0), ("rank", 3), ("empty", True),
               ("below_register", True), ("n_leaves", 1), ("n_leaves", 6),
               ("top", "dict"), ("top", "list"), ("top", "tuple")]:
    assert item in seen, item

"""The built-in circuits against closed forms, and the QNode inside XLA."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qsgd_optax
from qsgd_optax import _circuits
from qsgd_optax import circuits

from helpers import np_modulation


@pytest.mark.parametrize("circuit", ["paper", "entangled", "sine"])
@pytest.mark.parametrize("n_qubits", [1, 3, 4, 6])
def test_circuit_matches_closed_form(circuit, n_qubits, rng):
  theta = rng.uniform(-3, 3, size=(17, n_qubits)).astype(np.float32)
  mod = qsgd_optax.circuits.resolve_circuit(circuit, n_qubits)
  got = np.asarray(jax.jit(mod)(theta), np.float64)
  want = np_modulation(theta, circuit)
  # float32 statevector: pi * theta rounds to ~3e-7 relative.
  np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


def test_paper_qnode_equals_sine_circuit(rng):
  """The closed form is the oracle of the paper's QNode (PAPER.md sec. 2)."""
  theta = rng.normal(size=(64, 4)).astype(np.float32)
  paper = qsgd_optax.circuits.resolve_circuit("paper", 4)(theta)
  sine = qsgd_optax.circuits.resolve_circuit("sine", 4)(theta)
  np.testing.assert_allclose(paper, sine, atol=3e-6)


@pytest.mark.parametrize("readout", ["paper", "entangled"])
@pytest.mark.parametrize("n_qubits", [1, 4])
def test_vmapped_qnode_equals_parameter_broadcasting_in_the_paper_order(readout, n_qubits, rng):
  """The built-in QNode (vmap over registers, Hadamards queued first, angles read
  by a masked sum) against a second PennyLane code path: one broadcast QNode with
  the gates in the paper's per-wire order H, RY, RZ and the angles sliced."""
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  @qml.qnode(qml.device("default.qubit", wires=n_qubits), interface="jax",
             diff_method="backprop")
  def broadcast(y):  # y: [B, n]
    for i in range(n_qubits):
      qml.Hadamard(i)
      qml.RY(jnp.pi * y[..., i], i)
      qml.RZ(jnp.pi * y[..., i], i)
    for a in range(n_qubits - 1):
      qml.CNOT([a, a + 1])
    if readout == "paper":
      obs = [qml.PauliZ(0)] + [qml.PauliZ(a) @ qml.PauliZ(a + 1) for a in range(n_qubits - 1)]
    else:
      obs = [qml.PauliZ(w) for w in range(n_qubits)]
    return [qml.expval(o) for o in obs]

  theta = rng.uniform(-3, 3, size=(33, n_qubits)).astype(np.float32)
  y = _circuits.reduce_period2(jnp.asarray(theta))
  want = -np.stack([np.asarray(e) for e in jax.jit(broadcast)(y)], -1).reshape(33, n_qubits)
  got = np.asarray(jax.jit(circuits.make_qnode(n_qubits, readout))(theta))
  # float32 statevectors, the same gates applied in another order and batching
  # (measured: up to 9e-7 apart at 4 qubits).
  np.testing.assert_allclose(got, want, atol=3e-6, rtol=0)


def test_register_entry_is_the_slice_and_keeps_nans_in_place():
  y = jnp.asarray([[0.5, -0.0, np.nan, 3.0], [np.inf, -1.0, 2.0, 1e-30]], jnp.float32)
  for i in range(4):
    got = np.asarray(jax.jit(_circuits.register_entry, static_argnums=1)(y, i))
    want = np.asarray(y[:, i])
    # One entry plus zeros: equal as floats, NaN where the entry is NaN only
    # (-0.0 + 0 is +0.0, equal as a float).
    np.testing.assert_array_equal(got, want)
  assert _circuits.register_entry(jnp.arange(4.0), 2).shape == ()


def test_entangled_differs_from_paper(rng):
  theta = rng.uniform(0.1, 0.4, size=(5, 4)).astype(np.float32)
  paper = np.asarray(qsgd_optax.circuits.resolve_circuit("paper", 4)(theta))
  ent = np.asarray(qsgd_optax.circuits.resolve_circuit("entangled", 4)(theta))
  np.testing.assert_allclose(paper[:, 0], ent[:, 0], atol=3e-6)
  assert np.all(np.abs(paper[:, 1:] - ent[:, 1:]) > 1e-3)


def test_sinpi_accuracy_and_periodicity():
  theta = np.linspace(-40, 40, 200_001).astype(np.float32)
  got = np.asarray(circuits.sinpi(jnp.asarray(theta)), np.float64)
  want = np.sin(np.pi * theta.astype(np.float64))
  assert np.max(np.abs(got - want)) < 2e-7
  # Exact zeros at integers, exact +-1 at half integers.
  ints = np.arange(-5, 6, dtype=np.float32)
  assert np.all(np.asarray(circuits.sinpi(ints)) == 0)
  halves = ints + np.float32(0.5)
  np.testing.assert_allclose(circuits.sinpi(halves),
                             np.cos(np.pi * ints), atol=1e-7)


@pytest.mark.parametrize("circuit", ["paper", "sine"])
def test_gradient_through_circuit(circuit, rng):
  theta = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
  mod = qsgd_optax.circuits.resolve_circuit(circuit, 4)
  grad = jax.grad(lambda t: jnp.sum(mod(t)))(jnp.asarray(theta))
  np.testing.assert_allclose(grad, np.pi * np.cos(np.pi * theta), atol=2e-5)


def test_batched_leading_axes_and_empty_batch(rng):
  mod = qsgd_optax.circuits.resolve_circuit("paper", 4)
  theta = rng.uniform(-1, 1, size=(2, 3, 4)).astype(np.float32)
  out = mod(theta)
  assert out.shape == (2, 3, 4)
  np.testing.assert_allclose(out, np.sin(np.pi * theta), atol=3e-6)
  assert mod(np.zeros((0, 4), np.float32)).shape == (0, 4)


def _sub_jaxprs(params):
  """The jaxprs nested in an equation's params (jit, scan, cond, ...)."""
  core = jax.extend.core
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, core.Jaxpr):
        yield v


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _sub_jaxprs(eqn.params):
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


def test_make_qnode_is_a_valid_circuit_argument(rng):
  import pennylane as qml
  circuit = circuits.make_qnode(4)
  assert isinstance(circuit.qnode, qml.QNode)
  assert circuit.qnode.interface == "jax"
  assert circuit.qnode.diff_method == "backprop"
  theta = rng.uniform(-2, 2, size=(6, 4)).astype(np.float32)
  # Signs applied: the result is the modulation itself, not raw <Z> values.
  np.testing.assert_allclose(circuit(theta), np.sin(np.pi * theta), atol=2e-6)
  ent = circuits.make_qnode(4, readout="entangled")
  np.testing.assert_allclose(ent(theta), np_modulation(theta, "entangled"),
                             atol=2e-6)
  # Usable as circuit=, and the same as the built-in name.
  params = {"w": jnp.asarray(theta)}
  grads = {"w": jnp.asarray(np.cos(theta))}
  got = qsgd_optax.qsgd(1e-2, circuit=circuit)
  want = qsgd_optax.qsgd(1e-2, circuit="paper")
  u, _ = got.update(grads, got.init(params), params)
  v, _ = want.update(grads, want.init(params), params)
  # One cached circuit behind both: the very same jitted program.
  np.testing.assert_array_equal(u["w"], v["w"])
  assert circuits.make_qnode(4) is circuit  # built once, shared


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_qubits=4, readout="bogus"), "readout must be one of"),
        (dict(n_qubits=0), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits="4"), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits=True), "n_qubits must be a Python int >= 1"),
        (dict(n_qubits=13), "n_qubits must be at most 12"),
    ],
    ids=["readout", "zero", "str", "bool", "too-many"],
)
def test_make_qnode_validates_its_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    circuits.make_qnode(**kwargs)


def test_qnode_circuit_rejects_wrong_shapes_and_wrong_wire_count():
  circuit = circuits.make_qnode(3)
  with pytest.raises(ValueError, match=r"theta must have shape \(batch, n_qubits=3\)"):
    circuit(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="theta must be a real"):
    circuit(np.zeros((2, 3), np.complex64))
  with pytest.raises(ValueError, match="has 3 wires but n_qubits=4"):
    qsgd_optax.qsgd(1e-3, n_qubits=4, circuit=circuit)


def test_public_helpers_validate_their_arguments():
  mod = circuits.resolve_circuit("paper", 4)
  with pytest.raises(ValueError, match="last axis of size n_qubits=4"):
    mod(jnp.float32(0.5))  # 0-d theta
  with pytest.raises(ValueError, match="last axis of size n_qubits=4"):
    mod(np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="n_qubits must be a Python int"):
    circuits.resolve_circuit("sine", 0)
  with pytest.raises(ValueError, match="circuit must be one of"):
    circuits.resolve_circuit("bogus", 4)
  with pytest.raises(ValueError, match=r"scope must be one of \('leaf'"):
    circuits.selected_mask({"w": np.zeros(3)}, 4, "bogus")
  with pytest.raises(ValueError, match="n_qubits must be a Python int"):
    circuits.selected_mask({"w": np.zeros(3)}, -1, "leaf")
  with pytest.raises(ValueError, match="theta must be a real"):
    circuits.sinpi(jnp.ones(3, jnp.complex64))


@pytest.mark.parametrize("circuit", ["paper", "entangled"])
def test_qnode_equals_closed_form_at_any_magnitude(circuit):
  """The angle is built from theta reduced exactly mod 2 (2-periodic readouts).

  Without the reduction, float32 pi * theta drifts: 1.9e-4 off at |theta| ~
  1e3 and 0.19 at 1e6. With it the error is that of a float32 statevector
  at |theta| <= 1 (a rounded angle pi * y, |y| <= 1, and complex64 gate
  products: <= 1e-6 measured), at every magnitude.
  """
  mod = circuits.resolve_circuit(circuit, 4)
  # float32 spacing is 1 at 1e7 (integers only); 3e6 keeps quarter steps.
  for scale in (1.0, 1e3, 1e5, 1e6, 3e6, 1e7):
    theta = np.linspace(-scale, scale, 4000, dtype=np.float32).reshape(-1, 4)
    got = np.asarray(mod(theta), np.float64)
    want = np_modulation(theta.astype(np.float64), circuit)
    np.testing.assert_allclose(got, want, atol=1.5e-6, rtol=0,
                               err_msg=f"|theta| <= {scale:g}")


def test_top_level_namespace_is_the_contract():
  assert set(qsgd_optax.__all__) == {"circuits", "qsgd", "scale_by_qsgd",
                                     "superpose"}
  for name in ("CIRCUIT_NAMES", "MAX_QNODE_QUBITS", "SCOPE_NAMES",
               "MODULATE_NAMES", "resolve_circuit", "selected_mask"):
    with pytest.warns(DeprecationWarning, match=f"qsgd_optax.circuits.{name}"):
      assert getattr(qsgd_optax, name) is getattr(circuits, name)
  # make_qnode changed meaning (it returns a circuit now): no silent alias.
  with pytest.raises(AttributeError, match="circuits.make_qnode"):
    qsgd_optax.make_qnode  # noqa: B018
  with pytest.raises(AttributeError, match="no attribute 'bogus'"):
    qsgd_optax.bogus  # noqa: B018


def test_user_callable_circuit(rng):
  calls = []

  def cosine(theta):
    calls.append(theta.shape)
    return jnp.cos(theta)

  theta = rng.normal(size=(5, 4)).astype(np.float32)
  mod = qsgd_optax.circuits.resolve_circuit(cosine, 4)
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
  bound = qsgd_optax.circuits.MAX_QNODE_QUBITS
  with pytest.raises(ValueError, match=f"n_qubits must be at most {bound}"):
    qsgd_optax.qsgd(1e-3, n_qubits=bound + 1, circuit="paper")
  # The closed form has no such bound.
  qsgd_optax.qsgd(1e-3, n_qubits=bound + 1, circuit="sine")


@pytest.mark.parametrize("n_qubits", [8, 12])
def test_scope_all_temporaries_are_bounded(n_qubits):
  """Registers are simulated in chunks: temporaries do not grow with 2**n.

  One 1 MiB leaf (512 x 512 float32). Simulated whole, its statevectors
  needed 131 MiB of temporaries at n=8 and 1.37 GiB at n=12; in chunks of
  MAX_CHUNK_AMPLITUDES (8 MiB of complex64) they take about 18 MiB at any
  n (a few chunk-sized buffers plus leaf-sized ones). 32 MiB leaves room
  for another XLA version's buffer assignment.
  """
  x = jnp.zeros((512, 512), jnp.float32)
  tx = qsgd_optax.qsgd(1e-3, n_qubits=n_qubits, circuit="paper", scope="all")
  compiled = jax.jit(tx.update).lower(x, tx.init(x), x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 32 * 2**20, temp / 2**20


def test_chunked_evaluation_equals_whole(monkeypatch, rng):
  """Chunks (equal ones, or a padded last one) give the same modulation."""
  mod = circuits.resolve_circuit("paper", 4)
  thetas = {b: rng.uniform(-2, 2, size=(b, 4)).astype(np.float32)
            for b in (36, 37)}
  whole = {b: np.asarray(mod(t)) for b, t in thetas.items()}
  monkeypatch.setattr(_circuits, "MAX_CHUNK_AMPLITUDES", 16 * 8)  # 8 registers
  assert _circuits.chunk_registers(4) == 8
  assert _circuits._chunking(36, 8) == (6, 6)  # 6 equal chunks, no padding
  assert _circuits._chunking(37, 8) == (5, 8)  # 37 is prime: pad to 40
  # No divisor near: the fewest equal chunks, padded by < count registers.
  assert _circuits._chunking(65537, 65536) == (2, 32769)
  for b, theta in thetas.items():
    chunked = np.asarray(mod(theta))
    # Another program (a lax.map over chunks): equal to float32 rounding.
    np.testing.assert_allclose(chunked, whole[b], atol=1e-6, rtol=0)
    np.testing.assert_allclose(chunked, np.sin(np.pi * theta), atol=1.5e-6)


_WARNINGS_SCRIPT = """
import json, re, warnings
import jax, jax.numpy as jnp
from qsgd_optax import _circuits
circuit = _circuits.make_qnode(3)
theta = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
with warnings.catch_warnings(record=True) as raw:
  warnings.simplefilter("always")
  jax.jit(lambda t: circuit.qnode(t)).lower(theta)
with warnings.catch_warnings(record=True) as quiet:
  warnings.simplefilter("always")
  jax.jit(lambda t: circuit(t)).lower(theta + 1)
filters = _circuits.EXPECTED_QNODE_WARNINGS
print(json.dumps({
    "raw": [[i for i, (c, m) in enumerate(filters)
             if issubclass(w.category, c) and re.search(m, str(w.message))]
            + [w.category.__name__ + ": " + str(w.message)[:200]] for w in raw],
    "quiet": [str(w.message)[:200] for w in quiet],
    "filters": len(filters),
}))
"""


def test_every_warning_filter_still_matches_on_this_stack():
  """The QNode's expected warnings are filtered, and only those.

  A filter that no longer matches anything (a new jax or PennyLane fixed
  the warning or reworded it) fails here rather than silently filtering
  nothing; a new warning from the raw QNode fails here too. In a fresh
  process: some of these warnings are raised once per process (at the
  first trace that touches a deprecated jax name).
  """
  import json
  import os
  import subprocess
  import sys

  env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _WARNINGS_SCRIPT], capture_output=True,
                        text=True, timeout=300, check=False, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  matched = set()
  for *hits, text in report["raw"]:
    assert hits, f"unexpected warning from the QNode: {text}"
    matched.update(hits)
  unmatched = sorted(set(range(report["filters"])) - matched)
  assert not unmatched, ("filters that match nothing on this stack: "
                         f"{[_circuits.EXPECTED_QNODE_WARNINGS[i] for i in unmatched]}")
  assert report["quiet"] == []  # our own calls are quiet


def test_a_callable_circuit_is_traced_afresh_not_frozen():
  """A callable may hold state (an nnx.Module, a closure): no cached trace."""
  import dataclasses

  class Scaled:
    def __init__(self):
      self.k = 1.0

    def __call__(self, theta):
      return self.k * jnp.sin(theta)

  circuit = Scaled()
  params = jnp.array([0.5, 0.25, 0.1, 0.3])
  grads = jnp.ones(4)

  def term():
    tx = qsgd_optax.scale_by_qsgd(quantum_weight=0.5, circuit=circuit)
    u, _ = tx.update(grads, tx.init(params), params)
    adam, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params), params)
    return np.asarray(u - adam)

  np.testing.assert_allclose(term(), 0.5 * np.sin(params), rtol=1e-5, atol=1e-6)
  circuit.k = 10.0
  np.testing.assert_allclose(term(), 5.0 * np.sin(params), rtol=1e-5, atol=1e-6)

  @dataclasses.dataclass(frozen=True)
  class Power:  # equal by `name` only: two different circuits
    name: str
    p: float = dataclasses.field(compare=False)

    def __call__(self, theta):
      return jnp.sin(theta) ** self.p

  for p in (1.0, 3.0):
    tx = qsgd_optax.scale_by_qsgd(quantum_weight=1.0, circuit=Power("pow", p))
    u, _ = tx.update(grads, tx.init(params), params)
    adam, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params), params)
    # (u - adam: a difference next to Adam's unit step, hence the atol)
    np.testing.assert_allclose(u - adam, np.sin(params) ** p, rtol=1e-5, atol=1e-6)

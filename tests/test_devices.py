"""The paper's circuit on other PennyLane devices: make_device_qnode.

lightning.qubit ships with PennyLane; qiskit.aer needs the devices extra
(pip install "qsgd_optax[devices]"), and its tests skip without it.
"""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import np_modulation

import qsgd_optax
from qsgd_optax import circuits

qml = pytest.importorskip("pennylane")
pytest.importorskip("pennylane_lightning", reason='lightning.qubit: pip install "qsgd_optax[devices]"')

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _has(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a blocked or half-installed module
    return False


needs_qiskit = pytest.mark.skipif(
    not (_has("pennylane_qiskit") and _has("qiskit_aer")),
    reason='qiskit.aer needs the devices extra: pip install "qsgd_optax[devices]"')

HOST_DEVICES = [
    pytest.param("lightning.qubit", id="lightning"),
    pytest.param("qiskit.aer", id="aer", marks=needs_qiskit),
]


def _device(name: str, wires=4, **kwargs):
  if name == "qiskit.aer":
    kwargs.setdefault("method", "statevector")  # exact expectation values
  return qml.device(name, wires=wires, **kwargs)


def _has_callback(fn, *args) -> bool:
  return "callback" in str(jax.make_jaxpr(fn)(*args))


# A grid over two periods, plus magnitudes where an unreduced float32 angle
# would be off (the reduction theta - 2 round(theta / 2) is exact).
_GRID = np.concatenate([
    np.linspace(-2.0, 2.0, 48, dtype=np.float32),
    np.float32([1e3 + 0.25, -1e5 - 0.5, 3e6 + 0.75, 1.0 / 6, 0.5, -0.5, 1.0, 0.0]),
    np.linspace(0.05, 0.95, 8, dtype=np.float32),
]).reshape(-1, 4)


@pytest.mark.parametrize("readout", ["paper", "entangled"])
@pytest.mark.parametrize("name", HOST_DEVICES)
def test_host_device_equals_closed_form(name, readout):
  circuit = circuits.make_device_qnode(_device(name), 4, readout)
  assert circuit.qnode.interface == "jax-jit" and circuit.qnode.diff_method is None
  assert circuit.shots is None and circuit.n_qubits == 4 and circuit.readout == readout
  got = np.asarray(jax.jit(circuit)(_GRID), np.float64)
  want = np_modulation(_GRID.astype(np.float64), readout)
  # Measured: 1.6e-7 (float32 angles, float64 statevectors on the host).
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # It is a host callback inside the program (and only one per call).
  assert _has_callback(circuit, _GRID)


def test_default_qubit_stays_traced_into_xla():
  circuit = circuits.make_device_qnode(qml.device("default.qubit", wires=4), 4)
  assert circuit.qnode.interface == "jax" and circuit.qnode.diff_method == "backprop"
  assert not _has_callback(circuit, _GRID)
  np.testing.assert_allclose(circuit(_GRID), np_modulation(_GRID.astype(np.float64), "paper"), atol=1.5e-6)
  # Differentiable as circuit="paper" is.
  theta = jnp.asarray(_GRID[:3])
  grad = jax.grad(lambda t: jnp.sum(circuit(t)))(theta)
  np.testing.assert_allclose(grad, np.pi * np.cos(np.pi * _GRID[:3]), atol=2e-5)


def test_wire_labels_and_wireless_devices():
  labelled = circuits.make_device_qnode(qml.device("lightning.qubit", wires=["a", "b", "c"]), 3)
  wireless = circuits.make_device_qnode(qml.device("default.qubit"), 3, "entangled")
  theta = _GRID[:, :3]
  want = {r: np_modulation(theta.astype(np.float64), r) for r in ("paper", "entangled")}
  np.testing.assert_allclose(labelled(theta), want["paper"], atol=1e-6)
  np.testing.assert_allclose(wireless(theta), want["entangled"], atol=1.5e-6)
  one = circuits.make_device_qnode(qml.device("lightning.qubit", wires=1), 1)
  np.testing.assert_allclose(one(_GRID[:, :1]), np_modulation(_GRID[:, :1].astype(np.float64), "paper"), atol=1e-6)


_PARAMS = {"b": jnp.linspace(0.1, 0.4, 4), "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}


def _loss(p):
  return jnp.sum((p["w"] - 0.3) ** 2) + jnp.sum(jnp.sin(3 * p["b"]))


def _run(tx, steps=20):
  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = _PARAMS, tx.init(_PARAMS)
  for _ in range(steps):
    p, s = step(p, s)
  return p


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", HOST_DEVICES)
def test_twenty_qsgd_steps_equal_the_default_qubit_run(name):
  circuit = circuits.make_device_qnode(_device(name), 4)
  got = _run(qsgd_optax.qsgd(0.05, 0.5, circuit=circuit))
  want = _run(qsgd_optax.qsgd(0.05, 0.5, circuit="paper"))
  # Different programs (a host statevector in float64 against a traced
  # complex64 one): the modulations differ by ~1e-7, the parameters after
  # 20 steps of lr 0.05 by 3e-7 (measured).
  assert _max_diff(got, want) <= 1e-5


def test_in_optax_chain_superpose_and_inject_hyperparams():
  circuit = circuits.make_device_qnode(qml.device("lightning.qubit", wires=4), 4, "entangled")
  for make in (
      lambda c: optax.chain(optax.clip_by_global_norm(1.0), qsgd_optax.qsgd(0.05, 0.5, circuit=c)),
      lambda c: qsgd_optax.superpose(optax.adam(0.05), 0.5, circuit=c),
      lambda c: optax.inject_hyperparams(qsgd_optax.qsgd, static_args=("n_qubits", "circuit", "scope", "modulate"))(
          learning_rate=0.05, quantum_weight=0.5, circuit=c),
  ):
    got, want = _run(make(circuit), steps=5), _run(make("entangled"), steps=5)
    assert _max_diff(got, want) <= 1e-5  # different programs, as above


def test_gradient_through_an_update_requests_none_of_the_device():
  """The angles enter the device through stop_gradient: zero, not an error."""
  circuit = circuits.make_device_qnode(qml.device("lightning.qubit", wires=4), 4)
  theta = jnp.asarray(_GRID[:2])
  np.testing.assert_array_equal(jax.grad(lambda t: jnp.sum(circuit(t)))(theta), 0.0)
  tx = qsgd_optax.scale_by_qsgd(circuit=circuit)
  state = tx.init(_PARAMS)
  meta = jax.jit(jax.grad(lambda p: _loss(jax.tree.map(
      lambda a, b: a - b, p, tx.update(jax.grad(_loss)(p), state, p)[0]))))(_PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(meta))


def test_flax_nnx_optimizer_step():
  nnx = pytest.importorskip("flax.nnx")
  circuit = circuits.make_device_qnode(qml.device("lightning.qubit", wires=4), 4)
  x = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
  y = jnp.sum(x, axis=1, keepdims=True)
  losses = {}
  for label, c in (("device", circuit), ("traced", "paper")):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, qsgd_optax.qsgd(0.05, 0.5, circuit=c, modulate="update"), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    losses[label] = [float(train_step(model, optimizer)) for _ in range(10)]
  assert losses["device"][-1] < losses["device"][0]
  np.testing.assert_allclose(losses["device"], losses["traced"], rtol=1e-5, atol=1e-6)


_THETA = np.float32([[0.25, 1 / 6, -0.4, 0.7], [0.9, -0.05, 0.5, -1.0 / 3]])


@pytest.mark.parametrize("readout", ["paper", "entangled"])
def test_shot_noise_converges_to_the_exact_value(readout):
  """Each readout is a mean of +-1 samples: standard error <= 1/sqrt(shots)."""
  want = np_modulation(_THETA.astype(np.float64), readout)
  errors = {}
  for shots in (100, 1_000, 10_000, 100_000):
    circuit = circuits.make_device_qnode(
        qml.device("lightning.qubit", wires=4, seed=1234), 4, readout, shots=shots)
    assert circuit.shots == shots
    got = np.asarray(jax.jit(circuit)(_THETA), np.float64)
    assert np.all(np.abs(got) <= 1.0)
    errors[shots] = float(np.max(np.abs(got - want)))
    assert errors[shots] <= 5 / np.sqrt(shots), errors  # five standard errors
  assert errors[100_000] < errors[100]


def test_shot_noise_is_fresh_per_step_and_seeded_by_the_device():
  def estimates(seed, calls=3):
    device = qml.device("lightning.qubit", wires=4, seed=seed)
    f = jax.jit(circuits.make_device_qnode(device, 4, shots=200))
    return np.stack([np.asarray(f(_THETA)) for _ in range(calls)])

  first, again, other = estimates(7), estimates(7), estimates(8)
  assert not np.array_equal(first[0], first[1])  # new noise at every call
  np.testing.assert_array_equal(first, again)   # the same sequence per seed
  assert not np.array_equal(first, other)


def test_default_qubit_with_shots_samples_on_the_host():
  circuit = circuits.make_device_qnode(qml.device("default.qubit", wires=4, seed=3), 4, shots=4000)
  assert circuit.qnode.interface == "jax-jit" and _has_callback(circuit, _THETA)
  got = np.asarray(jax.jit(circuit)(_THETA))
  assert np.max(np.abs(got - np_modulation(_THETA, "paper"))) <= 5 / np.sqrt(4000)
  one = np.asarray(circuit(_THETA[:1]))  # one register, unbroadcast
  assert one.shape == (1, 4) and np.all(np.abs(one) <= 1)


@needs_qiskit
def test_aer_shots_seed_simulator_repeats_the_estimate():
  device = qml.device("qiskit.aer", wires=4, seed_simulator=11)  # aer_simulator backend
  f = jax.jit(circuits.make_device_qnode(device, 4, shots=2000))
  a, b = np.asarray(f(_THETA)), np.asarray(f(_THETA))
  np.testing.assert_array_equal(a, b)  # every execution seeded alike
  assert np.max(np.abs(a - np_modulation(_THETA, "paper"))) <= 5 / np.sqrt(2000)


class _SamplesOnly(qml.devices.Device):
  """A device that declares samples as its only measurement."""

  name = "samples.only"

  def __init__(self, wires):
    super().__init__(wires=wires)
    self.capabilities = qml.devices.capabilities.DeviceCapabilities(
        measurement_processes={"SampleMP": []})

  def execute(self, circuits, execution_config=None):
    raise NotImplementedError


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: "lightning.qubit", r"device must be a PennyLane device with n_qubits=4 wires"),
        (lambda: qml.device("lightning.qubit", wires=3),
         r"device: lightning.qubit has 3 wires \[0, 1, 2\] but n_qubits=4"),
        (lambda: _SamplesOnly(wires=4), r"device: samples.only does not measure expectation values"),
        (lambda: qml.device("default.qutrit", wires=4),
         r"device: default.qutrit cannot run the paper circuit: it lacks Hadamard, RY, RZ, CNOT, PauliZ"),
        (lambda: qml.device("default.gaussian", wires=4),
         r"device: default.gaussian cannot run the paper circuit: it lacks Hadamard, RY, RZ, CNOT, PauliZ"),
        pytest.param(lambda: qml.device("qiskit.aer", wires=4),
                     r"estimates expectation values from samples even without shots; create it "
                     r"with method='statevector'", marks=needs_qiskit),
    ],
    ids=["not-a-device", "wires", "no-expval", "gates", "cv-device", "aer-sampling"],
)
def test_bad_devices_are_rejected_at_construction(make, match):
  with pytest.raises(ValueError, match=match) as e:
    circuits.make_device_qnode(make(), 4)
  # Each message names the argument and what is accepted.
  assert str(e.value).startswith("device")
  assert "a PennyLane device with n_qubits=4 wires" in str(e.value) or "method='statevector'" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_qubits=0), "n_qubits must be a Python int >= 1"),
        (dict(readout="bogus"), "readout must be one of"),
        (dict(shots=0), r"shots must be None .* or a Python int >= 1, got 0"),
        (dict(shots=True), r"shots must be None .* got True"),
        (dict(shots=1.5), r"shots must be None .* got 1.5"),
    ],
    ids=["n_qubits", "readout", "zero-shots", "bool-shots", "float-shots"],
)
def test_arguments_are_validated(kwargs, match):
  kwargs = {"n_qubits": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    circuits.make_device_qnode(qml.device("lightning.qubit", wires=4), **kwargs)


def test_register_size_must_match_the_optimizer():
  circuit = circuits.make_device_qnode(qml.device("lightning.qubit", wires=3), 3)
  with pytest.raises(ValueError, match=r"has 3 wires but n_qubits=4.*make_device_qnode\(device, 4\)"):
    qsgd_optax.qsgd(1e-3, n_qubits=4, circuit=circuit)


def test_circuits_page_device_examples_run():
  """The device examples of docs/circuits.md (code-block fences) run."""
  blocks = re.findall(r"```\{code-block\} python\n(.*?)```", (DOCS / "circuits.md").read_text(), re.S)
  assert blocks
  for block in blocks:
    if "qiskit" in block and not (_has("pennylane_qiskit") and _has("qiskit_aer")):
      continue
    ns: dict = {}
    exec(compile(block, "circuits.md", "exec"), ns)  # pylint: disable=exec-used
    assert isinstance(ns["circuit"], circuits.QNodeCircuit)

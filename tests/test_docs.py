"""The documentation's code runs: every Python block of the guide pages."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _blocks(page: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_getting_started_runs_and_trains():
  blocks = _blocks("getting_started.md")
  assert len(blocks) == 5
  ns: dict = {}
  for block in blocks:  # one namespace, in page order, as a reader runs them
    exec(compile(block, "getting_started.md", "exec"), ns)  # pylint: disable=exec-used
  # The measured share: the first step's Adam direction is sign(g) = 1, so on the first
  # 4 entries of each leaf |term| / |update| = 0.5 |sin(pi theta)| / (1 + 0.5 sin(pi theta)).
  theta = np.concatenate([np.linspace(-1, 1, 12)[:4], np.full(4, 0.25)])
  m = 0.5 * np.sin(np.pi * theta)
  np.testing.assert_allclose(float(ns["share"]["max"]), np.max(np.abs(m) / np.abs(1 + m)), rtol=1e-4)
  # The nnx step trains.
  x = np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8)
  y = x.sum(axis=1, keepdims=True) / 8
  losses = [float(ns["train_step"](ns["model"], ns["optimizer"], x, y)) for _ in range(50)]
  assert losses[-1] < losses[0]
  # The optax step runs, and the injected weight was set.
  params, state = ns["params"], ns["state"]
  assert float(state.hyperparams["quantum_weight"]) == pytest.approx(0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  new, _ = ns["tx"].update(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(new))


def test_circuits_page_runs():
  blocks = _blocks("circuits.md")
  assert len(blocks) == 3
  ns: dict = {}
  circuits = []
  for block in blocks:
    exec(compile(block, "circuits.md", "exec"), ns)  # pylint: disable=exec-used
    if "my_circuit" in ns and ns["my_circuit"] not in circuits:
      circuits.append(ns["my_circuit"])
  assert len(circuits) == 2  # broadcast, then vmapped: the same circuit
  theta = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  for circuit in circuits:
    np.testing.assert_allclose(circuit(theta), np.cos(np.pi * np.asarray(theta)), atol=1e-6)
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  u, _ = ns["tx"].update(params, ns["tx"].init(params), params)
  assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_devices_page_runs_on_however_many_devices():
  blocks = _blocks("devices_and_hosts.md")
  assert len(blocks) == 1
  exec(compile(blocks[0], "devices_and_hosts.md", "exec"), {})  # pylint: disable=exec-used

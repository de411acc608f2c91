"""Run QSGD on params sharded over 8 CPU devices; print a JSON report.

Executed in a subprocess by tests/test_sharding.py, because the number of
host devices is fixed when JAX starts.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qsgd_optax  # noqa: E402


def main(mode: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  axis_type = (jax.sharding.AxisType.Explicit if mode == "explicit"
               else jax.sharding.AxisType.Auto)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  rng = np.random.default_rng(0)
  specs = {"w": P("data", "model"), "e": P(None, "data"), "v": P("data"),
           "r": P()}
  shapes = {"w": (16, 6), "e": (3, 8), "v": (8,), "r": (5,)}
  host = {k: rng.uniform(-1, 1, size=s).astype(np.float32)
          for k, s in shapes.items()}
  grads_host = {k: np.cos(v) for k, v in host.items()}
  put = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                      for k, v in tree.items()}
  report = {}
  for circuit, scope in [("paper", "leaf"), ("paper", "model"),
                         ("paper", "all"), ("sine", "all")]:
    tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope,
                         weight_decay=1e-3)
    params, grads = put(host), put(grads_host)
    with jax.set_mesh(mesh) if mode == "explicit" else _null():
      state = jax.jit(tx.init)(params)
      updates, state = jax.jit(tx.update)(grads, state, params)
    ref_u, _ = tx.update(grads_host, tx.init(host), host)
    adam_state = state[0]
    case = {}
    for k in host:
      want = NamedSharding(mesh, specs[k])
      case[k] = {
          "updates": updates[k].sharding.is_equivalent_to(want, len(shapes[k])),
          "mu": adam_state.mu[k].sharding.is_equivalent_to(want,
                                                           len(shapes[k])),
          "nu": adam_state.nu[k].sharding.is_equivalent_to(want,
                                                           len(shapes[k])),
          "shards": len(updates[k].addressable_shards),
          "max_abs_err": float(np.max(np.abs(np.asarray(updates[k])
                                             - np.asarray(ref_u[k])))),
      }
    report[f"{circuit}/{scope}"] = case
  return report


class _null:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


if __name__ == "__main__":
  modes = sys.argv[1:] or ["auto"]
  print(json.dumps({mode: main(mode) for mode in modes}))

"""Run QSGD on params sharded over 8 CPU devices; print a JSON report.

Executed in a subprocess by tests/test_sharding.py, because the number of
host devices is fixed when JAX starts. Modes: ``auto`` (Auto mesh axes),
``explicit`` (Explicit axes inside ``jax.set_mesh``) and ``explicit-bare``
(Explicit axes, the default of ``jax.make_mesh``, with no mesh context: the
way ``optax.adamw`` is used without one) and ``mixed`` ("data" Auto,
"model" Explicit, no context). Each mode runs the update jitted and
eagerly.
"""

import contextlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qsgd_optax  # noqa: E402

CASES = [("paper", "leaf"), ("paper", "model"), ("paper", "all"),
         ("sine", "all")]
# "w": both dims sharded, rows of 6 (registers span rows under "all");
# "e": last dim sharded 2 per device (registers straddle shards);
# "s": last dim sharded 8 per device (two whole registers per shard);
# "m": both dims sharded, 16 per device on the last (whole registers);
# "v": a sharded vector; "r": replicated.
SPECS = {"w": P("data", "model"), "e": P(None, "data"), "s": P(None, "data"),
         "m": P("data", "model"), "v": P("data"), "r": P()}
SHAPES = {"w": (16, 6), "e": (3, 8), "s": (2, 32), "m": (8, 32), "v": (8,),
          "r": (5,)}
AXIS_TYPES = {"auto": ("Auto", "Auto"), "explicit": ("Explicit", "Explicit"),
              "explicit-bare": ("Explicit", "Explicit"),
              "mixed": ("Auto", "Explicit")}
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")


def _collectives(hlo: str) -> list[str]:
  return [c for c in COLLECTIVES if c in hlo]


def main(mode: str) -> dict:
  assert jax.device_count() == 8, jax.devices()
  axis_types = tuple(getattr(jax.sharding.AxisType, t) for t in AXIS_TYPES[mode])
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=axis_types)
  context = (jax.set_mesh(mesh) if mode == "explicit"
             else contextlib.nullcontext())
  rng = np.random.default_rng(0)
  host = {k: rng.uniform(-1, 1, size=s).astype(np.float32)
          for k, s in SHAPES.items()}
  grads_host = {k: np.cos(v) for k, v in host.items()}
  put = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
                      for k, v in tree.items()}
  report = {}
  for circuit, scope in CASES:
    tx = qsgd_optax.qsgd(1e-2, 0.5, circuit=circuit, scope=scope,
                         weight_decay=1e-3)
    params, grads = put(host), put(grads_host)
    ref_u, _ = tx.update(grads_host, tx.init(host), host)
    with context:
      # init eagerly: jitting init needs a mesh context under Explicit axes,
      # for optax.adamw as for QSGD.
      state = tx.init(params)
      runs = {"jit": jax.jit(tx.update)(grads, state, params),
              "eager": tx.update(grads, state, params)}
      # The collectives of the "s" and "m" leaves alone: registers that fit
      # in a shard are simulated where they are.
      case = {}
      for k in ("s", "m"):
        only = {k: params[k]}
        hlo = jax.jit(tx.update).lower(only, tx.init(only), only).compile().as_text()
        case[f"collectives_{k}"] = _collectives(hlo)
    for how, (updates, new_state) in runs.items():
      adam_state = new_state[0]
      for k in host:
        want = NamedSharding(mesh, SPECS[k])
        ndim = len(SHAPES[k])
        case[f"{how}/{k}"] = {
            "updates": updates[k].sharding.is_equivalent_to(want, ndim),
            "mu": adam_state.mu[k].sharding.is_equivalent_to(want, ndim),
            "nu": adam_state.nu[k].sharding.is_equivalent_to(want, ndim),
            "shards": len(updates[k].addressable_shards),
            "max_abs_err": float(np.max(np.abs(np.asarray(updates[k])
                                               - np.asarray(ref_u[k])))),
        }
    report[f"{circuit}/{scope}"] = case
  if mode.startswith("explicit"):
    report["replicated_update"] = _replicated_update(mesh, host, grads_host, put)
  return report


def _replicated_update(mesh, host, grads_host, put):
  """An inner transformation whose update is replicated while the gradient is
  sharded (modulate="gradient"): the term's select then mixes shardings."""
  replicate = optax.stateless(lambda u, p: jax.tree.map(
      lambda x: jax.sharding.reshard(x, NamedSharding(mesh, P())), u))
  tx = qsgd_optax.superpose(optax.chain(optax.scale_by_adam(), replicate), 0.5,
                            modulate="gradient")
  # The reference: the same values without the resharding (single device).
  ref_tx = qsgd_optax.superpose(optax.scale_by_adam(), 0.5, modulate="gradient")
  ref_u, _ = ref_tx.update(grads_host, ref_tx.init(host), host)
  params, grads = put(host), put(grads_host)
  with jax.set_mesh(mesh):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return max(float(np.max(np.abs(np.asarray(updates[k]) - np.asarray(ref_u[k]))))
             for k in host)


if __name__ == "__main__":
  modes = sys.argv[1:] or ["auto"]
  print(json.dumps({mode: main(mode) for mode in modes}))

"""quantum_term and term_share on 4 CPU devices (Explicit and Auto mesh axes) vs one device; prints JSON."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import qsgd_optax  # noqa: E402

rng = np.random.default_rng(0)
host = {"a": rng.normal(size=(8, 6)), "b": rng.normal(size=(4, 8)), "c": rng.normal(size=(3,))}
host = {k: v.astype(np.float32) for k, v in host.items()}
specs = {"a": P("x", None), "b": P(None, "y"), "c": P()}


def share(p, u, scope):
  return qsgd_optax.diagnostics.term_share(qsgd_optax.diagnostics.quantum_term(p, p, 0.3, 4, circuit="sine", scope=scope), u, p, 4,
                               scope=scope)


report = {}
for kind in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(kind, kind))
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    updates = {k: jax.device_put(v * 0.1 + 1, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    for scope in ("leaf", "model", "all"):
      ref = share({k: jnp.asarray(v) for k, v in host.items()},
                  {k: jnp.asarray(v * 0.1 + 1) for k, v in host.items()}, scope)
      for mode, fn in (("eager", share), ("jit", jax.jit(share, static_argnums=2))):
        out = fn(params, updates, scope)
        report[f"{kind.name}/{scope}/{mode}"] = max(abs(float(out[k]) - float(ref[k])) for k in ref)
print(json.dumps(report))

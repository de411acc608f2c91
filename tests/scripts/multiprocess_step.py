"""One process of a 2-process QSGD run on a global 2 x 2 CPU mesh.

Started twice by tests/test_multiprocess.py (process ids 0 and 1, a free
loopback port): each process has 2 CPU devices, ``jax.distributed`` joins
them over gloo collectives, the parameters are global arrays sharded over
both processes, and every process prints one JSON line comparing the
gathered updates with a single-process NumPy-input reference.
"""

import contextlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qsgd_optax  # noqa: E402

SPECS = {"w": P("data", "model"), "e": P(None, "data"), "s": P(None, "model"),
         "v": P("data"), "r": P()}
SHAPES = {"w": (4, 6), "e": (3, 4), "s": (2, 16), "v": (4,), "r": (3,)}
CASES = [(scope, modulate) for scope in ("leaf", "model", "all")
         for modulate in ("gradient", "update")]
MODES = ("auto", "explicit", "explicit-bare")


def main(process_id: int, port: int) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)  # the same values in both processes
  host = {k: rng.uniform(-1, 1, size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads_host = {k: np.cos(3 * v) for k, v in host.items()}
  report = {}
  refs = {}  # the single-process reference of each case, the same in every mode
  for scope, modulate in CASES:
    tx = qsgd_optax.qsgd(1e-2, 0.5, circuit="paper", scope=scope, modulate=modulate,
                         weight_decay=1e-3)
    refs[scope, modulate], _ = tx.update(grads_host, tx.init(host), host)
  for mode in MODES:
    axis = jax.sharding.AxisType.Auto if mode == "auto" else jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis, axis))

    def put(tree):
      return {k: jax.make_array_from_callback(
          v.shape, NamedSharding(mesh, SPECS[k]), lambda index, v=v: v[index])
              for k, v in tree.items()}

    context = jax.set_mesh(mesh) if mode == "explicit" else contextlib.nullcontext()
    for scope, modulate in CASES:
      tx = qsgd_optax.qsgd(1e-2, 0.5, circuit="paper", scope=scope, modulate=modulate,
                           weight_decay=1e-3)
      params, grads = put(host), put(grads_host)
      with context:
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
      ref = refs[scope, modulate]
      for k in host:
        want = NamedSharding(mesh, SPECS[k])
        got = multihost_utils.process_allgather(updates[k], tiled=True)
        report[f"{mode} {scope}/{modulate} {k}"] = {
            "kept": updates[k].sharding.is_equivalent_to(want, len(SHAPES[k]))
                    and state[0].mu[k].sharding.is_equivalent_to(want, len(SHAPES[k])),
            "global": list(updates[k].shape) == list(SHAPES[k]),
            "max_abs_err": float(np.max(np.abs(np.asarray(got) - np.asarray(ref[k])))),
        }
  print("REPORT " + json.dumps({"process": process_id, "cases": report}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))

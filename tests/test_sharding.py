"""QSGD on parameters sharded over 8 (simulated) CPU devices.

The device count is fixed when JAX starts, so the sharded run happens in a
subprocess (``tests/scripts/sharded_step.py``) that prints a JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "sharded_step.py"
MODES = {"auto", "explicit", "explicit-bare", "mixed"}
LEAVES = {"w", "e", "s", "m", "v", "r"}


def _run_modes(groups, tmp_path, timeout=600):
  """The script once per group of modes, the groups concurrently; merged reports.

  Output goes to files, so that neither process waits on a full pipe.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = []
  try:
    for i, group in enumerate(groups):
      out, err = open(tmp_path / f"{i}.out", "w"), open(tmp_path / f"{i}.err", "w")
      with out, err:
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *group], stdout=out,
                                      stderr=err, text=True, env=env))
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  reports = {}
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, (tmp_path / f"{i}.err").read_text()[-4000:]
    reports.update(json.loads((tmp_path / f"{i}.out").read_text().strip().splitlines()[-1]))
  return reports


def test_sharded_update_keeps_sharding_and_matches_unsharded(tmp_path):
  modes = sorted(MODES)  # two processes of two modes each, side by side
  reports = _run_modes([modes[:2], modes[2:]], tmp_path)
  # Auto axes; Explicit axes inside jax.set_mesh; Explicit axes without any
  # mesh context (jax.make_mesh's default, where optax.adamw works too); one
  # Auto and one Explicit axis.
  assert set(reports) == MODES
  for mode, report in reports.items():
    if mode.startswith("explicit"):
      # A replicated inner update with a sharded gradient (modulate="gradient")
      # runs and equals the single-device reference.
      assert report.pop("replicated_update") < 1e-6, mode
    assert set(report) == {"paper/leaf", "paper/model", "paper/all",
                           "sine/all"}
    for case, leaves in report.items():
      collectives = {k: leaves.pop(f"collectives_{k}") for k in ("s", "m")}
      assert set(leaves) == {f"{how}/{k}" for how in ("jit", "eager")
                             for k in LEAVES}, case
      for name, leaf in leaves.items():
        where = f"{mode} {case} {name}"
        # Updates and both Adam moments keep the parameter's sharding ...
        assert leaf["updates"] and leaf["mu"] and leaf["nu"], where
        assert leaf["shards"] == 8, where
        # ... and the values equal the single-device reference (another
        # program: float32 rounding of the same ops).
        assert leaf["max_abs_err"] < 1e-6, where
      if case in ("paper/all", "sine/all"):
        # A leaf whose shards hold whole registers is simulated shard by
        # shard: no collective at all in its update. "s" is sharded on
        # "data", Auto in the auto and mixed modes, where the partitioner
        # decides (it gathers for the QNode); "m" is sharded on both axes,
        # and under mixed axes the Auto one stays with the partitioner
        # rather than being gathered.
        if mode in ("explicit", "explicit-bare"):
          assert collectives["s"] == [], (mode, case, collectives)
        if mode != "auto":
          assert collectives["m"] == [], (mode, case, collectives)


_AUTO_ALL = """
import json, jax, jax.numpy as jnp, numpy as np, optax, qsgd_optax
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 4
mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
specs = {"a": P("x"), "b": P("x"), "c": P()}
shapes = {"a": (512, 64), "b": (256, 128), "c": (5, 7)}
params = {k: jax.device_put(jnp.asarray(rng.uniform(-2, 2, shapes[k]), jnp.float32),
                            NamedSharding(mesh, specs[k])) for k in shapes}
grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
tx = qsgd_optax.qsgd(1e-3, 0.5, circuit="paper", scope="all")
state = tx.init(params)

@jax.jit
def step(params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state

text = step.lower(params, state, grads).compile().as_text()
new, _ = step(params, state, grads)
print(json.dumps({"specs": {k: str(new[k].sharding.spec) for k in new},
                  "all_to_all": text.count(" all-to-all("), "all_gather": text.count(" all-gather(")}))
"""


def test_scope_all_keeps_auto_shardings_of_several_leaves_and_moves_nothing(tmp_path):
  """Several leaves, some sharded on an Auto axis (invisible while tracing): every leaf keeps its
  sharding, and the compiled step has no all-to-all or all-gather (the circuit runs where the
  registers are)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", _AUTO_ALL], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["specs"] == {"a": str(jax_spec("x")), "b": str(jax_spec("x")), "c": str(jax_spec())}
  assert report["all_to_all"] == 0 and report["all_gather"] == 0, report


def jax_spec(*names):
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  return PartitionSpec(*names)

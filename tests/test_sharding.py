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


def test_sharded_update_keeps_sharding_and_matches_unsharded():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(SCRIPT), *sorted(MODES)],
                        capture_output=True, text=True, env=env, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  reports = json.loads(proc.stdout.strip().splitlines()[-1])
  # Auto axes; Explicit axes inside jax.set_mesh; Explicit axes without any
  # mesh context (jax.make_mesh's default, where optax.adamw works too); one
  # Auto and one Explicit axis.
  assert set(reports) == MODES
  for mode, report in reports.items():
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

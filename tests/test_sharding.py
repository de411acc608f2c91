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

"""bench/checkpoint_cost.py --smoke end to end: the verified and the plain saves both round-trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_cost.py"), "--smoke", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
  assert run["arrays"] > 20 and run["bytes"] > 0
  for key in ("save_plain", "save_verified", "restore_plain", "restore_verified", "digest"):
    assert len(run["times_s"][key]) == 2 and all(t > 0 for t in run["times_s"][key]), key
  assert "with digests s" in proc.stdout

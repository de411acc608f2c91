"""QSGD across two processes (jax.distributed on 127.0.0.1) equals one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "multiprocess_step.py"
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one():
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT_S)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, out, err in outs:
    assert code == 0, err[-4000:]
  reports = [json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:])
             for _, out, _ in outs]
  assert [r["process"] for r in reports] == [0, 1]
  cases = reports[0]["cases"]
  # 3 mesh modes (Auto; Explicit in set_mesh; Explicit, no context) x
  # 3 scopes x 2 forms x 5 leaves.
  assert len(cases) == 3 * 6 * 5
  for name, case in cases.items():
    assert case["kept"] and case["global"], name
    # Another program than the single-process reference: float32 rounding.
    assert case["max_abs_err"] < 1e-6, (name, case["max_abs_err"])
  assert reports[1]["cases"] == cases  # both processes see the same global result

"""What users install: the core without Flax, the extras named when missing."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=300, check=False, cwd=ROOT / "tests")


def test_core_works_without_flax_or_any_extra():
  proc = _run("""
      import sys
      for name in ("flax", "orbax", "tqdm", "matplotlib", "gguf", "tokenizers"):
        sys.modules[name] = None  # importing any of them now raises ImportError
      import jax, jax.numpy as jnp, qsgd_optax
      tx = qsgd_optax.qsgd(1e-2, 0.5)
      p = {"w": jnp.linspace(-1.0, 1.0, 6)}
      u, _ = jax.jit(tx.update)(p, tx.init(p), p)
      assert bool(jnp.all(jnp.isfinite(u["w"])))
      assert not any(m.split(".")[0] == "flax" for m in sys.modules if sys.modules[m])
      print("core ok")
  """)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "core ok" in proc.stdout


def test_tasks_without_the_extra_name_it():
  proc = _run("""
      import sys
      sys.modules["flax"] = None
      sys.modules["gguf"] = None
      import qsgd_optax.tasks
  """)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError:"), last
  assert "pip install 'qsgd_optax[examples]'" in last
  assert "missing: flax, gguf" in last


def test_every_public_name_is_in_the_api_reference():
  import qsgd_optax
  from qsgd_optax import circuits

  api = (ROOT / "docs" / "api.rst").read_text()
  names = [f"qsgd_optax.{n}" for n in qsgd_optax.__all__ if n != "circuits"]
  names += [f"qsgd_optax.circuits.{n}" for n in circuits.__all__]
  missing = [n for n in names if f":: {n}\n" not in api]
  assert not missing, f"public names without an entry in docs/api.rst: {missing}"

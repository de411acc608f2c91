"""Test configuration: strict JAX settings shared by every test module."""

import importlib.util
import os
import shutil
import tempfile

# One persistent compilation cache for the whole test session: this process
# and every subprocess it starts (the examples, multi-process runs) inherit
# it through the environment, and many tests compile the same train steps.
# Compiles over 0.5 s are stored. A size limit turns on JAX's file lock
# around every read and write of the cache (several processes share it),
# where the filelock package JAX locks with is installed.
# With the cache a rerun or resume in a new process loads the first run's
# executable instead of compiling afresh: the bit-identity checks compare
# runs of the same program, as they did, but no longer a fresh compile of
# it. Set before jax is imported; a cache directory of the user's own is
# left as it is (on hosts where XLA:CPU rejects its cached entries the
# cache only costs the writes).
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="qsgd-optax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  if importlib.util.find_spec("filelock") is not None:  # what JAX locks with
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
if "JAX_COMPILATION_CACHE_MAX_SIZE" in os.environ:
  jax.config.update("jax_compilation_cache_max_size",
                    int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE_DIR is not None:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


# Tests run in float32, as users do; the QNode's complex128 request is
# truncated to complex64 and its warning is filtered at the call site.
jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng() -> np.random.Generator:
  """A fixed NumPy generator: tests never draw unseeded randomness."""
  return np.random.default_rng(20251101)

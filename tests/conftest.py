"""Test configuration: strict JAX settings shared by every test module."""

import jax
import numpy as np
import pytest

# Tests run in float32, as users do; the QNode's complex128 request is
# truncated to complex64 and its warning is filtered at the call site.
jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng() -> np.random.Generator:
  """A fixed NumPy generator: tests never draw unseeded randomness."""
  return np.random.default_rng(20251101)

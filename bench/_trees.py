"""Transformer-shaped pytrees of parameters and gradients for the optimizer benchmarks.

:func:`transformer_shapes` draws the leaf shapes of a pre-norm transformer,
:func:`layout_for_size` sizes one to a parameter count, :func:`make_trees`
fills it deterministically on the device. Shapes and arrays only: no
optimizer, no timing.
"""

from __future__ import annotations

import math
from typing import Any

SEED = 0


_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_size(text: str) -> int:
  """``"64k"``, ``"8M"``, ``"1.5M"`` or ``"250000"`` -> a parameter count."""
  t = text.strip().lower()
  mult = 1
  if t and t[-1] in _SUFFIXES:
    mult, t = _SUFFIXES[t[-1]], t[:-1]
  try:
    value = float(t) * mult
  except ValueError:
    value = float("nan")
  if not math.isfinite(value) or value < 10_000 or value > 2_000_000_000:
    raise ValueError(
        f"expected a parameter count such as 64k, 8M or 250000 "
        f"(10k to 2G), got {text!r}")
  return int(round(value))


def layout_for_size(n_params: int) -> tuple[int, int, int]:
  """Chooses ``(d_model, n_layers, vocab)`` so the tree has about ``n_params``.

  The layers take about 80% of the parameters (width a multiple of 16, or
  of 32 from 256 on), the token embedding the rest.
  """
  if n_params < 256_000:
    n_layers = 2
  elif n_params < 4_000_000:
    n_layers = 4
  elif n_params < 16_000_000:
    n_layers = 6
  else:
    n_layers = 8
  d = math.sqrt(0.8 * n_params / (12 * n_layers))
  step = 32 if d >= 256 else 16
  d = max(16, int(round(d / step)) * step)
  per_layer = 12 * d * d + 13 * d
  vocab = max(16, int(round((n_params - n_layers * per_layer - 2 * d) / d)))
  return d, n_layers, vocab


def transformer_shapes(d: int, n_layers: int, vocab: int) -> dict[str, Any]:
  """Nested dict of leaf shapes of a pre-norm transformer (no head).

  Token embedding ``vocab x d``; per layer: q/k/v/o kernels ``d x d`` with
  biases, MLP ``d x 4d`` and ``4d x d`` with biases, two LayerNorms (scale
  and bias); a final LayerNorm. ``16 * n_layers + 3`` leaves and
  ``vocab * d + n_layers * (12 d^2 + 13 d) + 2 d`` parameters.
  """
  def dense(n_in, n_out):
    return {"kernel": (n_in, n_out), "bias": (n_out,)}

  def norm():
    return {"scale": (d,), "bias": (d,)}

  tree: dict[str, Any] = {"embed": {"tokens": (vocab, d)}}
  for i in range(n_layers):
    tree[f"layer_{i:02d}"] = {
        "attn": {name: dense(d, d) for name in ("q", "k", "v", "o")},
        "ln1": norm(),
        "mlp": {"up": dense(d, 4 * d), "down": dense(4 * d, d)},
        "ln2": norm(),
    }
  tree["final_norm"] = norm()
  return tree


def many_leaf_shapes(n_leaves: int) -> dict[str, Any]:
  """Nested dict of ``n_leaves`` small leaf shapes: ``64 x 96`` kernels and ``96`` biases alternating.

  The shape of a model with many small arrays (per-layer weights, biases,
  norms), where the per-array cost of the quantum term shows.
  """
  if n_leaves < 2 or n_leaves % 2:
    raise ValueError(f"n_leaves must be an even number >= 2, got {n_leaves}")
  return {f"layer_{i:04d}": {"kernel": (64, 96), "bias": (96,)} for i in range(n_leaves // 2)}


def _shape_leaves(shapes: Any) -> list[tuple[int, ...]]:
  if isinstance(shapes, dict):
    return [s for k in sorted(shapes) for s in _shape_leaves(shapes[k])]
  return [tuple(shapes)]


def count_params(shapes: Any) -> tuple[int, int]:
  """``(parameters, leaves)`` of a shape tree from :func:`transformer_shapes`."""
  leaves = _shape_leaves(shapes)
  return sum(math.prod(s) for s in leaves), len(leaves)


_HOST_CACHE: dict = {}


def _host_trees(shapes: Any, seed: int):
  """Params and grads as nested dicts of NumPy arrays (see :func:`make_trees`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  key = (repr(shapes), seed)
  if key in _HOST_CACHE:
    return _HOST_CACHE[key]
  _HOST_CACHE.clear()  # one layout at a time: 32M params are 256 MB here
  rng_p = np.random.default_rng([seed, 0])
  rng_g = np.random.default_rng([seed, 1])

  def build(node, name):
    if isinstance(node, dict):
      return {k: build(node[k], k) for k in sorted(node)}
    shape = tuple(node)
    if name == "scale":
      p = np.ones(shape, np.float32)
    else:
      p = 0.02 * rng_p.standard_normal(shape, dtype=np.float32)
    return p

  def build_g(node):
    if isinstance(node, dict):
      return {k: build_g(node[k]) for k in sorted(node)}
    return 1e-2 * rng_g.standard_normal(tuple(node), dtype=np.float32)

  _HOST_CACHE[key] = (build(shapes, ""), build_g(shapes))
  return _HOST_CACHE[key]


def make_trees(shapes: Any, seed: int = SEED):
  """Params and grads on the device, deterministic in ``seed``.

  Params: kernels, embeddings and biases ``0.02 * normal`` (biases nonzero
  so the modulation is not trivially zero there), LayerNorm scales 1; grads
  ``1e-2 * normal`` from an independent stream (NumPy ``default_rng``).
  Each call returns new device buffers that alias no host memory: they are
  donated to the step.
  """
  import jax  # pylint: disable=g-import-not-at-top

  params, grads = _host_trees(shapes, seed)
  put = lambda t: jax.tree.map(lambda a: jax.device_put(a, may_alias=False), t)
  return put(params), put(grads)

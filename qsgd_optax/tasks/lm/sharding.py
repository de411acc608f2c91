"""Meshes and sharding rules of the LM task: FSDP parameters, data-parallel batches.

A ``Mesh`` with axes ``("data", "fsdp")`` (:func:`make_mesh`). The batch
axis is split over both axes; every large parameter is split along its
largest axis divisible by the ``fsdp`` size (ZeRO-3 / FSDP style) and
replicated over ``data`` (:func:`param_shardings`); optimizer state follows
the parameter it belongs to (:func:`state_shardings`). Over several hosts,
call ``jax.distributed.initialize()`` first (``--distributed`` in the CLI),
then build the mesh over ``jax.devices()``: every process builds the same
global batch (the data are seeded) and :func:`shard_batch` materializes only
its own shards with ``jax.make_array_from_callback``. Rules only: no model,
no training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsgd_optax.tasks.lm.batching import Batch

__all__ = [
    "MESH_AXES",
    "batch_sharding",
    "device_summary",
    "make_mesh",
    "param_shardings",
    "parse_mesh",
    "shard_batch",
    "state_shardings",
]


MESH_AXES = ("data", "fsdp")


def parse_mesh(text: str) -> dict[str, int]:
  """Parses ``"data=N,fsdp=M"`` (either part optional) to ``{"data": N, "fsdp": M}``."""
  sizes = {"data": 1, "fsdp": 1}
  seen = set()
  for part in text.split(","):
    part = part.strip()
    if not part:
      continue
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in sizes or name in seen:
      raise ValueError(
          f"bad mesh {text!r}: expected data=N,fsdp=M with axes {MESH_AXES}, "
          "each at most once.")
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f"bad mesh {text!r}: {name} must be a positive int.")
    sizes[name] = size
    seen.add(name)
  if not seen:
    raise ValueError(f"bad mesh {text!r}: expected data=N,fsdp=M.")
  return sizes


def make_mesh(data: int = 1, fsdp: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices).

  Raises:
    ValueError: when ``data * fsdp`` differs from the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or fsdp < 1 or data * fsdp != len(devices):
    raise ValueError(
        f"mesh data={data},fsdp={fsdp} needs {data * fsdp} devices, but "
        f"{len(devices)} are available; data * fsdp must equal the device "
        "count.")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def _param_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  axes = sorted(range(len(shape)), key=lambda a: (-shape[a], a))
  for a in axes:
    if shape[a] % fsdp == 0:
      spec: list[Any] = [None] * len(shape)
      spec[a] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(params: Any, mesh: Mesh, *,
                    min_size: int = 1024) -> Any:
  """``NamedSharding`` per parameter: FSDP over the largest divisible axis.

  Arrays with fewer than ``min_size`` entries, or with no axis divisible by
  the ``fsdp`` size, are replicated. Everything is replicated over ``data``.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _param_spec(x.shape, fsdp, min_size)),
      params)


def state_shardings(opt_state: Any, params: Any, param_sharding: Any,
                    mesh: Mesh) -> Any:
  """Shardings for an optimizer state: each per-parameter leaf as its parameter.

  A state leaf belongs to a parameter when its tree path ends with the
  parameter's path and the shapes agree (Adam's ``mu``/``nu``, MultiSteps'
  accumulators, ...); every other leaf (step counts, scalars) is replicated.
  ``opt_state`` may be abstract (``jax.eval_shape(tx.init, params)``).
  """
  by_path = {}
  for path, (p, s) in zip(
      (kp for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
      zip(jax.tree.leaves(params), jax.tree.leaves(param_sharding))):
    by_path[tuple(path)] = (tuple(p.shape), s)
  lengths = sorted({len(k) for k in by_path}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    for n in lengths:
      hit = by_path.get(tuple(path[-n:])) if len(path) >= n else None
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over both mesh axes, sequence replicated."""
  return NamedSharding(mesh, P(MESH_AXES, None))


def shard_batch(batch: Batch, mesh: Mesh | None) -> Batch:
  """Places a host batch: on the default device, or split over ``mesh``.

  With a mesh, each process materializes only its addressable shards, so
  the same code runs on one host or many.
  """
  if mesh is None:
    return Batch(*(jnp.asarray(x) for x in batch))
  sharding = batch_sharding(mesh)
  rows = batch.inputs.shape[0]
  if rows % mesh.size:
    raise ValueError(f"a batch of {rows} rows cannot be split over "
                     f"{mesh.size} devices.")
  return Batch(*(jax.make_array_from_callback(x.shape, sharding,
                                              lambda idx, x=x: x[idx])
                 for x in batch))


def device_summary(mesh: Mesh | None) -> Mapping[str, Any]:
  """Platform and device counts, for run configs."""
  return {"platform": jax.default_backend(),
          "devices": jax.device_count(),
          "processes": jax.process_count(),
          "mesh": None if mesh is None else dict(mesh.shape)}

"""Which coordinates a scope selects, and how the quantum term is placed.

Three scopes (see :func:`qsgd_optax.superpose`):

``"leaf"``
  the first ``n_qubits`` entries, in row-major order, of every parameter
  array; an array with fewer entries contributes all of them (its register is
  padded with zeros, which the built-in circuits map to modulation 0 and
  which never influences the real coordinates of the register).
``"model"``
  the first ``n_qubits`` entries of the whole model: floating-point leaves in
  ``jax.tree`` order, row-major inside each leaf, forming one register.
``"all"``
  every entry, in registers of ``n_qubits`` consecutive row-major entries per
  array (the last register of an array is padded with zeros).

Only real floating-point, non-empty leaves take part; integer and complex
leaves, empty arrays and ``None`` updates pass through unchanged (a complex
leaf gets exactly ``inner``'s update: the paper's ``sin(pi * theta)`` has no
complex reading).

Placement: for ``"leaf"`` and ``"model"`` the circuit runs on a tiny batch
(one register per leaf, or one register in all), and the result is placed
by an ``iota`` mask and a small zero-padded coefficient block that broadcast
against the leaf inside the same elementwise expression as the update, so
XLA fuses it into the optimizer's single pass over memory (slicing,
``.at[].add``, ``pad`` or ``concatenate`` on the large arrays would cost
extra passes). The heads are read into the batch a few arrays per kernel
(:func:`stack_heads`); the quantum weight multiplies the batched result once;
each leaf picks its row by a gather at a constant index vector (:func:`row`),
so the fused loops of leaves of one shape stay one computation and XLA
compiles one kernel for all of them; leaves of one shape share one mask
(:func:`head_mask`). The placement is written in ``lax`` operations
(``gather``, ``pad``, ``select``), not ``jnp.where``/``jnp.pad``, which are
jitted functions and would put one call per leaf into the program.
For ``"all"`` the registers of all leaves of one precision go through the
circuit in one call on a single device (:func:`_modulation_all`; per leaf
with several devices), evaluated in bounded chunks
(:data:`qsgd_optax.circuits.MAX_CHUNK_AMPLITUDES`); an explicitly sharded
leaf is evaluated per shard.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qsgd_optax import _circuits

P = jax.sharding.PartitionSpec

SCOPE_NAMES = ("leaf", "model", "all")


def _eligible(p, u) -> bool:
  """Real floating-point, non-empty leaves take part; others pass through."""
  return (
      u is not None
      and p is not None
      and jnp.issubdtype(jnp.result_type(p), jnp.floating)
      and math.prod(jnp.shape(p)) > 0
  )


def _split_dim(shape: Sequence[int], k: int) -> int:
  """Smallest ``d`` such that the suffix ``shape[d:]`` holds >= ``k`` entries.

  The first ``k`` row-major entries then all lie at index 0 of dims ``< d``.
  """
  d = len(shape)
  while d > 0 and math.prod(shape[d:]) < k:
    d -= 1
  return d


def _explicit_sharding(x: jax.Array):
  """``x``'s NamedSharding when its type shards some dim explicitly, else None.

  The sharding is the one in ``x``'s type, on ``x``'s own (abstract) mesh:
  every sharding built from it with ``.update(spec=...)`` is valid with or
  without a ``jax.set_mesh`` context.
  """
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if not spec or mesh is None or getattr(mesh, "empty", True):
    return None
  if not any(s is not None for s in spec):
    return None
  return sharding


def _axis_size(mesh, entry) -> int:
  """Number of devices a PartitionSpec entry (None, a name, names) spans."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[name] for name in names)


def head(x: jax.Array, k: int) -> jax.Array:
  """The first ``k`` row-major entries of ``x`` as a 1-D array (small slice).

  Under explicit sharding a static slice of a sharded dim is not allowed;
  there the ``k`` entries are gathered into a ``float[k]`` replicated on
  ``x``'s mesh (``k`` elements move, never the leaf).
  """
  shape = x.shape
  sharding = _explicit_sharding(x)
  if sharding is not None:
    index = np.unravel_index(np.arange(k), shape)
    return x.at[tuple(jnp.asarray(i, jnp.int32) for i in index)].get(
        out_sharding=sharding.update(spec=P())
    )
  d = _split_dim(shape, k)
  if d == len(shape):  # scalar leaf
    return x.reshape(-1)[:k]
  inner = math.prod(shape[d + 1:])
  rows = -(-k // inner)
  block = x[(0,) * d + (slice(0, rows),)]
  return block.reshape(-1)[:k]


def head_mask(shape: Sequence[int], k: int) -> jax.Array | bool:
  """True on the first ``k`` row-major entries of an array of ``shape``.

  Iotas compared with 0 on the leading dims and with ``k`` on the trailing
  block ``shape[d:]`` that holds the first ``k`` entries (:func:`_split_dim`);
  the result broadcasts against the leaf without anything of the leaf's size
  being materialised. It depends on ``(shape, k)`` alone, so leaves of one
  shape share one mask. ``True`` for a scalar leaf. (A constant boolean mask
  instead, one operand of the loop instead of a dozen iota instructions,
  compiled 3% faster at 512 arrays but made the step 5% slower:
  bench/RESULTS.md.)
  """
  shape = tuple(shape)
  if not shape:
    return True
  d = _split_dim(shape, k)
  suffix = shape[d:]
  in_head = jax.lax.broadcasted_iota(jnp.int32, (math.prod(suffix),), 0) < k
  mask = in_head.reshape((1,) * d + suffix)
  for axis in range(d):
    mask = mask & (jax.lax.broadcasted_iota(jnp.int32, shape, axis) == 0)
  return mask


def head_block(shape: Sequence[int], r: jax.Array) -> jax.Array:
  """``r`` zero-padded to the trailing block of ``shape`` holding ``len(r)`` entries.

  Shaped ``(1,) * d + shape[d:]``, it broadcasts against the leaf; together
  with :func:`head_mask` it puts ``r`` on the first ``len(r)`` row-major
  entries inside the same elementwise expression as the update (so XLA fuses
  it into the optimizer's single pass over memory, without re-running the
  circuit per entry).
  """
  shape = tuple(shape)
  k = r.shape[0]
  if not shape:
    return r[0]
  d = _split_dim(shape, k)
  suffix = shape[d:]
  return _padded(r, math.prod(suffix)).reshape((1,) * d + suffix)


# Heads per concatenation. XLA:CPU fuses a concatenation of up to 8 slices
# of different arrays into one kernel; beyond that every slice becomes a
# kernel of its own (measured with jax 0.10; the stack of the groups may
# then be fused with them, e.g. one kernel reads the heads of 64 arrays).
HEADS_PER_KERNEL = 8


def stack_heads(heads: Sequence[jax.Array]) -> jax.Array:
  """``jnp.stack(heads)`` (``L`` heads of ``n`` entries), in few kernels.

  Stacking the heads of ``L`` arrays at once gives every array's head slice
  a kernel of its own on XLA:CPU (one dispatch per array per step), and
  nested concatenations along one axis are flattened back by its
  simplifier. So the heads are concatenated :data:`HEADS_PER_KERNEL` at a
  time along their own axis and the groups stacked along a new one: at
  most one kernel per group (bench/RESULTS.md, "Compile time at many parameter
  arrays"). Same values as ``jnp.stack(heads)``.
  """
  heads = list(heads)
  g = HEADS_PER_KERNEL
  if len(heads) <= g:
    return jnp.stack(heads)
  n = heads[0].shape[0]
  groups = [_padded(jnp.concatenate(heads[i:i + g]), g * n)
            for i in range(0, len(heads), g)]
  return jnp.stack(groups).reshape(-1, n)[:len(heads)]


def row(flat: jax.Array, start: int, count: int) -> jax.Array:
  """``flat[start:start + count]`` as a gather at a constant index vector.

  Not a slice: a static slice fused into leaf ``j``'s loop makes every
  leaf's fused computation different (its offset is part of the kernel), so
  XLA:CPU compiles one kernel per leaf; an index vector of more than one
  entry stays a constant buffer, an operand of the fusion, and leaves of
  one shape then share one compiled kernel (bench/RESULTS.md, "Compile time
  at many parameter arrays"). Written as ``lax.gather`` on int32 indices
  shaped ``[count, 1]``, in bounds by construction: nothing is emitted to
  convert, reshape or wrap them. A one-entry index would be simplified back
  into a slice, so one entry is picked as the first of two.
  """
  index = np.arange(start, start + max(count, 2), dtype=np.int32)
  if count == 1:
    index[1] = 0
  picked = jax.lax.gather(
      flat, jnp.asarray(index[:, None]),
      jax.lax.GatherDimensionNumbers(
          offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)),
      slice_sizes=(1,), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return picked if count > 1 else picked[:1]


def _combine(u, x, mask, scale, multiplicative=False):
  """``u + where(mask, scale * x, 0)``, in ``u``'s dtype.

  ``scale`` is the quantum weight times the modulation in
  ``promote_types(u.dtype, float32)`` (wider where the weight is), computed
  once for all leaves, not per leaf. Written as an addition of a masked
  term (not ``where(mask, u + t, u)``): XLA then keeps Adam's direction
  fused into the same loop (the select form materialises it;
  bench/RESULTS.md). With
  ``multiplicative`` (``x`` is ``u`` itself, modulate="update") it is
  ``u * (1 + where(mask, scale, 0))``, so that ``u`` is used once.
  """
  dtype = jnp.promote_types(u.dtype, jnp.float32)
  if mask is not True and _explicit_sharding(u) is not None:
    # Under explicit sharding the small coefficient block takes the leaf's
    # sharding (a broadcast, fused like the rest), so the masked term is
    # sharded like the leaf; _select aligns the mask and the zero with it.
    scale = scale + jnp.zeros_like(u, dtype=dtype)
  if multiplicative:  # x is u: u * (1 + where(mask, scale, 0)), one use of u
    if mask is not True:
      scale = _select(mask, scale)
    return (u.astype(dtype) * (1 + scale)).astype(u.dtype)
  term = scale * x.astype(dtype)
  if mask is True:
    return (u.astype(dtype) + term).astype(u.dtype)
  return (u.astype(dtype) + _select(mask, term)).astype(u.dtype)


def _select(mask, a):
  """``jnp.where(mask, a, 0)`` (``mask`` of the leaf's shape) as one ``lax.select``.

  ``jnp.where`` is a jitted function: one call per leaf in the lowered
  program, which XLA then inlines leaf by leaf.
  """
  a = jnp.broadcast_to(a, mask.shape)
  if _explicit_sharding(a) is not None:
    # lax.select wants its operands sharded alike: the mask (iotas) and the
    # zero take a's sharding (a may be sharded where u is not).
    mask = mask & jnp.ones_like(a, dtype=bool)
    zero = jnp.zeros_like(a)
  else:
    zero = jnp.zeros(mask.shape, a.dtype)
  return jax.lax.select(mask, a, zero)


def _scaled(weight, m: jax.Array, dtypes) -> dict:
  """``weight * m.astype(dt)`` for each ``dt`` of ``dtypes`` (the leaves' combine dtypes), once each."""
  return {dt: weight * m.astype(dt) for dt in dict.fromkeys(dtypes)}


def _registers_local(p: jax.Array, modulator: _circuits.Modulator) -> jax.Array:
  """Modulation of every entry of an unsharded ``p`` (registers row-major)."""
  n = modulator.n_qubits
  shape = p.shape
  if shape and shape[-1] % n == 0:
    regs = p.reshape(shape[:-1] + (shape[-1] // n, n))
    return modulator(regs).reshape(shape)
  size = math.prod(shape)
  pad = (-size) % n
  regs = jnp.pad(p.reshape(-1), (0, pad)).reshape(-1, n)
  return modulator(regs).reshape(-1)[:size].reshape(shape)


def _registers_all(p: jax.Array, modulator: _circuits.Modulator) -> jax.Array:
  """Modulation of every entry of ``p``, registers of ``n`` row-major entries.

  Registers lie along the last dim when it is divisible by ``n``. Under
  explicit sharding each device then simulates only the registers of its own
  shard (``shard_map`` over the leaf's Explicit axes; Auto axes of the same
  mesh stay with the partitioner), provided its part of the last dim is
  divisible by ``n``; otherwise only the last dim is gathered. A leaf whose
  last dim is not divisible by ``n`` has registers spanning rows: it is
  gathered whole and the result resharded back. Under Auto axes alone the
  partitioner decides how the registers are laid out. README, "Where it runs".
  """
  p = p.astype(jnp.promote_types(p.dtype, jnp.float32))
  if modulator.elementwise:
    return modulator.fn(p)
  sharding = _explicit_sharding(p)
  if sharding is None:
    return _registers_local(p, modulator)
  n = modulator.n_qubits
  spec = tuple(sharding.spec) + (None,) * (p.ndim - len(sharding.spec))
  if p.shape[-1] % n:
    full = jax.sharding.reshard(p, sharding.update(spec=P()))
    return jax.sharding.reshard(_registers_local(full, modulator), sharding)
  local_spec = spec
  if (p.shape[-1] // _axis_size(sharding.mesh, spec[-1])) % n:
    local_spec = spec[:-1] + (None,)  # registers would straddle shards
    p = jax.sharding.reshard(p, sharding.update(spec=P(*local_spec)))
  # Manual over the axes the leaf is sharded on, and only those: the other
  # (e.g. Auto) axes stay with the partitioner instead of being gathered.
  names = frozenset(a for entry in local_spec if entry is not None
                    for a in (entry if isinstance(entry, tuple) else (entry,)))
  out = jax.shard_map(
      functools.partial(_registers_local, modulator=modulator),
      mesh=sharding.mesh, in_specs=P(*local_spec), out_specs=P(*local_spec),
      axis_names=names,
  )(p)
  if local_spec != spec:
    out = jax.sharding.reshard(out, sharding)
  return out


def _modulation_all(ps, modulator: _circuits.Modulator) -> list[jax.Array]:
  """:func:`_registers_all` of every leaf of ``ps``, the circuit called once per precision.

  In a process with one device, the registers of all leaves of one
  precision are concatenated (each leaf's entries row-major, its last
  register zero-padded) and go through the circuit in one call (chunked
  like any large batch), and each leaf takes its slice of the result back:
  the statevector simulation is emitted once instead of once per leaf,
  which is most of the compile time of scope ``"all"`` with many arrays.
  The registers are the same as :func:`_registers_all`'s, so are the
  values. With several devices every leaf keeps its own call: leaves
  sharded on Auto mesh axes look unsharded here, and one concatenation
  would make the partitioner move them (all-to-alls every step) and
  change the shardings of the leaves it joins. The closed form needs no
  registers and is applied per leaf.
  """
  out: list = [None] * len(ps)
  groups: dict = {}
  several_devices = jax.device_count() > 1
  for i, p in enumerate(ps):
    if modulator.elementwise or several_devices:
      out[i] = _registers_all(p, modulator)
    else:
      groups.setdefault(jnp.dtype(jnp.promote_types(p.dtype, jnp.float32)), []).append(i)
  n = modulator.n_qubits
  for dtype, idx in groups.items():
    if len(idx) == 1:
      out[idx[0]] = _registers_all(ps[idx[0]], modulator)
      continue
    regs = []
    for i in idx:
      flat = ps[i].astype(dtype).reshape(-1)
      regs.append(_padded(flat, -(-flat.shape[0] // n) * n).reshape(-1, n))
    m = modulator(jnp.concatenate(regs)).reshape(-1)
    offset = 0
    for i, r in zip(idx, regs):
      out[i] = m[offset:offset + ps[i].size].reshape(ps[i].shape)
      offset += r.shape[0] * n
  return out


def add_term(
    updates,
    params,
    x,
    weight,
    modulator: _circuits.Modulator,
    scope: str,
    multiplicative: bool = False,
):
  """Returns ``updates + weight * M(params) * x`` on the scope's coordinates.

  For the built-in circuits the term is one cached jitted function per
  ``(circuit, n_qubits, scope, multiplicative)``: inside an enclosing ``jit``
  it is inlined into the same program; called eagerly (as
  ``optax.inject_hyperparams`` users may) it is a single dispatch, not one
  per operation. A user's callable runs as it is, traced afresh each time.

  Args:
    updates: the base update tree (may hold ``None`` leaves).
    params: the parameters ``theta`` fed to the circuit.
    x: what the modulation multiplies (same structure as ``params``).
    weight: scalar quantum weight (may be traced).
    modulator: the resolved circuit.
    scope: ``"leaf"``, ``"model"`` or ``"all"``.
    multiplicative: ``x`` is ``updates`` itself (modulate="update").

  Returns:
    A tree like ``updates``, each leaf in its own dtype; leaves that take no
    part are returned as they are.
  """
  if scope not in SCOPE_NAMES:
    raise ValueError(f"scope must be one of {SCOPE_NAMES}, got {scope!r}.")
  if isinstance(weight, (int, float)) and weight == 0:
    # A static zero weight is exactly the inner update: no circuit, and no
    # 0 * NaN where a parameter is not finite.
    return updates
  p_leaves, treedef = jax.tree.flatten(params, is_leaf=lambda v: v is None)
  u_leaves = treedef.flatten_up_to(updates)
  x_leaves = treedef.flatten_up_to(x)
  ids = [i for i, (p, u) in enumerate(zip(p_leaves, u_leaves))
         if _eligible(p, u)]
  if not ids:
    return updates
  # Python scalars (accepted by optax) become arrays.
  ps = [jnp.asarray(p_leaves[i]) for i in ids]
  us = [jnp.asarray(u_leaves[i]) for i in ids]
  xs = [None if multiplicative else jnp.asarray(x_leaves[i]) for i in ids]
  new = _term_fn(modulator, scope, multiplicative)(ps, us, xs, weight)
  out = list(u_leaves)
  for i, u in zip(ids, new):
    out[i] = u
  return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _cached_term_fn(modulator, scope, multiplicative):
  return jax.jit(functools.partial(
      _term, modulator=modulator, scope=scope, multiplicative=multiplicative))


def _term_fn(modulator, scope, multiplicative):
  """The term as one cached jit for built-in circuits; plain for callables.

  A user's callable may carry state that changes between calls (an
  ``nnx.Module``, a closure), which a cached trace would freeze, and two
  equal callables may differ; so only the built-in circuits, whose
  behaviour is fixed by ``(name, n_qubits)``, share a cached jit.
  """
  if modulator.fn is _circuits.sinpi_circuit or modulator.fn in _circuits.BUILT_IN:
    return _cached_term_fn(modulator, scope, multiplicative)
  return functools.partial(
      _term, modulator=modulator, scope=scope, multiplicative=multiplicative)


def _term(ps, us, xs, weight, *, modulator, scope, multiplicative):
  """The new updates of the eligible leaves ``ps`` (lists, same order)."""
  n = modulator.n_qubits
  dtypes = [jnp.promote_types(u.dtype, jnp.float32) for u in us]
  if scope == "all":
    return [_combine(u, x, True, weight * m.astype(dt), multiplicative)
            for m, u, x, dt in zip(_modulation_all(ps, modulator), us, xs, dtypes)]

  # Registers in the parameters' precision (at least float32).
  ftype = jnp.result_type(jnp.float32, *(p.dtype for p in ps))
  if scope == "leaf":
    counts = [min(n, p.size) for p in ps]
    regs = stack_heads([_padded(head(p, c).astype(ftype), n)
                        for p, c in zip(ps, counts)])
    scaled = {dt: v.reshape(-1)
              for dt, v in _scaled(weight, modulator(regs), dtypes).items()}
    parts = [row(scaled[dt], j * n, c)
             for j, (c, dt) in enumerate(zip(counts, dtypes))]
  else:  # "model"
    counts, remaining = [], n
    for p in ps:
      c = min(remaining, p.size)
      counts.append(c)
      remaining -= c
    reg = jnp.concatenate([head(p, c).astype(ftype)
                           for p, c in zip(ps, counts) if c > 0])
    scaled = _scaled(weight, modulator(_padded(reg, n)[None])[0], dtypes)
    parts, offset = [], 0
    for c, dt in zip(counts, dtypes):
      parts.append(scaled[dt][offset:offset + c] if c > 0 else None)
      offset += c

  out, masks = [], {}
  for p, u, x, r in zip(ps, us, xs, parts):
    if r is None:
      out.append(u)
      continue
    key = (p.shape, r.shape[0])
    if key not in masks:  # one mask per shape and count, shared by leaves
      masks[key] = head_mask(*key)
    out.append(_combine(u, x, masks[key], head_block(p.shape, r), multiplicative))
  return out


def _padded(v: jax.Array, n: int) -> jax.Array:
  """``v`` (1-D) zero-padded to ``n`` entries (``v`` itself if it has them; keeps its sharding)."""
  if v.shape[0] == n:
    return v
  return jax.lax.pad(v, jnp.zeros((), v.dtype), [(0, n - v.shape[0], 0)])


def selected_mask(params, n_qubits: int, scope: str):
  """NumPy boolean masks of the coordinates a scope selects.

  Args:
    params: a tree of arrays (only shapes and dtypes are used).
    n_qubits: register size, a Python int >= 1.
    scope: ``"leaf"``, ``"model"`` or ``"all"``.

  Returns:
    A tree of ``bool`` NumPy arrays shaped like ``params``; leaves that take
    no part (integer, complex, empty) are all False.

  Raises:
    ValueError: ``n_qubits`` not an int >= 1, or an unknown ``scope``.

  Examples:
    >>> import numpy as np
    >>> import qsgd_optax
    >>> qsgd_optax.circuits.selected_mask(np.zeros(6), 4, "leaf")
    array([ True,  True,  True,  True, False, False])
  """
  n_qubits = _circuits.check_n_qubits(n_qubits)
  if not isinstance(scope, str) or scope not in SCOPE_NAMES:
    raise ValueError(f"scope must be one of {SCOPE_NAMES}, got {scope!r}.")
  leaves, treedef = jax.tree.flatten(params)
  masks, remaining = [], n_qubits
  for p in leaves:
    shape = np.shape(p)
    size = math.prod(shape)
    flat = np.zeros(size, bool)
    if jnp.issubdtype(jnp.result_type(p), jnp.floating) and size:
      if scope == "all":
        flat[:] = True
      elif scope == "leaf":
        flat[: min(n_qubits, size)] = True
      else:
        c = min(remaining, size)
        flat[:c] = True
        remaining -= c
    masks.append(flat.reshape(shape))
  return jax.tree.unflatten(treedef, masks)

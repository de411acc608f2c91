"""Measuring the quantum term: the term tree itself, and its share of an update.

:func:`quantum_term` is the term QSGD adds to its inner direction,
``quantum_weight * M(params) * x`` on the scope's coordinates and zero
elsewhere, computed by the same code the optimizers run. :func:`term_share`
says how large a term is next to the update it is part of, on the
coordinates the term touches. Both are pure JAX functions: call them inside
your own jitted train step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qsgd_optax import _circuits
from qsgd_optax import _scope
from qsgd_optax import _transform


def quantum_term(
    x: Any,
    params: Any,
    quantum_weight: float | jax.Array = 0.5,
    n_qubits: int = 4,
    *,
    circuit: str | Callable[[jax.Array], jax.Array] = "paper",
    scope: str = "leaf",
) -> Any:
  r"""The quantum term :math:`\lambda \, M(\theta) \odot x` as a tree like ``x``.

  This is exactly what :func:`qsgd_optax.scale_by_qsgd` adds to Adam's
  direction and :func:`qsgd_optax.superpose` to its inner update (the same
  code runs): on the coordinates ``scope`` selects, ``quantum_weight`` times
  the circuit's modulation of ``params`` times ``x``; zero elsewhere and on
  leaves that take no part (integer, complex, empty, 0-d).

  Which ``x`` an optimizer uses, and where the term ends up:

  * ``qsgd(lr, ..., modulate="gradient")`` (the paper's form): ``x`` is the
    gradient, and the step applied to the parameters changes by
    ``-lr * quantum_term(grads, params, ...)`` (``lr`` the learning rate
    of that step): ``qsgd(...)`` minus ``optax.adamw(...)`` with the same
    settings.
  * ``modulate="update"``: ``x`` is Adam's direction (``scale_by_qsgd``) or
    the inner update (``superpose``).
  * ``modulate="preconditioned"``: ``x`` is ``g / (sqrt(nu_hat) + eps)``.

  Args:
    x: what the modulation multiplies (a tree like ``params``).
    params: the parameters :math:`\theta` the circuit reads.
    quantum_weight: :math:`\lambda`, a finite real scalar (may be traced).
    n_qubits: register size, as in the optimizers.
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable
      ``float[B, n_qubits] -> float[B, n_qubits]``.
    scope: ``"leaf"``, ``"model"`` or ``"all"``.

  Returns:
    A tree like ``x``: each taking-part leaf in its own dtype, zero off the
    selected coordinates; other leaves as zeros.

  Raises:
    ValueError: on invalid arguments, as the optimizers raise them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import qsgd_optax
    >>> params = jnp.array([0.5, 0.25, -0.5, 1.0, 2.0])
    >>> grads = jnp.ones(5)
    >>> qsgd_optax.diagnostics.quantum_term(grads, params, 0.5, circuit="sine").round(3)
    Array([ 0.5  ,  0.354, -0.5  ,  0.   ,  0.   ], dtype=float32)
  """
  modulator = _transform._resolve(  # pylint: disable=protected-access
      quantum_weight, n_qubits, circuit, scope, "gradient", _transform.MODULATE_NAMES)
  zeros = jax.tree.map(jnp.zeros_like, x)
  return _scope.add_term(zeros, params, x, quantum_weight, modulator, scope)


def _touched(tree: Any, params: Any, n_qubits: int, scope: str) -> list[jax.Array]:
  """The entries of ``tree`` on the coordinates ``scope`` selects, as 1-D arrays."""
  p_leaves, treedef = jax.tree.flatten(params)
  t_leaves = treedef.flatten_up_to(tree)
  out, remaining = [], n_qubits
  for p, t in zip(p_leaves, t_leaves):
    if not _scope._eligible(p, t):  # pylint: disable=protected-access
      continue
    t = jnp.asarray(t)
    if scope == "all":
      sharding = _scope._explicit_sharding(t)  # pylint: disable=protected-access
      if sharding is not None:  # explicit axes allow neither this reshape nor a mixed concatenate
        t = jax.sharding.reshard(t, sharding.update(spec=jax.sharding.PartitionSpec()))
      out.append(t.reshape(-1))
      continue
    count = min(n_qubits if scope == "leaf" else remaining, t.size)
    if scope == "model":
      remaining -= count
    if count > 0:
      out.append(_scope.head(t, count))
  return out


def term_share(
    term: Any,
    updates: Any,
    params: Any,
    n_qubits: int = 4,
    *,
    scope: str = "leaf",
) -> dict[str, jax.Array]:
  """How large the quantum term is next to the update it is part of.

  ``term`` is the term's contribution to ``updates`` (both trees like
  ``params``, in the same units: e.g. ``-lr * quantum_term(grads, ...)``
  next to the ``qsgd`` update, or the difference of ``qsgd``'s and
  ``adamw``'s updates on the same state). On the coordinates ``scope``
  selects (``n_qubits`` as in the optimizer), with
  ``r = |term| / |updates|`` over those where ``updates`` is not zero:

  Under explicit sharding with ``scope="all"`` the ratios are gathered onto
  every device for the median (a diagnostic, not a train-step cost); the
  other scopes move ``n_qubits`` entries per leaf.

  Returns:
    ``{"median": median r, "max": max r, "global": ||term|| / ||updates||}``
    as float32 scalars, the global ratio over every coordinate of every
    taking-part leaf (the term is zero off the selected ones). NaN when
    no selected coordinate has a non-zero update.

  Examples:
    >>> import jax.numpy as jnp
    >>> import qsgd_optax
    >>> share = qsgd_optax.diagnostics.term_share(jnp.array([0.1, 0.0, 0.0]), jnp.array([1.0, 2.0, 4.0]),
    ...                               jnp.zeros(3), n_qubits=2)
    >>> {k: round(float(v), 4) for k, v in share.items()}
    {'median': 0.05, 'max': 0.1, 'global': 0.0218}
  """
  n_qubits = _circuits.check_n_qubits(n_qubits)
  _transform._check_choice("scope", scope, _scope.SCOPE_NAMES)  # pylint: disable=protected-access
  t_parts = _touched(term, params, n_qubits, scope)
  u_parts = _touched(updates, params, n_qubits, scope)
  if not t_parts:
    nan = jnp.float32(jnp.nan)
    return {"median": nan, "max": nan, "global": nan}
  t = jnp.abs(jnp.concatenate([a.astype(jnp.float32) for a in t_parts]))
  u = jnp.abs(jnp.concatenate([a.astype(jnp.float32) for a in u_parts]))
  ratio = jnp.where(u > 0, t / jnp.where(u > 0, u, 1.0), jnp.nan)
  p_leaves, treedef = jax.tree.flatten(params)
  pairs = [(jnp.asarray(a), jnp.asarray(b)) for p, a, b in zip(
      p_leaves, treedef.flatten_up_to(term), treedef.flatten_up_to(updates))
           if _scope._eligible(p, a)]  # pylint: disable=protected-access
  sq = lambda a: jnp.sum(jnp.square(a.astype(jnp.float32)))
  term_norm = jnp.sqrt(sum(sq(a) for a, _ in pairs))
  update_norm = jnp.sqrt(sum(sq(b) for _, b in pairs))
  return {"median": jnp.nanmedian(ratio), "max": jnp.nanmax(ratio),
          "global": term_norm / update_norm}

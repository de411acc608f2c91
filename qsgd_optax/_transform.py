"""The superposition step as Optax gradient transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base

from qsgd_optax import _circuits
from qsgd_optax import _scope

MODULATE_NAMES = ("gradient", "preconditioned", "update")
SUPERPOSE_MODULATE_NAMES = ("gradient", "update")


def _check_quantum_weight(quantum_weight: Any) -> None:
  """A finite real scalar; a JAX array is checked without leaving the device.

  ``optax.inject_hyperparams`` calls the factory with JAX arrays (traced, or
  concrete on every eager update): their shape and dtype are checked, their
  value is not, since reading it would block on the device each step.
  """
  if isinstance(quantum_weight, jax.Array) or _is_traced(quantum_weight):
    shape, dtype = jnp.shape(quantum_weight), jnp.result_type(quantum_weight)
    if shape != () or not _is_real_number_dtype(dtype):
      raise ValueError(
          "quantum_weight must be a finite real scalar, got an array of "
          f"shape {shape} and dtype {dtype}."
      )
    return
  try:
    value = np.asarray(quantum_weight)
    ok = (value.shape == () and _is_real_number_dtype(value.dtype)
          and bool(np.isfinite(value)))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f"quantum_weight must be a finite real scalar, got {quantum_weight!r}."
    )


def _is_real_number_dtype(dtype) -> bool:
  """Floating or integer, not bool (NumPy and JAX dtypes alike)."""
  return dtype != np.bool_ and (jnp.issubdtype(dtype, jnp.floating)
                                or jnp.issubdtype(dtype, jnp.integer))


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
  if not isinstance(value, str) or value not in accepted:
    raise ValueError(f"{name} must be one of {accepted}, got {value!r}.")
  return value


def _resolve(quantum_weight, n_qubits, circuit, scope, modulate, accepted):
  n_qubits = _circuits.check_n_qubits(n_qubits)
  _check_quantum_weight(quantum_weight)
  _check_choice("scope", scope, _scope.SCOPE_NAMES)
  _check_choice("modulate", modulate, accepted)
  return _circuits.resolve_circuit(circuit, n_qubits)


def superpose(
    inner: optax.GradientTransformation,
    quantum_weight: float | jax.Array = 0.5,
    n_qubits: int = 4,
    *,
    circuit: str | Callable[[jax.Array], jax.Array] = "paper",
    scope: str = "leaf",
    modulate: str = "update",
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the quantum superposition term to any Optax transformation.

  With ``u`` the update of ``inner`` and ``g`` the incoming gradient, the
  returned transformation outputs

  .. math::

    u' = u + \lambda \, M(\theta) \odot x, \qquad
    x = \begin{cases} g & \text{modulate="gradient"} \\
                      u & \text{modulate="update"} \end{cases}

  where :math:`\lambda` is ``quantum_weight``, :math:`\theta` the current
  parameters, and :math:`M(\theta)` the circuit's modulation on the
  coordinates selected by ``scope`` and 0 elsewhere. With the paper's circuit
  :math:`M_i(\theta) = \sin(\pi \theta_i)` (Pamuk et al., eq. 2).

  ``modulate="update"`` (the default) is safe on any inner transformation,
  complete optimizers included: the step becomes ``(1 + lambda * M) * u`` on
  the selected coordinates, so its sign and scale are ``inner``'s.
  ``modulate="gradient"`` adds a *descent direction* term: it is meaningful
  only on an inner transformation that outputs a descent direction (such as
  ``optax.scale_by_adam()``) followed by ``optax.scale_by_learning_rate``, as
  :func:`qsgd_optax.scale_by_qsgd` does. On a complete optimizer (whose update
  is already ``-lr * direction``) it points uphill and is ``1 / lr`` times too
  large. ``"preconditioned"`` needs Adam's second moment and is offered only
  by :func:`qsgd_optax.scale_by_qsgd`.

  Non-finite gradients: the term is added only on the selected coordinates,
  so a NaN or Inf in ``g`` or ``u`` propagates exactly as it does in
  ``inner``; compose with ``optax.apply_if_finite`` to skip such steps. A NaN
  or Inf parameter on a selected coordinate makes the term NaN on its
  register (see :func:`qsgd_optax.scale_by_qsgd`), which ``apply_if_finite``
  does not detect.

  Args:
    inner: the transformation to wrap (any ``optax.GradientTransformation``).
    quantum_weight: :math:`\lambda`, a finite real scalar. A Python or NumPy
      number is checked at construction; a JAX array (as
      ``optax.inject_hyperparams`` passes, traced or not) is checked for
      shape and dtype only, since reading its value would block on the
      device.
    n_qubits: register size: how many coordinates one circuit evaluation
      modulates. A Python int >= 1, at most
      :data:`qsgd_optax.circuits.MAX_QNODE_QUBITS` for the built-in QNodes.
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable
      ``float[B, n_qubits] -> float[B, n_qubits]``.
    scope: ``"leaf"``, ``"model"`` or ``"all"``.
    modulate: ``"update"`` (default) or ``"gradient"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s
    state, unchanged in structure. ``update`` requires ``params``.

  Raises:
    ValueError: on invalid arguments (at construction), or when ``update`` is
      called without ``params``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import qsgd_optax
    >>> f = lambda x: jnp.sum(x ** 2)
    >>> tx = qsgd_optax.superpose(optax.adam(0.1), 0.5, circuit="sine")
    >>> params = jnp.array([0.3, -1.2, 2.5])
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(f)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{f(params):.3f}")
    6.694
    5.789
    5.066
    4.496
    4.044

  References:
    Pamuk, Özdemir, Kocabay, `Superpositional Gradient Descent: Harnessing
    Quantum Principles for Model Training <https://arxiv.org/abs/2511.01918>`_,
    2025.
  """
  if modulate == "preconditioned":
    raise ValueError(
        "modulate='preconditioned' needs Adam's second moment, which superpose"
        " cannot see inside an arbitrary inner transformation; use "
        "qsgd_optax.scale_by_qsgd or qsgd_optax.qsgd for it. superpose accepts"
        f" modulate in {SUPERPOSE_MODULATE_NAMES}."
    )
  modulator = _resolve(
      quantum_weight, n_qubits, circuit, scope, modulate,
      SUPERPOSE_MODULATE_NAMES,
  )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    x = updates if modulate == "gradient" else new_updates
    new_updates = _scope.add_term(
        new_updates, params, x, quantum_weight, modulator, scope,
        multiplicative=modulate == "update",
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_qsgd(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Optional[Any] = None,
    quantum_weight: float | jax.Array = 0.5,
    n_qubits: int = 4,
    *,
    circuit: str | Callable[[jax.Array], jax.Array] = "paper",
    scope: str = "leaf",
    modulate: str = "gradient",
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam and adds the quantum superposition term.

  .. math::

    u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
          + \lambda \, M(\theta_t) \odot x_t

  The first term is exactly ``optax.scale_by_adam`` (bias-corrected, ``eps``
  outside the root). :math:`M` is the circuit's modulation on the coordinates
  selected by ``scope`` (0 elsewhere), and ``x`` depends on ``modulate``:

  * ``"gradient"`` (default, the paper's eq. 1-2): the raw gradient
    :math:`g_t`. Faithful, but not invariant to the gradient's scale: a
    gradient 100x larger makes the term 100x larger while Adam's term stays
    O(1). Where :math:`\lambda |M| |g| \geq 1` it cancels or reverses the Adam
    step, so training can stall or diverge where Adam converges
    (measurements: ``bench/RESULTS.md``, "Robustness").
  * ``"preconditioned"``: :math:`g_t / (\sqrt{\hat v_t + \epsilon_{root}} +
    \epsilon)`, the term on Adam's own scale.
  * ``"update"``: Adam's direction itself, so the step is
    :math:`(1 + \lambda M)` times Adam's on the selected coordinates.
    Scale invariant, and the form that converged wherever Adam did in our
    measurements.

  Non-finite values: a NaN or Inf gradient entry stays on its coordinate,
  exactly as in ``optax.scale_by_adam``: ``mu``, ``nu`` and the update are
  non-finite there and nowhere else, for every ``modulate`` (the term uses the
  gradient elementwise). To skip such steps, wrap the optimizer:
  ``optax.apply_if_finite(qsgd(...), max_consecutive_errors)`` leaves the
  parameters and the Adam state untouched on a non-finite step, and the run
  then continues exactly as if that step had never happened. A NaN or Inf
  *parameter* on a selected coordinate makes :math:`M` NaN: for ``"sine"`` on
  that coordinate only, for the QNode circuits (``"paper"``,
  ``"entangled"``) on its whole register, since the simulated state is then
  NaN; with ``scope="model"`` that register can span several leaves. A
  Python-number ``quantum_weight=0`` skips the term entirely (exactly Adam);
  a traced zero (e.g. under ``inject_hyperparams``) still gives ``0 * NaN``,
  which is NaN. The Adam state
  never sees the parameters and stays finite, but ``apply_if_finite`` checks
  only the gradients and does not skip such a step.

  Degenerate trees and dtypes: empty trees and trees of only integer,
  zero-size or 0-d leaves are accepted and keep their structure; only
  non-empty real floating-point leaves take part in the term, in their own
  precision (at least float32; float64 with ``jax_enable_x64``). Complex
  leaves get exactly Adam's update (``sin(pi * theta)`` has no complex
  reading here). Give integer leaves zero gradients: as in
  ``optax.adamw``, their update and first moment come out float32 (a
  ``None`` gradient is rejected by ``optax.scale_by_adam`` itself).

  Sharding: updates and state keep each leaf's sharding, with Auto or
  Explicit mesh axes, with or without ``jax.set_mesh``; scope ``"leaf"``
  moves ``n_qubits`` entries per leaf, never a leaf (see
  :mod:`qsgd_optax.circuits` for scope ``"all"``).

  Args:
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: optional dtype of the first moment.
    quantum_weight: :math:`\lambda`; the paper uses 0.1 and 0.5. A finite
      real scalar (a JAX array is checked for shape and dtype only, see
      :func:`qsgd_optax.superpose`).
    n_qubits: register size; the paper uses 4.
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable
      ``float[B, n_qubits] -> float[B, n_qubits]``.
    scope: ``"leaf"`` (first ``n_qubits`` entries of every array; the
      paper's reading, our default), ``"model"`` (first ``n_qubits`` entries of
      the whole model) or ``"all"`` (every entry).
    modulate: ``"gradient"``, ``"preconditioned"`` or ``"update"``.
    nesterov: use Nesterov momentum in the Adam term.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``optax.ScaleByAdamState``. ``update`` requires ``params``.

  Raises:
    ValueError: on invalid arguments, or when ``update`` gets no ``params``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import qsgd_optax
    >>> f = lambda x: jnp.sum(x ** 2)
    >>> tx = optax.chain(qsgd_optax.scale_by_qsgd(quantum_weight=0.5),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([0.3, -1.2, 2.5])
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(f)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{f(params):.3f}")
    5.713
    4.667
    4.260
    4.058
    3.939

  References:
    Pamuk, Özdemir, Kocabay, `Superpositional Gradient Descent: Harnessing
    Quantum Principles for Model Training <https://arxiv.org/abs/2511.01918>`_,
    2025.

    Kingma, Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  modulator = _resolve(
      quantum_weight, n_qubits, circuit, scope, modulate, MODULATE_NAMES
  )
  adam = optax.scale_by_adam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
      nesterov=nesterov,
  )

  def init_fn(params):
    return adam.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    direction, new_state = adam.update(updates, state, params)
    if modulate == "gradient":
      x = updates
    elif modulate == "update":
      x = direction
    else:
      nu_hat = optax.tree.bias_correction(new_state.nu, b2, new_state.count)
      x = jax.tree.map(
          lambda g, v: None if g is None else g / (jnp.sqrt(v + eps_root) + eps),
          updates,
          nu_hat,
          is_leaf=lambda v: v is None,
      )
    direction = _scope.add_term(
        direction, params, x, quantum_weight, modulator, scope,
        multiplicative=modulate == "update",
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


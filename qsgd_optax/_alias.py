"""The user-facing optimizer: QSGD with decoupled weight decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import optax

from qsgd_optax import _transform


def qsgd(
    learning_rate: optax.ScalarOrSchedule,
    quantum_weight: float | jax.Array = 0.5,
    n_qubits: int = 4,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: float | jax.Array = 0.0,
    mask: Optional[Any] = None,
    *,
    circuit: str | Callable[[jax.Array], jax.Array] = "paper",
    scope: str = "leaf",
    modulate: str = "gradient",
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Superpositional Gradient Descent: AdamW plus a circuit-modulated term.

  The update (Pamuk et al., eq. 1-2, with decoupled weight decay as in
  ``optax.adamw``) is

  .. math::

    \theta_{t+1} = \theta_t - \alpha_t \left(
        \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
        + \lambda \, M(\theta_t) \odot x_t + w \, \theta_t \right)

  with :math:`M_i(\theta) = \sin(\pi\theta_i)` computed by a PennyLane QNode
  on the coordinates selected by ``scope`` (0 elsewhere), and :math:`x_t` the
  raw gradient (``modulate="gradient"``, the paper's form), the
  Adam-preconditioned gradient (``"preconditioned"``) or Adam's direction
  (``"update"``). See :func:`qsgd_optax.scale_by_qsgd` for the measured
  failure modes of the paper's form and when to prefer the others.

  Interpretations (the paper is silent; these are our choices): Adam is
  standard bias-corrected Adam with ``eps`` outside the root; weight decay is
  decoupled; "the first ``n_qubits`` coordinates" means the first entries of
  each parameter array (``scope="leaf"``).

  This is ``optax.chain(scale_by_qsgd(...), add_decayed_weights(weight_decay,
  mask), scale_by_learning_rate(learning_rate))``.

  Non-finite values: a NaN or Inf gradient entry makes the update and Adam's
  moments non-finite on that coordinate only, as in ``optax.adamw``. Skip
  such steps with ``optax.apply_if_finite(qsgd(...), max_consecutive_errors)``:
  a skipped step changes neither the parameters nor the state, and later
  steps are exactly those of a run that never saw it. A NaN or Inf parameter
  on a selected coordinate makes the quantum term NaN there (``"sine"``) or
  on its whole register (the QNode circuits; with ``scope="model"`` possibly
  in several leaves), unless ``quantum_weight`` is the Python number 0,
  which skips the term; ``apply_if_finite``
  checks only gradients, so it does not catch this. With ``weight_decay > 0``
  the parameter's own update is NaN too, as in ``optax.adamw``. See
  :func:`qsgd_optax.scale_by_qsgd` for degenerate trees (empty, integer-only,
  zero-size or 0-d leaves).

  Args:
    learning_rate: a scalar or an ``optax.Schedule``.
    quantum_weight: :math:`\lambda`; the paper uses 0.1 and 0.5. A finite
      real scalar (a JAX array is checked for shape and dtype only, see
      :func:`qsgd_optax.superpose`).
    n_qubits: register size; the paper uses 4.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    mu_dtype: optional dtype of the first moment.
    weight_decay: decoupled weight decay :math:`w`.
    mask: a tree or callable selecting which leaves get weight decay, as in
      ``optax.adamw``.
    circuit: ``"paper"``, ``"entangled"``, ``"sine"`` or a callable.
    scope: ``"leaf"``, ``"model"`` or ``"all"``.
    modulate: ``"gradient"``, ``"preconditioned"`` or ``"update"``.
    nesterov: use Nesterov momentum in the Adam term.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires
    ``params``.

  Raises:
    ValueError: on invalid arguments, or when ``update`` gets no ``params``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import qsgd_optax
    >>> f = lambda x: jnp.sum(x ** 2)
    >>> solver = qsgd_optax.qsgd(learning_rate=0.1, quantum_weight=0.5)
    >>> params = jnp.array([0.3, -1.2, 2.5])
    >>> state = solver.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(f)(params)
    ...   updates, state = solver.update(grads, state, params)
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

    Loshchilov, Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return optax.chain(
      _transform.scale_by_qsgd(
          b1=b1,
          b2=b2,
          eps=eps,
          eps_root=eps_root,
          mu_dtype=mu_dtype,
          quantum_weight=quantum_weight,
          n_qubits=n_qubits,
          circuit=circuit,
          scope=scope,
          modulate=modulate,
          nesterov=nesterov,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )

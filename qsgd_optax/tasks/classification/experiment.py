"""The paper's text-classification experiment: configuration, jitted steps, the train loop.

One optimizer arm (:mod:`qsgd_optax.tasks.arms`) trains the classifier
(:mod:`~qsgd_optax.tasks.classification.transformer`) on a task from
:mod:`~qsgd_optax.tasks.classification.text_data`.

:func:`train_and_evaluate` is the classification loop of the project: the
example CLI and the benchmarks call it. Its train step is one ``jax.jit``
over the split NNX state, holding forward, backward and the whole optimizer
update (for ``qsgd`` arms the QSGD circuit too); evaluation is jitted too.
With ``checkpoint_dir`` it writes Orbax checkpoints (model, optimizer and
metric state, the position in the batch order, the history so far) and
with ``resume=True`` continues the latest complete one, ending bit-identical
to an uninterrupted run. It writes no result files: the CLI does.

Example:

  >>> config = ClassificationConfig(epochs=1, n_train=64, n_test=32, seq_len=8)
  >>> run = train_and_evaluate(config, parse_arm("adamw"), seed=0)
  >>> sorted(k for k in run if k.startswith("test_"))
  ['test_accuracy', 'test_loss']
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qsgd_optax.tasks._checkpoints import CheckpointError, RunCheckpoints, run_directory
from qsgd_optax.tasks.arms import Arm, make_optimizer, parse_arm  # noqa: F401  parse_arm: the doctests' namespace
from qsgd_optax.tasks.classification import text_data
from qsgd_optax.tasks.classification.quantum_attention import METHODS
from qsgd_optax.tasks.classification.transformer import ATTENTIONS, POOLINGS, TransformerClassifier, create_model
from qsgd_optax.tasks.reporting import arm_label, format_table, group_runs, mean_std
from qsgd_optax.tasks.running import NonFiniteError, progress_bar

__all__ = [
    "TASKS",
    "ClassificationConfig",
    "checkpoint_path",
    "comparison_table",
    "epochs_to_target",
    "eval_step",
    "load_task",
    "train_and_evaluate",
    "train_step",
]


TASKS: tuple[str, ...] = ("synthetic", "agreement", "polarity")
_EVAL_BATCH = 250


@dataclasses.dataclass(frozen=True)
class ClassificationConfig:
  """Everything that defines a classification run except the arm and seed.

  Defaults are the paper's configuration on the synthetic task.

  Attributes:
    task: ``"synthetic"`` (which class fires first), ``"agreement"`` (do
      the first and last markers agree: the headroom task, see
      :func:`~qsgd_optax.tasks.classification.text_data.make_synthetic`) or
      ``"polarity"``.
    epochs: passes over the training split.
    batch_size: training batch size (the last partial batch is dropped).
    learning_rate: constant learning rate.
    weight_decay: decoupled weight decay.
    target_accuracy: the test accuracy ``epochs_to_target`` waits for.
    embed_dim, num_heads, ff_dim, num_layers, dropout: the transformer.
    pooling: ``"mean"`` (over real tokens) or ``"cls"`` (a learned token).
    attention: ``"standard"`` or ``"quantum"``.
    n_qubits: qubits of the quantum attention circuit.
    quantum_method: ``"spectral"`` or ``"direct"`` (see quantum_attention).
    n_train, n_test, seq_len: synthetic task size (``seq_len`` is the
      polarity truncation length too).
    data_seed: fixes the data split (model seeds vary independently).
    loss_scale: multiplies the training loss the optimizer sees (its
      gradient, equivalently); metrics stay unscaled. Adam is invariant to
      it, the paper's raw-gradient QSGD term is not (``bench/robustness.py``).
    markers: markers per sequence of the ``"agreement"`` task (>= 2).
    evals_per_epoch: test-set evaluations per epoch, evenly spaced in steps
      (the last at the epoch's end); the per-evaluation history resolves
      steps-to-target below an epoch.
    record_term_share: for ``qsgd`` arms, measure the quantum term's share
      of the update at every evaluation (on a fixed probe batch: the first
      ``batch_size`` training sequences; see :func:`term_share_fn`), recorded
      as ``term_share_median`` / ``_max`` / ``_global`` at epochs
      ``term_share_epoch``. Reads the state, never changes it: the run's
      trajectory is the same either way.
    max_nonfinite: when set, the optimizer is wrapped in
      ``optax.apply_if_finite``: a step with a non-finite gradient changes
      nothing and is counted (``nonfinite_steps`` in the record), and the run
      stops with :class:`NonFiniteError` once ``max_nonfinite`` steps in a row
      were non-finite (checked at every epoch end, so the stop comes at the
      end of the epoch in which it happened; the skipped steps did no harm).
  """

  task: str = "synthetic"
  epochs: int = 15
  batch_size: int = 32
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  target_accuracy: float = 0.9
  embed_dim: int = 64
  num_heads: int = 4
  ff_dim: int = 128
  num_layers: int = 2
  dropout: float = 0.1
  pooling: str = "mean"
  attention: str = "standard"
  n_qubits: int = 4
  quantum_method: str = "spectral"
  n_train: int = 2000
  n_test: int = 1000
  seq_len: int = 32
  data_seed: int = 0
  loss_scale: float = 1.0
  max_nonfinite: int | None = None
  markers: int = 2
  evals_per_epoch: int = 1
  record_term_share: bool = True

  def __post_init__(self) -> None:
    for name, accepted in (("task", TASKS), ("attention", ATTENTIONS), ("pooling", POOLINGS),
                           ("quantum_method", METHODS)):
      if getattr(self, name) not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
    for name in ("epochs", "batch_size", "embed_dim", "num_heads", "ff_dim", "num_layers", "n_train",
                 "n_test", "seq_len", "evals_per_epoch"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
    if self.max_nonfinite is not None and (not isinstance(self.max_nonfinite, int)
                                           or self.max_nonfinite < 1):
      raise ValueError(f"max_nonfinite must be None or a positive int, got {self.max_nonfinite!r}")
    if not (math.isfinite(self.loss_scale) and self.loss_scale > 0):
      raise ValueError(f"loss_scale must be positive and finite, got {self.loss_scale!r}")
    if not isinstance(self.markers, int) or not 2 <= self.markers <= self.seq_len:
      raise ValueError(f"markers must be an int in [2, seq_len={self.seq_len}], got {self.markers!r}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    if not 0 < self.target_accuracy <= 1:
      raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy!r}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")


def load_task(config: ClassificationConfig) -> text_data.TextDataset:
  """The dataset ``config`` names, with its fixed split."""
  if config.task == "synthetic":
    return text_data.make_synthetic(config.n_train, config.n_test, seq_len=config.seq_len, seed=config.data_seed)
  if config.task == "agreement":
    return text_data.make_synthetic(config.n_train, config.n_test, seq_len=config.seq_len, seed=config.data_seed,
                                    rule="agree", markers=config.markers)
  return text_data.load_polarity(max_len=config.seq_len, seed=config.data_seed)


def _metrics() -> nnx.MultiMetric:
  return nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, labels: jax.Array) -> nnx.State:
  """One optimizer step on a batch; also accumulates the training metrics."""
  model, optimizer, metrics = nnx.merge(graphdef, state)

  def loss_fn(model: TransformerClassifier) -> tuple[jax.Array, jax.Array]:
    logits = model(tokens)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.mean(), (logits, losses)

  (_, (logits, losses)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  metrics.update(loss=losses, logits=logits, labels=labels)
  return nnx.state((model, optimizer, metrics))


@functools.partial(jax.jit, static_argnums=0)
def eval_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, labels: jax.Array,
              valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sums of the loss and of correct predictions over the ``valid`` rows of a padded batch.

  The sums are taken here rather than through ``nnx.metrics``' ``mask=``, which
  flax before 0.12.6 silently ignores (padding rows would count).
  """
  model = nnx.merge(graphdef, state)
  logits = model(tokens)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(jnp.where(valid, correct, 0.0))


def _placement(mesh: jax.sharding.Mesh | None, batch_size: int) -> tuple[Callable[[np.ndarray], Any], Any]:
  """``(place_batch, replicated)``: how host batches and the state go onto ``mesh`` (identity without one)."""
  if mesh is None:
    return (lambda x: x), None
  if len(mesh.axis_names) != 1:
    raise ValueError(f"mesh must have one (data) axis, got axes {mesh.axis_names}")
  if batch_size % mesh.size:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of the mesh size ({mesh.size})")
  rows = NamedSharding(mesh, P(mesh.axis_names[0]))

  def place_batch(x: np.ndarray) -> jax.Array:  # each process builds only its own rows
    return jax.make_array_from_callback(x.shape, rows, lambda index: x[index])

  return place_batch, NamedSharding(mesh, P())


def _on_mesh(state: Any, replicated: NamedSharding | None) -> Any:
  """``state`` with every leaf not yet on ``replicated``'s devices replicated there (as is without a mesh)."""
  if replicated is None:
    return state
  devices = replicated.mesh.devices.size

  def place(x):
    sharding = getattr(x, "sharding", None)
    if sharding is not None and len(sharding.device_set) == devices:
      return x
    return _replicate(x, replicated)

  return jax.tree.map(place, state)


def _replicate(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """``x`` (the same on every process) as a global array replicated over ``sharding``'s mesh."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_replicate(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _evaluate(model: TransformerClassifier, split: text_data.Split, replicated: Any = None) -> dict[str, float]:
  """Loss and accuracy of ``model`` (in eval mode) on a whole split (inputs replicated on a mesh if given)."""
  model.eval()
  graphdef, state = nnx.split(model)
  n = len(split)
  loss_sum = correct_sum = 0.0
  for start in range(0, n, _EVAL_BATCH):
    tokens, labels = split.tokens[start:start + _EVAL_BATCH], split.labels[start:start + _EVAL_BATCH]
    pad = _EVAL_BATCH - len(labels)
    valid = np.arange(_EVAL_BATCH) < len(labels)
    if pad:
      tokens = np.pad(tokens, ((0, pad), (0, 0)))
      labels = np.pad(labels, (0, pad))
    if replicated is not None:
      tokens, labels, valid = (jax.make_array_from_callback(np.shape(a), replicated, lambda index, a=a: a[index])
                               for a in (tokens, labels, valid))
    batch_loss, batch_correct = eval_step(graphdef, state, tokens, labels, valid)
    loss_sum += float(batch_loss)
    correct_sum += float(batch_correct)
  model.train()
  if n == 0:
    return {"loss": float("nan"), "accuracy": float("nan")}
  return {"loss": loss_sum / n, "accuracy": correct_sum / n}


def epochs_to_target(accuracies: Sequence[float], target: float) -> int | None:
  """First epoch (1-based) whose accuracy reaches ``target``, else ``None``.

  >>> epochs_to_target([0.5, 0.91, 0.89, 0.95], 0.9)
  2
  """
  for epoch, accuracy in enumerate(accuracies, 1):
    if accuracy >= target:
      return epoch
  return None


# What must match for a checkpoint to be resumed: everything that shapes the
# training trajectory. ``epochs`` (a resumed run may train longer) and
# ``target_accuracy`` (only read when the record is built) are left out.
_NOT_IDENTITY = ("epochs", "target_accuracy", "record_term_share")
# Fields added after checkpoints were first written, left out at their
# default so that those checkpoints still resume.
_NEW_FIELDS = {"evals_per_epoch": 1, "markers": 2}


def checkpoint_path(checkpoint_dir: str | os.PathLike[str], arm: Arm, seed: int) -> Path:
  """The directory holding one run's checkpoints: ``checkpoint_dir/<arm label>-seed<seed>``.

  Characters other than letters, digits, ``.``, ``_`` and ``-`` in the label
  become ``_``.

  >>> checkpoint_path("ckpt", parse_arm("qsgd:0.5"), 2).as_posix()
  'ckpt/qsgd_0.5-seed2'
  """
  return run_directory(checkpoint_dir, arm.label, seed)


def _identity(config: ClassificationConfig, arm: Arm, seed: int, data: text_data.TextDataset) -> dict[str, Any]:
  fields = {k: v for k, v in dataclasses.asdict(config).items()
            if k not in _NOT_IDENTITY and not (k in _NEW_FIELDS and v == _NEW_FIELDS[k])}
  return {"optimizer": arm.label, "seed": int(seed), **fields, "train_sequences": len(data.train),
          "vocab_size": int(data.vocab_size), "num_classes": int(data.num_classes)}


@functools.lru_cache(maxsize=32)
def _optimizer(arm: Arm, learning_rate: float, weight_decay: float, n_qubits: int,
               loss_scale: float = 1.0, max_nonfinite: int | None = None) -> optax.GradientTransformation:
  """One transformation object per setting, so seeds of an arm share the compiled step."""
  tx = make_optimizer(arm, learning_rate, weight_decay=weight_decay, n_qubits=n_qubits)
  if max_nonfinite is not None:
    # One more than the stop threshold: apply_if_finite never lets a
    # non-finite update through before the run is stopped.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=max_nonfinite + 1)
  if loss_scale != 1.0:  # the scaled gradient is what the optimizer (and the check) sees
    tx = optax.chain(optax.scale(loss_scale), tx)
  return tx


SHARE_KEYS = ("median", "max", "global")


@functools.lru_cache(maxsize=32)
def term_share_fn(arm: Arm, learning_rate: float, weight_decay: float, n_qubits: int,
                  loss_scale: float = 1.0, max_nonfinite: int | None = None) -> Callable[..., Any] | None:
  """A jitted ``(graphdef, state, tokens, labels) -> {median, max, global}`` for a ``qsgd`` arm.

  On one batch, from the run's current state: the arm's update ``u`` (what
  its next step would apply) and the quantum term's part of it, ``u``
  minus the update of the same optimizer with ``quantum_weight=0`` (exactly
  AdamW's chain) from the same state; then
  :func:`qsgd_optax.diagnostics.term_share` on the arm's scope. The state passed in is
  not changed (the function returns only the three ratios). The
  difference of two float32 updates resolves shares down to about 1e-7
  (one rounding of ``u``); smaller terms read as that floor. ``None`` for
  ``adamw``, which has no term.
  """
  if arm.name != "qsgd":
    return None
  import qsgd_optax  # pylint: disable=import-outside-toplevel

  tx = _optimizer(arm, learning_rate, weight_decay, n_qubits, loss_scale, max_nonfinite)
  twin = _optimizer(dataclasses.replace(arm, quantum_weight=0.0), learning_rate, weight_decay, n_qubits,
                    loss_scale, max_nonfinite)

  @functools.partial(jax.jit, static_argnums=0)
  def share(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    model, optimizer, _ = nnx.merge(graphdef, state)
    seen: dict[str, Any] = {}

    def record(grads, opt_state, params=None, **extra):
      updates, new_state = tx.update(grads, opt_state, params, **extra)
      seen["updates"], seen["params"] = updates, params
      seen["twin"] = twin.update(grads, opt_state, params, **extra)[0]
      return updates, new_state

    def loss_fn(model: TransformerClassifier) -> jax.Array:
      return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()

    grads = nnx.grad(loss_fn)(model)
    # nnx.Optimizer turns its variables into arrays and back the same way
    # on every flax version; only its transformation is swapped, on this copy.
    optimizer.tx = optax.GradientTransformationExtraArgs(tx.init, record)
    optimizer.update(model, grads)
    term = jax.tree.map(jnp.subtract, seen["updates"], seen["twin"])
    return qsgd_optax.diagnostics.term_share(term, seen["updates"], seen["params"], n_qubits, scope=arm.scope)

  return share


def _finite_guard(opt_state: Any) -> Any:
  """The ``ApplyIfFiniteState`` inside ``_optimizer``'s state (after an optional scale)."""
  if isinstance(opt_state, tuple) and not hasattr(opt_state, "notfinite_count"):
    return opt_state[-1]
  return opt_state


def train_and_evaluate(
    config: ClassificationConfig,
    arm: Arm,
    seed: int,
    *,
    dataset: text_data.TextDataset | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    return_state: bool = False,
    log: Callable[[str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], nnx.State]:
  """Trains one model with one optimizer arm and returns its run record.

  Args:
    config: the experiment configuration.
    arm: the optimizer arm.
    seed: fixes initialisation, dropout and batch order (not the data split).
    dataset: the already loaded task, to share it across runs; loaded from
      ``config`` when ``None``.
    progress: show a per-epoch progress bar.
    checkpoint_dir: when given, Orbax checkpoints go to
      ``checkpoint_path(checkpoint_dir, arm, seed)``: after every epoch (once
      evaluated) and every ``checkpoint_every`` optimizer steps, the last
      ``keep`` kept. Each holds the model, optimizer (the whole optax state)
      and metric state, the step, epoch and position in the epoch, the
      batch-order generator's state and the history so far; the directory
      also holds ``run_identity.json``, the configuration a resumed run must
      match. Writing into a directory that already holds checkpoints needs
      ``resume=True``.
    checkpoint_every: also checkpoint every this many optimizer steps.
    keep: how many checkpoints to keep.
    resume: continue from the newest complete checkpoint in the run's
      directory that reads and matches its digests (incomplete saves are
      ignored, damaged ones skipped with a note to ``log``; none there:
      start afresh; only damaged ones: a CheckpointError). The run then
      ends bit-identical to an uninterrupted one. ``epochs``
      may differ from the checkpointed run's (train on); every other
      field of ``config``, the arm and the seed must match.
    on_step: called with the number of optimizer steps done after every
      step (after that step's checkpoint, if any); raising stops the run.
    return_state: also return the final ``nnx.state((model, optimizer))``.
    log: receives the one-line notes on skipped checkpoints (default: a
      ``RuntimeWarning``).
    mesh: data parallelism: a one-axis mesh (e.g. every device of every
      process under ``jax.distributed``); the state is replicated on it,
      every batch split along its rows (``batch_size`` must be a multiple
      of the mesh size), and each process materialises only its own rows.
      Within float rounding of the single-device run (the gradient is
      summed in another order).

  Returns:
    A JSON-ready record: the arm's fields and ``seed``; per-epoch lists
    ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` (and
    ``validation_*`` when the task has a validation split); ``final_accuracy``
    (last test accuracy), ``best_accuracy``, ``epochs_to_target``,
    ``wall_time_s`` (the whole run), ``compile_time_s`` (near 0 when an
    earlier run of the same arm and shapes already compiled the step) and
    ``mean_step_time_s`` (training wall time per optimizer step run by this
    call, compile and checkpoint writes excluded), ``steps`` (all of the
    run's, resumed ones included), ``diverged`` (a non-finite training
    loss). With ``return_state``, the pair ``(record, state)``.

  Raises:
    CheckpointError: (a ``ValueError``) the checkpoint directory holds
      another run's checkpoints (naming the mismatching fields), or holds
      checkpoints and ``resume`` is false, or is past this run's ``epochs``.
  """
  if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
    raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
  if not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep must be a positive int, got {keep!r}")
  data = dataset if dataset is not None else load_task(config)
  start = time.perf_counter()
  model = create_model(config, data, seed)
  tx = _optimizer(arm, config.learning_rate, config.weight_decay, config.n_qubits, config.loss_scale,
                  config.max_nonfinite)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = _metrics()
  model.train()
  graphdef, state = nnx.split((model, optimizer, metrics))
  place_batch, replicated = _placement(mesh, config.batch_size)
  state = _on_mesh(state, replicated)

  steps_per_epoch = len(data.train) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size ({config.batch_size}) exceeds the {len(data.train)} training sequences")
  batch_shape = (config.batch_size, data.seq_len)

  order_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
  history: dict[str, list[float]] = {}
  first_epoch, first_position, global_step = 0, 0, 0
  checkpoints = None
  if checkpoint_dir is not None:
    checkpoints = RunCheckpoints(checkpoint_path(checkpoint_dir, arm, seed), _identity(config, arm, seed, data),
                                 keep=keep, resume=resume)
  try:  # the checkpoint manager is closed on every way out
    if checkpoints is not None and checkpoints.latest is not None:
      tree, saved = checkpoints.restore(nnx.to_pure_dict(state), log=log)
      nnx.replace_by_pure_dict(state, tree)
      first_epoch, first_position, global_step = saved["epoch"], saved["position"], saved["step"]
      if first_epoch > config.epochs or (first_epoch == config.epochs and first_position):
        raise CheckpointError(
            f"cannot resume from {checkpoints.directory}: its latest checkpoint is past epoch {config.epochs}, "
            "the end of this run")
      order_rng.bit_generator.state = saved["order_rng"]
      history = {k: list(v) for k, v in saved["history"].items()}
      if "eval_epoch" not in history:  # written before evaluations were placed (one per epoch then)
        history["eval_epoch"] = [float(e) for e in range(1, len(history.get("test_accuracy", [])) + 1)]
      nnx.update((model, optimizer, metrics), state)

    compile_start = time.perf_counter()
    rows = None if mesh is None else NamedSharding(mesh, P(mesh.axis_names[0]))
    step = train_step.lower(graphdef, state, jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=rows),
                            jax.ShapeDtypeStruct(batch_shape[:1], jnp.int32, sharding=rows)).compile()
    compile_time = time.perf_counter() - compile_start
  except BaseException:
    if checkpoints is not None:
      checkpoints.close()
    raise

  def progress_record(epoch: int, position: int, rng_state: Mapping[str, Any]) -> dict[str, Any]:
    return {"step": global_step, "epoch": epoch, "position": position, "order_rng": rng_state,
            "history": history}

  # Evaluations after these steps of every epoch (the last is the epoch's end).
  eval_after = sorted({round(k * steps_per_epoch / config.evals_per_epoch)
                       for k in range(1, config.evals_per_epoch + 1)} - {0})
  share_fn = None
  if config.record_term_share:
    share_fn = term_share_fn(arm, config.learning_rate, config.weight_decay, config.n_qubits,
                             config.loss_scale, config.max_nonfinite)
  probe = (place_batch(data.train.tokens[:config.batch_size]),
           place_batch(data.train.labels[:config.batch_size]))

  def evaluate(epoch: int, position: int) -> None:
    """Test (and validation) metrics, and the term's share, of the current state."""
    nnx.update((model, optimizer, metrics), state)
    history.setdefault("eval_epoch", []).append(epoch + position / steps_per_epoch)
    for name, split in (("test", data.test), ("validation", data.validation)):
      if split is not None:
        for key, value in _evaluate(model, split, replicated).items():
          history.setdefault(f"{name}_{key}", []).append(value)
    if share_fn is not None:
      shares = share_fn(graphdef, state, *probe)
      # its own x values: a run resumed from a checkpoint written without shares has fewer
      history.setdefault("term_share_epoch", []).append(epoch + position / steps_per_epoch)
      for key in SHARE_KEYS:
        history.setdefault(f"term_share_{key}", []).append(float(shares[key]))

  train_time, steps_run = 0.0, 0
  try:
    for epoch in progress_bar(range(first_epoch, config.epochs), desc=f"{arm.label} seed={seed}",
                              disable=not progress, leave=False):
      epoch_rng_state = order_rng.bit_generator.state  # before this epoch's permutation
      order = order_rng.permutation(len(data.train))[: steps_per_epoch * config.batch_size]
      tokens = data.train.tokens[order].reshape(steps_per_epoch, *batch_shape)
      labels = data.train.labels[order].reshape(steps_per_epoch, config.batch_size)
      epoch_start, save_time = time.perf_counter(), 0.0
      for i in range(first_position if epoch == first_epoch else 0, steps_per_epoch):
        state = step(state, place_batch(tokens[i]), place_batch(labels[i]))
        global_step += 1
        steps_run += 1
        if i + 1 in eval_after[:-1]:  # a mid-epoch evaluation; the epoch's last comes below
          jax.block_until_ready(state)
          eval_start = time.perf_counter()
          evaluate(epoch, i + 1)
          graphdef, state = nnx.split((model, optimizer, metrics))
          state = _on_mesh(state, replicated)
          save_time += time.perf_counter() - eval_start
        if (checkpoints is not None and checkpoint_every is not None and global_step % checkpoint_every == 0
            and i + 1 < steps_per_epoch):  # the epoch's last step is saved after evaluation
          save_start = time.perf_counter()
          checkpoints.save(global_step, nnx.to_pure_dict(state), progress_record(epoch, i + 1, epoch_rng_state))
          save_time += time.perf_counter() - save_start
        if on_step is not None:
          on_step(global_step)
      jax.block_until_ready(state)
      train_time += time.perf_counter() - epoch_start - save_time

      nnx.update((model, optimizer, metrics), state)
      if config.max_nonfinite is not None:
        in_a_row = int(_finite_guard(optimizer.opt_state).notfinite_count[...])
        if in_a_row >= config.max_nonfinite:
          raise NonFiniteError(
              f"{arm.label} seed={seed}: {in_a_row} non-finite training steps in a row (up to step "
              f"{global_step}, max_nonfinite={config.max_nonfinite}); the parameters were left as "
              "they were before them. Lower the learning rate or quantum_weight, or use "
              "modulate='update'.")
      for key, value in metrics.compute().items():
        history.setdefault(f"train_{key}", []).append(float(value))
      metrics.reset()
      graphdef, state = nnx.split((model, optimizer, metrics))
      evaluate(epoch, steps_per_epoch)
      graphdef, state = nnx.split((model, optimizer, metrics))
      state = _on_mesh(state, replicated)  # metrics.reset() may have made new single-device arrays
      if checkpoints is not None:
        checkpoints.save(global_step, nnx.to_pure_dict(state), progress_record(epoch + 1, 0, order_rng.bit_generator.state))
  finally:
    if checkpoints is not None:
      checkpoints.close()

  test_accuracy = history["test_accuracy"]
  window = min(len(test_accuracy), max(3, config.evals_per_epoch))
  reached = [e for e, a in zip(history["eval_epoch"], test_accuracy) if a >= config.target_accuracy]
  to_target = reached[0] if reached else None
  if to_target is not None and config.evals_per_epoch == 1:
    to_target = int(round(to_target))
  record = {
      **history,
      "final_accuracy": test_accuracy[-1],
      "final_accuracy_window": float(np.mean(test_accuracy[-window:])),
      "final_window": window,
      "best_accuracy": max(test_accuracy),
      "epochs_to_target": to_target,
      "evals_per_epoch": config.evals_per_epoch,
      "steps": steps_per_epoch * config.epochs,
      "wall_time_s": time.perf_counter() - start,
      "compile_time_s": compile_time,
      "mean_step_time_s": train_time / steps_run if steps_run else float("nan"),
      "diverged": not all(math.isfinite(v) for v in history["train_loss"]),
      "nonfinite_steps": (int(_finite_guard(optimizer.opt_state).total_notfinite[...])
                          if config.max_nonfinite is not None else None),
  }
  if return_state:
    return record, nnx.state((model, optimizer))
  return record


def _fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
  if n == 0:
    return "-"
  return f"{mean:.{digits}f} +- {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def comparison_table(runs: Sequence[Mapping[str, Any]], target_accuracy: float = 0.9) -> str:
  """One row per arm: final test accuracy, epochs to target, step time (mean +- std over seeds).

  ``epochs to target`` averages the seeds that reached it and says how many did.
  """
  rows = []
  for label, group in group_runs(runs).items():
    final = mean_std(r["final_accuracy"] for r in group)
    reached = [r["epochs_to_target"] for r in group if r["epochs_to_target"] is not None]
    to_target = mean_std(reached)
    step_ms = mean_std(1e3 * r["mean_step_time_s"] for r in group)
    rows.append([
        arm_label(label, group), len(group), _fmt(*final),
        f"{_fmt(*to_target, digits=1)} ({len(reached)}/{len(group)})",
        _fmt(*step_ms, digits=2),
    ])
  headers = ["arm", "seeds", "final test acc", f"epochs to {target_accuracy:.0%}", "step ms"]
  return format_table(headers, rows)

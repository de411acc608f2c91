"""The LM fine-tuning experiment: configuration, model loading, checkpoints, every run.

The recipe (Pamuk et al.'s GSM8K experiment, scaled): one epoch, a batch of
one example by default with gradient accumulation through
:class:`optax.MultiSteps`, linear warmup then linear decay to zero,
``optax.clip_by_global_norm`` chained before the optimizer, decoupled weight
decay, and mixed precision (bfloat16 compute through the model's ``dtype``,
float32 master weights and optimizer state).

:func:`run_finetune` is the driver: :class:`FinetuneConfig` -> data
(:mod:`~qsgd_optax.tasks.lm.gsm_data`) and model
(:mod:`~qsgd_optax.tasks.lm.llama`, :mod:`~qsgd_optax.tasks.lm.gguf_loader`)
-> batches (:mod:`~qsgd_optax.tasks.lm.batching`) -> the compiled step
(:mod:`~qsgd_optax.tasks.lm.steps`) on a mesh
(:mod:`~qsgd_optax.tasks.lm.sharding`) -> the loop
(:mod:`~qsgd_optax.tasks.lm.loop`) -> run records; with a checkpoint
directory it saves and resumes Orbax checkpoints. It writes no result
files: the CLI does (:mod:`~qsgd_optax.tasks.reporting`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qsgd_optax.tasks import _checkpoints, reporting, running
from qsgd_optax.tasks.arms import Arm
from qsgd_optax.tasks.lm.batching import make_batches, pack_examples
from qsgd_optax.tasks.lm.loop import evaluate, finite_mean, smooth_curve, train
from qsgd_optax.tasks.lm.sharding import device_summary, make_mesh, param_shardings, state_shardings
from qsgd_optax.tasks.lm.sharding import shard_batch
from qsgd_optax.tasks.lm.steps import (Compiled, make_eval_fn, make_grad_fn, make_optimizer, make_share_fn,
                                       make_update_fn, split_params)

__all__ = [
    "DTYPES",
    "MODELS",
    "FinetuneConfig",
    "comparison_table",
    "run_finetune",
]


MODELS = ("smollm2-135m", "tiny")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass
class FinetuneConfig:
  """Configuration of :func:`run_finetune` (the CLI's options).

  Attributes:
    model: ``"smollm2-135m"`` (the pretrained GGUF) or ``"tiny"`` (a small
      random-init Llama with a byte-level tokenizer, no download).
    examples: training problems, one epoch over them.
    test_examples: held-out problems (from templates unseen in training).
    max_len: tokens per row; longer examples are cut at the end.
    batch_size: examples (or packed rows) per micro-batch.
    grad_accum: micro-batches per optimizer update (``optax.MultiSteps``).
    learning_rate: peak learning rate.
    warmup: warmup length as a fraction of the optimizer updates.
    weight_decay: decoupled weight decay.
    clip_norm: global-norm gradient clipping (``None``: off).
    dtype: compute dtype name; parameters and optimizer state stay float32.
    format: ``"chat"``, ``"plain"`` or ``"auto"`` (chat for SmolLM2, plain
      for the tiny model).
    pack: pack several examples per row instead of one padded example.
    bucket: padded row lengths are multiples of this (``pack=False``).
    data_seed: seed of the problem set (each run's seed only shuffles order
      and, for the tiny model, initializes the weights).
    eval_rows: rows per evaluation batch.
    mesh: ``{"data": N, "fsdp": M}`` or ``None`` for one device.
    n_qubits: QSGD register size.
    cache: cache directory for downloads (``None``: the default).
    max_nonfinite: when set, the optimizer is wrapped in
      ``optax.apply_if_finite``: a micro-batch with a non-finite gradient
      changes nothing and is counted (``nonfinite_steps`` in the record), and
      the run stops with :class:`~qsgd_optax.tasks.running.NonFiniteError`
      once ``max_nonfinite`` of them came in a row.
  """

  model: str = "smollm2-135m"
  examples: int = 48
  test_examples: int = 16
  max_len: int = 512
  batch_size: int = 1
  grad_accum: int = 1
  learning_rate: float = 2e-5
  warmup: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float | None = 1.0
  dtype: str = "bfloat16"
  format: str = "auto"
  pack: bool = False
  bucket: int = 64
  data_seed: int = 0
  eval_rows: int = 4
  mesh: dict[str, int] | None = None
  n_qubits: int = 4
  cache: str | None = None
  max_nonfinite: int | None = None

  def __post_init__(self) -> None:
    if self.max_nonfinite is not None and (not isinstance(self.max_nonfinite, int)
                                           or self.max_nonfinite < 1):
      raise ValueError(f"max_nonfinite must be None or a positive int, got {self.max_nonfinite!r}.")
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got "
                       f"{self.dtype!r}.")
    if self.format not in ("auto", "chat", "plain"):
      raise ValueError(f"format must be 'auto', 'chat' or 'plain', got "
                       f"{self.format!r}.")
    for name in ("examples", "max_len", "batch_size", "grad_accum", "bucket",
                 "eval_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.test_examples < 0:
      raise ValueError(f"test_examples must be >= 0, got {self.test_examples}.")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"warmup must be in [0, 1), got {self.warmup}.")

  @property
  def style(self) -> str:
    """The prompt format actually used."""
    if self.format != "auto":
      return self.format
    return "chat" if self.model == "smollm2-135m" else "plain"


def _abstract_model(cfg: Any, dtype: Any) -> nnx.GraphDef:
  from qsgd_optax.tasks.lm.llama import Llama  # pylint: disable=import-outside-toplevel

  abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype,
                                          param_dtype=jnp.float32,
                                          rngs=nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def _load_model(config: FinetuneConfig) -> tuple[Any, Any, Callable[[int], Any]]:
  """``(graphdef, tokenizer, init(seed) -> host float32 params)``."""
  from qsgd_optax.tasks.lm import gguf_loader, llama  # pylint: disable=import-outside-toplevel

  dtype = DTYPES[config.dtype]
  if config.model == "smollm2-135m":
    loaded = gguf_loader.load_gguf(gguf_loader.fetch_smollm2(config.cache))
    graphdef = _abstract_model(loaded.config, dtype)
    return graphdef, loaded.tokenizer, lambda seed: loaded.params
  tokenizer = gguf_loader.byte_level_tokenizer()
  cfg = llama.LlamaConfig.tiny(vocab_size=tokenizer.get_vocab_size())
  graphdef = _abstract_model(cfg, dtype)

  def init(seed: int) -> Any:
    model = llama.Llama(cfg, dtype=dtype, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(seed))
    return jax.device_get(split_params(model)[1])

  return graphdef, tokenizer, init


# What a resumed run may change: where files are cached, how evaluation is
# batched and how many non-finite micro-batches in a row stop it (none of
# them shapes the trajectory; whether apply_if_finite wraps the optimizer at
# all shows in the state's layout, which is checked on restore).
_NOT_IDENTITY = ("cache", "eval_rows", "max_nonfinite")


def _state_tree(params: Any, opt_state: Any) -> dict[str, Any]:
  """Parameters and optimizer state as one flat dict for Orbax.

  Optax states hold namedtuples and empty nodes; numbering the leaves keeps
  the checkpoint independent of how Orbax would name them. The leaves' key
  paths are saved with the progress record and compared on restore.
  """
  leaves = jax.tree.leaves((params, opt_state))
  return {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}


def _state_paths(params: Any, opt_state: Any) -> list[str]:
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path((params, opt_state))[0]]


def _check_state_paths(progress: Mapping[str, Any], like: Any, directory: Any) -> None:
  """Refuses a checkpoint whose saved leaf paths differ from ``like``'s."""
  paths = _state_paths(*like)
  saved = progress.get("state_paths") or []
  if saved != paths:
    missing = sorted(set(paths) - set(saved))[:3]
    extra = sorted(set(saved) - set(paths))[:3]
    raise _checkpoints.CheckpointError(
        f"cannot resume from {directory}: its optimizer state is laid out differently "
        f"(another optax or qsgd_optax version, or max_nonfinite on/off): this run has "
        f"{len(paths)} arrays, the checkpoint {len(saved)}; e.g. missing {missing}, "
        f"unexpected {extra}")


def run_finetune(config: FinetuneConfig, arms: Sequence[Arm],
                 seeds: Sequence[int], *, progress: bool = True,
                 log: Callable[[str], None] | None = None,
                 checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_every: int | None = None, keep: int = 3,
                 resume: bool = False,
                 on_step: Callable[[int], None] | None = None,
                 share_points: int = 8,
                 skip: Sequence[tuple[str, int]] = (),
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 seed_major: bool = False,
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Fine-tunes the model once per (arm, seed); one epoch each.

  Args:
    config: the experiment.
    arms: optimizer arms.
    seeds: seeds; each fixes the batch order (and the tiny model's init).
    progress: show progress bars.
    log: called with one line per finished run.
    checkpoint_dir: when given, each run writes Orbax checkpoints to
      ``checkpoint_dir/<arm label>-seed<seed>`` (parameters, the whole
      optimizer state, the losses so far and the position in the batch
      order, which with the seed fixes the data still to come; the run
      has no other randomness): every ``checkpoint_every`` optimizer steps
      and at the end of the epoch, the last ``keep`` kept.
    checkpoint_every: optimizer steps between checkpoints (``None``: only
      at the end).
    keep: checkpoints kept per run.
    resume: continue every run from its latest complete checkpoint (a
      finished run is only evaluated). The resumed run ends bit-identical
      to an uninterrupted one on the same devices. A checkpoint written
      with another configuration is refused with a
      :class:`~qsgd_optax.tasks._checkpoints.CheckpointError` naming the
      fields that differ; without ``resume`` existing checkpoints are an
      error too.
    on_step: called with the number of micro-batches done after each one
      (and after its checkpoint, if any); raising stops the run.
    share_points: for ``qsgd`` arms (with ``grad_accum=1``), how many
      times, at the mid-points of equal parts of the epoch, to measure the quantum term's
      share of the next update on a probe batch (the run's first batch,
      the same for every arm of a seed): :func:`~qsgd_optax.tasks.lm.steps.make_share_fn`, recorded
      as ``term_share_step`` / ``_median`` / ``_max`` / ``_global``. Reads
      the state only; 0 turns it off.
    skip: ``(arm label, seed)`` runs not to make (done earlier).
    on_record: called with each run's record as soon as it ends.
    seed_major: every arm of a seed before the next seed.

  Returns:
    ``(runs, info)``: one record per run (see the CLI's docs for the keys)
    and facts about data and devices for the summary's config.
  """
  if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                       or checkpoint_every < 1):
    raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}.")
  from qsgd_optax.tasks.lm import gsm_data  # pylint: disable=import-outside-toplevel

  checkpoint_log = log  # None: skipped checkpoints are a RuntimeWarning
  log = log or (lambda msg: None)
  mesh = None
  if config.mesh is not None:
    mesh = make_mesh(config.mesh.get("data", 1), config.mesh.get("fsdp", 1))
  n_shards = 1 if mesh is None else mesh.size
  if config.batch_size % n_shards:
    raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of "
                     f"the mesh size ({n_shards}).")

  start = time.perf_counter()
  graphdef, tokenizer, init_params = _load_model(config)
  train_p, test_p = gsm_data.load_gsm_symbolic(
      config.examples, config.test_examples, seed=config.data_seed,
      cache=config.cache)
  train_ex, cut_train = gsm_data.tokenize(tokenizer, train_p,
                                          style=config.style,
                                          max_len=config.max_len)
  test_ex, cut_test = gsm_data.tokenize(tokenizer, test_p, style=config.style,
                                        max_len=config.max_len)
  eval_batches = pack_examples(
      test_ex, config.max_len,
      batch_size=config.eval_rows + (-config.eval_rows) % n_shards,
      pad_rows_to=n_shards)
  if not train_ex:
    raise ValueError(f"none of the {len(train_p)} training problems keeps an answer token "
                     f"within max_len={config.max_len} tokens (prompts are longer); raise "
                     "max_len.")
  lengths = [len(ex) for ex in train_ex]
  info: dict[str, Any] = {
      "n_train": len(train_ex), "n_test": len(test_ex),
      "train_truncated": cut_train, "test_truncated": cut_test,
      "train_templates": len({p.template for p in train_p}),
      "test_templates": len({p.template for p in test_p}),
      "tokens_per_example_mean": float(np.mean(lengths)) if lengths else 0.0,
      "completion_tokens": int(sum(int(ex.completion[1:].sum())
                                   for ex in train_ex)),
      "setup_seconds": 0.0,
      **device_summary(mesh),
  }
  log(f"data: {len(train_ex)} train / {len(test_ex)} held-out examples "
      f"(templates {info['train_templates']} / {info['test_templates']}, "
      f"disjoint), {info['tokens_per_example_mean']:.0f} tokens per example, "
      f"{cut_train + cut_test} cut to max_len={config.max_len}")

  host0 = init_params(0)
  if mesh is not None:
    p_shard = param_shardings(host0, mesh)
    place = lambda host: jax.device_put(host, p_shard)  # pylint: disable=unnecessary-lambda-assignment
  else:
    p_shard = None
    place = lambda host: jax.tree.map(jnp.asarray, host)  # pylint: disable=unnecessary-lambda-assignment
  grad_fn = Compiled(make_grad_fn(graphdef, p_shard))
  eval_fn = Compiled(make_eval_fn(graphdef))
  info["setup_seconds"] = time.perf_counter() - start
  eval_before: dict[int, float] = {}
  shared_init = config.model == "smollm2-135m"

  def run_one(arm: Arm, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    host = host0 if (shared_init or seed == 0) else init_params(seed)
    order = np.random.default_rng(seed).permutation(len(train_ex))
    batches = make_batches([train_ex[i] for i in order], config.max_len,
                           batch_size=config.batch_size, pack=config.pack,
                           bucket=config.bucket, pad_rows_to=n_shards)
    total_steps = math.ceil(len(batches) / config.grad_accum)
    warmup = int(round(config.warmup * total_steps))
    tx = make_optimizer(arm, learning_rate=config.learning_rate,
                        total_steps=total_steps, warmup_steps=warmup,
                        weight_decay=config.weight_decay,
                        clip_norm=config.clip_norm,
                        accum_steps=config.grad_accum,
                        n_qubits=config.n_qubits)
    if config.max_nonfinite is not None:
      # One more than the stop threshold: apply_if_finite never lets a
      # non-finite update through before the run is stopped.
      tx = optax.apply_if_finite(tx, max_consecutive_errors=config.max_nonfinite + 1)
    params = place(host)
    key = 0 if shared_init else seed
    if key not in eval_before:
      eval_before[key] = evaluate(eval_fn, params, eval_batches, mesh)
    if mesh is not None:
      o_shard = state_shardings(jax.eval_shape(tx.init, params), params,
                                p_shard, mesh)
      opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    else:
      o_shard = None
      opt_state = jax.jit(tx.init)(params)
    update_fn = Compiled(make_update_fn(tx, p_shard, o_shard))
    share_fn, share_at = None, set()
    if arm.name == "qsgd" and share_points and config.grad_accum == 1:
      twin = make_optimizer(dataclasses.replace(arm, quantum_weight=0.0), learning_rate=config.learning_rate,
                            total_steps=total_steps, warmup_steps=warmup, weight_decay=config.weight_decay,
                            clip_norm=config.clip_norm, n_qubits=config.n_qubits)
      if config.max_nonfinite is not None:
        twin = optax.apply_if_finite(twin, max_consecutive_errors=config.max_nonfinite + 1)
      share_fn = Compiled(make_share_fn(tx, twin, config.n_qubits, arm.scope))
      # mid-points of share_points equal parts; never after the last batch, where the
      # schedule's learning rate is 0 and there is no next update to compare with
      share_at = {min(len(batches) - 1, max(1, round((k + 0.5) * len(batches) / share_points)))
                  for k in range(share_points)} - {0}
    shares: dict[str, list[float]] = {}
    probe = shard_batch(batches[0], mesh)

    checkpoints, prior = None, {"micro_step": 0, "losses": [], "tokens": [], "seconds": 0.0}
    if checkpoint_dir is not None:
      identity = {"optimizer": arm.label, "seed": int(seed),
                  **{k: v for k, v in dataclasses.asdict(config).items()
                     if k not in _NOT_IDENTITY},
                  "n_train": len(train_ex), "micro_batches": len(batches)}
      checkpoints = _checkpoints.RunCheckpoints(
          _checkpoints.run_directory(checkpoint_dir, arm.label, seed), identity,
          keep=keep, resume=resume)
    every = None if checkpoint_every is None else checkpoint_every * config.grad_accum

    def after_step(done, params, opt_state, losses, tokens, seconds):
      if share_fn is not None and done in share_at:
        _, grads = grad_fn(params, probe)  # the run's first batch: its shape is compiled already
        measured = share_fn(params, opt_state, grads)
        shares.setdefault("term_share_step", []).append(done)
        for key in ("median", "max", "global"):
          shares.setdefault(f"term_share_{key}", []).append(float(measured[key]))
      if checkpoints is not None and (done == len(batches) or (every and done % every == 0)):
        checkpoints.save(done, _state_tree(params, opt_state),
                         {"micro_step": done, "losses": losses, "tokens": tokens,
                          "seconds": seconds, "state_paths": _state_paths(params, opt_state),
                          "term_share": shares})
      if on_step is not None:
        on_step(done)

    try:
      if checkpoints is not None and checkpoints.latest is not None:
        tree, prior = checkpoints.restore(
            _state_tree(params, opt_state), log=checkpoint_log,
            check=lambda saved: _check_state_paths(saved, (params, opt_state), checkpoints.directory))
        params, opt_state = jax.tree.unflatten(jax.tree.structure((params, opt_state)),
                                               [tree[k] for k in sorted(tree)])
        shares.update({k: list(v) for k, v in prior.get("term_share", {}).items()})
        log(f"{arm.label} seed={seed}: resumed at micro-batch {prior['micro_step']} "
            f"of {len(batches)} from {checkpoints.directory}")
      result = train(params, opt_state, batches, grad_fn=grad_fn,
                     update_fn=update_fn, mesh=mesh, progress=progress,
                     desc=f"{arm.label} seed={seed}", start=prior["micro_step"],
                     losses=prior["losses"], tokens=prior["tokens"],
                     seconds=prior["seconds"],
                     on_step=(after_step if checkpoints is not None or on_step is not None
                              or share_fn is not None else None),
                     on_step_when=(None if checkpoints is not None or on_step is not None
                                   else share_at.__contains__),
                     max_nonfinite=config.max_nonfinite)
    finally:
      if checkpoints is not None:
        checkpoints.close()
    after = evaluate(eval_fn, result.params, eval_batches, mesh)
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):]
    record = {  # skipped (non-finite) micro-batches are left out of the means
        "final_loss": finite_mean(tail),
        "diverged": not (math.isfinite(finite_mean(tail)) and math.isfinite(after)),
        "mean_loss": finite_mean(losses),
        "eval_loss_before": eval_before[key],
        "eval_loss_after": after,
        "steps": total_steps,
        "micro_steps": len(losses),
        "warmup_steps": warmup,
        "train_tokens": int(sum(result.tokens)),
        "tokens_per_s": result.tokens_per_second,
        "train_seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "wall_time": time.perf_counter() - t0,
        "nonfinite_steps": (int(result.opt_state.total_notfinite)
                            if config.max_nonfinite is not None else None),
        "resumed_at": prior["micro_step"] if checkpoints is not None else None,
        "loss_curve": losses,
        "loss_smooth": smooth_curve(losses),
        **shares,
    }
    log(f"{arm.label} seed={seed}: mean loss {record['mean_loss']:.4f}, "
        f"held-out {record['eval_loss_before']:.4f} -> {after:.4f}, "
        f"{record['tokens_per_s']:.0f} tok/s, {record['wall_time']:.0f} s")
    return record

  runs = running.run_arms(arms, seeds, run_one, progress=progress, desc="runs", seed_major=seed_major,
                          skip=skip, on_record=on_record)
  info["grad_compile_seconds"] = grad_fn.compile_seconds
  info["eval_compile_seconds"] = eval_fn.compile_seconds
  return runs, info


def comparison_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """The paper-style table: mean training loss per arm and change vs AdamW."""
  groups = reporting.group_runs(runs)
  base = groups.get("adamw")
  base_mean = (reporting.mean_std(r["mean_loss"] for r in base)[0]
               if base else float("nan"))
  rows = []
  for label, group in groups.items():
    m, s, n = reporting.mean_std(r["mean_loss"] for r in group)
    fin = reporting.mean_std(r["final_loss"] for r in group)[0]
    before = reporting.mean_std(r["eval_loss_before"] for r in group)[0]
    after = reporting.mean_std(r["eval_loss_after"] for r in group)[0]
    tps = reporting.mean_std(r["tokens_per_s"] for r in group)[0]
    wall = reporting.mean_std(r["wall_time"] for r in group)[0]
    rel = ("" if label == "adamw" or not math.isfinite(base_mean)
           else f"{100 * (m - base_mean) / base_mean:+.2f}%")
    mean = f"{m:.4f}" + (f" +- {s:.4f}" if n > 1 else "")
    rows.append([reporting.arm_label(label, group), n, mean, rel, f"{fin:.4f}", f"{before:.4f}",
                 f"{after:.4f}", f"{tps:.0f}", f"{wall:.0f}"])
  return reporting.format_table(
      ["optimizer", "runs", "mean loss", "vs adamw", "final loss",
       "held-out before", "held-out after", "tok/s", "wall s"], rows)

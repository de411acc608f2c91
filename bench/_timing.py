"""The timing harness of bench/step_overhead.py: AdamW and QSGD arms, interleaved pairs.

An arm owns one optimizer's buffers and its compiled step (the optimizer
update alone, :class:`OptimizerArm`, or a Flax train step of an example's model,
:class:`TrainStepArm`); :func:`interleave` times two arms in alternating
pairs and returns the case record; :func:`balanced` runs it once per build
order and combines the two. Builds and times; prints and writes nothing.

Why both orders: with jaxlib 0.10.2 on XLA:CPU and glibc's malloc, the
host side of a call is slower for an executable built after another one is
alive in the process, even for the very same program. Three identical
AdamW steps at 512 small arrays, built one after the other, timed
interleaved: 1.00, 1.16, 1.13 in the stored run of ``bench/build_order.py``
(1.07 to 1.19 in others), while the kernels' own durations do not follow.
It follows the executable, not its buffers; it is absent with jax 0.7.1,
gone under jemalloc (``LD_PRELOAD``, which also makes the step about 30%
faster) and mostly gone with ``MALLOC_ARENA_MAX=1``: an allocator effect,
not the optimizer's. At 128 arrays it is 1.02 to 1.06, at 1M parameters
within noise. Measuring each case in both orders and taking the geometric
mean of the two ratios removes it to first order (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from functools import partial

from _hlo import distinct_fusions
from _trees import SEED, make_trees, transformer_shapes

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
QUANTUM_WEIGHT = 0.5


def make_tx(name: str, combo=None):
  import optax  # pylint: disable=g-import-not-at-top
  import qsgd_optax  # pylint: disable=g-import-not-at-top

  if name == "adamw":
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  circuit, scope, modulate = combo
  return qsgd_optax.qsgd(LEARNING_RATE, quantum_weight=QUANTUM_WEIGHT,
                         weight_decay=WEIGHT_DECAY, circuit=circuit,
                         scope=scope, modulate=modulate)


def make_step(tx):
  """A new step function (and so a new jit cache key) for ``tx``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  @partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


class OptimizerArm:
  """One optimizer on its own buffers: compiles, then steps on donated state."""

  def __init__(self, name: str, combo, shapes):
    import jax  # pylint: disable=g-import-not-at-top

    self.name = name
    tx = make_tx(name, combo)  # fresh: its QNode has never been traced
    self.params, self.grads = make_trees(shapes)
    self.state = jax.jit(tx.init)(self.params)
    jax.block_until_ready((self.params, self.state, self.grads))
    self.step = make_step(tx)
    t0 = time.perf_counter()
    compiled = self.step.lower(self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - t0
    self.kernels = distinct_fusions(compiled.as_text())[1]
    self.times_ms: list[float] = []

  def call(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    return (time.perf_counter() - t0) * 1e3

  def close(self) -> None:
    del self.params, self.state, self.grads, self.step


def warm_process(combos) -> None:
  """Compiles every optimizer once on a tiny tree, untimed.

  The first trace in a process pays one-time costs (JAX, XLA and PennyLane
  internals) that a training run pays once too; keeping them out of the
  timed compiles makes compile_s comparable across cases.
  """
  shapes = transformer_shapes(16, 1, 16)
  names = [("adamw", None)] + [("qsgd", c) for c in combos]
  seen = set()
  for name, combo in names:
    key = (name, combo and combo[0])
    if key in seen:
      continue
    seen.add(key)
    arm = OptimizerArm(name, combo, shapes)
    arm.call()
    arm.close()


def interleave(adamw, qsgd, args, name, n_params, n_leaves, combo, device):
  """Warm-up, then interleaved timed pairs; the case record and raw times."""
  for _ in range(args.warmup):
    adamw.call()
    qsgd.call()
  ratios, spent = [], 0.0
  for _ in range(args.pairs):
    a = adamw.call()
    b = qsgd.call()
    adamw.times_ms.append(a)
    qsgd.times_ms.append(b)
    ratios.append(b / a)
    spent += (a + b) / 1e3
    if spent > args.budget_s and len(ratios) >= args.min_pairs:
      break
  circuit, scope, modulate = combo
  case = {
      "name": name,
      "params": n_params,
      "leaves": n_leaves,
      "circuit": circuit,
      "scope": scope,
      "modulate": modulate,
      "adamw_ms": statistics.median(adamw.times_ms),
      "qsgd_ms": statistics.median(qsgd.times_ms),
      "ratio": statistics.median(ratios),
      "adamw_min_ms": min(adamw.times_ms),
      "adamw_max_ms": max(adamw.times_ms),
      "qsgd_min_ms": min(qsgd.times_ms),
      "qsgd_max_ms": max(qsgd.times_ms),
      "pairs": len(ratios),
      "compile_s_adamw": adamw.compile_s,
      "compile_s_qsgd": qsgd.compile_s,
      "kernels_adamw": adamw.kernels,
      "kernels_qsgd": qsgd.kernels,
      "device": device,
      "target": None,
      "meets_target": None,
  }
  extras = {
      "adamw_times_ms": list(adamw.times_ms),
      "qsgd_times_ms": list(qsgd.times_ms),
      "pair_ratios": ratios,
  }
  return case, extras


class TrainStepArm:
  """A full Flax train step (forward, backward, update) of an example's model.

  ``classifier``: the paper's transformer classifier on the synthetic task,
  batch 32 (``qsgd_optax.tasks.classification.experiment.train_step``, one jit).
  ``lm``: the SmolLM2-135M architecture (random init, bf16 compute, f32
  master weights), one 256-token row, the fine-tuning example's gradient
  and update functions. ``smoke`` shrinks both models.
  """

  def __init__(self, task: str, name: str, combo, smoke: bool):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from qsgd_optax.tasks import arms  # pylint: disable=g-import-not-at-top

    self.name = name
    self.times_ms: list[float] = []
    arm = (arms.Arm("adamw") if name == "adamw" else
           arms.Arm("qsgd", QUANTUM_WEIGHT, combo[2], combo[0], combo[1]))
    if task == "classifier":
      from qsgd_optax.tasks.classification import experiment, transformer  # pylint: disable=g-import-not-at-top

      small = dict(n_train=64, n_test=32, seq_len=16, embed_dim=16, ff_dim=32) if smoke else {}
      config = experiment.ClassificationConfig(**small)
      data = experiment.load_task(config)
      model = transformer.create_model(config, data, SEED)
      optimizer = nnx.Optimizer(model, arms.make_optimizer(arm, 1e-3), wrt=nnx.Param)
      model.train()
      graphdef, self.state = nnx.split((model, optimizer, experiment._metrics()))  # pylint: disable=protected-access
      self.batch = (jnp.asarray(data.train.tokens[:32]), jnp.asarray(data.train.labels[:32]))
      self.params_tree = nnx.state(model, nnx.Param)
      t0 = time.perf_counter()
      step = experiment.train_step.lower(graphdef, self.state, *self.batch).compile()
      self.compile_s = time.perf_counter() - t0
      self.kernels = distinct_fusions(step.as_text())[1]

      def call():
        self.state = step(self.state, *self.batch)
        return self.state
    else:
      from qsgd_optax.tasks.lm import batching, gsm_data, llama, steps  # pylint: disable=g-import-not-at-top

      cfg = llama.LlamaConfig.tiny() if smoke else llama.LlamaConfig.smollm2_135m()
      graphdef, self.params = steps.split_params(
          llama.Llama(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(SEED)))
      self.params_tree = self.params
      tx = steps.make_optimizer(arm, learning_rate=2e-5, total_steps=1000, warmup_steps=100)
      self.opt = jax.jit(tx.init)(self.params)
      length = 64 if smoke else 256
      rng = np.random.default_rng(SEED)
      ids = rng.integers(3, cfg.vocab_size, size=length).astype("int32")
      example = gsm_data.TokenizedExample(ids, np.arange(length) >= length // 3)
      self.batch = batching.make_batches([example], length, batch_size=1, bucket=length)[0]
      grad_fn, update_fn = steps.make_grad_fn(graphdef), steps.make_update_fn(tx)
      t0 = time.perf_counter()
      grad_c = grad_fn.lower(self.params, self.batch).compile()
      grads = jax.eval_shape(grad_fn, self.params, self.batch)[1]
      update_c = update_fn.lower(self.params, self.opt, grads).compile()
      self.compile_s = time.perf_counter() - t0
      self.kernels = sum(distinct_fusions(c.as_text())[1] for c in (grad_c, update_c))

      def call():
        _, g = grad_c(self.params, self.batch)
        self.params, self.opt = update_c(self.params, self.opt, g)
        return self.params, self.opt
    self._call = call
    leaves = jax.tree.leaves(self.params_tree)
    self.n_params, self.n_leaves = sum(x.size for x in leaves), len(leaves)

  def call(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    jax.block_until_ready(self._call())
    return (time.perf_counter() - t0) * 1e3

  def close(self) -> None:
    self.__dict__.clear()


def balanced(build, args, name, combo, device, n_params=None, n_leaves=None):
  """``interleave`` once with AdamW built first and once with QSGD built first.

  ``build(arm_name)`` returns a new arm (``"adamw"`` or ``"qsgd"``); each
  build order gets half of ``args.pairs`` and of ``args.budget_s`` (at least
  ``args.min_pairs`` pairs), and its arms are closed before the next order
  is built. The case's ``ratio`` is the geometric mean of the two orders'
  median pair ratios; medians, minima, maxima and ``pairs`` are over both.
  The compile times are those of each arm's first build: the second build
  of QSGD reuses the trace of the term cached in the process, so its compile
  is not a fresh one. The run extras carry both orders' ratios and pair
  counts (``order_ratios``, ``order_pairs``), the orders as built
  (``build_orders``), the pair ratios of both orders in sequence and each
  build's compile time (``compile_s``, first build first).
  ``n_params``/``n_leaves`` default to the AdamW arm's own (train steps).
  """
  half = argparse.Namespace(**{**vars(args), "pairs": max(1, -(-args.pairs // 2)),
                               "budget_s": args.budget_s / 2})
  phases, built = {}, []
  for first in ("adamw", "qsgd"):
    arms = {}
    for arm_name in (first, "qsgd" if first == "adamw" else "adamw"):
      arms[arm_name] = build(arm_name)
    built.append(list(arms))
    adamw, qsgd = arms["adamw"], arms["qsgd"]
    if n_params is None:
      n_params, n_leaves = adamw.n_params, adamw.n_leaves
    phases[first] = interleave(adamw, qsgd, half, name, n_params, n_leaves, combo, device)
    for arm in arms.values():
      arm.close()
    del arms, adamw, qsgd
    gc.collect()
  (c1, e1), (c2, e2) = phases["adamw"], phases["qsgd"]
  times = {arm: e1[f"{arm}_times_ms"] + e2[f"{arm}_times_ms"] for arm in ("adamw", "qsgd")}
  case = dict(c1)
  for arm in ("adamw", "qsgd"):
    case[f"{arm}_ms"] = statistics.median(times[arm])
    case[f"{arm}_min_ms"] = min(times[arm])
    case[f"{arm}_max_ms"] = max(times[arm])
    case[f"compile_s_{arm}"] = c1[f"compile_s_{arm}"]  # the first, fresh build
  case["ratio"] = math.sqrt(c1["ratio"] * c2["ratio"])
  case["pairs"] = c1["pairs"] + c2["pairs"]
  extras = {
      "adamw_times_ms": times["adamw"],
      "qsgd_times_ms": times["qsgd"],
      "pair_ratios": e1["pair_ratios"] + e2["pair_ratios"],
      "order_ratios": {"adamw_first": c1["ratio"], "qsgd_first": c2["ratio"]},
      "order_pairs": {"adamw_first": c1["pairs"], "qsgd_first": c2["pairs"]},
      "build_orders": built,
      "compile_s": {arm: [c1[f"compile_s_{arm}"], c2[f"compile_s_{arm}"]] for arm in ("adamw", "qsgd")},
  }
  return case, extras

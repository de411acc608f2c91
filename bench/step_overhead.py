"""Step overhead of QSGD's quantum term against optax.adamw, optimizer update only.

For each parameter count and each ``circuit/scope/modulate`` combination this
times one jitted optimizer step on a transformer-shaped pytree of float32
arrays (no model, no loss, no backward pass: the gradients are a fixed
array tree), for ``optax.adamw`` (arm A) and ``qsgd_optax.qsgd`` (arm B):

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

Method, per case:

* compile time: ``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()``
  timed with ``time.perf_counter`` on a fresh optimizer, step closure and jit
  object (no trace or compile cache can answer it); one untimed compile on a
  tiny tree at start-up keeps the process's one-time costs out of it;
* ``--warmup`` untimed calls per arm, then ``--pairs`` interleaved pairs
  A B A B ..., each call timed up to ``jax.block_until_ready``; buffers are
  donated, so each call's outputs feed the next call of the same arm. A case
  stops early once its timed time passes ``--budget-s`` (at least
  ``--min-pairs`` pairs); the pair count actually run is recorded;
* reported: medians per arm, ``ratio`` = median over pairs of qsgd / adamw,
  min and max per arm, the pair count and the two compile times.

Examples::

  python bench/step_overhead.py                         # the default run
  python bench/step_overhead.py --smoke --out /tmp/step
  python bench/step_overhead.py --sizes 8M --combos paper/leaf/gradient,sine/all/gradient --pairs 50

``DIR/summary.json`` (``--out DIR``, default ``bench/results/step_overhead``)
holds ``{"cases": [...], "runs": [...], "config": {...}}``: one case object
per size and combination; one run record per case (optimizer "qsgd",
quantum_weight 0.5, seed 0, the case's fields, the pytree's layout and the
per-pair times in ms); the CLI arguments, library versions and XLA flags.
``DIR/step_overhead.png`` draws the ratio per case with a line at 1.0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from qsgd_optax.tasks import _common

CIRCUITS = ("paper", "entangled", "sine")
SCOPES = ("leaf", "model", "all")
MODULATES = ("gradient", "preconditioned", "update")

DEFAULT_SIZES = "1M,8M,32M"
DEFAULT_COMBOS = (
    "paper/leaf/gradient,paper/all/gradient,sine/all/gradient,"
    "paper/leaf/update,entangled/all/gradient,paper/model/gradient"
)
DEFAULT_TRAIN = "classifier,lm"
TRAIN_TASKS = ("classifier", "lm")
TRAIN_COMBOS = (("paper", "leaf", "gradient"), ("paper", "leaf", "update"))
DEFAULTS = dict(sizes=DEFAULT_SIZES, combos=DEFAULT_COMBOS, pairs=50,
                warmup=3, budget_s=60.0, min_pairs=3, train_steps=DEFAULT_TRAIN)
SMOKE = dict(sizes="64k", combos="paper/leaf/gradient,sine/all/gradient",
             pairs=5, warmup=1, budget_s=10.0, min_pairs=3, train_steps="classifier")
DEFAULT_OUT = Path("bench") / "results" / "step_overhead"
PNG_NAME = "step_overhead.png"

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
QUANTUM_WEIGHT = 0.5
SEED = 0

# Targets on the 2-core CPU this benchmark was written on. A ratio target
# applies to (circuit, scope, modulate, size in params or None for every
# size); the compile target to every "paper"-circuit case at 8M.
RATIO_TARGETS = (
    (("paper", "leaf", "gradient"), 8_000_000, 1.05),
    (("sine", "all", "gradient"), None, 1.3),
    (("paper", "all", "gradient"), None, 2.0),
)
COMPILE_TARGET = ("paper", 8_000_000, 1.0)  # circuit, size, extra seconds
TRAIN_TARGET = (("paper", "leaf"), 1.02)  # full train step, any modulate

_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


# --------------------------------------------------------------------------
# Transformer-shaped pytrees.


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


# --------------------------------------------------------------------------
# Arguments.


def _sizes_arg(text: str) -> list[tuple[str, int]]:
  labels = [s.strip() for s in text.split(",") if s.strip()]
  if not labels:
    raise argparse.ArgumentTypeError(f"expected sizes such as 1M,8M,32M, got {text!r}")
  try:
    return [(label, parse_size(label)) for label in labels]
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _combos_arg(text: str) -> list[tuple[str, str, str]]:
  combos = []
  for item in (s.strip() for s in text.split(",")):
    if not item:
      continue
    parts = item.split("/")
    if (len(parts) != 3 or parts[0] not in CIRCUITS or parts[1] not in SCOPES
        or parts[2] not in MODULATES):
      raise argparse.ArgumentTypeError(
          f"expected circuit/scope/modulate with circuit in {'|'.join(CIRCUITS)},"
          f" scope in {'|'.join(SCOPES)}, modulate in {'|'.join(MODULATES)};"
          f" got {item!r}")
    combos.append(tuple(parts))
  if not combos:
    raise argparse.ArgumentTypeError(f"expected at least one combination, got {text!r}")
  return combos


def _seconds_arg(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = _common.docstring_parser(__doc__)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help=f"output folder for summary.json and {PNG_NAME} (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny run for tests: sizes {SMOKE['sizes']}, combos {SMOKE['combos']},"
                           f" {SMOKE['pairs']} pairs, {SMOKE['warmup']} warm-up call")
  parser.add_argument("--sizes", type=_sizes_arg, default=None,
                      help=f"comma list of parameter counts (default: {DEFAULT_SIZES})")
  parser.add_argument("--combos", type=_combos_arg, default=None,
                      help="comma list of circuit/scope/modulate with circuit in "
                           f"{'|'.join(CIRCUITS)}, scope in {'|'.join(SCOPES)}, modulate in "
                           f"{'|'.join(MODULATES)} (default: {DEFAULT_COMBOS})")
  parser.add_argument("--pairs", type=_common.int_arg(1), default=None,
                      help=f"interleaved adamw/qsgd pairs per case (default: {DEFAULTS['pairs']})")
  parser.add_argument("--warmup", type=_common.int_arg(0), default=None,
                      help=f"untimed calls per arm before timing (default: {DEFAULTS['warmup']})")
  parser.add_argument("--budget-s", type=_seconds_arg, default=None,
                      help="stop a case early once its timed time (both arms) passes this "
                           f"(default: {DEFAULTS['budget_s']:g})")
  parser.add_argument("--train-steps", type=_common.names_arg(TRAIN_TASKS, empty="none"), default=None,
                      help="comma list of full Flax train steps to time too, from "
                           f"{'|'.join(TRAIN_TASKS)}, or 'none' (default: {DEFAULT_TRAIN})")
  parser.add_argument("--min-pairs", type=_common.int_arg(1), default=None,
                      help=f"pairs run even past the budget (default: {DEFAULTS['min_pairs']})")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  preset = SMOKE if args.smoke else DEFAULTS
  if args.sizes is None:
    args.sizes = _sizes_arg(preset["sizes"])
  if args.combos is None:
    args.combos = _combos_arg(preset["combos"])
  for name in ("pairs", "warmup", "budget_s", "min_pairs"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  if args.train_steps is None:
    args.train_steps = _common.names_arg(TRAIN_TASKS, empty="none")(preset["train_steps"])
  return args


# --------------------------------------------------------------------------
# Timing.


def _make_tx(name: str, combo=None):
  import optax  # pylint: disable=g-import-not-at-top
  import qsgd_optax  # pylint: disable=g-import-not-at-top

  if name == "adamw":
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  circuit, scope, modulate = combo
  return qsgd_optax.qsgd(LEARNING_RATE, quantum_weight=QUANTUM_WEIGHT,
                         weight_decay=WEIGHT_DECAY, circuit=circuit,
                         scope=scope, modulate=modulate)


def _make_step(tx):
  """A new step function (and so a new jit cache key) for ``tx``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  @partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


class _Arm:
  """One optimizer on its own buffers: compiles, then steps on donated state."""

  def __init__(self, name: str, combo, shapes):
    import jax  # pylint: disable=g-import-not-at-top

    self.name = name
    tx = _make_tx(name, combo)  # fresh: its QNode has never been traced
    self.params, self.grads = make_trees(shapes)
    self.state = jax.jit(tx.init)(self.params)
    jax.block_until_ready((self.params, self.state, self.grads))
    self.step = _make_step(tx)
    t0 = time.perf_counter()
    self.step.lower(self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - t0
    self.times_ms: list[float] = []

  def call(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    return (time.perf_counter() - t0) * 1e3

  def close(self) -> None:
    del self.params, self.state, self.grads, self.step


def _warm_process(combos) -> None:
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
    arm = _Arm(name, combo, shapes)
    arm.call()
    arm.close()


def check_targets(case: dict, n_params: int) -> dict[str, bool]:
  """The targets that apply to a case (``n_params``: the requested size),
  each mapped to whether the case meets it; empty when none applies."""
  combo = (case["circuit"], case["scope"], case["modulate"])
  out = {}
  for target_combo, size, limit in RATIO_TARGETS:
    if combo == target_combo and (size is None or size == n_params):
      out[f"ratio <= {limit:g}"] = bool(case["ratio"] <= limit)
  circuit, size, extra = COMPILE_TARGET
  if combo[0] == circuit and n_params == size:
    out[f"compile +{extra:g} s"] = bool(
        case["compile_s_qsgd"] - case["compile_s_adamw"] <= extra)
  return out


def run_case(label: str, n_target: int, combo, args, device: str):
  """Times one (size, combination) case; returns ``(case, run_extras)``."""
  d, n_layers, vocab = layout_for_size(n_target)
  shapes = transformer_shapes(d, n_layers, vocab)
  n_params, n_leaves = count_params(shapes)
  adamw = _Arm("adamw", None, shapes)
  qsgd = _Arm("qsgd", combo, shapes)
  case, extras = _interleave(adamw, qsgd, args, f"{label} {'/'.join(combo)}", n_params,
                             n_leaves, combo, device)
  targets = check_targets(case, n_target)
  if targets:
    case["target"] = "; ".join(targets)
    case["meets_target"] = all(targets.values())
  extras.update({"size": label, "d_model": d, "n_layers": n_layers, "vocab": vocab,
                 "targets_met": targets})
  adamw.close()
  qsgd.close()
  gc.collect()
  return case, extras


def _interleave(adamw, qsgd, args, name, n_params, n_leaves, combo, device):
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


class _TrainArm:
  """A full Flax train step (forward, backward, update) of an example's model.

  ``classifier``: the paper's transformer classifier on the synthetic task,
  batch 32 (``qsgd_optax.tasks.classification.train_step``, one jit).
  ``lm``: the SmolLM2-135M architecture (random init, bf16 compute, f32
  master weights), one 256-token row, the fine-tuning example's gradient
  and update functions. ``smoke`` shrinks both models.
  """

  def __init__(self, task: str, name: str, combo, smoke: bool):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from qsgd_optax.tasks import _common  # pylint: disable=g-import-not-at-top

    self.name = name
    self.times_ms: list[float] = []
    arm = (_common.Arm("adamw") if name == "adamw" else
           _common.Arm("qsgd", QUANTUM_WEIGHT, combo[2], combo[0], combo[1]))
    if task == "classifier":
      from qsgd_optax.tasks import classification  # pylint: disable=g-import-not-at-top

      small = dict(n_train=64, n_test=32, seq_len=16, embed_dim=16, ff_dim=32) if smoke else {}
      config = classification.ClassificationConfig(**small)
      data = classification.load_task(config)
      model = classification.create_model(config, data, SEED)
      optimizer = nnx.Optimizer(model, _common.make_optimizer(arm, 1e-3), wrt=nnx.Param)
      model.train()
      graphdef, self.state = nnx.split((model, optimizer, classification._metrics()))  # pylint: disable=protected-access
      self.batch = (jnp.asarray(data.train.tokens[:32]), jnp.asarray(data.train.labels[:32]))
      self.params_tree = nnx.state(model, nnx.Param)
      t0 = time.perf_counter()
      step = classification.train_step.lower(graphdef, self.state, *self.batch).compile()
      self.compile_s = time.perf_counter() - t0

      def call():
        self.state = step(self.state, *self.batch)
        return self.state
    else:
      from qsgd_optax.tasks import gsm_data, llama, lm  # pylint: disable=g-import-not-at-top

      cfg = llama.LlamaConfig.tiny() if smoke else llama.LlamaConfig.smollm2_135m()
      graphdef, self.params = lm.split_params(
          llama.Llama(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(SEED)))
      self.params_tree = self.params
      tx = lm.make_optimizer(arm, learning_rate=2e-5, total_steps=1000, warmup_steps=100)
      self.opt = jax.jit(tx.init)(self.params)
      length = 64 if smoke else 256
      rng = np.random.default_rng(SEED)
      ids = rng.integers(3, cfg.vocab_size, size=length).astype("int32")
      example = gsm_data.TokenizedExample(ids, np.arange(length) >= length // 3)
      self.batch = lm.make_batches([example], length, batch_size=1, bucket=length)[0]
      grad_fn, update_fn = lm.make_grad_fn(graphdef), lm.make_update_fn(tx)
      t0 = time.perf_counter()
      grad_c = grad_fn.lower(self.params, self.batch).compile()
      grads = jax.eval_shape(grad_fn, self.params, self.batch)[1]
      update_c = update_fn.lower(self.params, self.opt, grads).compile()
      self.compile_s = time.perf_counter() - t0

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


def run_train_case(task: str, combo, args, device: str):
  """Times the full train step of ``task``, AdamW vs QSGD ``combo``."""
  adamw = _TrainArm(task, "adamw", None, args.smoke)
  qsgd = _TrainArm(task, "qsgd", combo, args.smoke)
  case, extras = _interleave(adamw, qsgd, args, f"train {task} {'/'.join(combo)}",
                             adamw.n_params, adamw.n_leaves, combo, device)
  (scope_circuit, limit) = TRAIN_TARGET
  targets = {}
  if (combo[0], combo[1]) == scope_circuit:
    targets[f"ratio <= {limit:g}"] = bool(case["ratio"] <= limit)
    case["target"] = "; ".join(targets)
    case["meets_target"] = all(targets.values())
  extras.update({"size": f"train {task}", "targets_met": targets})
  adamw.close()
  qsgd.close()
  gc.collect()
  return case, extras


# --------------------------------------------------------------------------
# Output.


def format_table(cases: list[dict], runs: list[dict]) -> str:
  head = ("case", "params", "leaves", "adamw ms", "qsgd ms", "ratio",
          "compile adamw s", "compile qsgd s", "adamw min/max ms",
          "qsgd min/max ms", "pairs", "target", "met?")
  rows = []
  for c, r in zip(cases, runs):
    met = "; ".join("yes" if ok else "no" for ok in r["targets_met"].values())
    rows.append((
        c["name"], f"{c['params']:,}", str(c["leaves"]),
        f"{c['adamw_ms']:.2f}", f"{c['qsgd_ms']:.2f}", f"{c['ratio']:.2f}",
        f"{c['compile_s_adamw']:.2f}", f"{c['compile_s_qsgd']:.2f}",
        f"{c['adamw_min_ms']:.2f} / {c['adamw_max_ms']:.2f}",
        f"{c['qsgd_min_ms']:.2f} / {c['qsgd_max_ms']:.2f}",
        str(c["pairs"]), c["target"] or "", met))
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
  sep = "| " + " | ".join("-" * w for w in widths) + " |"
  return "\n".join([line(head), sep] + [line(r) for r in rows])


def plot(cases: list[dict], runs: list[dict], path: Path) -> None:
  """Ratio per case (bars: median, whiskers: min-max over pairs, coloured by
  the ratio target) above the compile times of both arms."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ratios = [c["ratio"] for c in cases]
  lo = [r - min(run["pair_ratios"]) for r, run in zip(ratios, runs)]
  hi = [max(run["pair_ratios"]) - r for r, run in zip(ratios, runs)]

  def color(run):
    met = [ok for name, ok in run["targets_met"].items() if name.startswith("ratio")]
    return "tab:blue" if not met else ("tab:green" if all(met) else "tab:red")

  x = list(range(len(cases)))
  fig, (ax, ax2) = plt.subplots(
      2, 1, figsize=(max(6.0, 0.55 * len(cases) + 2), 7.5), sharex=True,
      gridspec_kw={"height_ratios": [2, 1]})
  ax.bar(x, ratios, color=[color(r) for r in runs], yerr=[lo, hi],
         error_kw={"elinewidth": 0.8, "capsize": 2})
  ax.axhline(1.0, color="black", lw=1, ls="--", label="adamw (1.0)")
  if max(ratios) / max(min(ratios), 1e-9) > 20:
    ax.set_yscale("log")
  for i, r in enumerate(ratios):
    ax.annotate(f"{r:.2f}", (i, r), xytext=(0, 2), textcoords="offset points",
                ha="center", va="bottom", fontsize=7)
  ax.set_ylabel("qsgd / adamw step time\n(median of pairs, min-max)")
  ax.set_title("QSGD optimizer-step overhead vs optax.adamw "
               "(green/red: meets/misses its ratio target)", fontsize=10)
  ax.legend(loc="upper left", fontsize=8)
  width = 0.4
  ax2.bar([i - width / 2 for i in x], [c["compile_s_adamw"] for c in cases],
          width, label="adamw", color="tab:gray")
  ax2.bar([i + width / 2 for i in x], [c["compile_s_qsgd"] for c in cases],
          width, label="qsgd", color="tab:purple")
  ax2.set_ylabel("compile s")
  ax2.legend(loc="upper left", fontsize=8)
  ax2.set_xticks(x)
  ax2.set_xticklabels([c["name"] for c in cases], rotation=60, ha="right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _versions() -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top

  out = {}
  for pkg in ("jax", "jaxlib", "optax", "pennylane", "numpy"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  device = f"{dev} ({dev.platform})"
  cases_todo = [(label, n, combo) for label, n in args.sizes for combo in args.combos]
  train_combos = TRAIN_COMBOS[:1] if args.smoke else TRAIN_COMBOS
  cases_todo += [(f"train {t}", None, combo) for t in args.train_steps for combo in train_combos]
  print(f"step overhead: {len(cases_todo)} cases on {device}, "
        f"{args.pairs} pairs (budget {args.budget_s:g} s per case), "
        f"{args.warmup} warm-up calls", flush=True)
  t_start = time.perf_counter()
  _warm_process(args.combos)
  cases, runs = [], []
  bar = tqdm(cases_todo, desc="cases", unit="case", file=sys.stderr)
  for label, n, combo in bar:
    bar.set_postfix_str(f"{label} {'/'.join(combo)}")
    if n is None:
      case, extras = run_train_case(label.split()[1], combo, args, device)
    else:
      case, extras = run_case(label, n, combo, args, device)
    cases.append(case)
    runs.append({"optimizer": "qsgd", "quantum_weight": QUANTUM_WEIGHT,
                 "seed": SEED, **case, **extras})
    bar.write(f"  {case['name']}: ratio {case['ratio']:.2f} "
              f"({case['qsgd_ms']:.2f} / {case['adamw_ms']:.2f} ms, {case['pairs']} pairs)")
  bar.close()
  wall = time.perf_counter() - t_start

  config = {
      "argv": sys.argv[1:] if argv is None else list(argv),
      "smoke": args.smoke,
      "sizes": [label for label, _ in args.sizes],
      "size_params": {label: n for label, n in args.sizes},
      "combos": ["/".join(c) for c in args.combos],
      "train_steps": list(args.train_steps),
      "pairs": args.pairs,
      "warmup": args.warmup,
      "budget_s": args.budget_s,
      "min_pairs": args.min_pairs,
      "out": str(args.out),
      "learning_rate": LEARNING_RATE,
      "weight_decay": WEIGHT_DECAY,
      "quantum_weight": QUANTUM_WEIGHT,
      "seed": SEED,
      "versions": _versions(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
      "device": device,
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "python": platform.python_version(),
      "wall_s": wall,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  summary = {"cases": cases, "runs": runs, "config": config}
  (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  plot(cases, runs, args.out / PNG_NAME)
  print()
  print(format_table(cases, runs))
  print(f"\nwall {wall:.0f} s; wrote {args.out / 'summary.json'} and {args.out / PNG_NAME}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Cost of an optax.inject_hyperparams step: QSGD against optax.adamw.

``optax.inject_hyperparams`` calls the optimizer's factory on every update,
with the hyperparameters as JAX arrays. A factory that builds a QNode or a
new jit per call makes every step pay for it. This benchmark times one
update of ``inject_hyperparams(qsgd)`` (arm B) against one of
``inject_hyperparams(optax.adamw)`` (arm A), both eager (the factory and
every optax op dispatched from Python, as in an un-jitted loop) and jitted,
on a tree of ``--leaves`` arrays (alternating 64 x 96 matrices and
96-vectors, like a small transformer's weights and biases).

Method: ``--warmup`` untimed calls per arm, then ``--pairs`` interleaved
pairs A B A B ..., each timed up to ``jax.block_until_ready``; reported: the
median per arm and ``ratio`` = median over pairs of qsgd / adamw. The number
of QNodes built over the whole run is recorded too (1 is the target: one per
circuit and register size, however often the factory runs).

Examples::

  python bench/inject_overhead.py                 # the default run
  python bench/inject_overhead.py --smoke --out /tmp/inject

``DIR/summary.json`` (``--out DIR``, default ``bench/results/inject``) holds
``{"runs": [...], "config": {...}}``: one run record per mode (optimizer
"qsgd", quantum_weight 0.5, seed 0, mode, medians, ratio, target, the
per-pair times). ``DIR/inject_overhead.png`` shows the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qsgd_optax.tasks import cli, reporting, running

DEFAULTS = dict(leaves=32, pairs=200, warmup=5)
SMOKE = dict(leaves=4, pairs=10, warmup=2)
DEFAULT_OUT = Path("bench") / "results" / "inject"
PNG_NAME = "inject_overhead.png"
MODES = ("eager", "jit")
TARGET = 1.2  # eager median pair ratio (jitted: reported, no target)
QUANTUM_WEIGHT = 0.5
STATIC = ("n_qubits", "circuit", "scope", "modulate")


def build_parser() -> argparse.ArgumentParser:
  parser = cli.docstring_parser(__doc__)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help=f"output folder for summary.json and {PNG_NAME} (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny run for tests: {SMOKE['leaves']} leaves, {SMOKE['pairs']} pairs")
  parser.add_argument("--leaves", type=cli.int_arg(1), default=None,
                      help=f"number of parameter arrays (default: {DEFAULTS['leaves']})")
  parser.add_argument("--pairs", type=cli.int_arg(1), default=None,
                      help=f"interleaved adamw/qsgd pairs per mode (default: {DEFAULTS['pairs']})")
  parser.add_argument("--warmup", type=cli.int_arg(0), default=None,
                      help=f"untimed calls per arm before timing (default: {DEFAULTS['warmup']})")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  preset = SMOKE if args.smoke else DEFAULTS
  for name in ("leaves", "pairs", "warmup"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  return args


def make_tree(leaves: int):
  """``leaves`` float32 arrays: 64 x 96 matrices and 96-vectors in turn."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  shapes = [(64, 96) if i % 2 == 0 else (96,) for i in range(leaves)]
  return {f"p{i:04d}": jnp.linspace(-1.0, 1.0, int(jnp.prod(jnp.array(s)))).reshape(s)
          for i, s in enumerate(shapes)}


def time_mode(mode: str, leaves: int, pairs: int, warmup: int, bar) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import qsgd_optax  # pylint: disable=g-import-not-at-top

  params = make_tree(leaves)
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  arms = {
      "adamw": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4),
      "qsgd": optax.inject_hyperparams(qsgd_optax.qsgd, static_args=STATIC)(
          learning_rate=1e-3, quantum_weight=QUANTUM_WEIGHT, weight_decay=1e-4),
  }
  states = {name: tx.init(params) for name, tx in arms.items()}
  updates = {name: (jax.jit(tx.update) if mode == "jit" else tx.update)
             for name, tx in arms.items()}

  def call(name):
    start = time.perf_counter()
    out, states[name] = updates[name](grads, states[name], params)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  for _ in range(warmup):
    for name in arms:
      call(name)
  times = {name: [] for name in arms}
  for _ in range(pairs):
    for name in arms:
      times[name].append(call(name) * 1e3)
    bar.update(1)
  ratios = [q / a for a, q in zip(times["adamw"], times["qsgd"])]
  ratio = statistics.median(ratios)
  return {
      "optimizer": "qsgd", "quantum_weight": QUANTUM_WEIGHT, "seed": 0,
      "mode": mode, "leaves": leaves,
      "adamw_ms": statistics.median(times["adamw"]),
      "qsgd_ms": statistics.median(times["qsgd"]),
      "ratio": ratio, "target": TARGET if mode == "eager" else None,
      "meets_target": ratio <= TARGET if mode == "eager" else None,
      "pairs": pairs, "ratios": ratios,
      "adamw_times_ms": times["adamw"], "qsgd_times_ms": times["qsgd"],
  }


def plot(runs, path: Path) -> Path:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  ax = fig.subplots()
  ax.boxplot([r["ratios"] for r in runs], tick_labels=[r["mode"] for r in runs])
  ax.axhline(1.0, color="gray", lw=1)
  ax.axhline(TARGET, color="red", lw=1, ls="--", label=f"eager target {TARGET}")
  ax.set_ylabel("qsgd / adamw, per interleaved pair")
  ax.set_title(f"inject_hyperparams update, {runs[0]['leaves']} leaves")
  ax.legend()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path



def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  from qsgd_optax import _circuits  # pylint: disable=g-import-not-at-top

  import pennylane as qml  # pylint: disable=g-import-not-at-top

  # Count every QNode constructed during the run (not the cache's own size,
  # which a bypassed cache would not change).
  built = []
  init = qml.QNode.__init__

  def counting_init(self, *a, **kw):
    built.append(1)
    init(self, *a, **kw)

  _circuits._qnode_circuit.cache_clear()  # pylint: disable=protected-access
  qml.QNode.__init__ = counting_init
  runs = []
  try:
    with running.progress_bar(total=len(MODES) * args.pairs, desc="pairs") as bar:
      for mode in MODES:
        runs.append(time_mode(mode, args.leaves, args.pairs, args.warmup, bar))
  finally:
    qml.QNode.__init__ = init
  qnodes = len(built)
  for run in runs:
    run["qnodes_built"] = qnodes
  config = {**vars(args), "device": jax.devices()[0].device_kind,
            "machine": reporting.cpu_model(),
            "jax": jax.__version__, "python": sys.version.split()[0]}
  reporting.write_summary(args.out, runs, config)
  plot(runs, args.out / PNG_NAME)
  rows = [[r["mode"], f"{r['adamw_ms']:.3f}", f"{r['qsgd_ms']:.3f}", f"{r['ratio']:.3f}",
           "-" if r["target"] is None else f"<= {r['target']}",
           "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")]
          for r in runs]
  print(reporting.format_table(["mode", "adamw ms", "qsgd ms", "ratio", "target", "met"], rows))
  print(f"QNodes built: {qnodes}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

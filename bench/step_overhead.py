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
  object, reported for each arm's first build (the second build of QSGD
  reuses the term's trace cached in the process; a persistent
  ``JAX_COMPILATION_CACHE_DIR`` would answer both); one untimed compile on a
  tiny tree at start-up keeps the process's one-time costs out of it;
* both build orders: the two arms are built AdamW first, timed, closed, then
  built again QSGD first and timed (with jaxlib 0.10.2 and glibc's malloc an
  executable built after another one pays a host-side penalty, 1.16 for the
  very same program at 512 small arrays; ``bench/_timing.py``); each order
  gets half of ``--pairs`` (rounded up) and of ``--budget-s``;
* per order, ``--warmup`` untimed calls per arm, then interleaved pairs
  A B A B ..., each call timed up to ``jax.block_until_ready``; buffers are
  donated, so each call's outputs feed the next call of the same arm. An
  order stops early once its timed time passes half of ``--budget-s`` (at
  least ``--min-pairs`` pairs); the pair counts actually run are recorded;
* reported: medians per arm over both orders, ``ratio`` = the geometric mean
  of the two orders' median pair ratios qsgd / adamw (each order's ratio in
  the run record, ``order_ratios``), min and max per arm, the pair count,
  the compile times (first builds) and the two kernel counts
  (distinct fused computations of each compiled step, ``bench/_hlo.py``).

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
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import LEARNING_RATE, QUANTUM_WEIGHT, WEIGHT_DECAY, OptimizerArm, TrainStepArm, balanced, warm_process  # noqa: E402
from _trees import SEED, count_params, layout_for_size, many_leaf_shapes, parse_size, transformer_shapes  # noqa: E402

from qsgd_optax.tasks import cli  # noqa: E402

CIRCUITS = ("paper", "entangled", "sine")
SCOPES = ("leaf", "model", "all")
MODULATES = ("gradient", "preconditioned", "update")

DEFAULT_SIZES = "1M,8M,32M"
DEFAULT_COMBOS = (
    "paper/leaf/gradient,paper/all/gradient,sine/all/gradient,"
    "paper/leaf/update,entangled/all/gradient,paper/model/gradient"
)
DEFAULT_LEAVES = "32,128,512"
LEAF_COMBOS = ("paper/leaf/gradient,paper/leaf/update,paper/model/gradient,sine/leaf/gradient")
DEFAULT_TRAIN = "classifier,lm"
TRAIN_TASKS = ("classifier", "lm")
TRAIN_COMBOS = (("paper", "leaf", "gradient"), ("paper", "leaf", "update"))
DEFAULTS = dict(sizes=DEFAULT_SIZES, combos=DEFAULT_COMBOS, pairs=50,
                warmup=3, budget_s=60.0, min_pairs=3, train_steps=DEFAULT_TRAIN,
                leaves=DEFAULT_LEAVES, leaf_combos=LEAF_COMBOS)
SMOKE = dict(sizes="64k", combos="paper/leaf/gradient,sine/all/gradient",
             pairs=5, warmup=1, budget_s=10.0, min_pairs=3, train_steps="classifier",
             leaves="8", leaf_combos="paper/leaf/gradient")
DEFAULT_OUT = Path("bench") / "results" / "step_overhead"
PNG_NAME = "step_overhead.png"

# Targets on the 2-core CPU this benchmark was written on. A ratio target
# applies to (circuit, scope, modulate, size in params or None for every
# size); the compile target to every "paper"-circuit case at 8M.
RATIO_TARGETS = (
    (("paper", "leaf", "gradient"), 8_000_000, 1.05),
    (("sine", "all", "gradient"), None, 1.3),
    (("paper", "all", "gradient"), None, 2.0),
)
COMPILE_TARGET = ("paper", 8_000_000, 1.0)  # circuit, size, extra seconds
# Leaf-count sweep: every combination, at every leaf count, steps within
# LEAF_RATIO of AdamW; at LEAF_COMPILE_AT leaves and more it compiles within
# max(factor x AdamW, AdamW + extra seconds).
LEAF_RATIO = 1.05
LEAF_COMPILE_AT, LEAF_COMPILE_FACTOR, LEAF_COMPILE_EXTRA = 128, 1.25, 1.5
TRAIN_TARGET = (("paper", "leaf"), 1.02)  # full train step, any modulate


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


def _leaves_arg(text: str) -> list[int]:
  try:
    counts = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    counts = []
  if not counts or any(c < 2 or c % 2 for c in counts):
    raise argparse.ArgumentTypeError(
        f"expected a comma list of even leaf counts >= 2 such as 32,128,512, or 'none'; got {text!r}")
  return counts


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
  parser = cli.docstring_parser(__doc__)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help=f"output folder for summary.json and {PNG_NAME} (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny run for tests: sizes {SMOKE['sizes']}, combos {SMOKE['combos']},"
                           f" {SMOKE['pairs']} pairs (3 per build order), {SMOKE['warmup']} "
                           "warm-up call")
  parser.add_argument("--sizes", type=_sizes_arg, default=None,
                      help=f"comma list of parameter counts (default: {DEFAULT_SIZES})")
  parser.add_argument("--combos", type=_combos_arg, default=None,
                      help="comma list of circuit/scope/modulate with circuit in "
                           f"{'|'.join(CIRCUITS)}, scope in {'|'.join(SCOPES)}, modulate in "
                           f"{'|'.join(MODULATES)} (default: {DEFAULT_COMBOS})")
  parser.add_argument("--pairs", type=cli.int_arg(1), default=None,
                      help="interleaved adamw/qsgd pairs per case, half in each build order "
                           f"(an odd count rounds up) (default: {DEFAULTS['pairs']})")
  parser.add_argument("--warmup", type=cli.int_arg(0), default=None,
                      help=f"untimed calls per arm before timing (default: {DEFAULTS['warmup']})")
  parser.add_argument("--budget-s", type=_seconds_arg, default=None,
                      help="stop a build order early once its timed time (both arms) passes half "
                           f"of this (default: {DEFAULTS['budget_s']:g})")
  parser.add_argument("--train-steps", type=cli.names_arg(TRAIN_TASKS, empty="none"), default=None,
                      help="comma list of full Flax train steps to time too, from "
                           f"{'|'.join(TRAIN_TASKS)}, or 'none' (default: {DEFAULT_TRAIN})")
  parser.add_argument("--leaves", default=None, metavar="COUNTS",
                      help="comma list of leaf counts for the many-small-arrays sweep (64x96 kernels "
                           f"and 96 biases), or 'none' (default: {DEFAULT_LEAVES})")
  parser.add_argument("--leaf-combos", type=_combos_arg, default=None, metavar="COMBOS",
                      help=f"combinations timed in the leaf sweep (default: {LEAF_COMBOS})")
  parser.add_argument("--min-pairs", type=cli.int_arg(1), default=None,
                      help="pairs run in each build order even past the budget "
                           f"(default: {DEFAULTS['min_pairs']})")
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
    args.train_steps = cli.names_arg(TRAIN_TASKS, empty="none")(preset["train_steps"])
  leaves = preset["leaves"] if args.leaves is None else args.leaves
  try:
    args.leaves = [] if leaves.strip() == "none" else _leaves_arg(leaves)
  except argparse.ArgumentTypeError as e:
    build_parser().error(f"argument --leaves: {e}")
  if args.leaf_combos is None:
    args.leaf_combos = _combos_arg(preset["leaf_combos"])
  return args


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
  case, extras = balanced(lambda arm: OptimizerArm(arm, combo if arm == "qsgd" else None, shapes),
                          args, f"{label} {'/'.join(combo)}", combo, device, n_params, n_leaves)
  targets = check_targets(case, n_target)
  if targets:
    case["target"] = "; ".join(targets)
    case["meets_target"] = all(targets.values())
  extras.update({"size": label, "d_model": d, "n_layers": n_layers, "vocab": vocab,
                 "targets_met": targets})
  return case, extras


def check_leaf_targets(case: dict) -> dict[str, bool]:
  """The leaf-sweep targets of a case, each mapped to whether it is met."""
  out = {f"ratio <= {LEAF_RATIO:g}": bool(case["ratio"] <= LEAF_RATIO)}
  if case["leaves"] >= LEAF_COMPILE_AT:
    adamw = case["compile_s_adamw"]
    limit = max(LEAF_COMPILE_FACTOR * adamw, adamw + LEAF_COMPILE_EXTRA)
    out[f"compile <= max({LEAF_COMPILE_FACTOR:g}x, +{LEAF_COMPILE_EXTRA:g} s)"] = bool(
        case["compile_s_qsgd"] <= limit)
  return out


def run_leaves_case(n_leaves: int, combo, args, device: str):
  """Times one (leaf count, combination) case of the many-small-arrays sweep."""
  shapes = many_leaf_shapes(n_leaves)
  n_params, n_leaves = count_params(shapes)
  case, extras = balanced(lambda arm: OptimizerArm(arm, combo if arm == "qsgd" else None, shapes),
                          args, f"{n_leaves} leaves {'/'.join(combo)}", combo, device, n_params,
                          n_leaves)
  targets = check_leaf_targets(case)
  case["target"] = "; ".join(targets)
  case["meets_target"] = all(targets.values())
  extras.update({"size": f"{n_leaves} leaves", "targets_met": targets})
  return case, extras


def run_train_case(task: str, combo, args, device: str):
  """Times the full train step of ``task``, AdamW vs QSGD ``combo``."""
  case, extras = balanced(
      lambda arm: TrainStepArm(task, arm, combo if arm == "qsgd" else None, args.smoke),
      args, f"train {task} {'/'.join(combo)}", combo, device)
  (scope_circuit, limit) = TRAIN_TARGET
  targets = {}
  if (combo[0], combo[1]) == scope_circuit:
    targets[f"ratio <= {limit:g}"] = bool(case["ratio"] <= limit)
    case["target"] = "; ".join(targets)
    case["meets_target"] = all(targets.values())
  extras.update({"size": f"train {task}", "targets_met": targets})
  return case, extras


# --------------------------------------------------------------------------
# Output.


def format_table(cases: list[dict], runs: list[dict]) -> str:
  head = ("case", "params", "leaves", "adamw ms", "qsgd ms", "ratio",
          "compile adamw s", "compile qsgd s", "kernels adamw/qsgd", "adamw min/max ms",
          "qsgd min/max ms", "pairs", "target", "met?")
  rows = []
  for c, r in zip(cases, runs):
    met = "; ".join("yes" if ok else "no" for ok in r["targets_met"].values())
    rows.append((
        c["name"], f"{c['params']:,}", str(c["leaves"]),
        f"{c['adamw_ms']:.2f}", f"{c['qsgd_ms']:.2f}", f"{c['ratio']:.2f}",
        f"{c['compile_s_adamw']:.2f}", f"{c['compile_s_qsgd']:.2f}",
        f"{c.get('kernels_adamw', '-')} / {c.get('kernels_qsgd', '-')}",
        f"{c['adamw_min_ms']:.2f} / {c['adamw_max_ms']:.2f}",
        f"{c['qsgd_min_ms']:.2f} / {c['qsgd_max_ms']:.2f}",
        str(c["pairs"]), c["target"] or "", met))
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
  sep = "| " + " | ".join("-" * w for w in widths) + " |"
  return "\n".join([line(head), sep] + [line(r) for r in rows])


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
  """25th and 75th percentiles (inclusive method; one value: itself twice)."""
  if len(values) < 2:
    return values[0], values[0]
  q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return q1, q3


def plot(cases: list[dict], runs: list[dict], path: Path) -> None:
  """Ratio per case (bars: median, whiskers: the middle half of the pair
  ratios, coloured by the ratio target) above the compile times of both arms.

  The whiskers span the 25th to 75th percentile, not min-max: on a shared
  machine one descheduled call makes a single pair ratio of 5 or 0.2, which
  would flatten every other whisker.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ratios = [c["ratio"] for c in cases]
  quartiles = [_quartiles(run["pair_ratios"]) for run in runs]
  lo = [max(0.0, r - q1) for r, (q1, _) in zip(ratios, quartiles)]
  hi = [max(0.0, q3 - r) for r, (_, q3) in zip(ratios, quartiles)]

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
  ax.set_ylabel("qsgd / adamw step time (geometric mean\nof both build orders' medians; "
                "25th-75th pct of pairs)")
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
  cases_todo = [("size", label, n, combo) for label, n in args.sizes for combo in args.combos]
  cases_todo += [("leaves", f"{n} leaves", n, combo) for n in args.leaves for combo in args.leaf_combos]
  train_combos = TRAIN_COMBOS[:1] if args.smoke else TRAIN_COMBOS
  cases_todo += [("train", f"train {t}", t, combo) for t in args.train_steps for combo in train_combos]
  print(f"step overhead: {len(cases_todo)} cases on {device}, "
        f"{args.pairs} pairs (budget {args.budget_s:g} s per case), "
        f"{args.warmup} warm-up calls", flush=True)
  t_start = time.perf_counter()
  warm_process(list(args.combos) + list(args.leaf_combos))
  cases, runs = [], []
  bar = tqdm(cases_todo, desc="cases", unit="case", file=sys.stderr)
  for kind, label, what, combo in bar:
    bar.set_postfix_str(f"{label} {'/'.join(combo)}")
    if kind == "train":
      case, extras = run_train_case(what, combo, args, device)
    elif kind == "leaves":
      case, extras = run_leaves_case(what, combo, args, device)
    else:
      case, extras = run_case(label, what, combo, args, device)
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
      "leaves": list(args.leaves),
      "leaf_combos": ["/".join(c) for c in args.leaf_combos],
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

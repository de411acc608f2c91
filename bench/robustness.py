"""How often each QSGD form stalls or diverges, measured over a grid.

For every problem x quantum_weight x loss scale x seed it trains AdamW and
QSGD in its three forms (``modulate`` = ``gradient``, the paper's;
``preconditioned``; ``update``) and classifies each QSGD run against AdamW on
the same problem, scale and seed:

* **diverged**: the final loss is not finite;
* **stalled**: the final loss is more than 10x AdamW's and above the
  convergence floor 1e-4 (so 1e-10 vs 1e-12 is not called a stall); for the
  classifier, final test accuracy more than 0.1 below AdamW's;
* **ok** otherwise.

Problems: optax's convergence problems (parabola, Rosenbrock, matrix
parabola; lr 1e-2, inside ``lax.scan``), least squares with 8 inputs and an
intercept (lr 3e-2), and the paper's transformer classifier on the synthetic
order task (``qsgd_optax.tasks.classification``, lr 1e-3). The loss scale
multiplies the loss the optimizer sees: Adam is invariant to it, the paper's
raw-gradient term is not. Seeds perturb the starting point (seed 0 is the
canonical start) or, for the classifier, the initialisation and batch order.

The analytic problems use the closed-form ``"sine"`` circuit by default: it
equals the ``"paper"`` QNode to float precision (``tests/test_circuits.py``)
and lets every (weight, scale, seed) of a form run as one vmapped,
scanned program; ``--circuit paper`` runs the QNode itself.

Everything reported is a function of the per-run records in
``DIR/summary.json``; ``--from DIR`` redraws the table and heat map without
training.

Examples::

  python bench/robustness.py                      # default grid
  python bench/robustness.py --smoke --out /tmp/rob
  python bench/robustness.py --from bench/results/robustness
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qsgd_optax
from qsgd_optax.tasks import arms, cli, reporting, running

FORMS = ("gradient", "preconditioned", "update")
ANALYTIC = ("parabola", "rosenbrock", "matrix_parabola", "least_squares")
PROBLEMS = ANALYTIC + ("classifier",)
STALL_FACTOR = 10.0
CONVERGED_FLOOR = 1e-4
ACCURACY_GAP = 0.1
DEFAULT_OUT = Path("bench") / "results" / "robustness"
DEFAULTS = dict(weights="0.1,0.5,0.9", scales="1,100", seeds=5, steps=20_000,
                problems=",".join(PROBLEMS), classifier_seeds=2,
                classifier_epochs=6)
SMOKE = dict(weights="0.1,0.9", scales="1,100", seeds=2, steps=300,
             problems="parabola,rosenbrock,least_squares", classifier_seeds=1,
             classifier_epochs=1)


# --------------------------------------------------------------------------- problems


def _least_squares_data() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = x @ np.arange(1, 9, dtype=np.float32) + 0.5
  return x, y


def analytic_problem(name: str) -> tuple[Any, Callable[[Any], jax.Array], float]:
  """``(init params, loss, learning rate)`` of an analytic problem."""
  if name == "parabola":
    final = jnp.array([1.0, -1.0, 1.0])
    return jnp.array([-1.0, 10.0, 1.0]), lambda p: jnp.sum(jnp.square(p - final)), 1e-2
  if name == "rosenbrock":
    return (jnp.zeros(2),
            lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2, 1e-2)
  if name == "matrix_parabola":
    target = jnp.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.5]])
    return jnp.zeros((2, 3)), lambda p: jnp.sum(jnp.square(p - target)), 1e-2
  if name == "least_squares":
    x, y = map(jnp.asarray, _least_squares_data())
    return ({"w": jnp.zeros(8), "b": jnp.zeros(())},
            lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y)), 3e-2)
  raise ValueError(f"unknown problem {name!r}; accepted: {ANALYTIC}")


def _start(init: Any, seed: int) -> Any:
  """Seed 0: the canonical start; others: a fixed N(0, 0.5^2) perturbation."""
  if seed == 0:
    return init
  leaves, treedef = jax.tree.flatten(init)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def run_analytic(name: str, form: str | None, weights: Sequence[float],
                 scales: Sequence[float], seeds: Sequence[int], steps: int,
                 circuit: str) -> np.ndarray:
  """Final unscaled losses ``float[len(weights), len(scales), len(seeds)]``.

  ``form=None`` is AdamW (then every weight row is the same run).
  """
  init, loss, lr = analytic_problem(name)

  def one(weight, scale, start):
    if form is None:
      tx = optax.adam(lr)
    else:
      tx = qsgd_optax.qsgd(lr, quantum_weight=weight, circuit=circuit, modulate=form)

    def body(carry, _):
      p, s = carry
      g = jax.grad(lambda q: scale * loss(q))(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (start, tx.init(start)), None, length=steps)
    return loss(p)

  starts = [_start(init, s) for s in seeds]
  start_batch = jax.tree.map(lambda *xs: jnp.stack(xs), *starts)
  w = jnp.asarray(weights, jnp.float32)
  sc = jnp.asarray(scales, jnp.float32)
  f = jax.vmap(one, (None, None, 0))             # seeds
  f = jax.vmap(f, (None, 0, None))               # scales
  f = jax.jit(jax.vmap(f, (0, None, None)))      # weights
  return np.asarray(f(w, sc, start_batch), np.float64)


def run_classifier(form: str | None, weight: float | None, scale: float, seed: int,
                   epochs: int, dataset: Any) -> dict[str, Any]:
  """One classifier training run (the paper's model on the synthetic task)."""
  from qsgd_optax.tasks.classification import experiment  # pylint: disable=import-outside-toplevel

  config = experiment.ClassificationConfig(epochs=epochs, loss_scale=float(scale))
  arm = (arms.Arm("adamw") if form is None
         else arms.Arm("qsgd", quantum_weight=weight, modulate=form))
  run = experiment.train_and_evaluate(config, arm, seed, dataset=dataset)
  return {"final_loss": run["train_loss"][-1], "final_accuracy": run["final_accuracy"],
          "wall_time_s": run["wall_time_s"]}


# --------------------------------------------------------------------------- classification of runs


def classify(run: dict[str, Any], reference: dict[str, Any]) -> str:
  """``"diverged"``, ``"stalled"`` or ``"ok"`` for a QSGD run vs its AdamW run."""
  loss = run["final_loss"]
  if loss is None or not math.isfinite(loss):
    return "diverged"
  if run["problem"] == "classifier":
    ref_acc = reference["final_accuracy"]
    return "stalled" if run["final_accuracy"] < ref_acc - ACCURACY_GAP else "ok"
  ref = reference["final_loss"]
  ref = math.inf if ref is None else ref
  if loss > STALL_FACTOR * ref and loss > CONVERGED_FLOOR:
    return "stalled"
  return "ok"


def outcomes(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each QSGD run with its ``outcome`` against the AdamW run of the same cell."""
  refs = {(r["problem"], r["scale"], r["seed"]): r for r in runs if r["optimizer"] == "adamw"}
  out = []
  for r in runs:
    if r["optimizer"] == "adamw":
      continue
    key = (r["problem"], r["scale"], r["seed"])
    if key not in refs:
      raise ValueError(f"no adamw run for problem={key[0]} scale={key[1]} seed={key[2]}")
    out.append({**r, "outcome": classify(r, refs[key])})
  return out


def tally(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, float, float], dict[str, int]]:
  """Counts of outcomes per (form, weight, scale), over problems and seeds."""
  counts: dict[tuple[str, float, float], dict[str, int]] = {}
  for r in outcomes(runs):
    cell = counts.setdefault((r["modulate"], r["quantum_weight"], r["scale"]),
                             {"ok": 0, "stalled": 0, "diverged": 0})
    cell[r["outcome"]] += 1
  return counts


def report(runs: Sequence[dict[str, Any]]) -> str:
  """The summary tables: overall per cell, then per problem."""
  counts = tally(runs)
  rows = [[form, f"{w:g}", f"{s:g}", c["ok"], c["stalled"], c["diverged"],
           f"{(c['stalled'] + c['diverged']) / sum(c.values()):.0%}"]
          for (form, w, s), c in sorted(counts.items())]
  text = [reporting.format_table(
      ["modulate", "weight", "scale", "ok", "stalled", "diverged", "failed"], rows)]
  per_problem: dict[tuple[str, str], dict[str, int]] = {}
  for r in outcomes(runs):
    cell = per_problem.setdefault((r["problem"], r["modulate"]), {"ok": 0, "stalled": 0, "diverged": 0})
    cell[r["outcome"]] += 1
  rows = [[p, f, c["ok"], c["stalled"], c["diverged"]] for (p, f), c in sorted(per_problem.items())]
  text.append(reporting.format_table(["problem", "modulate", "ok", "stalled", "diverged"], rows))
  return "\n\n".join(text)


def plot_heatmap(runs: Sequence[dict[str, Any]], path: Path) -> Path:
  """Failure fraction per form (rows) and (weight, scale) (columns)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  counts = tally(runs)
  forms = [f for f in FORMS if any(k[0] == f for k in counts)]
  cols = sorted({(w, s) for _, w, s in counts})
  grid = np.full((len(forms), len(cols)), np.nan)
  notes = [["" for _ in cols] for _ in forms]
  for i, f in enumerate(forms):
    for j, (w, s) in enumerate(cols):
      c = counts.get((f, w, s))
      if c:
        n = sum(c.values())
        grid[i, j] = (c["stalled"] + c["diverged"]) / n
        notes[i][j] = f"{c['stalled']}s {c['diverged']}d\n/{n}"
  fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 1.0 * len(forms) + 1.8))
  im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(cols)), [f"w={w:g}\nscale={s:g}" for w, s in cols])
  ax.set_yticks(range(len(forms)), forms)
  for i in range(len(forms)):
    for j in range(len(cols)):
      ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8,
              color="white" if grid[i, j] > 0.6 else "black")
  fig.colorbar(im, ax=ax, label="stalled or diverged (fraction)")
  ax.set_title("QSGD failure rate vs AdamW (s: stalled, d: diverged)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------- CLI


def _float_list(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    values = ()
  if not values or not all(math.isfinite(v) and v > 0 for v in values):
    raise argparse.ArgumentTypeError(f"expected a comma list of positive numbers, got {text!r}")
  return values


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="robustness.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"--smoke: {SMOKE} (explicit options still win).")
  parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                      help=f"output directory (default: {DEFAULT_OUT})")
  parser.add_argument("--smoke", action="store_true", help="a tiny grid for tests (under a minute)")
  parser.add_argument("--from", dest="from_dir", type=Path, default=None, metavar="DIR",
                      help="redraw table and heat map from DIR/summary.json, no training")
  parser.add_argument("--weights", type=_float_list, default=None,
                      help=f"quantum_weight values (default: {DEFAULTS['weights']})")
  parser.add_argument("--scales", type=_float_list, default=None,
                      help=f"loss scales (default: {DEFAULTS['scales']})")
  parser.add_argument("--seeds", type=cli.int_arg(1), default=None,
                      help=f"seeds per analytic cell (default: {DEFAULTS['seeds']})")
  parser.add_argument("--steps", type=cli.int_arg(1), default=None,
                      help=f"steps on the analytic problems (default: {DEFAULTS['steps']})")
  parser.add_argument("--problems", type=cli.names_arg(PROBLEMS), default=None,
                      help=f"comma list from {', '.join(PROBLEMS)} (default: all)")
  parser.add_argument("--classifier-seeds", type=cli.int_arg(1), default=None,
                      help=f"seeds per classifier cell (default: {DEFAULTS['classifier_seeds']})")
  parser.add_argument("--classifier-epochs", type=cli.int_arg(1), default=None,
                      help=f"classifier epochs (default: {DEFAULTS['classifier_epochs']})")
  parser.add_argument("--circuit", choices=("sine", "paper"), default="sine",
                      help="circuit on the analytic problems (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  return parser


def _fill(args: argparse.Namespace) -> argparse.Namespace:
  base = SMOKE if args.smoke else DEFAULTS
  parsers = {"weights": _float_list, "scales": _float_list, "seeds": int, "steps": int,
             "problems": cli.names_arg(PROBLEMS), "classifier_seeds": int, "classifier_epochs": int}
  for key, parse in parsers.items():
    if getattr(args, key) is None:
      setattr(args, key, parse(base[key]) if isinstance(base[key], str) else base[key])
  if args.out is None:
    args.out = DEFAULT_OUT
  return args


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Trains the whole grid and returns the per-run records."""
  runs: list[dict[str, Any]] = []
  seeds = list(range(args.seeds))
  analytic = [p for p in args.problems if p in ANALYTIC]
  jobs = [(p, f) for p in analytic for f in (None,) + FORMS]
  bar = running.progress_bar(jobs, desc="analytic", disable=args.no_progress)
  for problem, form in bar:
    start = time.perf_counter()
    losses = run_analytic(problem, form, args.weights, args.scales, seeds, args.steps, args.circuit)
    elapsed = time.perf_counter() - start
    for i, w in enumerate(args.weights if form else [None]):
      for j, s in enumerate(args.scales):
        for k, seed in enumerate(seeds):
          loss = float(losses[i, j, k])
          runs.append({"problem": problem, "optimizer": "adamw" if form is None else "qsgd",
                       "quantum_weight": w, "modulate": form, "circuit": form and args.circuit,
                       "scale": s, "seed": seed, "steps": args.steps,
                       "final_loss": loss if math.isfinite(loss) else None,
                       "batch_wall_time_s": elapsed})
  if "classifier" in args.problems:
    from qsgd_optax.tasks.classification import experiment  # pylint: disable=import-outside-toplevel

    dataset = experiment.load_task(experiment.ClassificationConfig())
    cells = [(None, None)] + [(f, w) for f in FORMS for w in args.weights]
    jobs = [(f, w, s, seed) for f, w in cells for s in args.scales
            for seed in range(args.classifier_seeds)]
    for form, w, s, seed in running.progress_bar(jobs, desc="classifier", disable=args.no_progress):
      r = run_classifier(form, w, s, seed, args.classifier_epochs, dataset)
      loss = r["final_loss"]
      runs.append({"problem": "classifier", "optimizer": "adamw" if form is None else "qsgd",
                   "quantum_weight": w, "modulate": form, "circuit": form and "paper",
                   "scale": s, "seed": seed, "epochs": args.classifier_epochs,
                   "final_loss": loss if math.isfinite(loss) else None,
                   "final_accuracy": r["final_accuracy"], "wall_time_s": r["wall_time_s"]})
  return runs


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.from_dir is not None:
    summary = json.loads((args.from_dir / "summary.json").read_text())
    runs, out = summary["runs"], args.out or args.from_dir
  else:
    args = _fill(args)
    start = time.perf_counter()
    runs = collect(args)
    out = args.out
    config = {k: v for k, v in vars(args).items() if k not in ("from_dir", "out")}
    config.update(stall_factor=STALL_FACTOR, converged_floor=CONVERGED_FLOOR,
                  accuracy_gap=ACCURACY_GAP, total_wall_time_s=time.perf_counter() - start,
                  jax=jax.__version__, optax=optax.__version__, device=str(jax.devices()[0]))
    reporting.write_summary(out, runs, config)
  table = report(runs)
  print(table)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.txt").write_text(table + "\n")
  png = plot_heatmap(runs, out / "robustness.png")
  print(f"\nwrote {out / 'summary.json'}, {out / 'table.txt'} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""How large are the gradients the paper's term multiplies? |g| on the touched coordinates of an AdamW run.

The paper form's term is ``quantum_weight * sin(pi * theta) * g``; it
cancels or reverses Adam's unit-sized step only where
``quantum_weight * |g| >= 1`` (``bench/RESULTS.md``, "Robustness"). This
trains the paper's classifier with AdamW (the trajectory every arm starts
from) and records, every ``--every`` steps, the largest ``|g|`` on the
coordinates scope "leaf" touches (the first ``n_qubits`` of every array)
and on all coordinates. ``--from DIR`` reprints the table.

Examples::

  python bench/gradient_scale.py                         # synthetic and agreement tasks
  python bench/gradient_scale.py --smoke --out /tmp/gs
  python bench/gradient_scale.py --from bench/results/gradient_scale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qsgd_optax.tasks import cli, reporting
from qsgd_optax.tasks.classification import experiment

DEFAULT_OUT = Path("bench") / "results" / "gradient_scale"
WEIGHTS = (0.5, 5.0, 50.0)


def measure(task: str, *, epochs: int, every: int, seed: int, smoke: bool) -> dict[str, Any]:
  """Largest |g| per sampled step, on the touched coordinates and overall."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qsgd_optax.tasks.classification import transformer  # pylint: disable=import-outside-toplevel

  sizes = dict(n_train=192, n_test=64, seq_len=12) if smoke else {}
  config = experiment.ClassificationConfig(task=task, epochs=epochs, **sizes)
  data = experiment.load_task(config)
  model = transformer.create_model(config, data, seed)
  optimizer = nnx.Optimizer(model, optax.adamw(config.learning_rate, weight_decay=config.weight_decay),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens, labels):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(tokens), labels).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    touched = jax.numpy.stack([jax.numpy.max(jax.numpy.abs(g.reshape(-1)[:config.n_qubits])) for g in leaves])
    overall = jax.numpy.stack([jax.numpy.max(jax.numpy.abs(g)) for g in leaves])
    return touched.max(), overall.max()

  rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
  batch = config.batch_size
  touched, overall, done = [], [], 0
  for _ in range(epochs):
    order = rng.permutation(len(data.train))
    for i in range(len(data.train) // batch):
      rows = order[i * batch:(i + 1) * batch]
      t, o = step(model, optimizer, data.train.tokens[rows], data.train.labels[rows])
      done += 1
      if done % every == 1 or every == 1:
        touched.append(float(t))
        overall.append(float(o))
  return {"task": task, "seed": seed, "epochs": epochs, "every": every, "steps": done,
          "max_abs_grad_touched": touched, "max_abs_grad_all": overall}


def table(runs: Sequence[dict[str, Any]]) -> str:
  header = ["task", "sampled steps", "max abs(g) touched", "99th pct of step max", "median of step max",
            "max abs(g) anywhere"] + [f"steps with {w:g} * max abs(g) touched >= 1" for w in WEIGHTS]
  rows = []
  for r in runs:
    t = np.asarray(r["max_abs_grad_touched"])
    rows.append([r["task"], len(t), f"{t.max():.3f}", f"{np.percentile(t, 99):.3f}", f"{np.median(t):.4f}",
                 f"{max(r['max_abs_grad_all']):.3f}"] + [f"{np.mean(w * t >= 1):.0%}" for w in WEIGHTS])
  return "\n".join(reporting.markdown_table(header, rows))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gradient_scale.py", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", type=cli.names_arg(("synthetic", "agreement")), default=("synthetic", "agreement"),
                      help="comma list (default: synthetic,agreement)")
  parser.add_argument("--epochs", type=cli.int_arg(1), default=12, help="epochs (default: %(default)s)")
  parser.add_argument("--every", type=cli.int_arg(1), default=10, help="sample every N steps (default: %(default)s)")
  parser.add_argument("--seed", type=cli.int_arg(0), default=0, help="seed (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch")
  parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: {DEFAULT_OUT})")
  parser.add_argument("--from", dest="from_dir", type=Path, default=None, metavar="DIR",
                      help="reprint the table from DIR/summary.json")
  args = parser.parse_args(argv)
  if args.from_dir is not None:
    runs = json.loads((args.from_dir / "summary.json").read_text())["runs"]
    out = args.out or args.from_dir
  else:
    epochs = 1 if args.smoke else args.epochs
    runs = [measure(t, epochs=epochs, every=args.every, seed=args.seed, smoke=args.smoke) for t in args.tasks]
    out = args.out or DEFAULT_OUT
    reporting.write_summary(out, runs, {"tasks": list(args.tasks), "epochs": epochs, "every": args.every,
                                        "seed": args.seed, "smoke": args.smoke})
  text = table(runs)
  print(text)
  Path(out).mkdir(parents=True, exist_ok=True)
  (Path(out) / "table.md").write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

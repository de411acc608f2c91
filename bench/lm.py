"""The paper's LM fine-tuning comparison (its Table I) with paired seeds and intervals.

The paper fine-tunes Llama-3.2-1B-Instruct on GSM8K for one epoch and
reports mean training loss: AdamW 0.2188, QSGD 0.2098 (quantum_weight 0.1),
0.2097 (0.5), one run each. This benchmark runs the same recipe at CPU scale
through ``qsgd_optax.tasks.lm.experiment.run_finetune`` (the code behind
``examples/finetune_lm.py``: SmolLM2-135M-Instruct, GSM-Symbolic problems,
loss on answer tokens, warmup + linear decay, clipping 1.0, weight decay
0.01, bf16 compute) for every arm and seed. A seed fixes the order of the
training problems (the model is pretrained, so there is no initialisation
to vary) and is shared by all arms: differences are paired.

Per arm it reports the mean training loss over the epoch (the paper's
metric) and the held-out loss after training, mean +- std over seeds, and
for each QSGD arm the paired difference to AdamW with a 95% bootstrap
interval and an exact sign-flip p-value. ``--from DIR`` redraws everything
from ``DIR/summary.json``.

Examples::

  python bench/lm.py                           # SmolLM2-135M, 4 arms x 3 seeds
  python bench/lm.py --smoke --out /tmp/lmb     # random tiny Llama, seconds
  python bench/lm.py --from bench/results/lm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats  # noqa: E402  pylint: disable=wrong-import-position
from qsgd_optax.tasks import arms, cli, reporting  # noqa: E402

PAPER = {"adamw": 0.2188, "qsgd:0.1": 0.2098, "qsgd:0.5": 0.2097}
DEFAULTS = dict(model="smollm2-135m", optimizers="adamw,qsgd:0.1,qsgd:0.5,qsgd:0.5:update",
                seeds="3", examples=48, test_examples=16, max_len=512, lr=2e-5)
SMOKE = dict(model="tiny", optimizers="adamw,qsgd:0.5", seeds="2", examples=16,
             test_examples=4, max_len=256, lr=3e-3)
DEFAULT_OUT = Path("bench") / "results" / "lm"
METRICS = (("mean_loss", "mean train loss"), ("eval_loss_after", "held-out loss after"))


def analyse(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per arm: mean +- std of each metric and paired differences to AdamW."""
  by_arm = reporting.group_runs(runs, "arm")
  control = by_arm.get("adamw", [])
  rows = []
  for arm, group in by_arm.items():
    row: dict[str, Any] = {"arm": arm, "n": len(group), "paper_mean_loss": PAPER.get(arm)}
    for key, _ in METRICS:
      mean, std, _n = reporting.mean_std(r[key] for r in group)
      row[f"{key}_mean"], row[f"{key}_std"] = mean, std
      if arm != "adamw" and control:
        row[f"{key}_vs_adamw"] = _stats.paired({r["seed"]: r[key] for r in group},
                                               {r["seed"]: r[key] for r in control})
    row["tokens_per_s"] = reporting.mean_std(r["tokens_per_s"] for r in group)[0]
    rows.append(row)
  return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table in the shape of the paper's Table I."""
  header = ["arm", "n", "paper mean loss", "mean train loss", "vs adamw [95% CI] p",
            "held-out after", "vs adamw [95% CI] p", "tok/s"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["arm"], r["n"], "" if r["paper_mean_loss"] is None else f"{r['paper_mean_loss']:.4f}"]
    for key, _ in METRICS:
      m, s = r[f"{key}_mean"], r[f"{key}_std"]
      cells.append("-" if math.isnan(m) else f"{m:.4f} +- {s:.4f}")
      d = r.get(f"{key}_vs_adamw")
      cells.append("" if not d else (
          f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] p={d['p_value']:.3f} "
          f"({d['mean_diff'] / r[f'{key}_mean'] * 100:+.2f}%)" if r[f"{key}_mean"] else ""))
    cells.append(f"{r['tokens_per_s']:.0f}")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="lm.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"--smoke: {SMOKE} (explicit options still win).")
  cli.add_common_args(parser, optimizers=DEFAULTS["optimizers"], seeds=DEFAULTS["seeds"],
                          learning_rate=DEFAULTS["lr"], batch_size=1)
  parser.set_defaults(optimizers=None, seeds=None, lr=None)
  parser.add_argument("--model", choices=("smollm2-135m", "tiny"), default=None,
                      help=f"pretrained SmolLM2 or a random tiny Llama (default: {DEFAULTS['model']})")
  parser.add_argument("--examples", type=cli.int_arg(1), default=None,
                      help=f"training problems, one epoch (default: {DEFAULTS['examples']})")
  parser.add_argument("--test-examples", type=cli.int_arg(1), default=None,
                      help=f"held-out problems (default: {DEFAULTS['test_examples']})")
  parser.add_argument("--max-len", type=cli.int_arg(8), default=None,
                      help=f"context length (default: {DEFAULTS['max_len']})")
  parser.add_argument("--mesh", type=_mesh_arg, default=None, metavar="data=N,fsdp=M",
                      help="shard over a device mesh of every process's devices (default: one device)")
  cli.add_distributed_args(parser)
  parser.add_argument("--from", dest="from_dir", type=Path, default=None, metavar="DIR",
                      help="redraw the table and plot from DIR/summary.json, no training")
  return parser


def _mesh_arg(text: str) -> dict[str, int]:
  from qsgd_optax.tasks.lm import sharding  # pylint: disable=import-outside-toplevel

  return cli.checked(sharding.parse_mesh)(text)


def _fill(args: argparse.Namespace) -> argparse.Namespace:
  base = SMOKE if args.smoke else DEFAULTS
  for key in ("model", "examples", "test_examples", "max_len", "lr"):
    if getattr(args, key) is None:
      setattr(args, key, base[key])
  if args.optimizers is None:
    args.optimizers = arms.parse_arms(base["optimizers"])
  if args.seeds is None:
    args.seeds = arms.parse_seeds(base["seeds"])
  if args.out is None:
    args.out = DEFAULT_OUT
  return args


def collect(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  from qsgd_optax.tasks.lm import experiment  # pylint: disable=import-outside-toplevel

  config = experiment.FinetuneConfig(model=args.model, examples=args.examples,
                             test_examples=args.test_examples, max_len=args.max_len,
                             batch_size=args.batch_size, learning_rate=args.lr, mesh=args.mesh)
  primary = _primary()
  log = lambda msg: primary and print(msg, file=sys.stderr, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  runs, info = experiment.run_finetune(config, args.optimizers, args.seeds,
                               progress=primary and not args.no_progress, log=log)
  return runs, {"model": args.model, "examples": args.examples,
                "test_examples": args.test_examples, "max_len": args.max_len,
                "learning_rate": args.lr, "batch_size": args.batch_size,
                "optimizers": [a.label for a in args.optimizers], "seeds": list(args.seeds),
                "smoke": args.smoke, "mesh": args.mesh, **info}


def _primary() -> bool:
  """Whether this is process 0 (the one that prints and writes files)."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index() == 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.from_dir is None:
    cli.init_distributed(args, parser)
  if args.from_dir is not None:
    runs = json.loads((args.from_dir / "summary.json").read_text())["runs"]
    out = Path(args.out or args.from_dir)
  else:
    args = _fill(args)
    start = time.perf_counter()
    runs, config = collect(args)
    config["total_wall_time_s"] = time.perf_counter() - start
    if not _primary():
      return 0
    out = Path(args.out)
    reporting.write_summary(out, runs, config)
  rows = analyse(runs)
  text = table(rows)
  print(text)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(text + "\n")
  (out / "analysis.json").write_text(json.dumps(rows, indent=2) + "\n")
  png = reporting.plot_curves(runs, out / "loss.png",
                            [("loss_smooth", "training loss (EMA 0.9, answer tokens)")],
                            xlabel="micro-step", band="std",
                            title="one epoch, mean +- std over seeds")
  print(f"\nwrote {out / 'summary.json'}, {out / 'table.md'} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Trains the paper's transformer text classifier with AdamW and QSGD and compares them.

The paper's text-classification experiment (Pamuk et al., sec. 4): a
2-layer transformer (embedding 64, 4 heads, feed-forward 128, dropout 0.1)
trained with batch 32 and lr 1e-3, comparing final test accuracy and the
number of epochs to reach 90% test accuracy. Without arguments it runs the
synthetic order task with standard attention for the arms adamw, qsgd:0.1
and qsgd:0.5 over three seeds, then prints the comparison table.

Examples::

  python examples/sequence_classification.py                    # the default run
  python examples/sequence_classification.py --smoke --out /tmp/cls
  python examples/sequence_classification.py --optimizers adamw,qsgd:0.5:update --seeds 5
  python examples/sequence_classification.py --task polarity --attention quantum
  python examples/sequence_classification.py --checkpoint-every 50 --out /tmp/cls   # interrupted? then:
  python examples/sequence_classification.py --checkpoint-every 50 --out /tmp/cls --resume

``DIR/summary.json`` (``--out DIR``, default ``runs/sequence_classification``)
holds ``{"runs": [...], "config": {...}}``; every run has optimizer,
quantum_weight, modulate, circuit, scope, seed, per-epoch train_loss /
train_accuracy / test_loss / test_accuracy lists, final_accuracy,
epochs_to_target, wall_time_s and mean_step_time_s. ``DIR/curves.png``
draws test accuracy and training loss per epoch: mean over seeds, with the
min-max band.

Checkpoints (``--checkpoint-every N`` or ``--resume``): Orbax checkpoints of
every run go to ``DIR/checkpoints/<arm>-seed<seed>`` after every epoch and
every N optimizer steps (the last ``--keep`` kept). ``--resume`` continues
each run from its latest complete checkpoint (runs without one start
afresh) and ends exactly where an uninterrupted run ends; it may ask for
more ``--epochs`` than the checkpointed run, but every other setting must
match, or it stops with an error naming the mismatching settings.

Several devices or processes: ``--data-parallel`` splits every batch over
all devices; under ``jax.distributed`` (``--coordinator HOST:PORT
--num-processes N --process-id I``, or ``--distributed``) it is implied,
every process feeds its own rows, and process 0 alone prints and writes
files. ``examples/launch_local.py --processes 2 -- examples/sequence_classification.py
--smoke`` tries it on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qsgd_optax.tasks import _checkpoints, arms, cli, reporting, running
from qsgd_optax.tasks.classification import experiment, transformer

DEFAULTS = dict(epochs=15, optimizers="adamw,qsgd:0.1,qsgd:0.5", seeds="0,1,2")
SMOKE = dict(epochs=2, optimizers="adamw,qsgd:0.5", seeds="0,", n_train=256, n_test=128, seq_len=16)
DEFAULT_OUT = Path("runs") / "sequence_classification"


def _fraction_arg(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The CLI's argument parser."""
  parser = argparse.ArgumentParser(
      prog="sequence_classification.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"--smoke: {SMOKE['n_train']} training sequences of length {SMOKE['seq_len']}, "
             f"{SMOKE['epochs']} epochs, arms {SMOKE['optimizers']}, seed 0 (explicit options still win).")
  cli.add_common_args(parser, optimizers=DEFAULTS["optimizers"], seeds=DEFAULTS["seeds"])
  parser.add_argument("--task", choices=experiment.TASKS, default="synthetic",
                      help="synthetic order task, or real movie-review polarity (default: %(default)s)")
  parser.add_argument("--attention", choices=transformer.ATTENTIONS, default="standard",
                      help="standard softmax attention, or with the quantum score bias (default: %(default)s)")
  parser.add_argument("--quantum-method", choices=("spectral", "direct"), default="spectral",
                      help="how the quantum bias is evaluated; both exact, 'direct' runs the QNode on "
                           "every score and is much slower (default: %(default)s)")
  parser.add_argument("--pooling", choices=transformer.POOLINGS, default="mean",
                      help="sequence pooling (default: %(default)s)")
  parser.add_argument("--epochs", type=cli.int_arg(1), default=None,
                      help=f"training epochs (default: {DEFAULTS['epochs']})")
  parser.add_argument("--target-accuracy", type=_fraction_arg, default=0.9,
                      help="test accuracy that epochs_to_target waits for (default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=0.0,
                      help="decoupled weight decay (default: %(default)s)")
  cli.add_long_run_args(parser)
  parser.add_argument("--data-parallel", action="store_true",
                      help="split every batch over all devices (of all processes); implied with several "
                           "processes; --batch-size must be a multiple of the device count")
  cli.add_distributed_args(parser)
  # None marks "not given", so --smoke can fill in its own values.
  parser.set_defaults(optimizers=None, seeds=None)
  return parser


def make_config(args: argparse.Namespace) -> experiment.ClassificationConfig:
  """The run configuration from parsed arguments (``--smoke`` shrinks the data)."""
  sizes = {k: SMOKE[k] for k in ("n_train", "n_test", "seq_len")} if args.smoke else {}
  if args.task == "polarity":
    sizes = {"seq_len": sizes.get("seq_len", 48)}
  return experiment.ClassificationConfig(
      task=args.task, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
      weight_decay=args.weight_decay, target_accuracy=args.target_accuracy, pooling=args.pooling,
      attention=args.attention, quantum_method=args.quantum_method,
      max_nonfinite=args.max_nonfinite, **sizes)


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
  base = SMOKE if args.smoke else DEFAULTS
  if args.optimizers is None:
    args.optimizers = arms.parse_arms(base["optimizers"])
  if args.seeds is None:
    args.seeds = arms.parse_seeds(base["seeds"])
  if args.epochs is None:
    args.epochs = base["epochs"]
  if args.out is None:
    args.out = DEFAULT_OUT
  return args


def _mesh(args: argparse.Namespace, parser: argparse.ArgumentParser):
  """The data-parallel mesh over every device of every process, or None for one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  if not (args.data_parallel or jax.process_count() > 1):
    return None
  if args.batch_size % jax.device_count():
    parser.error(f"argument --batch-size: {args.batch_size} is not a multiple of the "
                 f"{jax.device_count()} devices the batch is split over")
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = _fill_defaults(parser.parse_args(argv))
  cli.init_distributed(args, parser)
  mesh = _mesh(args, parser)
  import jax  # pylint: disable=import-outside-toplevel

  primary = jax.process_index() == 0  # every process trains; process 0 alone prints and writes
  config = make_config(args)
  start = time.perf_counter()
  dataset = experiment.load_task(config)
  if primary:
    print(f"task {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test sequences of length "
          f"{dataset.seq_len}, vocab {dataset.vocab_size}; {config.attention} attention; "
          f"arms {', '.join(a.label for a in args.optimizers)}; seeds {list(args.seeds)}"
          + (f"; data parallel over {mesh.size} devices, {jax.process_count()} processes" if mesh else ""),
          flush=True)

  checkpoint_dir = args.out / "checkpoints" if args.checkpoint_every or args.resume else None

  def run_one(arm: arms.Arm, seed: int) -> dict:
    return experiment.train_and_evaluate(
        config, arm, seed, dataset=dataset, progress=primary and not args.no_progress,
        checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every, keep=args.keep,
        resume=args.resume, log=lambda msg: primary and print(msg, file=sys.stderr, flush=True), mesh=mesh)

  try:
    runs = running.run_arms(args.optimizers, args.seeds, run_one, progress=primary and not args.no_progress)
  except (_checkpoints.CheckpointError, running.NonFiniteError) as e:
    print(f"sequence_classification.py: error: {e}", file=sys.stderr)
    return 1
  total = time.perf_counter() - start
  warnings = reporting.divergence_warnings(runs)
  status = 3 if warnings and args.fail_on_divergence else 0
  if not primary:
    return status
  print()
  print(experiment.comparison_table(runs, config.target_accuracy))
  print(f"\ntotal wall time {total:.0f} s")
  for line in warnings:
    print(line, file=sys.stderr)

  summary_config = {**dataclasses.asdict(config), "optimizers": [a.label for a in args.optimizers],
                    "seeds": list(args.seeds), "smoke": args.smoke, "data": dataset.info,
                    "total_wall_time_s": total, "devices": mesh.size if mesh else 1,
                    "processes": jax.process_count()}
  path = reporting.write_summary(args.out, runs, summary_config)
  png = reporting.plot_curves(
      runs, args.out / "curves.png",
      [("test_accuracy", "test accuracy"), ("train_loss", "training loss")],
      title=f"{dataset.name} task, {config.attention} attention (mean over seeds, min-max band)")
  print(f"wrote {path} and {png}")
  return status


if __name__ == "__main__":
  sys.exit(main())

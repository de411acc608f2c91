"""What verified checkpoints cost: save and restore of the LM checkpoint with and without digests.

The LM fine-tuning checkpoint (SmolLM2-135M architecture, random init:
float32 parameters, QSGD's Adam moments, the step count, as
``finetune_lm.py`` saves them) is saved and restored through
``qsgd_optax.tasks._checkpoints.RunCheckpoints`` (arm B: digests computed on
save, every array verified on restore) and through the same Orbax manager
without digests (arm A), interleaved A B A B ... ``--repeats`` times in one
process; medians are reported, and the digest computation alone.

Examples::

  python bench/checkpoint_cost.py                       # the LM checkpoint, 5 repeats
  python bench/checkpoint_cost.py --smoke --out /tmp/ck

``DIR/summary.json`` (``--out DIR``, default ``bench/results/checkpoint_cost``)
holds ``{"runs": [...], "config": {...}}``: one record with the per-repeat
times in seconds.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qsgd_optax.tasks import cli, reporting

DEFAULT_OUT = Path("bench") / "results" / "checkpoint_cost"


def build_parser():
  parser = cli.docstring_parser(__doc__)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true", help="the tiny Llama, 2 repeats")
  parser.add_argument("--repeats", type=cli.int_arg(1), default=None, help="A/B pairs (default: 5; smoke: 2)")
  return parser


def _state(smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qsgd_optax.tasks import arms  # pylint: disable=import-outside-toplevel
  from qsgd_optax.tasks.lm import experiment, llama, steps  # pylint: disable=import-outside-toplevel

  cfg = llama.LlamaConfig.tiny() if smoke else llama.LlamaConfig.smollm2_135m()
  _, params = steps.split_params(llama.Llama(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  tx = steps.make_optimizer(arms.parse_arm("qsgd:0.5"), learning_rate=2e-5, total_steps=100, warmup_steps=10)
  tree = experiment._state_tree(params, jax.jit(tx.init)(params))  # pylint: disable=protected-access
  return jax.block_until_ready(tree)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  repeats = args.repeats or (2 if args.smoke else 5)
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from qsgd_optax.tasks import _checkpoints, running  # pylint: disable=import-outside-toplevel

  tree = _state(args.smoke)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  print(f"checkpoint: {len(tree)} arrays, {n_bytes / 2**20:.0f} MiB", flush=True)
  _checkpoints.digests(tree)  # compile the digest program once, untimed
  times: dict[str, list[float]] = {k: [] for k in ("save_plain", "save_verified", "restore_plain",
                                                   "restore_verified", "digest")}
  work = Path(tempfile.mkdtemp(prefix="qsgd_ckpt_cost_"))
  try:
    for r in running.progress_bar(range(repeats), desc="repeats"):
      plain = ocp.CheckpointManager(work / f"plain{r}", options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False, create=True))
      t0 = time.perf_counter()
      plain.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave({})))
      plain.wait_until_finished()
      times["save_plain"].append(time.perf_counter() - t0)
      verified = _checkpoints.RunCheckpoints(work / f"verified{r}", {"bench": 1}, keep=1, resume=False)
      t0 = time.perf_counter()
      verified.save(1, tree, {})
      times["save_verified"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      restored = plain.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree),
                                                          progress=ocp.args.JsonRestore())).state
      jax.block_until_ready(restored)
      times["restore_plain"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      restored, _ = verified.restore(tree)
      jax.block_until_ready(restored)
      times["restore_verified"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      _checkpoints.digests(tree)
      times["digest"].append(time.perf_counter() - t0)
      plain.close()
      verified.close()
      shutil.rmtree(work / f"plain{r}")
      shutil.rmtree(work / f"verified{r}")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  rows = [["save", f"{med['save_plain']:.2f}", f"{med['save_verified']:.2f}",
           f"{med['save_verified'] / med['save_plain']:.2f}"],
          ["restore", f"{med['restore_plain']:.2f}", f"{med['restore_verified']:.2f}",
           f"{med['restore_verified'] / med['restore_plain']:.2f}"],
          ["digest alone", "", f"{med['digest']:.3f}", ""]]
  print(reporting.format_table(["", "plain Orbax s", "with digests s", "ratio"], rows))
  record = {"optimizer": "qsgd", "quantum_weight": 0.5, "seed": 0, "arrays": len(tree), "bytes": n_bytes,
            **{f"{k}_s": v for k, v in med.items()}, "times_s": times}
  config = {"argv": sys.argv[1:] if argv is None else list(argv), "smoke": args.smoke, "repeats": repeats,
            "model": "tiny" if args.smoke else "smollm2-135m", "cpu_count": os.cpu_count(),
            "machine": reporting.cpu_model()}
  path = reporting.write_summary(args.out, [record], config)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

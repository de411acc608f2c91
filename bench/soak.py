"""Soak test: many optimizer steps of the classifier, watching for NaNs, leaks and drift.

For each arm it trains the paper's transformer classifier on the synthetic
task (``qsgd_optax.tasks.classification``) for ``--steps`` optimizer steps
(cycling through epochs of the training split) and samples, every
``--every`` steps: the training loss, whether any parameter or optimizer
state leaf is non-finite, the process's peak resident memory
(``resource.getrusage``, so it only grows) and the mean step time over the
window. It reports per arm: the first non-finite step (or none), peak RSS
at the first and last sample and its growth, and the step-time drift (the
median of the last quarter of windows over the median of the first
quarter). Not part of the default test run (only its --smoke path is).

Examples::

  python bench/soak.py                             # 20,000 steps per stable form
  python bench/soak.py --smoke --out /tmp/soak
  python bench/soak.py --steps 5000 --optimizers adamw,qsgd:0.5:update
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsgd_optax.tasks import arms, cli, reporting, running
from qsgd_optax.tasks.classification import experiment, transformer

DEFAULTS = dict(optimizers="adamw,qsgd:0.5:update,qsgd:0.5:preconditioned", steps=20_000,
                every=500)
SMOKE = dict(optimizers="adamw,qsgd:0.5:update", steps=60, every=20)
SMOKE_DATA = dict(n_train=128, n_test=32, seq_len=12, embed_dim=16, ff_dim=32, num_layers=1)
DEFAULT_OUT = Path("bench") / "results" / "soak"


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves))


def soak(arm: arms.Arm, steps: int, every: int, config: experiment.ClassificationConfig,
         data: Any, seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """Trains ``steps`` steps of ``arm`` and returns its soak record."""
  model = transformer.create_model(config, data, seed)
  tx = arms.make_optimizer(arm, config.learning_rate)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = experiment._metrics()  # pylint: disable=protected-access
  model.train()
  graphdef, state = nnx.split((model, optimizer, metrics))
  batch = config.batch_size
  per_epoch = len(data.train) // batch
  shape = (batch, data.seq_len)
  step = experiment.train_step.lower(
      graphdef, state, jax.ShapeDtypeStruct(shape, jnp.int32),
      jax.ShapeDtypeStruct(shape[:1], jnp.int32)).compile()
  rng = np.random.default_rng(seed)
  samples: list[dict[str, Any]] = []
  first_nonfinite = None
  done, window_start = 0, time.perf_counter()
  bar = running.progress_bar(total=steps, desc=arm.label, disable=not progress, leave=False)
  while done < steps:
    order = rng.permutation(len(data.train))[: per_epoch * batch]
    tokens = data.train.tokens[order].reshape(per_epoch, *shape)
    labels = data.train.labels[order].reshape(per_epoch, batch)
    for i in range(per_epoch):
      state = step(state, tokens[i], labels[i])
      done += 1
      if done % every == 0 or done == steps:
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - window_start
        nnx.update((model, optimizer, metrics), state)
        loss = float(metrics.compute()["loss"])
        metrics.reset()
        finite = math.isfinite(loss) and _all_finite(nnx.state((model, optimizer)))
        if not finite and first_nonfinite is None:
          first_nonfinite = done
        n = every if done % every == 0 else done % every
        samples.append({"step": done, "loss": loss, "finite": finite,
                        "peak_rss_mb": _peak_rss_mb(), "step_ms": 1e3 * elapsed / n})
        bar.update(n)
        graphdef, state = nnx.split((model, optimizer, metrics))
        window_start = time.perf_counter()
      if done >= steps:
        break
  bar.close()
  times = [s["step_ms"] for s in samples]
  quarter = max(1, len(times) // 4)
  return {**arm.record(), "seed": seed, "steps": steps, "samples": samples,
          "first_nonfinite_step": first_nonfinite,
          "final_loss": samples[-1]["loss"] if samples else math.nan,
          "rss_first_mb": samples[0]["peak_rss_mb"], "rss_last_mb": samples[-1]["peak_rss_mb"],
          "rss_growth_mb": samples[-1]["peak_rss_mb"] - samples[0]["peak_rss_mb"],
          "step_ms_first": statistics.median(times[:quarter]),
          "step_ms_last": statistics.median(times[-quarter:]),
          "drift": statistics.median(times[-quarter:]) / statistics.median(times[:quarter])}


def table(runs: Sequence[dict[str, Any]]) -> str:
  rows = [[r["arm"], r["steps"], r["first_nonfinite_step"] or "none", f"{r['final_loss']:.4f}",
           f"{r['rss_first_mb']:.0f} -> {r['rss_last_mb']:.0f} ({r['rss_growth_mb']:+.0f})",
           f"{r['step_ms_first']:.1f} -> {r['step_ms_last']:.1f} (x{r['drift']:.2f})"] for r in runs]
  return reporting.format_table(
      ["arm", "steps", "first non-finite", "final loss", "peak RSS MB", "step ms (drift)"], rows)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, optimizers=DEFAULTS["optimizers"], seeds="0,")
  parser.set_defaults(optimizers=None)
  parser.add_argument("--steps", type=cli.int_arg(1), default=None,
                      help=f"optimizer steps per arm (default: {DEFAULTS['steps']})")
  parser.add_argument("--every", type=cli.int_arg(1), default=None,
                      help=f"sampling interval in steps (default: {DEFAULTS['every']})")
  args = parser.parse_args(argv)
  base = SMOKE if args.smoke else DEFAULTS
  chosen = args.optimizers or arms.parse_arms(base["optimizers"])
  steps, every = args.steps or base["steps"], args.every or base["every"]
  out = args.out or DEFAULT_OUT
  config = experiment.ClassificationConfig(
      batch_size=args.batch_size, learning_rate=args.lr, **(SMOKE_DATA if args.smoke else {}))
  data = experiment.load_task(config)
  start = time.perf_counter()
  runs = [soak(arm, steps, every, config, data, seed=args.seeds[0], progress=not args.no_progress)
          for arm in chosen]
  text = table(runs)
  print(text)
  reporting.write_summary(out, runs, {"steps": steps, "every": every, "smoke": args.smoke,
                                    "optimizers": [a.label for a in chosen], "seed": args.seeds[0],
                                    "wall_time_s": time.perf_counter() - start,
                                    "device": str(jax.devices()[0])})
  (Path(out) / "table.txt").write_text(text + "\n")
  for r in runs:
    r["step_ms"] = [s["step_ms"] for s in r["samples"]]
    r["loss"] = [s["loss"] for s in r["samples"]]
    r["x"] = [s["step"] for s in r["samples"]]
  png = reporting.plot_curves(runs, Path(out) / "soak.png",
                            [("loss", "training loss (window mean)"), ("step_ms", "ms per step")],
                            xlabel="step", x_key="x", band="none")
  print(f"\nwrote {Path(out) / 'summary.json'} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

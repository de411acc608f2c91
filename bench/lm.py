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
for each QSGD arm the paired difference to AdamW and to the null arm
(``qsgd:1e-6``: the same code path, no systematic term) with a 95%
Student-t interval and an exact sign-flip p-value; the paper's -4% is
tested against the null arm with a one-sided 95% bound. QSGD runs record
the quantum term's share of the update at 8 points of the epoch.
``--from DIR`` redraws everything from ``DIR/summary.json``.

The summary is written after every run; ``--resume`` keeps the runs
already in it and continues an interrupted run from its checkpoints in
``OUT/checkpoints`` (every 25 optimizer steps), so a long benchmark can be
stopped and continued later. Checkpoints are written only under
``--resume``: start a long benchmark with it (an empty OUT is fine), or an
interrupted run restarts from its beginning.

Examples::

  python bench/lm.py                           # SmolLM2-135M, 4 arms x 3 seeds
  python bench/lm.py --smoke --out /tmp/lmb     # random tiny Llama, seconds
  python bench/lm.py --examples 150 --optimizers adamw,qsgd:0.5,qsgd:1e-6 --out bench/results/lm_scale --resume
  python bench/lm.py --from bench/results/lm
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stats  # noqa: E402  pylint: disable=wrong-import-position
from qsgd_optax.tasks import arms, cli, reporting  # noqa: E402
from qsgd_optax.tasks._checkpoints import run_directory  # noqa: E402

PAPER = {"adamw": 0.2188, "qsgd:0.1": 0.2098, "qsgd:0.5": 0.2097}
NULL_ARM = "qsgd:1e-6"
PAPER_EFFECT = -0.04  # the paper's mean-loss change, -4.11% (0.1) and -4.16% (0.5)
CHECKPOINT_EVERY = 25
DEFAULTS = dict(model="smollm2-135m", optimizers="adamw,qsgd:0.1,qsgd:0.5,qsgd:0.5:update",
                seeds="3", examples=48, test_examples=16, max_len=512, lr=2e-5)
SMOKE = dict(model="tiny", optimizers="adamw,qsgd:0.5", seeds="2", examples=16,
             test_examples=4, max_len=256, lr=3e-3)
DEFAULT_OUT = Path("bench") / "results" / "lm"
METRICS = (("mean_loss", "mean train loss"), ("eval_loss_after", "held-out loss after"))


def analyse(runs: Sequence[Mapping[str, Any]], null_arm: str = NULL_ARM) -> list[dict[str, Any]]:
  """One row per arm: mean +- std of each metric, paired differences to AdamW and the null arm, the claim."""
  null_label = arms.parse_arm(null_arm).label
  by_arm = reporting.group_runs(runs, "arm")
  control, null = by_arm.get("adamw", []), by_arm.get(null_label, [])
  rows = []
  for arm, group in by_arm.items():
    row: dict[str, Any] = {"arm": arm, "n": len(group), "paper_mean_loss": PAPER.get(arm),
                           "is_null": arm == null_label, "null_arm": null_label,
                           "term_share": _stats.share_summary(group)}
    for key, _ in METRICS:
      mean, std, _n = reporting.mean_std(r[key] for r in group)
      row[f"{key}_mean"], row[f"{key}_std"] = mean, std
      for other, name in ((control, "adamw"), (null, "null")):
        if other and not (arm == "adamw" or (arm == null_label and name == "null")):
          row[f"{key}_vs_{name}"] = _stats.paired({r["seed"]: r[key] for r in group},
                                                  {r["seed"]: r[key] for r in other})
    if null and arm not in ("adamw", null_label):
      base = {r["seed"]: r["mean_loss"] for r in null}
      pairs = [(r["mean_loss"], base[r["seed"]]) for r in group if r["seed"] in base]
      finite = lambda v: v is not None and math.isfinite(v) and v > 0  # noqa: E731
      if all(finite(a) and finite(b) for a, b in pairs):
        row["claim_vs_null"] = _stats.claim_test([math.log(a / b) for a, b in pairs], PAPER_EFFECT,
                                                 relative=True)
      else:  # a diverged run: no ratio to bound
        row["claim_vs_null"] = {"n": len(pairs), "mean": math.nan, "bound": math.nan, "excluded": None,
                                "method": "n/a (a run's mean loss is not finite)"}
    row["tokens_per_s"] = reporting.mean_std(r["tokens_per_s"] for r in group)[0]
    rows.append(row)
  return rows


def _cell(d: Mapping[str, Any] | None, mean: float) -> str:
  if not d:
    return ""
  if d["n"] < 2:
    return f"{d['mean_diff']:+.4f} (n={d['n']})"
  rel = f" ({d['mean_diff'] / mean * 100:+.2f}%)" if mean else ""
  return f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] p={d['p_value']:.3f}{rel}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table in the shape of the paper's Table I, then the claim against the null arm."""
  header = ["arm", "n", "paper mean loss", "mean train loss", "vs adamw [95% t CI] p", "vs null",
            "held-out after", "vs adamw [95% t CI] p", "vs null", "term share median / max", "tok/s"]
  body = []
  for r in rows:
    name = f"{r['arm']} (null)" if r.get("is_null") else r["arm"]
    cells = [name, r["n"], "" if r["paper_mean_loss"] is None else f"{r['paper_mean_loss']:.4f}"]
    for key, _ in METRICS:
      m, s = r[f"{key}_mean"], r[f"{key}_std"]
      cells.append("-" if math.isnan(m) else f"{m:.4f} +- {s:.4f}")
      cells.append(_cell(r.get(f"{key}_vs_adamw"), m))
      cells.append(_cell(r.get(f"{key}_vs_null"), m))
    share = r.get("term_share")
    cells.append(f"{share['median']:.1e} / {share['max']:.1e}" if share else "")
    cells.append(f"{r['tokens_per_s']:.0f}")
    body.append(cells)
  lines = reporting.markdown_table(header, body)
  claim_rows = [r for r in rows if r.get("claim_vs_null")]
  if claim_rows:
    lines += ["", f"Claim: mean training loss {100 * PAPER_EFFECT:+.0f}% (paper: -4.11% / -4.16%), each arm "
              f"against the null arm {rows[0]['null_arm']} on the same seeds (one-sided 95% Student-t "
              "bound on the log ratio):", "",
              "| arm | ours | lower bound | paper's effect |", "|---|---|---|---|"]
    for r in claim_rows:
      c = r["claim_vs_null"]
      verdict = {True: "excluded", False: "not excluded", None: "n/a"}[c["excluded"]]
      if c["excluded"] is None:
        verdict = c["method"] if c["method"].startswith("n/a") else "n/a (n<2)"
      lines.append(f"| {r['arm']} | {100 * c['mean']:+.2f}% | {100 * c['bound']:+.2f}% (n={c['n']}) | {verdict} |")
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
  parser.add_argument("--null-arm", default=NULL_ARM,
                      help="the arm whose difference to AdamW is the noise floor (default: %(default)s)")
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in OUT/summary.json (same model, data and learning "
                           "rate), continue an interrupted run from OUT/checkpoints, train the rest")
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


# Options that shape every run: a resumed summary must have been made with the same.
_SHARED = ("model", "examples", "test_examples", "max_len", "learning_rate", "batch_size", "smoke", "mesh")


def _config_record(args: argparse.Namespace) -> dict[str, Any]:
  return {"model": args.model, "examples": args.examples, "test_examples": args.test_examples,
          "max_len": args.max_len, "learning_rate": args.lr, "batch_size": args.batch_size,
          "optimizers": [a.label for a in args.optimizers], "seeds": list(args.seeds),
          "smoke": args.smoke, "mesh": args.mesh}


def _previous(path: Path, config: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """The runs ``--resume`` keeps, and the config record with the union of arms and seeds."""
  if not path.exists():
    return [], config
  summary = json.loads(path.read_text())
  saved = summary.get("config")
  missing = [key for key in _SHARED if key not in (saved or {})]
  if missing:
    raise SystemExit(f"lm.py: error: --resume: {path} does not say how its runs were made (no "
                     f"{', '.join(missing)} in its config); it was not written by bench/lm.py. Use "
                     "another --out.")
  for key in _SHARED:
    if saved[key] != config[key]:
      raise SystemExit(f"lm.py: error: --resume: {path} holds runs made with {key}={saved[key]!r}; this "
                       f"command asks for {key}={config[key]!r}. Use another --out or the same settings.")
  merged = dict(saved)
  merged.update({k: v for k, v in config.items() if k not in ("optimizers", "seeds")})
  for key in ("optimizers", "seeds"):
    merged[key] = list(saved.get(key, [])) + [v for v in config[key] if v not in saved.get(key, [])]
  return summary["runs"], merged


def collect(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Every (arm, seed) run not already done, seed-major, the summary written after each."""
  from qsgd_optax.tasks.lm import experiment  # pylint: disable=import-outside-toplevel

  config = experiment.FinetuneConfig(model=args.model, examples=args.examples,
                             test_examples=args.test_examples, max_len=args.max_len,
                             batch_size=args.batch_size, learning_rate=args.lr, mesh=args.mesh)
  primary = _primary()
  log = lambda msg: primary and print(msg, file=sys.stderr, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  out = Path(args.out)
  record = _config_record(args)
  runs: list[dict[str, Any]] = []
  if args.resume:
    runs, record = _previous(out / "summary.json", record)
    log(f"resuming: {len(runs)} runs kept")
  done = [(r["arm"], r["seed"]) for r in runs]

  def on_record(run: dict[str, Any]) -> None:
    runs.append(run)
    if primary:
      reporting.write_summary(out, runs, record)
      # The record holds the result; a finished run's checkpoints (1.6 GB each for
      # SmolLM2-135M) are no longer needed to resume.
      shutil.rmtree(run_directory(out / "checkpoints", run["arm"], run["seed"]), ignore_errors=True)

  _, info = experiment.run_finetune(
      config, args.optimizers, args.seeds, progress=primary and not args.no_progress, log=log,
      checkpoint_dir=out / "checkpoints" if args.resume else None,
      checkpoint_every=CHECKPOINT_EVERY if args.resume else None, keep=2, resume=args.resume,
      skip=done, on_record=on_record, seed_major=True)
  record.update(info)
  return runs, record


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
  rows = analyse(runs, args.null_arm)
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

"""Does QSGD converge faster than AdamW? Paired seeds, intervals and tests.

The paper (Pamuk et al.) reports that QSGD at quantum_weight 0.5 reaches
93.8% +- 0.7% test accuracy vs Adam's ~91.5%, and 90% in 4.6 epochs vs 7.4,
with no seed counts or tests. This benchmark trains the paper's transformer
classifier (``qsgd_optax.tasks.classification``, the same code as
``examples/sequence_classification.py``) for every arm on the same seeds
(paired: seed s fixes initialisation, dropout and batch order for every
arm) and reports per task, attention and arm:

* final test accuracy mean +- std;
* epochs to the target (90%) mean +- std over the runs that reached it, and
  how many never did;
* time to target in seconds: epochs to target x steps per epoch x the
  measured mean step time of that run (compile excluded);
* for each QSGD arm, the paired difference to AdamW (final accuracy; epochs
  to target with never-reached runs counted as ``epochs + 1``, a censored
  value that favours neither arm), its 95% percentile-bootstrap interval
  and an exact two-sided sign-flip permutation p-value.

Every number is a function of the per-run records in ``DIR/summary.json``
(written after every run, so an interrupted benchmark keeps what it did);
``--from DIR`` redraws tables and plots without training.

Examples::

  python bench/convergence.py                          # synthetic, standard attention
  python bench/convergence.py --tasks synthetic,polarity --attention standard,quantum
  python bench/convergence.py --smoke --out /tmp/conv
  python bench/convergence.py --tasks polarity --resume   # add a setting to the same DIR
  python bench/convergence.py --from bench/results/convergence
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

import numpy as np  # noqa: E402

import _stats  # noqa: E402  pylint: disable=wrong-import-position
from qsgd_optax.tasks import arms, cli, reporting, running  # noqa: E402
from qsgd_optax.tasks.classification import experiment, transformer  # noqa: E402

ARMS = ("adamw,qsgd:0.1,qsgd:0.5,qsgd:0.5:preconditioned,qsgd:0.5:update,"
        "qsgd:0.5:gradient:paper:all")
DEFAULTS = dict(tasks="synthetic", attention="standard", optimizers=ARMS, seeds="10", epochs=15)
SMOKE = dict(tasks="synthetic", attention="standard", optimizers="adamw,qsgd:0.5", seeds="2",
             epochs=2)
SMOKE_DATA = dict(n_train=192, n_test=64, seq_len=12)
DEFAULT_OUT = Path("bench") / "results" / "convergence"


# --------------------------------------------------------------------------- analysis


def _setting(run: Mapping[str, Any]) -> str:
  return f"{run['task']}/{run['attention']}"


def analyse(runs: Sequence[Mapping[str, Any]], target: float) -> list[dict[str, Any]]:
  """One row per (setting, arm): summaries and paired differences to AdamW."""
  rows = []
  for setting, group in reporting.group_runs(runs, "setting").items():
    by_arm = reporting.group_runs(group, "arm")
    control = by_arm.get("adamw", [])
    for arm, arm_runs in by_arm.items():
      epochs = arm_runs[0]["epochs"]
      final = reporting.mean_std(r["final_accuracy"] for r in arm_runs)
      reached = [r for r in arm_runs if r["epochs_to_target"] is not None]
      to_target = reporting.mean_std(r["epochs_to_target"] for r in reached)
      seconds = reporting.mean_std(
          r["epochs_to_target"] * r["steps_per_epoch"] * r["mean_step_time_s"] for r in reached)
      row = {"setting": setting, "arm": arm, "n": len(arm_runs), "target": target,
             "final_accuracy_mean": final[0], "final_accuracy_std": final[1],
             "epochs_to_target_mean": to_target[0], "epochs_to_target_std": to_target[1],
             "reached": len(reached), "never": len(arm_runs) - len(reached),
             "time_to_target_s_mean": seconds[0], "time_to_target_s_std": seconds[1],
             "step_ms_mean": reporting.mean_std(1e3 * r["mean_step_time_s"] for r in arm_runs)[0]}
      if arm != "adamw" and control:
        acc = {r["seed"]: r["final_accuracy"] for r in arm_runs}
        acc0 = {r["seed"]: r["final_accuracy"] for r in control}
        censored = lambda r: r["epochs_to_target"] if r["epochs_to_target"] is not None else epochs + 1
        ett = {r["seed"]: censored(r) for r in arm_runs}
        ett0 = {r["seed"]: censored(r) for r in control}
        row["accuracy_vs_adamw"] = _stats.paired(acc, acc0)
        row["epochs_to_target_vs_adamw"] = _stats.paired(ett, ett0)
      rows.append(row)
  return rows


def _pm(mean: float, std: float, digits: int) -> str:
  if math.isnan(mean):
    return "-"
  return f"{mean:.{digits}f} +- {std:.{digits}f}"


def _diff(d: Mapping[str, float] | None, digits: int) -> str:
  if not d or d["n"] == 0:
    return ""
  return (f"{d['mean_diff']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}] "
          f"p={d['p_value']:.3f}")


def tables(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown tables, one per setting."""
  out = []
  for setting, group in reporting.group_runs(rows, "setting").items():
    target = group[0]["target"]
    header = ["arm", "n", "final acc", f"epochs to {target:.0%}", "never", "s to target",
              "step ms", "acc diff vs adamw [95% CI] p", "epochs diff vs adamw [95% CI] p"]
    lines = [f"### {setting}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in group:
      cells = [r["arm"], r["n"], _pm(r["final_accuracy_mean"], r["final_accuracy_std"], 3),
               _pm(r["epochs_to_target_mean"], r["epochs_to_target_std"], 1), r["never"],
               _pm(r["time_to_target_s_mean"], r["time_to_target_s_std"], 1),
               f"{r['step_ms_mean']:.1f}", _diff(r.get("accuracy_vs_adamw"), 3),
               _diff(r.get("epochs_to_target_vs_adamw"), 2)]
      lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


def plot(runs: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
  """Learning curves per setting and the epochs-to-target distributions."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  paths = []
  settings = reporting.group_runs(runs, "setting")
  for setting, group in settings.items():
    name = setting.replace("/", "_")
    paths.append(reporting.plot_curves(
        group, out / f"curves_{name}.png",
        [("test_accuracy", "test accuracy"), ("train_loss", "training loss")],
        band="std", title=f"{setting}: mean +- std over seeds"))
  fig = Figure(figsize=(6.0 * len(settings), 4.0), layout="constrained")
  axes = fig.subplots(1, len(settings), squeeze=False)[0]
  for ax, (setting, group) in zip(axes, settings.items()):
    by_arm = reporting.group_runs(group, "arm")
    epochs = group[0]["epochs"]
    rng = np.random.default_rng(0)
    for i, (arm, arm_runs) in enumerate(by_arm.items()):
      ys = np.asarray([r["epochs_to_target"] if r["epochs_to_target"] is not None else epochs + 1
                       for r in arm_runs], np.float64)
      ax.scatter(i + rng.uniform(-0.15, 0.15, ys.size), ys, s=18, alpha=0.7)
      ax.hlines(np.mean(ys), i - 0.3, i + 0.3, color="black")
    ax.axhline(epochs + 1, color="grey", ls=":", lw=1)
    ax.set_xticks(range(len(by_arm)), list(by_arm), rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(f"epochs to {group[0]['target_accuracy']:.0%} (dotted: never)")
    ax.set_title(setting)
    ax.grid(alpha=0.3)
  path = out / "epochs_to_target.png"
  fig.savefig(path, dpi=110)
  paths.append(path)
  return paths


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="convergence.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"--smoke: {SMOKE}, data {SMOKE_DATA} (explicit options still win).")
  cli.add_common_args(parser, optimizers=DEFAULTS["optimizers"], seeds=DEFAULTS["seeds"])
  parser.set_defaults(optimizers=None, seeds=None)
  parser.add_argument("--tasks", type=cli.names_arg(experiment.TASKS), default=None,
                      help=f"comma list from {experiment.TASKS} (default: {DEFAULTS['tasks']})")
  parser.add_argument("--attention", type=cli.names_arg(transformer.ATTENTIONS),
                      default=None,
                      help=f"comma list from {transformer.ATTENTIONS} (default: {DEFAULTS['attention']})")
  parser.add_argument("--epochs", type=cli.int_arg(1), default=None,
                      help=f"epochs per run (default: {DEFAULTS['epochs']})")
  parser.add_argument("--target-accuracy", type=float, default=0.9,
                      help="test accuracy that epochs_to_target waits for (default: %(default)s)")
  parser.add_argument("--from", dest="from_dir", type=Path, default=None, metavar="DIR",
                      help="redraw tables and plots from DIR/summary.json, no training")
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in OUT/summary.json (same epochs and target) "
                           "and train only the missing (task, attention, seed, arm) runs")
  return parser


def _fill(args: argparse.Namespace) -> argparse.Namespace:
  base = SMOKE if args.smoke else DEFAULTS
  if args.optimizers is None:
    args.optimizers = arms.parse_arms(base["optimizers"])
  if args.seeds is None:
    args.seeds = arms.parse_seeds(base["seeds"])
  if args.tasks is None:
    args.tasks = tuple(base["tasks"].split(","))
  if args.attention is None:
    args.attention = tuple(base["attention"].split(","))
  if args.epochs is None:
    args.epochs = base["epochs"]
  if args.out is None:
    args.out = DEFAULT_OUT
  return args


# Options that shape every run: runs made with other values are not comparable.
_SHARED = ("lr", "batch_size", "smoke")
# Options that name what was run: a resumed summary records the union.
_UNION = ("tasks", "attention", "optimizers", "seeds")


def _previous(path: Path, args: argparse.Namespace,
              config: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """The runs kept by ``--resume`` and the merged config record."""
  config = reporting._jsonable(config)  # pylint: disable=protected-access
  if not path.exists():
    return [], config
  summary = json.loads(path.read_text())
  runs, saved = summary["runs"], summary.get("config", {})

  def refuse(what: str) -> None:
    raise SystemExit(f"convergence.py: error: --resume: {path} holds {what}. Use another --out "
                     "or the same settings.")

  for key in _SHARED:
    if key in saved and saved[key] != config[key]:
      refuse(f"runs made with {key}={saved[key]!r}; this command asks for {key}={config[key]!r}")
  for run in runs:
    if run["task"] not in args.tasks or run["attention"] not in args.attention:
      continue  # another setting: kept as it is
    if run["epochs"] != args.epochs or run["target_accuracy"] != args.target_accuracy:
      refuse(f"{run['setting']} runs with epochs={run['epochs']}, target {run['target_accuracy']}; "
             f"this command asks for epochs={args.epochs}, target {args.target_accuracy}")
  for key in _UNION:
    merged = list(saved.get(key, []))
    merged += [v for v in config[key] if v not in merged]
    config[key] = merged
  return runs, config


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Trains every setting x seed x arm, saving the summary after each run.

  With ``args.resume`` the runs already in ``args.out/summary.json`` are kept
  (all of them, so one directory can grow setting by setting) and a job is
  skipped when a run with its task, attention, seed and arm exists. Runs made
  with another learning rate, batch size or data size, or runs of a requested
  setting with other epochs or another target, make resuming fail rather
  than mix; the config record lists the union of tasks, attention, arms and
  seeds.
  """
  runs: list[dict[str, Any]] = []
  config_record = {k: v for k, v in vars(args).items() if k not in ("from_dir", "resume")}
  jobs = [(t, a, s, arm) for t in args.tasks for a in args.attention for s in args.seeds
          for arm in args.optimizers]
  if args.resume:
    runs, config_record = _previous(args.out / "summary.json", args, config_record)
    done = {(r["task"], r["attention"], r["seed"], r["arm"]) for r in runs}
    jobs = [job for job in jobs if (job[0], job[1], int(job[2]), job[3].label) not in done]
    print(f"resuming: {len(runs)} runs kept, {len(jobs)} to train")
    reporting.write_summary(args.out, runs, config_record)
  datasets: dict[str, Any] = {}
  bar = running.progress_bar(jobs, desc="runs", disable=args.no_progress)
  for task, attention, seed, arm in bar:
    sizes = SMOKE_DATA if args.smoke else {}
    if task == "polarity":
      sizes = {"seq_len": sizes.get("seq_len", 48)}
    config = experiment.ClassificationConfig(
        task=task, attention=attention, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, target_accuracy=args.target_accuracy, **sizes)
    if task not in datasets:
      datasets[task] = experiment.load_task(config)
    data = datasets[task]
    bar.set_postfix_str(f"{task}/{attention} {arm.label} seed={seed}")
    run = experiment.train_and_evaluate(config, arm, seed, dataset=data)
    runs.append({**arm.record(), "seed": int(seed), "task": task, "attention": attention,
                 "setting": f"{task}/{attention}", "epochs": args.epochs,
                 "target_accuracy": args.target_accuracy,
                 "steps_per_epoch": len(data.train) // args.batch_size, **run})
    reporting.write_summary(args.out, runs, config_record)
  return runs


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.from_dir is not None:
    summary = json.loads((args.from_dir / "summary.json").read_text())
    runs = summary["runs"]
    out = args.out or args.from_dir
    target = runs[0]["target_accuracy"] if runs else args.target_accuracy
  else:
    args = _fill(args)
    start = time.perf_counter()
    runs = collect(args)
    out, target = args.out, args.target_accuracy
    print(f"total wall time {time.perf_counter() - start:.0f} s")
  out = Path(out)
  rows = analyse(runs, target)
  text = tables(rows)
  print(text)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(text + "\n")
  (out / "analysis.json").write_text(json.dumps(rows, indent=2, allow_nan=True) + "\n")
  paths = plot(runs, out)
  print(f"\nwrote {out / 'summary.json'}, {out / 'table.md'}, "
        + ", ".join(str(p) for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())

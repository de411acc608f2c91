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

ARMS = ("adamw,qsgd:1e-6,qsgd:0.1,qsgd:0.5,qsgd:0.5:preconditioned,qsgd:0.5:update,"
        "qsgd:0.5:gradient:paper:all")
DEFAULTS = dict(tasks="synthetic", attention="standard", optimizers=ARMS, seeds="10", epochs=15)
SMOKE = dict(tasks="synthetic", attention="standard", optimizers="adamw,qsgd:0.5", seeds="2",
             epochs=2)
SMOKE_DATA = dict(n_train=192, n_test=64, seq_len=12)
DEFAULT_OUT = Path("bench") / "results" / "convergence"


# --------------------------------------------------------------------------- analysis


NULL_ARM = "qsgd:1e-6"
# The paper's claims (PAPER.md): (name, metric, effect, relative, as the paper says it).
CLAIMS = (
    ("final accuracy", "final", 0.023, False, "+2.3 points (93.8% vs 91.5%)"),
    ("epochs to target", "epochs_to_target", -2.8, False, "-2.8 epochs (4.6 vs 7.4)"),
    ("epochs to target, relative", "epochs_to_target", -0.378, True, "-37.8%"),
    ("time to target", "time_to_target_s", -0.16, True, "-16% (4.6 x 1.35 vs 7.4 epochs)"),
)


def _setting(run: Mapping[str, Any]) -> str:
  return f"{run['task']}/{run['attention']}"


def _final(run: Mapping[str, Any]) -> float:
  """Final accuracy: with several evaluations per epoch the mean of the last ones, else the last.

  ``--resume`` refuses to mix runs with different ``evals_per_epoch`` in one
  summary, so every run of a setting is measured the same way.
  """
  if run.get("evals_per_epoch", 1) > 1:
    return run["final_accuracy_window"]
  return run["final_accuracy"]


def _time_to_target(run: Mapping[str, Any]) -> float | None:
  if run["epochs_to_target"] is None:
    return None
  return run["epochs_to_target"] * run["steps_per_epoch"] * run["mean_step_time_s"]


def _metric(run: Mapping[str, Any], name: str) -> float | None:
  if name == "final":
    return _final(run)
  if name == "time_to_target_s":
    return _time_to_target(run)
  return run[name]


def claims(treatment: Sequence[Mapping[str, Any]], control: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Each paper claim tested on paired seeds: ``treatment`` minus ``control``.

  A metric that some run never reached (censored) makes its claim "n/a".
  The final-accuracy gain is "untestable" when ``control``'s mean plus the
  claimed gain exceeds 100%: no arm could show it there, so a bound at 0
  would say nothing about the method (even a clearly worse treatment is
  reported only as its difference).
  """
  out = []
  for name, metric, effect, relative, paper in CLAIMS:
    t = {r["seed"]: _metric(r, metric) for r in treatment}
    c = {r["seed"]: _metric(r, metric) for r in control}
    seeds = sorted(set(t) & set(c))
    censored = sum(t[s] is None or c[s] is None for s in seeds)
    row = {"claim": name, "paper": paper, "effect": effect, "pairs": len(seeds), "censored": censored}
    ceiling = (metric == "final" and seeds and not censored
               and np.mean([c[s] for s in seeds]) + effect > 1.0)
    if censored or not seeds:
      row.update(n=len(seeds), mean=math.nan, bound=math.nan, excluded=None, method="n/a")
    elif ceiling:  # the control is within the claimed gain of 100%: no room to show it
      d = [t[s] - c[s] for s in seeds]
      row.update(n=len(seeds), mean=float(np.mean(d)), bound=math.nan, excluded=None, method="ceiling",
                 relative=False, side="upper")
    else:
      d = [math.log(t[s] / c[s]) if relative else t[s] - c[s] for s in seeds]
      row.update(_stats.claim_test(d, effect, relative=relative))
    out.append(row)
  return out


def analyse(runs: Sequence[Mapping[str, Any]], target: float,
            null_arm: str = NULL_ARM) -> list[dict[str, Any]]:
  """One row per (setting, arm): summaries, paired differences to AdamW and to the null arm, claims."""
  null_label = arms.parse_arm(null_arm).label
  rows = []
  for setting, group in reporting.group_runs(runs, "setting").items():
    by_arm = reporting.group_runs(group, "arm")
    control, null = by_arm.get("adamw", []), by_arm.get(null_label, [])
    for arm, arm_runs in by_arm.items():
      final = reporting.mean_std(_final(r) for r in arm_runs)
      reached = [r for r in arm_runs if r["epochs_to_target"] is not None]
      to_target = reporting.mean_std(r["epochs_to_target"] for r in reached)
      seconds = reporting.mean_std(_time_to_target(r) for r in reached)
      row = {"setting": setting, "arm": arm, "n": len(arm_runs), "target": target,
             "null_arm": null_label, "is_null": arm == null_label,
             "final_window": arm_runs[0].get("final_window", 1),
             "final_accuracy_mean": final[0], "final_accuracy_std": final[1],
             "epochs_to_target_mean": to_target[0], "epochs_to_target_std": to_target[1],
             "reached": len(reached), "never": len(arm_runs) - len(reached),
             "time_to_target_s_mean": seconds[0], "time_to_target_s_std": seconds[1],
             "step_ms_mean": reporting.mean_std(1e3 * r["mean_step_time_s"] for r in arm_runs)[0],
             "term_share": _stats.share_summary(arm_runs)}
      for other, name in ((control, "adamw"), (null, "null")):
        if not other or arm == "adamw" or (arm == null_label and name == "null"):
          continue  # AdamW against nothing, the null arm against AdamW only
        row[f"accuracy_vs_{name}"] = _stats.paired({r["seed"]: _final(r) for r in arm_runs},
                                                   {r["seed"]: _final(r) for r in other})
        row[f"epochs_to_target_vs_{name}"] = _stats.paired(
            {r["seed"]: r["epochs_to_target"] for r in arm_runs},
            {r["seed"]: r["epochs_to_target"] for r in other})
      if arm not in ("adamw", null_label):
        if null:
          row["claims_vs_null"] = claims(arm_runs, null)
        if control:
          row["claims_vs_adamw"] = claims(arm_runs, control)
      rows.append(row)
  return rows


def _pm(mean: float, std: float, digits: int) -> str:
  if math.isnan(mean):
    return "-"
  return f"{mean:.{digits}f} +- {std:.{digits}f}"


def _diff(d: Mapping[str, float] | None, digits: int) -> str:
  if not d or d["n"] == 0:
    return ""
  if d.get("censored"):
    return f"n/a ({d['censored']} of {d['n']} pairs censored)"
  if d["n"] < 2:
    return f"{d['mean_diff']:+.{digits}f} (n=1)"
  return (f"{d['mean_diff']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}] "
          f"p={d['p_value']:.3f}")


def _claim_cell(c: Mapping[str, Any]) -> tuple[str, str, str]:
  """(ours, bound, verdict) cells of one claim row."""
  if c["method"] == "n/a":
    why = f"{c['censored']} of {c['pairs']} pairs censored" if c["censored"] else "no pairs"
    return "n/a", "n/a", f"n/a ({why})"
  if c["method"] == "ceiling":
    return f"{100 * c['mean']:+.2f} points", "n/a", "untestable (the null arm is within the claimed gain of 100%)"
  fmt = (lambda v: f"{100 * v:+.1f}%") if c["relative"] else (
      (lambda v: f"{100 * v:+.2f} points") if c["claim"] == "final accuracy" else (lambda v: f"{v:+.2f}"))
  bound = f"{c['side']} {fmt(c['bound'])} (n={c['n']})"
  verdict = {True: "excluded", False: "not excluded", None: "n/a (n<2)"}[c["excluded"]]
  return fmt(c["mean"]), bound, verdict


def tables(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown tables per setting: the arms, then the paper's claims against the null arm."""
  out = []
  for setting, group in reporting.group_runs(rows, "setting").items():
    target = group[0]["target"]
    window = group[0].get("final_window", 1)
    final_name = "final acc" if window == 1 else f"final acc (last {window} evals)"
    header = ["arm", "n", final_name, f"epochs to {target:.0%}", "never", "s to target",
              "step ms", "acc diff vs adamw [95% t CI] p", "acc diff vs null",
              "epochs diff vs adamw", "epochs diff vs null", "term share median / max"]
    body = []
    for r in group:
      share = r.get("term_share")
      share_cell = f"{share['median']:.1e} / {share['max']:.1e}" if share else ""
      name = f"{r['arm']} (null)" if r["is_null"] else r["arm"]
      cells = [name, r["n"], _pm(r["final_accuracy_mean"], r["final_accuracy_std"], 3),
               _pm(r["epochs_to_target_mean"], r["epochs_to_target_std"], 2), r["never"],
               _pm(r["time_to_target_s_mean"], r["time_to_target_s_std"], 1),
               f"{r['step_ms_mean']:.1f}", _diff(r.get("accuracy_vs_adamw"), 3),
               _diff(r.get("accuracy_vs_null"), 3), _diff(r.get("epochs_to_target_vs_adamw"), 2),
               _diff(r.get("epochs_to_target_vs_null"), 2), share_cell]
      body.append(cells)
    lines = [f"### {setting}", "", *reporting.markdown_table(header, body)]
    claim_rows = [(r["arm"], c) for r in group for c in r.get("claims_vs_null", [])]
    if claim_rows:
      null = group[0]["null_arm"]
      lines += ["", f"Claims, each arm minus the null arm {null} on the same seeds "
                "(one-sided 95% Student-t bound; a censored metric is n/a):", "",
                "| arm | claim | paper | ours | bound | paper's effect |", "|---|---|---|---|---|---|"]
      for arm, c in claim_rows:
        lines.append("| " + " | ".join([arm, c["claim"], c["paper"], *_claim_cell(c)]) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


def plot(runs: Sequence[Mapping[str, Any]], out: Path, null_arm: str = NULL_ARM) -> list[Path]:
  """Learning curves per setting and the epochs-to-target distributions."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  paths = []
  settings = reporting.group_runs(runs, "setting")
  for setting, group in settings.items():
    name = setting.replace("/", "_")
    title = f"{setting}: mean +- std over seeds"
    if group[0].get("evals_per_epoch", 1) > 1:  # test accuracy within epochs, training loss per epoch
      paths.append(reporting.plot_curves(group, out / f"curves_{name}.png", [("test_accuracy", "test accuracy")],
                                         x_key="eval_epoch", band="std", title=title))
      paths.append(reporting.plot_curves(group, out / f"train_loss_{name}.png", [("train_loss", "training loss")],
                                         band="std", title=title))
    else:
      paths.append(reporting.plot_curves(
          group, out / f"curves_{name}.png",
          [("test_accuracy", "test accuracy"), ("train_loss", "training loss")], band="std", title=title))
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
  paths += _plot_shares(runs, out)
  paths += _plot_dose(analyse(runs, runs[0]["target_accuracy"] if runs else 0.9, null_arm), out)
  return paths


def _plot_shares(runs: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
  """The term's share of the update over training, per setting and arm (median over seeds)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  settings = {k: g for k, g in reporting.group_runs(runs, "setting").items()
              if any(r.get("term_share_median") for r in g)}
  if not settings:
    return []
  fig = Figure(figsize=(6.5 * len(settings), 4.5), layout="constrained")
  axes = fig.subplots(1, len(settings), squeeze=False)[0]
  for ax, (setting, group) in zip(axes, settings.items()):
    for arm, arm_runs in reporting.group_runs(group, "arm").items():
      curves = [r for r in arm_runs if r.get("term_share_median")]
      if not curves:
        continue
      length = min(len(r["term_share_median"]) for r in curves)
      x = curves[0].get("term_share_epoch", curves[0]["eval_epoch"])[-length:]
      color = None
      for key, style in (("term_share_median", "-"), ("term_share_global", ":")):
        y = np.nanmedian(np.asarray([r[key][-length:] for r in curves], np.float64), axis=0)
        color = ax.plot(x, y, style, color=color, label=f"{arm} ({key.rsplit('_', 1)[1]})")[0].get_color()
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("|term| / |update| (median over seeds)")
    ax.set_title(f"{setting}: the quantum term's share (solid: median, dotted: global)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="xx-small", ncol=2)
  path = out / "term_share.png"
  fig.savefig(path, dpi=110)
  return [path]


def _plot_dose(rows: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
  """Dose-response: difference to the null arm against quantum_weight, one line per scope."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  points: dict[tuple[str, str], list[tuple[float, Mapping[str, Any]]]] = {}
  for r in rows:
    if r.get("accuracy_vs_null") is None:
      continue
    arm = arms.parse_arm(r["arm"])
    if arm.modulate != "gradient":
      continue
    points.setdefault((r["setting"], arm.scope), []).append((arm.quantum_weight, r))
  if len({w for v in points.values() for w, _ in v}) < 2:
    return []
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for (setting, scope), values in sorted(points.items()):
    values.sort(key=lambda v: v[0])
    for ax, key in zip(axes, ("accuracy_vs_null", "epochs_to_target_vs_null")):
      pts = [(w, r[key]) for w, r in values if not r[key].get("censored")]
      if not pts:
        continue
      w = np.asarray([p[0] for p in pts])
      mean = np.asarray([p[1]["mean_diff"] for p in pts])
      lo = np.asarray([p[1]["ci_low"] for p in pts])
      hi = np.asarray([p[1]["ci_high"] for p in pts])
      ax.errorbar(w, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3,
                  label=f"{setting}, scope {scope}")
  for ax, label in zip(axes, ("final accuracy minus null arm", "epochs to target minus null arm")):
    ax.axhline(0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("quantum_weight (modulate=gradient)")
    ax.set_ylabel(f"{label} (mean, 95% t CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  path = out / "dose_response.png"
  fig.savefig(path, dpi=110)
  return [path]


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
  parser.add_argument("--evals-per-epoch", type=cli.int_arg(1), default=1,
                      help="test evaluations per epoch, evenly spaced (default: %(default)s)")
  parser.add_argument("--markers", type=cli.int_arg(2), default=2,
                      help="markers per sequence of the agreement task (default: %(default)s)")
  parser.add_argument("--target-accuracy", type=float, default=0.9,
                      help="test accuracy that epochs_to_target waits for (default: %(default)s)")
  parser.add_argument("--null-arm", default=NULL_ARM,
                      help="the arm whose difference to AdamW is the noise floor; verdicts compare "
                           "to it (default: %(default)s)")
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
_SHARED = ("lr", "batch_size", "smoke", "evals_per_epoch", "markers")
# What a summary written before an option existed was made with.
_OLD_DEFAULTS = {"evals_per_epoch": 1, "markers": 2}
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
    made = saved.get(key, _OLD_DEFAULTS.get(key))
    if (key in saved or key in _OLD_DEFAULTS) and made != config[key]:
      refuse(f"runs made with {key}={made!r}; this command asks for {key}={config[key]!r}")
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
        learning_rate=args.lr, target_accuracy=args.target_accuracy, evals_per_epoch=args.evals_per_epoch,
        markers=args.markers, **sizes)
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
  rows = analyse(runs, target, args.null_arm)
  text = tables(rows)
  print(text)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(text + "\n")
  (out / "analysis.json").write_text(json.dumps(rows, indent=2, allow_nan=True) + "\n")
  paths = plot(runs, out, args.null_arm)
  print(f"\nwrote {out / 'summary.json'}, {out / 'table.md'}, "
        + ", ".join(str(p) for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Results of many runs as people read them: grouped statistics, tables, summary.json, plots.

Lists of per-epoch (or per-step) values in run records are plain lists of
floats; :func:`write_summary` writes strict JSON (non-finite floats become
``null``) and :func:`plot_curves` one PNG of learning curves. Reads run
records only; runs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "cpu_model",
    "arm_label",
    "divergence_warnings",
    "format_table",
    "markdown_table",
    "group_runs",
    "mean_std",
    "plot_curves",
    "write_summary",
]


def group_runs(runs: Iterable[Mapping[str, Any]], key: str = "arm") -> dict[str, list[Mapping[str, Any]]]:
  """Groups run records by ``run[key]``, keeping first-appearance order."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(str(run[key]), []).append(run)
  return groups


def cpu_model() -> str:
  """The CPU's model name (as lscpu shows it), else the platform's word; for benchmark records."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def divergence_warnings(runs: Iterable[Mapping[str, Any]]) -> list[str]:
  """One warning line per run whose record says ``"diverged": True``, naming its arm and seed.

  >>> divergence_warnings([{"arm": "adamw", "seed": 0, "diverged": False},
  ...                      {"arm": "qsgd:0.9", "seed": 2, "diverged": True}])
  ['warning: qsgd:0.9 seed 2 diverged (non-finite loss); its numbers are not comparable']
  """
  return [f"warning: {r['arm']} seed {r['seed']} diverged (non-finite loss); its numbers are not comparable"
          for r in runs if r.get("diverged")]


def arm_label(label: str, group: Sequence[Mapping[str, Any]]) -> str:
  """``label``, marked with how many of its runs diverged (if any), for tables.

  >>> arm_label("qsgd:0.9", [{"diverged": True}, {"diverged": False}])
  'qsgd:0.9 (1/2 diverged)'
  """
  n = sum(bool(r.get("diverged")) for r in group)
  return f"{label} ({n}/{len(group)} diverged)" if n else label


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
  """Mean, sample std (0 for one value) and count of the non-``None`` finite values.

  Returns ``(nan, nan, 0)`` when no value is usable.
  """
  xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
  if xs.size == 0:
    return float("nan"), float("nan"), 0
  std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
  return float(xs.mean()), std, int(xs.size)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with left-aligned columns.

  >>> print(format_table(["arm", "acc"], [["adamw", "0.91"], ["qsgd:0.5", "0.94"]]))
  arm       acc
  --------  ----
  adamw     0.91
  qsgd:0.5  0.94
  """
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  if any(len(r) != len(headers) for r in cells):
    raise ValueError("rows must have as many cells as headers")
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   drop_empty: bool = True) -> list[str]:
  """The lines of a markdown table; columns empty in every row are left out.

  >>> print("\\n".join(markdown_table(["arm", "acc", "note"], [["adamw", 0.9, ""]])))
  | arm | acc |
  |---|---|
  | adamw | 0.9 |
  """
  cells = [[str(c) for c in row] for row in rows]
  if any(len(r) != len(headers) for r in cells):
    raise ValueError("rows must have as many cells as headers")
  keep = [i for i in range(len(headers))
          if not drop_empty or i == 0 or any(r[i] for r in cells)]
  lines = ["| " + " | ".join(headers[i] for i in keep) + " |", "|" + "---|" * len(keep)]
  lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in cells]
  return lines


def _jsonable(obj: Any) -> Any:
  """Converts numpy/Path/dataclass values to JSON; non-finite floats become ``None``."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return _jsonable(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, (str, type(None))):
    return obj
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, "label"):  # an Arm inside a config
    return obj.label
  if hasattr(obj, "shape") and hasattr(obj, "tolist"):  # a jax.Array
    return _jsonable(np.asarray(obj))
  raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_summary(out_dir: str | os.PathLike[str], runs: Sequence[Mapping[str, Any]], config: Any) -> Path:
  """Writes ``out_dir/summary.json`` = ``{"runs": [...], "config": {...}}`` and returns its path.

  ``config`` may be a mapping or a dataclass. NumPy and JAX scalars/arrays
  become JSON numbers/lists; NaN and infinities become ``null`` (so the file
  is strict JSON); arms become their labels.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "summary.json"
  payload = {"runs": _jsonable(list(runs)), "config": _jsonable(config)}
  path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
  return path


def plot_curves(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, str]],
    *,
    xlabel: str = "epoch",
    x_key: str | None = None,
    band: str = "minmax",
    group_key: str = "arm",
    title: str | None = None,
) -> Path:
  """Plots per-run curves as one line per group (mean over seeds) with a band.

  Args:
    runs: run records; ``run[key]`` is a list of floats for every panel key.
    path: the PNG to write (parent directories are created).
    panels: ``(key, y-axis label)`` per subplot, side by side.
    xlabel: x-axis label.
    x_key: record key holding the x values (a list as long as the curves);
      default ``1, 2, ...``.
    band: ``"minmax"`` (range over seeds), ``"std"`` (mean +- one std) or
      ``"none"``.
    group_key: record key that names a line (default ``"arm"``).
    title: figure title.

  Curves of different lengths in a group are cut to the shortest; ``None``
  values (non-finite in JSON) are drawn as gaps.
  """
  if band not in ("minmax", "std", "none"):
    raise ValueError(f"band must be 'minmax', 'std' or 'none', got {band!r}")
  if not panels:
    raise ValueError("panels must name at least one (key, label)")
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (key, ylabel) in zip(axes, panels):
    for label, group in group_runs(runs, group_key).items():
      curves = [np.asarray([np.nan if v is None else v for v in r[key]], dtype=np.float64) for r in group]
      n = min(len(c) for c in curves)
      if n == 0:
        continue
      ys = np.stack([c[:n] for c in curves])
      xs = np.asarray(group[0][x_key][:n], dtype=np.float64) if x_key else np.arange(1, n + 1)
      with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(All-NaN slice|Mean of empty slice|Degrees of freedom)")
        mean = np.nanmean(ys, axis=0)
        if band == "minmax":
          lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
        else:
          std = np.nanstd(ys, axis=0)
          lo, hi = mean - std, mean + std
      (line,) = ax.plot(xs, mean, label=f"{label} (n={len(group)})", marker="o" if n <= 30 else None, ms=3)
      if band != "none" and len(group) > 1:
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  return out

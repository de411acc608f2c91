"""Paired statistics for the benchmarks: t intervals, one-sided bounds against a claim, an exact test.

NumPy and SciPy (a PennyLane dependency). Differences are always
``treatment - control`` over pairs that share a seed. Intervals are
Student-t (n - 1 degrees of freedom) and say their n: a percentile
bootstrap of 3 to 10 pairs under-covers (simulated 75% at n=3, 91% at
n=10 for a nominal 95%), so it is kept only as a helper.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

N_BOOTSTRAP = 10_000
EXACT_LIMIT = 16  # enumerate all 2**n sign flips up to this many pairs


def bootstrap_ci(diffs: Sequence[float], *, level: float = 0.95, n_resamples: int = N_BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of paired differences.

  >>> lo, hi = bootstrap_ci([0.01, 0.02, 0.03, 0.02])
  >>> 0.01 <= lo <= 0.02 <= hi <= 0.03
  True
  """
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    return math.nan, math.nan
  if d.size == 1:
    return float(d[0]), float(d[0])
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
  alpha = (1.0 - level) / 2
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  return float(lo), float(hi)


def sign_flip_pvalue(diffs: Sequence[float], *, n_resamples: int = 100_000, seed: int = 0) -> float:
  """Two-sided paired permutation (sign-flip) test of mean difference 0.

  Under the null each pair's difference is symmetric about 0, so flipping
  signs gives its distribution; exact (all ``2**n`` flips) for ``n <= 16``
  pairs, Monte Carlo beyond. Zero differences carry no information and are
  kept (they do not move the statistic).

  >>> sign_flip_pvalue([1.0, 1.0, 1.0, 1.0, 1.0])   # 2 of 32 flips as extreme
  0.0625
  >>> sign_flip_pvalue([0.0, 0.0])
  1.0
  """
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    return math.nan
  observed = abs(d.mean())
  if d.size <= EXACT_LIMIT:
    signs = np.asarray(list(itertools.product((1.0, -1.0), repeat=d.size)))
  else:
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_resamples, d.size))
  stats = np.abs((signs * d).mean(axis=1))
  return float(np.mean(stats >= observed - 1e-12 * max(1.0, observed)))


def t_interval(diffs: Sequence[float], *, level: float = 0.95) -> tuple[float, float]:
  """Two-sided Student-t interval of the mean (NaN below 2 values).

  >>> lo, hi = t_interval([1.0, 2.0, 3.0])
  >>> round(lo, 3), round(hi, 3)
  (-0.484, 4.484)
  """
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return math.nan, math.nan
  half = _scipy_stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return float(d.mean() - half), float(d.mean() + half)


def one_sided_bound(diffs: Sequence[float], side: str, *, level: float = 0.95) -> float:
  """One-sided Student-t confidence bound of the mean: ``"upper"`` or ``"lower"``.

  The true mean is below the upper bound (above the lower one) with
  confidence ``level``. NaN below 2 values.

  >>> round(one_sided_bound([1.0, 2.0, 3.0], "upper"), 3)
  3.686
  """
  if side not in ("upper", "lower"):
    raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return math.nan
  half = _scipy_stats.t.ppf(level, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return float(d.mean() + half if side == "upper" else d.mean() - half)


def claim_test(diffs: Sequence[float], effect: float, *, relative: bool = False,
               level: float = 0.95) -> dict[str, object]:
  """Is a claimed effect excluded by paired differences?

  A positive ``effect`` claims the treatment raises the metric by that much:
  the one-sided upper bound of the mean difference is compared with it; a
  negative one claims a decrease, and the lower bound is used. With
  ``relative`` the differences are log ratios ``log(treatment / control)``
  and both the mean and the bound are reported as ratios minus 1
  (``effect`` is then a fraction, e.g. ``-0.378``).

  Returns:
    ``n``, ``mean`` (the mean difference, or ratio - 1), ``side``, ``bound``,
    ``effect``, ``excluded`` (``True`` when the bound lies on the other side
    of the effect, ``False`` when not, ``None`` below 2 pairs or when a
    difference is not finite) and ``method``.

  >>> r = claim_test([0.001, -0.004, 0.003, 0.0], 0.023)
  >>> r["side"], round(r["bound"], 4), r["excluded"]
  ('upper', 0.0035, True)
  """
  d = np.asarray(diffs, np.float64)
  side = "upper" if effect > 0 else "lower"
  bound = one_sided_bound(d, side, level=level)
  mean = float(d.mean()) if d.size else math.nan
  if relative:
    mean, bound = math.expm1(mean) if d.size else math.nan, math.expm1(bound)
  excluded = None
  if d.size >= 2 and math.isfinite(bound):
    excluded = bool(bound < effect) if side == "upper" else bool(bound > effect)
  method = f"one-sided {level:.0%} Student-t, {max(d.size - 1, 0)} df"
  if d.size >= 2 and np.all(np.isfinite(d)) and np.ptp(d) == 0:
    method += "; every difference equal, so the bound is the mean (degenerate)"
  return {"n": int(d.size), "mean": mean, "side": side, "bound": bound, "effect": effect,
          "excluded": excluded, "relative": relative, "method": method}


def paired(treatment: dict[int, float | None], control: dict[int, float | None]) -> dict[str, float]:
  """Mean paired difference, its 95% t interval and the sign-flip p-value.

  ``treatment`` and ``control`` map seed -> value; only seeds in both count.
  A ``None`` value (a censored metric, e.g. never reached the target) makes
  the whole comparison undefined: every number is NaN and ``censored``
  counts the pairs that had one.
  """
  seeds = sorted(set(treatment) & set(control))
  censored = sum(treatment[s] is None or control[s] is None for s in seeds)
  if censored:
    return {"n": len(seeds), "censored": censored, "mean_diff": math.nan, "ci_low": math.nan,
            "ci_high": math.nan, "p_value": math.nan}
  d = [treatment[s] - control[s] for s in seeds]
  lo, hi = t_interval(d)
  return {"n": len(d), "censored": 0, "mean_diff": float(np.mean(d)) if d else math.nan,
          "ci_low": lo, "ci_high": hi, "p_value": sign_flip_pvalue(d)}


def share_summary(runs: Sequence[dict]) -> dict[str, float] | None:
  """The quantum term's recorded share over runs: median of the medians, max, median global ratio.

  Reads ``term_share_median`` / ``_max`` / ``_global`` lists (``None`` entries, a
  NaN written to JSON, are skipped); ``None`` when no run recorded any.

  >>> share_summary([{"term_share_median": [1e-4, None], "term_share_max": [2.0], "term_share_global": [3e-5]}])
  {'median': 0.0001, 'max': 2.0, 'global_median': 3e-05}
  """
  def values(key: str) -> list[float]:
    return [v for r in runs for v in r.get(key) or [] if v is not None]

  if not values("term_share_median"):
    return None
  return {"median": float(np.nanmedian(values("term_share_median"))),
          "max": float(np.nanmax(values("term_share_max"))),
          "global_median": float(np.nanmedian(values("term_share_global")))}

"""Paired statistics for the benchmarks: bootstrap intervals and an exact paired test.

NumPy only. Differences are always ``treatment - control`` over pairs that
share a seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

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


def paired(treatment: dict[int, float], control: dict[int, float]) -> dict[str, float]:
  """Mean paired difference, its 95% bootstrap CI and the sign-flip p-value.

  ``treatment`` and ``control`` map seed -> value; only seeds in both count.
  """
  seeds = sorted(set(treatment) & set(control))
  d = [treatment[s] - control[s] for s in seeds]
  lo, hi = bootstrap_ci(d)
  return {"n": len(d), "mean_diff": float(np.mean(d)) if d else math.nan,
          "ci_low": lo, "ci_high": hi, "p_value": sign_flip_pvalue(d)}

"""bench/soak.py: the soak loop on a tiny classifier, and its non-finite detector."""

import importlib.util
import math
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


soak = _load()


def test_all_finite_detects_nan_and_inf_but_ignores_ints():
  assert soak._all_finite({"a": jnp.ones(3), "i": jnp.arange(3)})
  assert not soak._all_finite({"a": jnp.array([1.0, jnp.nan])})
  assert not soak._all_finite([jnp.ones(2), (jnp.array(jnp.inf),)])


def test_soak_record_is_consistent():
  from qsgd_optax.tasks import arms
  from qsgd_optax.tasks.classification import experiment
  config = experiment.ClassificationConfig(**soak.SMOKE_DATA)
  data = experiment.load_task(config)
  r = soak.soak(arms.parse_arm("qsgd:0.5:update"), 25, 10, config, data, progress=False)
  assert [s["step"] for s in r["samples"]] == [10, 20, 25]
  assert r["first_nonfinite_step"] is None and all(s["finite"] for s in r["samples"])
  assert math.isfinite(r["final_loss"]) and r["final_loss"] == r["samples"][-1]["loss"]
  rss = [s["peak_rss_mb"] for s in r["samples"]]
  assert rss == sorted(rss) and r["rss_growth_mb"] == pytest.approx(rss[-1] - rss[0])
  assert r["drift"] == pytest.approx(r["step_ms_last"] / r["step_ms_first"])
  assert "qsgd:0.5:update" in soak.table([r])

"""Tests for the transformer classifier, its jitted steps and the training loop."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsgd_optax.tasks import arms, running
from qsgd_optax.tasks.classification import experiment, text_data, transformer

TINY = dict(n_train=96, n_test=40, seq_len=10, epochs=2)


@pytest.fixture(scope="module")
def tiny_data() -> text_data.TextDataset:
  return text_data.make_synthetic(TINY["n_train"], TINY["n_test"], seq_len=TINY["seq_len"], seed=0)


@pytest.mark.parametrize(
    "pooling, attention",
    [pytest.param("mean", "standard", id="mean-standard"), pytest.param("cls", "quantum", id="cls-quantum")],
)
def test_model_shapes_and_padding_invariance(pooling, attention):
  config = experiment.ClassificationConfig(pooling=pooling, attention=attention)
  model = transformer.TransformerClassifier(config, vocab_size=20, num_classes=3, max_len=8, rngs=nnx.Rngs(0))
  model.eval()
  tokens = jnp.asarray([[5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=jnp.int32)
  apply = nnx.jit(lambda m, t: m(t))
  logits = apply(model, tokens)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # trailing padding is invisible: the same sentence without it gives the same logits
  np.testing.assert_allclose(apply(model, tokens[:1, :3]), logits[:1], atol=1e-5)
  assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4


def test_paper_configuration_is_the_default():
  config = experiment.ClassificationConfig()
  paper = (config.embed_dim, config.num_heads, config.ff_dim, config.num_layers, config.dropout,
           config.batch_size, config.learning_rate, config.weight_decay)
  assert paper == (64, 4, 128, 2, 0.1, 32, 1e-3, 0.0)
  model = transformer.create_model(config, text_data.make_synthetic(4, 4), seed=0)
  params = nnx.state(model, nnx.Param)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_dropout_is_active_in_train_mode_only():
  config = experiment.ClassificationConfig()
  model = transformer.create_model(config, text_data.make_synthetic(4, 4, seq_len=8), seed=0)
  tokens = jnp.arange(1, 9, dtype=jnp.int32)[None]
  model.train()
  a, b = model(tokens), model(tokens)
  model.eval()
  c, d = model(tokens), model(tokens)
  assert float(jnp.abs(a - b).max()) > 1e-6
  np.testing.assert_array_equal(c, d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"task": "mnist"}, "task", id="task"),
        pytest.param({"attention": "linear"}, "attention", id="attention"),
        pytest.param({"pooling": "max"}, "pooling", id="pooling"),
        pytest.param({"epochs": 0}, "epochs", id="epochs"),
        pytest.param({"learning_rate": -1.0}, "learning_rate", id="lr"),
        pytest.param({"dropout": 1.0}, "dropout", id="dropout"),
        pytest.param({"target_accuracy": 1.5}, "target_accuracy", id="target"),
        pytest.param({"embed_dim": 66}, "divisible", id="heads"),
        pytest.param({"loss_scale": 0.0}, "loss_scale", id="loss_scale"),
        pytest.param({"evals_per_epoch": 0}, "evals_per_epoch", id="evals_per_epoch"),
        pytest.param({"markers": 1}, "markers", id="markers"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    experiment.ClassificationConfig(**kwargs)


def test_epochs_to_target():
  assert experiment.epochs_to_target([0.5, 0.89, 0.9, 0.8], 0.9) == 3
  assert experiment.epochs_to_target([0.5, 0.89], 0.9) is None
  assert experiment.epochs_to_target([], 0.9) is None


def test_train_step_updates_everything_including_circuit_angles(tiny_data):
  config = experiment.ClassificationConfig(attention="quantum", **TINY)
  model = transformer.create_model(config, tiny_data, seed=0)
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  tx = arms.make_optimizer(arms.parse_arm("qsgd:0.5"), 1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = experiment._metrics()
  model.train()
  graphdef, state = nnx.split((model, optimizer, metrics))
  batch = tiny_data.train.tokens[:32], tiny_data.train.labels[:32]
  state = experiment.train_step(graphdef, state, *batch)
  state = experiment.train_step(graphdef, state, *batch)
  model, optimizer, metrics = nnx.merge(graphdef, state)
  after = nnx.state(model, nnx.Param)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
  assert all(jax.tree.leaves(changed))  # the circuit angles (ry, rz of every layer) included
  assert len([p for p in jax.tree_util.tree_leaves_with_path(changed) if "bias" in str(p[0])
              and ("'ry'" in str(p[0]) or "'rz'" in str(p[0]))]) == 4
  assert int(optimizer.step[...]) == 2
  computed = metrics.compute()
  assert 0 <= float(computed["accuracy"]) <= 1 and math.isfinite(float(computed["loss"]))


def test_train_and_evaluate_record(tiny_data):
  config = experiment.ClassificationConfig(**TINY, target_accuracy=0.05)
  run = experiment.train_and_evaluate(config, arms.parse_arm("adamw"), seed=0, dataset=tiny_data)
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert len(run[key]) == 2 and all(math.isfinite(v) for v in run[key])
  assert run["final_accuracy"] == run["test_accuracy"][-1]
  assert run["epochs_to_target"] == 1  # every accuracy reaches 5%
  assert run["steps"] == 2 * (96 // 32)
  assert run["mean_step_time_s"] > 0 and run["wall_time_s"] > run["mean_step_time_s"]
  assert run["diverged"] is False
  # the per-epoch test accuracy is a fraction of the 40 test sequences
  assert all(abs(a * 40 - round(a * 40)) < 1e-3 for a in run["test_accuracy"])


def test_train_and_evaluate_is_reproducible_per_seed(tiny_data):
  config = experiment.ClassificationConfig(**TINY)
  arm = arms.parse_arm("qsgd:0.5")
  a = experiment.train_and_evaluate(config, arm, seed=1, dataset=tiny_data)
  b = experiment.train_and_evaluate(config, arm, seed=1, dataset=tiny_data)
  c = experiment.train_and_evaluate(config, arm, seed=2, dataset=tiny_data)
  assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]
  assert a["train_loss"] != c["train_loss"]


def test_training_learns_the_synthetic_task():
  # A shortened, easier version of the real task: AdamW must get well above chance.
  # It sits on a plateau near chance for ~4 epochs, then learns the order rule
  # (measured: test accuracy 0.92 at epoch 6, 0.95 at epoch 8).
  data = text_data.make_synthetic(1024, 200, seq_len=12, markers_per_class=1, seed=0)
  config = experiment.ClassificationConfig(epochs=8, n_train=1024, n_test=200, seq_len=12,
                                               learning_rate=3e-3)
  run = experiment.train_and_evaluate(config, arms.parse_arm("adamw"), seed=0, dataset=data)
  assert run["train_loss"][-1] < run["train_loss"][0] - 0.2
  assert run["best_accuracy"] >= 0.8


def test_comparison_table():
  def run(arm, seed, final, epochs):
    return {**arms.parse_arm(arm).record(), "seed": seed, "final_accuracy": final,
            "epochs_to_target": epochs, "mean_step_time_s": 0.01}

  runs = [run("adamw", 0, 0.91, 7), run("adamw", 1, 0.93, 9), run("qsgd:0.5", 0, 0.8, None)]
  table = experiment.comparison_table(runs, 0.9).splitlines()
  assert table[0].split()[:2] == ["arm", "seeds"] and "epochs to 90%" in table[0]
  assert table[2].startswith("adamw") and "0.920 +- 0.014" in table[2] and "8.0 +- 1.4 (2/2)" in table[2]
  assert table[3].startswith("qsgd:0.5") and "0.800" in table[3] and "- (0/1)" in table[3]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run():
  data = text_data.make_synthetic(128, 32, seq_len=12, markers_per_class=1, seed=0)
  small = dict(n_train=128, n_test=32, seq_len=12, embed_dim=16, ff_dim=32, num_layers=1, epochs=2)
  arm = arms.parse_arm("qsgd:0.5")
  # A finite run: the wrapper counts nothing and changes nothing.
  plain = experiment.train_and_evaluate(experiment.ClassificationConfig(**small), arm, 0,
                                            dataset=data)
  guarded = experiment.train_and_evaluate(
      experiment.ClassificationConfig(**small, max_nonfinite=3), arm, 0, dataset=data)
  assert guarded["nonfinite_steps"] == 0 and plain["nonfinite_steps"] is None
  # apply_if_finite compiles another train step (a finite check and a
  # select), so the losses agree to float32 rounding, not bit for bit (8e-8
  # relative measured); a skipped or altered step would move the epoch-mean
  # loss by far more than 1e-5.
  np.testing.assert_allclose(guarded["train_loss"], plain["train_loss"], rtol=1e-5, atol=0)
  # An infinite loss scale makes every gradient non-finite: every step is
  # skipped, and the run stops at the first epoch end with a clear message.
  bad = experiment.ClassificationConfig(**small, max_nonfinite=3, loss_scale=1e39)
  with pytest.raises(running.NonFiniteError, match=r"4 non-finite training steps in a row"):
    experiment.train_and_evaluate(bad, arm, 0, dataset=data)


def test_evaluations_within_epochs_and_the_term_share(tiny_data):
  config = experiment.ClassificationConfig(**TINY, evals_per_epoch=3, target_accuracy=0.05)
  arm = arms.parse_arm("qsgd:0.5")
  run = experiment.train_and_evaluate(config, arm, seed=0, dataset=tiny_data)
  # 3 steps per epoch: evaluations after steps 1, 2, 3 of each of 2 epochs
  assert run["eval_epoch"] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
  assert len(run["test_accuracy"]) == 6 and len(run["train_loss"]) == 2
  assert run["epochs_to_target"] == pytest.approx(1 / 3)
  assert run["final_accuracy_window"] == pytest.approx(np.mean(run["test_accuracy"][-3:]))
  shares = run["term_share_median"]
  assert len(shares) == 6 and all(0 < s < 1 for s in shares)
  assert all(m <= x for m, x in zip(shares, run["term_share_max"]))
  # The probe only reads the state: without it the same train program gives the same run.
  quiet = experiment.train_and_evaluate(dataclasses.replace(config, record_term_share=False), arm, seed=0,
                                        dataset=tiny_data)
  assert quiet["test_accuracy"] == run["test_accuracy"] and quiet["train_loss"] == run["train_loss"]
  assert "term_share_median" not in quiet
  assert run["term_share_epoch"] == run["eval_epoch"]
  # Evaluating within epochs only reads the state: one evaluation per epoch gives the same training,
  # and the same accuracy at every epoch's end (the same train program twice).
  once = experiment.train_and_evaluate(dataclasses.replace(config, evals_per_epoch=1), arm, seed=0,
                                       dataset=tiny_data)
  assert once["train_loss"] == run["train_loss"] and once["test_accuracy"] == run["test_accuracy"][2::3]
  assert "term_share_median" not in experiment.train_and_evaluate(config, arms.parse_arm("adamw"), seed=0,
                                                                  dataset=tiny_data)


def test_term_share_is_linear_in_the_weight_down_to_the_float32_floor(tiny_data):
  """The share of lambda's term doubles with lambda; the null arm's sits at the float32 resolution."""
  config = experiment.ClassificationConfig(**TINY)
  model = transformer.create_model(config, tiny_data, seed=0)
  batch = tiny_data.train.tokens[:32], tiny_data.train.labels[:32]
  out = {}
  for weight in (1e-6, 0.05, 0.1):
    arm = arms.parse_arm(f"qsgd:{weight}")
    optimizer = nnx.Optimizer(model, experiment._optimizer(arm, 1e-3, 0.0, 4), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer, experiment._metrics()))
    state = experiment.train_step(graphdef, state, *batch)  # a non-trivial Adam state
    share = experiment.term_share_fn(arm, 1e-3, 0.0, 4)(graphdef, state, *batch)
    out[weight] = {k: float(v) for k, v in share.items()}
    model = transformer.create_model(config, tiny_data, seed=0)
  for key in ("median", "global"):
    # the term is linear in lambda, |update| barely moves: rounding of u - u0 only
    assert out[0.05][key] > 1e-5
    assert out[0.1][key] == pytest.approx(2 * out[0.05][key], rel=0.02)
    assert out[1e-6][key] < 1e-6
  assert experiment.term_share_fn(arms.parse_arm("adamw"), 1e-3, 0.0, 4) is None


def test_agreement_task_and_markers_config():
  config = experiment.ClassificationConfig(task="agreement", markers=3, n_train=64, n_test=16, seq_len=12)
  data = experiment.load_task(config)
  assert data.info["generator"] == "first_last_agree" and data.info["markers"] == 3
  with pytest.raises(ValueError, match="markers"):
    experiment.ClassificationConfig(task="agreement", markers=1)
  # checkpoints written before these fields existed keep their identity at the defaults
  arm = arms.parse_arm("adamw")
  identity = experiment._identity(experiment.ClassificationConfig(), arm, 0, data)
  assert "markers" not in identity and "evals_per_epoch" not in identity
  assert experiment._identity(experiment.ClassificationConfig(evals_per_epoch=4), arm, 0, data)[
      "evals_per_epoch"] == 4


def test_run_arms_seed_major_skip_and_on_record():
  seen = []
  records = running.run_arms(arms.parse_arms("adamw,qsgd:0.5"), [0, 1], lambda arm, seed: {"x": seed},
                             progress=False, seed_major=True, skip=[("qsgd:0.5", 0)], on_record=seen.append)
  assert [(r["arm"], r["seed"]) for r in records] == [("adamw", 0), ("adamw", 1), ("qsgd:0.5", 1)]
  assert seen == records

"""Tests of the Llama-architecture model (tiny random-init configurations)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsgd_optax.tasks.lm import llama

TINY = llama.LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, ffn_dim=48, rope_theta=10_000.0)


@functools.lru_cache(maxsize=None)
def _cached_model(cfg, seed, dtype):
  return llama.Llama(cfg, rngs=nnx.Rngs(seed), dtype=dtype)


def _model(cfg=TINY, seed=0, dtype=jnp.float32):
  """Shared across tests (construction is eager and slow); never mutate."""
  return _cached_model(cfg, seed, dtype)


@nnx.jit
def _apply(model, tokens, positions=None, segment_ids=None):
  return model(tokens, positions, segment_ids)


def _tokens(rng, b, t, vocab=TINY.vocab_size):
  return jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(n_kv_heads=3), "n_kv_heads", id="kv-not-dividing"),
    pytest.param(dict(dim=30), "n_heads", id="dim-not-divisible"),
    pytest.param(dict(head_dim=7), "even", id="odd-head-dim"),
    pytest.param(dict(n_layers=0), "n_layers", id="zero-layers"),
    pytest.param(dict(rope_theta=0.0), "rope_theta", id="bad-theta"),
])
def test_config_validation(kwargs, match):
  base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
              ffn_dim=48)
  with pytest.raises(ValueError, match=match):
    llama.LlamaConfig(**{**base, **kwargs})


def test_smollm2_config():
  cfg = llama.LlamaConfig.smollm2_135m()
  assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim,
          cfg.head_dim, cfg.rope_theta, cfg.tie_embeddings) == (
              30, 576, 9, 3, 1536, 64, 1e5, True)


def test_param_count_smollm2():
  abstract = nnx.eval_shape(lambda: _model(llama.LlamaConfig.smollm2_135m()))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == 134_515_008  # SmolLM2-135M with tied embeddings


def test_forward_shapes_and_mixed_precision(rng):
  model = _model(dtype=jnp.bfloat16)
  logits = _apply(model, _tokens(rng, 2, 7))
  assert logits.shape == (2, 7, TINY.vocab_size)
  assert logits.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32  # master weights stay f32


def test_untied_head(rng):
  cfg = llama.LlamaConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4,
                          n_kv_heads=4, ffn_dim=48, tie_embeddings=False)
  model = _model(cfg)
  assert model.lm_head is not None
  assert _apply(model, _tokens(rng, 1, 5)).shape == (1, 5, 61)


def test_causal(rng):
  model = _model()
  tokens = _tokens(rng, 1, 10)
  changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % TINY.vocab_size)
  a, b = _apply(model, tokens), _apply(model, changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_packed_rows_match_separate_sequences(rng):
  model = _model()
  s1, s2 = _tokens(rng, 1, 5), _tokens(rng, 1, 4)
  packed = jnp.concatenate([s1, s2, jnp.zeros((1, 3), jnp.int32)], axis=1)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
  segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
  out = _apply(model, packed, positions, segments)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out[:, :5], _apply(model, s1), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], _apply(model, s2), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv(rng):
  """Query head h reads key/value head h // (n_heads // n_kv_heads)."""
  gqa = _model()
  mha_cfg = llama.LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4,
                              n_kv_heads=4, ffn_dim=48)
  mha = llama.Llama(mha_cfg, rngs=nnx.Rngs(1))
  g = TINY.n_heads // TINY.n_kv_heads
  h = TINY.head_dim
  src = nnx.to_pure_dict(nnx.state(gqa))
  dst = nnx.to_pure_dict(nnx.state(mha))
  for i, layer in src["layers"].items():
    dst["layers"][i] = jax.tree.map(lambda x: x, layer)
    for name in ("k_proj", "v_proj"):
      k = layer["attn"][name]["kernel"].reshape(TINY.dim, TINY.n_kv_heads, h)
      dst["layers"][i]["attn"][name]["kernel"] = jnp.repeat(
          k, g, axis=1).reshape(TINY.dim, TINY.n_heads * h)
  dst["embed"], dst["norm"] = src["embed"], src["norm"]
  graphdef, state = nnx.split(mha)
  nnx.replace_by_pure_dict(state, dst)
  mha = nnx.merge(graphdef, state)
  tokens = _tokens(rng, 2, 9)
  np.testing.assert_allclose(_apply(gqa, tokens), _apply(mha, tokens), atol=1e-5)


def test_rope_depends_only_on_relative_position(rng):
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    qm = llama.apply_rope(q, jnp.asarray([[m]]), 100.0)
    kn = llama.apply_rope(k, jnp.asarray([[n]]), 100.0)
    return float(jnp.sum(qm * kn))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-6)


def test_rope_half_split_layout():
  """Feature i rotates with feature i + head_dim/2 (Hugging Face layout)."""
  x = jnp.zeros((1, 1, 1, 8)).at[..., 1].set(1.0)
  out = np.asarray(llama.apply_rope(x, jnp.asarray([[1]]), 10.0))[0, 0, 0]
  angle = 1.0 / 10.0 ** (1 / 4)
  expected = np.zeros(8)
  expected[1], expected[5] = np.cos(angle), np.sin(angle)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_generate_is_greedy(rng):
  model = _model()
  prompt = [int(t) for t in np.asarray(_tokens(rng, 1, 4))[0]]
  out = llama.generate(model, prompt, 5)
  assert len(out) == 5
  # Causality: one forward over prompt + output shows every greedy choice.
  logits = _apply(model, jnp.asarray([prompt + out], jnp.int32))
  best = np.asarray(jnp.argmax(logits[0], axis=-1))
  assert out == [int(t) for t in best[len(prompt) - 1:-1]]
  stopped = llama.generate(model, prompt, 5, stop_token=out[1])
  assert stopped == out[:out.index(out[1]) + 1]


def test_generate_validates():
  model = _model()
  with pytest.raises(ValueError, match="prompt"):
    llama.generate(model, [], 3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    llama.generate(model, [1], -1)

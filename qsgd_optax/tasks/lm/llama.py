"""A Llama-architecture decoder in Flax NNX, for fine-tuning experiments.

The model follows the Llama family as used by SmolLM2 and Llama 3: RMSNorm
before attention and MLP, rotary position embeddings (RoPE), grouped-query
attention (GQA), a SwiGLU MLP and, where the checkpoint ties them, an output
projection that reuses the token embedding.

RoPE convention: this module uses the *half-split* layout of the Hugging Face
implementation (``rotate_half``): inside each head, feature ``i`` is paired
with feature ``i + head_dim // 2``. Checkpoints converted by llama.cpp store
the query and key projections permuted for the *interleaved-pair* layout
(features ``2i`` and ``2i + 1`` paired); :mod:`qsgd_optax.tasks.lm.gguf_loader`
un-permutes them on load, so parameters here have Hugging Face's layout.

Mixed precision: parameters are created in ``param_dtype`` (float32 master
weights) and cast to ``dtype`` (e.g. bfloat16) inside every matrix product.
Normalisation statistics, attention softmax and the final logits are
computed in float32.

The forward pass has no key/value cache; it takes explicit ``positions`` and
``segment_ids`` so that several sequences can be packed into one row (tokens
attend only inside their own segment, causally). :func:`generate` is a
simple greedy decoder that re-runs the full forward for every new token,
meant for sanity checks, not for serving.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qsgd_optax.tasks._compat import ModuleList

__all__ = [
    "LlamaConfig",
    "Llama",
    "RMSNorm",
    "apply_rope",
    "causal_segment_mask",
    "generate",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama-architecture decoder.

  Attributes:
    vocab_size: number of token ids.
    dim: model width (embedding size).
    n_layers: number of transformer blocks.
    n_heads: number of query heads.
    n_kv_heads: number of key/value heads; must divide ``n_heads``.
    ffn_dim: hidden width of the SwiGLU MLP.
    rope_theta: RoPE base frequency.
    norm_eps: epsilon of every RMSNorm.
    tie_embeddings: whether the output projection reuses the embedding.
    head_dim: per-head width; defaults to ``dim // n_heads``.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  head_dim: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                 "ffn_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_kv_heads ({self.n_kv_heads}) must divide n_heads "
          f"({self.n_heads}).")
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(
            f"n_heads ({self.n_heads}) must divide dim ({self.dim}) when "
            "head_dim is not given.")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be positive, got {self.rope_theta}.")

  @classmethod
  def smollm2_135m(cls) -> "LlamaConfig":
    """SmolLM2-135M: 30 layers, width 576, 9/3 heads, ffn 1536."""
    return cls(vocab_size=49152, dim=576, n_layers=30, n_heads=9,
               n_kv_heads=3, ffn_dim=1536, rope_theta=100_000.0,
               norm_eps=1e-5, tie_embeddings=True)

  @classmethod
  def tiny(cls, vocab_size: int = 259) -> "LlamaConfig":
    """A small random-init model for tests and smoke runs (about 0.2M params)."""
    return cls(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4,
               n_kv_heads=2, ffn_dim=128, rope_theta=10_000.0, norm_eps=1e-5,
               tie_embeddings=True)


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation with a learned scale, computed in f32."""

  def __init__(self, dim: int, *, eps: float = 1e-5,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.weight[...].astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, half-split (Hugging Face) layout.

  Args:
    x: ``[batch, seq, heads, head_dim]``.
    positions: ``[batch, seq]`` integer positions.
    theta: base frequency.

  Returns:
    ``x`` rotated; feature ``i`` is paired with ``i + head_dim // 2``.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """Boolean mask ``[batch, 1, seq, seq]``: causal and within one segment.

  Padding carries segment id 0 and so only attends to other padding, which
  keeps every softmax row non-empty.
  """
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None]


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and no bias terms."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.dim, cfg.head_dim
    init = nnx.initializers.normal(0.02)

    def linear(n_in, n_out):
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, kernel_init=init, rngs=rngs)

    self.q_proj = linear(d, cfg.n_heads * h)
    self.k_proj = linear(d, cfg.n_kv_heads * h)
    self.v_proj = linear(d, cfg.n_kv_heads * h)
    self.o_proj = linear(cfg.n_heads * h, d)

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = apply_rope(q, positions, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.rope_theta)
    # Grouped-query attention: view the query heads as [kv_heads, group].
    g = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(b, t, cfg.n_kv_heads, g, cfg.head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k,
                        preferred_element_type=jnp.float32)
    logits = logits * (cfg.head_dim ** -0.5)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return self.o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim))


class MLP(nnx.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)

    def linear(n_in, n_out):
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, kernel_init=init, rngs=rngs)

    self.gate_proj = linear(cfg.dim, cfg.ffn_dim)
    self.up_proj = linear(cfg.dim, cfg.ffn_dim)
    self.down_proj = linear(cfg.ffn_dim, cfg.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm transformer block: attention then MLP, each residual."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, **kw)
    self.attn = Attention(cfg, rngs=rngs, **kw)
    self.post_attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, **kw)
    self.mlp = MLP(cfg, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array,
               mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.input_norm(x), positions, mask)
    return x + self.mlp(self.post_attn_norm(x))


class Llama(nnx.Module):
  """Llama-architecture causal language model.

  Every layer's weights are separate parameter arrays (no stacking across
  layers), as in the PyTorch reference, so per-array optimizer choices such
  as QSGD's ``scope="leaf"`` see one array per layer and projection.

  Args:
    cfg: the architecture.
    dtype: compute dtype of matrix products and activations.
    param_dtype: dtype of the parameters (master weights).
    rngs: random streams for the initialisation.
  """

  def __init__(self, cfg: LlamaConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02), **kw)
    self.layers = ModuleList(
        [Block(cfg, rngs=rngs, **kw) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, **kw)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False,
                                kernel_init=nnx.initializers.normal(0.02),
                                rngs=rngs, **kw)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Float32 logits ``[batch, seq, vocab]`` for int ``tokens [batch, seq]``.

    Args:
      tokens: token ids.
      positions: position of every token inside its own sequence; defaults
        to ``0 .. seq-1`` on every row.
      segment_ids: packed-sequence ids (0 for padding); tokens attend only
        to earlier tokens with the same id. Defaults to one segment per row.
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    mask = causal_segment_mask(segment_ids)
    x = self.embed(tokens).astype(self.dtype)
    for layer in self.layers:
      x = layer(x, positions, mask)
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef: nnx.GraphDef, state: Any, buf: jax.Array,
                length: jax.Array) -> jax.Array:
  logits = nnx.merge(graphdef, state)(buf[None])[0]
  return jnp.argmax(logits[length - 1]).astype(jnp.int32)


def generate(model: Llama, prompt: list[int] | jax.Array, max_new_tokens: int,
             *, stop_token: int | None = None) -> list[int]:
  """Greedy decoding without a cache, for sanity checks.

  The prompt is right-padded to a fixed buffer so that the forward pass is
  compiled once.

  Args:
    model: the language model.
    prompt: the prompt's token ids.
    max_new_tokens: how many tokens to generate at most.
    stop_token: stop after producing this id (it is included).

  Returns:
    The generated ids (without the prompt).
  """
  prompt = [int(i) for i in jnp.asarray(prompt).reshape(-1)]
  if not prompt:
    raise ValueError("prompt must hold at least one token.")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  total = len(prompt) + max_new_tokens
  graphdef, state = nnx.split(model)
  buf = jnp.zeros((total,), jnp.int32).at[:len(prompt)].set(
      jnp.asarray(prompt, jnp.int32))
  out: list[int] = []
  length = len(prompt)
  for _ in range(max_new_tokens):
    tok = int(_next_token(graphdef, state, buf, length))
    out.append(tok)
    if stop_token is not None and tok == stop_token:
      break
    buf = buf.at[length].set(tok)
    length += 1
  return out

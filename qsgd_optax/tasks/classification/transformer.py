"""The paper's transformer sequence classifier, a Flax NNX module.

Token + learned position embeddings, post-norm encoder blocks with standard
or quantum attention (:mod:`~qsgd_optax.tasks.classification.quantum_attention`),
mean or CLS pooling and a linear head, configured by a
:class:`~qsgd_optax.tasks.classification.experiment.ClassificationConfig`
(embedding 64, 4 heads, feed-forward 128, 2 layers, dropout 0.1, FP32 by
default). The model only: no optimizer, no training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from qsgd_optax.tasks._compat import ModuleList
from qsgd_optax.tasks.classification import text_data
from qsgd_optax.tasks.classification.quantum_attention import MultiHeadSelfAttention

if TYPE_CHECKING:
  from qsgd_optax.tasks.classification.experiment import ClassificationConfig

__all__ = [
    "ATTENTIONS",
    "POOLINGS",
    "EncoderBlock",
    "TransformerClassifier",
    "create_model",
]


ATTENTIONS: tuple[str, ...] = ("standard", "quantum")
POOLINGS: tuple[str, ...] = ("mean", "cls")


class EncoderBlock(nnx.Module):
  """Post-norm transformer encoder block: attention and feed-forward, residual + LayerNorm."""

  def __init__(self, config: ClassificationConfig, *, rngs: nnx.Rngs):
    self.attention = MultiHeadSelfAttention(
        config.embed_dim, config.num_heads, dropout=config.dropout, quantum=config.attention == "quantum",
        n_qubits=config.n_qubits, method=config.quantum_method, rngs=rngs)
    self.norm1 = nnx.LayerNorm(config.embed_dim, rngs=rngs)
    self.ff_in = nnx.Linear(config.embed_dim, config.ff_dim, rngs=rngs)
    self.ff_out = nnx.Linear(config.ff_dim, config.embed_dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.embed_dim, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.norm1(x + self.dropout(self.attention(x, mask)))
    h = self.ff_out(self.dropout(jax.nn.relu(self.ff_in(x))))
    return self.norm2(x + self.dropout(h))


class TransformerClassifier(nnx.Module):
  """Token + learned position embeddings, encoder blocks, pooling, linear head.

  Call on ``int32[batch, length]`` tokens (``0`` = padding); returns
  ``float32[batch, num_classes]`` logits. Use ``.train()`` / ``.eval()`` to
  switch dropout.
  """

  def __init__(self, config: ClassificationConfig, vocab_size: int, num_classes: int, max_len: int,
               *, rngs: nnx.Rngs):
    self.pooling = config.pooling
    self.embed = nnx.Embed(vocab_size, config.embed_dim, rngs=rngs)
    extra = 1 if config.pooling == "cls" else 0
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len + extra, config.embed_dim)))
    self.cls = nnx.Param(jnp.zeros((1, 1, config.embed_dim))) if extra else None
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
    self.blocks = ModuleList([EncoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
    self.head = nnx.Linear(config.embed_dim, num_classes, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    mask = tokens != text_data.PAD
    x = self.embed(tokens)
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[2])), x], axis=1)
      mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    x = self.dropout(x + self.position[: x.shape[1]])
    for block in self.blocks:
      x = block(x, mask)
    if self.cls is not None:
      pooled = x[:, 0]
    else:
      weights = mask[..., None].astype(x.dtype)
      pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return self.head(pooled)


def create_model(config: ClassificationConfig, dataset: text_data.TextDataset, seed: int) -> TransformerClassifier:
  """A freshly initialised classifier for ``dataset``; ``seed`` fixes init and dropout."""
  rngs = nnx.Rngs(params=seed, dropout=seed + 1_000_003)
  return TransformerClassifier(config, dataset.vocab_size, dataset.num_classes, dataset.seq_len, rngs=rngs)

"""SAM's two-way transformer (`sam2.modeling.sam.transformer`), the mask decoder's core.

Prompt tokens and image tokens attend to each other in both directions. Post-norm with
`nn.LayerNorm` eps 1e-5; token sequences are (B, N, C), the image is flattened row-major from
(B, h, w, C), which is the order PyTorch's `flatten(2).permute(0, 2, 1)` gives.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
from flax import nnx

from qsam2_jax.model import layers

LN_EPS = 1e-5  # torch nn.LayerNorm default, used by every norm of the transformer


class Attention(layers.AttentionSlots, nnx.Module):
  """Multi-head attention whose q/k/v project to `embedding_dim // downsample_rate` channels.

  `kv_in_dim` lets keys/values come from a narrower stream (memory attention's 64-d memories).
  """

  def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1,
               kv_in_dim: Optional[int] = None, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
    self.embedding_dim = embedding_dim
    self.internal_dim = embedding_dim // downsample_rate
    self.num_heads = num_heads
    if self.internal_dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide internal dim {self.internal_dim}")
    self.q_proj = layers.Linear(embedding_dim, self.internal_dim, dtype=dtype, rngs=rngs)
    self.k_proj = layers.Linear(kv_in_dim, self.internal_dim, dtype=dtype, rngs=rngs)
    self.v_proj = layers.Linear(kv_in_dim, self.internal_dim, dtype=dtype, rngs=rngs)
    self.out_proj = layers.Linear(self.internal_dim, embedding_dim, dtype=dtype, rngs=rngs)
    self._init_slots()

  def separate_heads(self, x: jax.Array) -> jax.Array:
    """(B, N, C) -> (B, N, heads, C / heads), head-major channels like torch."""
    return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               key_valid: Optional[jax.Array] = None) -> jax.Array:
    """`key_valid` (B, N_k) bool: False keys get zero weight (padding prompt slots)."""
    q = self.separate_heads(self.q_proj(q))
    k = self.separate_heads(self.k_proj(k))
    v = self.separate_heads(self.v_proj(v))
    if key_valid is None:
      out = self._attend(q, k, v)
    else:
      mask = key_valid.astype(bool)[:, None, None, :]
      out = self._attend(q, k, v, key_valid,
                         fast=lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
    return self.out_proj(out.reshape(*out.shape[:-2], self.internal_dim))


class TwoWayAttentionBlock(nnx.Module):
  """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn (post-norm)."""

  def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
               attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False, *,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    d = embedding_dim
    self.self_attn = Attention(d, num_heads, dtype=dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(d, eps=LN_EPS)
    self.cross_attn_token_to_image = Attention(
        d, num_heads, attention_downsample_rate, dtype=dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(d, eps=LN_EPS)
    self.mlp = layers.MLP(d, mlp_dim, d, 2, activation=layers.relu, dtype=dtype, rngs=rngs)
    self.norm3 = layers.LayerNorm(d, eps=LN_EPS)
    self.norm4 = layers.LayerNorm(d, eps=LN_EPS)
    self.cross_attn_image_to_token = Attention(
        d, num_heads, attention_downsample_rate, dtype=dtype, rngs=rngs)
    self.skip_first_layer_pe = skip_first_layer_pe

  def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
               key_pe: jax.Array, token_valid: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array]:
    if self.skip_first_layer_pe:
      # First layer: the queries *are* the prompt PE, so no PE and no residual.
      queries = self.self_attn(queries, queries, queries, key_valid=token_valid)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries, key_valid=token_valid)
    queries = self.norm1(queries)

    q = queries + query_pe
    k = keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

    queries = self.norm3(queries + self.mlp(queries))

    q = queries + query_pe
    k = keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, key_valid=token_valid))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  """`depth` two-way blocks plus a final token->image attention and norm."""

  def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
               mlp_dim: int = 2048, attention_downsample_rate: int = 2, *,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.layers = nnx.List([
        TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                             skip_first_layer_pe=(i == 0), dtype=dtype, rngs=rngs)
        for i in range(depth)])
    self.final_attn_token_to_image = Attention(
        embedding_dim, num_heads, attention_downsample_rate, dtype=dtype, rngs=rngs)
    self.norm_final_attn = layers.LayerNorm(embedding_dim, eps=LN_EPS)

  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
               point_embedding: jax.Array, token_valid: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array]:
    """Runs the transformer.

    Args:
      image_embedding: (B, h, w, C).
      image_pe: (B or 1, h, w, C), broadcast over the batch.
      point_embedding: (B, N, C) tokens; also their own PE.
      token_valid: optional (B, N) bool. Tokens marked False are never attended to, so the
        other outputs equal those of the sequence without them (tokens only influence one
        another as keys); their own outputs are meaningless. Lets a fixed number of prompt
        slots stand for a varying number of prompts.

    Returns:
      (queries (B, N, C), keys (B, h*w, C)).
    """
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
    queries = point_embedding
    for layer in self.layers:
      queries, keys = layer(queries, keys, point_embedding, key_pe, token_valid)
    q = queries + point_embedding
    k = keys + key_pe
    queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
    return queries, keys

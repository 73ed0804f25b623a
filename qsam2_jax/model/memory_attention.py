"""SAM2's memory attention (`sam2.modeling.memory_attention`): conditions the current frame's
features on the memory bank of past frames and object pointers.

Four pre-norm layers (RoPE self-attention, RoPE cross-attention to the 64-d memories, ReLU FFN)
and a final LayerNorm, all `nn.LayerNorm` eps 1e-5. PyTorch is sequence-first; here everything
is batch-first and channels-last: (B, tokens, C).

Memory layout and padding. The memory is `[frame_0 … frame_{S-1}]` (HW tokens each, row-major
like the query grid) followed by `num_obj_ptr_tokens` pointer tokens. Spatial key t is rotated
by RoPE position t mod HW, so every frame slot carries the same positions and the result does
not depend on which slot a frame sits in; pointer tokens are never rotated. The video predictor
can therefore keep a fixed-size bank (one compile per step) and pass `memory_valid` to drop the
empty frame slots and pointer slots from the softmax: the result equals the unpadded call.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.rope import apply_rope, grid_rope_tables

LN_EPS = 1e-5  # torch nn.LayerNorm default
NUM_LAYERS = 4
NUM_HEADS = 1
DIM_FEEDFORWARD = 2048
POS_AT_INPUT_SCALE = 0.1  # `pos_enc_at_input`: x = curr + 0.1 * curr_pos


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     key_valid: Optional[jax.Array]) -> jax.Array:
  """SDPA on (B, L, heads, hd); keys where `key_valid` (B, S) is False get zero weight.

  Without a mask this is `layers.attention`. With one, masked logits are set to a large
  negative number before the float32 softmax, so their weights are exactly 0.
  """
  return layers.attention(q, k, v, key_valid)


class RoPEAttention(layers.AttentionSlots, nnx.Module):
  """`RoPEAttention`: attention whose q and k are rotated by axial RoPE after projection.

  The table follows the query grid (√N×√N). With `rope_k_repeat` (cross-attention to memories)
  keys may span several frames and end with `num_k_exclude_rope` unrotated tokens.
  """

  def __init__(self, embedding_dim: int, num_heads: int, kv_in_dim: Optional[int] = None, *,
               rope_theta: float = 10000.0, rope_k_repeat: bool = False,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
    if embedding_dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide embedding_dim={embedding_dim}")
    self.embedding_dim = embedding_dim
    self.num_heads = num_heads
    self.rope_theta = rope_theta
    self.rope_k_repeat = rope_k_repeat
    self.q_proj = layers.Linear(embedding_dim, embedding_dim, dtype=dtype, rngs=rngs)
    self.k_proj = layers.Linear(kv_in_dim, embedding_dim, dtype=dtype, rngs=rngs)
    self.v_proj = layers.Linear(kv_in_dim, embedding_dim, dtype=dtype, rngs=rngs)
    self.out_proj = layers.Linear(embedding_dim, embedding_dim, dtype=dtype, rngs=rngs)
    self._init_slots()   # q and k slots see the rotated tensors (the matmul's inputs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, num_k_exclude_rope: int = 0,
               key_valid: Optional[jax.Array] = None) -> jax.Array:
    fold_v = self._can_fold_v()
    q = self._heads(self.q_proj(q))
    k = self._heads(self.k_proj(k))
    if fold_v:  # raw memories as values, in v_proj's compute dtype
      v = v[..., None, :].astype(self.v_proj.dtype or v.dtype)
    else:
      v = self._heads(self.v_proj(v))
    if k.shape[1] != q.shape[1] and not self.rope_k_repeat:
      raise ValueError("keys longer than queries need rope_k_repeat=True")
    cos, sin = grid_rope_tables(q.shape[1], q.shape[-1], self.rope_theta)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin, num_exclude=num_k_exclude_rope)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)  # the SDPA wants one dtype
    out = self._attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), key_valid,
                       fast=lambda q, k, v: masked_attention(q, k, v, key_valid))
    out = out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])
    if fold_v:
      out = self.v_proj(out)
    return self.out_proj(out)

  def _can_fold_v(self) -> bool:
    """Whether v_proj may run after the attention instead of before it.

    Softmax rows sum to 1, so P·(M·W + b) = (P·M)·W + b for an affine v_proj: with one head and
    narrower inputs than outputs (the 64-d memories of the cross-attention, 256-d values) the
    P·V product then runs on 64 channels instead of 256, 4× fewer FLOPs in its half of the
    attention. Only for the float layer and identity v / probability slots (a quantized
    v_proj or a slot on v or the probabilities needs the projected values themselves).
    """
    return (self.num_heads == 1 and type(self.v_proj) is layers.Linear
            and self.v_proj.in_features < self.v_proj.out_features
            and layers.active(self.v_quant) is None and layers.active(self.probs_quant) is None)


class MemoryAttentionLayer(nnx.Module):
  """Pre-norm: x += SA(norm1 x); x += CA(norm2 x, memory + pos, memory); x += FFN(norm3 x).

  Position encodings enter only the cross-attention keys (released SAM2 configs).
  """

  def __init__(self, d_model: int, mem_dim: int, dim_feedforward: int = DIM_FEEDFORWARD, *,
               rope_theta: float = 10000.0, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.self_attn = RoPEAttention(d_model, NUM_HEADS, rope_theta=rope_theta, dtype=dtype,
                                   rngs=rngs)
    self.cross_attn_image = RoPEAttention(d_model, NUM_HEADS, mem_dim, rope_theta=rope_theta,
                                          rope_k_repeat=True, dtype=dtype, rngs=rngs)
    self.linear1 = layers.Linear(d_model, dim_feedforward, dtype=dtype, rngs=rngs)
    self.linear2 = layers.Linear(dim_feedforward, d_model, dtype=dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(d_model, eps=LN_EPS)
    self.norm2 = layers.LayerNorm(d_model, eps=LN_EPS)
    self.norm3 = layers.LayerNorm(d_model, eps=LN_EPS)

  def self_attention(self, x: jax.Array) -> jax.Array:
    """x + SA(norm1 x): the half of the layer that does not see the memory."""
    h = self.norm1(x)
    return x + self.self_attn(h, h, h)

  def __call__(self, x: jax.Array, memory: jax.Array, memory_pos: jax.Array, *,
               num_obj_ptr_tokens: int = 0, memory_valid: Optional[jax.Array] = None,
               skip_self_attention: bool = False) -> jax.Array:
    if not skip_self_attention:
      x = self.self_attention(x)
    h = self.norm2(x)
    x = x + self.cross_attn_image(h, memory + memory_pos, memory,
                                  num_k_exclude_rope=num_obj_ptr_tokens, key_valid=memory_valid)
    h = self.norm3(x)
    return x + self.linear2(layers.relu(self.linear1(h)))


class MemoryAttention(nnx.Module):
  """`MemoryAttention` (keys `memory_attention.layers.{0..3}.*`, `memory_attention.norm.*`)."""

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.layers = nnx.List([
        MemoryAttentionLayer(cfg.d_model, cfg.mem_dim, rope_theta=cfg.rope_theta, dtype=dtype,
                             rngs=rngs)
        for _ in range(NUM_LAYERS)])
    self.norm = layers.LayerNorm(cfg.d_model, eps=LN_EPS)

  def frame_start(self, curr: jax.Array, curr_pos: jax.Array) -> jax.Array:
    """The memory-independent start: the input PE and the first layer's self-attention.

    Objects tracked on the same frame share it: compute it once and pass it as `start`
    (the first self-attention is a quarter of the self-attentions, ~7 % of a call with 4
    memory frames).
    """
    return self.layers[0].self_attention(curr + POS_AT_INPUT_SCALE * curr_pos)

  def __call__(self, curr: jax.Array, curr_pos: jax.Array, memory: jax.Array,
               memory_pos: jax.Array, num_obj_ptr_tokens: int = 0,
               memory_valid: Optional[jax.Array] = None,
               start: Optional[jax.Array] = None) -> jax.Array:
    """Conditions the current frame on the memory bank.

    Args:
      curr: (B, HW, d_model) current-frame features, row-major over a square h×w grid (batch
        1: one frame shared by the B memories, its start computed once).
      curr_pos: (B, HW, d_model) their sine position encoding.
      memory: (B, L, mem_dim): S·HW spatial memory tokens, then `num_obj_ptr_tokens` pointer
        tokens (L = S·HW + num_obj_ptr_tokens).
      memory_pos: (B, L, mem_dim) position encodings of the memory tokens.
      num_obj_ptr_tokens: static size of the trailing pointer block (not rotated by RoPE).
        With padding this is the number of pointer *slots*, masked ones included.
      memory_valid: optional (B, L) bool; False marks padding (empty frame or pointer slots),
        which is excluded from the softmax. Padded entries may hold any values, even NaN.
        Every row needs at least one valid key.
      start: optional `frame_start(curr, curr_pos)`, computed once for objects that share the
        frame (batch 1 or B); then curr and curr_pos are not read.

    Returns:
      (B, HW, d_model) memory-conditioned features (after the final LayerNorm).
    """
    if memory_valid is not None:
      keep = memory_valid.astype(bool)[..., None]
      memory = jnp.where(keep, memory, jnp.zeros((), memory.dtype))
      memory_pos = jnp.where(keep, memory_pos, jnp.zeros((), memory_pos.dtype))
    x = self.frame_start(curr, curr_pos) if start is None else start
    if x.shape[0] != memory.shape[0]:
      x = jnp.broadcast_to(x, (memory.shape[0],) + x.shape[1:])
    for i, layer in enumerate(self.layers):
      x = layer(x, memory, memory_pos, num_obj_ptr_tokens=num_obj_ptr_tokens,
                memory_valid=memory_valid, skip_self_attention=i == 0)
    return self.norm(x)

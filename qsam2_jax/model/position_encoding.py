"""SAM2's positional encodings (all parameter-free except the random-Fourier buffer).

The sine encodings depend only on shapes, so they are computed once in numpy float32 (the same
operation order as PyTorch) and enter jitted code as constants.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.model.layers import Buffer


@functools.lru_cache(maxsize=32)
def sine_pe_2d(height: int, width: int, channels: int, temperature: float = 10000.0) -> np.ndarray:
  """`PositionEmbeddingSine(channels, normalize=True)` as an (H, W, C) float32 array.

  Per axis F = C/2 features, sin and cos interleaved; output is concat(pos_y, pos_x).
  """
  f = channels // 2
  scale = np.float32(2 * math.pi)
  eps = np.float32(1e-6)
  y = np.arange(1, height + 1, dtype=np.float32)
  x = np.arange(1, width + 1, dtype=np.float32)
  y = y / (np.float32(height) + eps) * scale
  x = x / (np.float32(width) + eps) * scale
  dim_t = np.arange(f, dtype=np.float32)
  dim_t = np.float32(temperature) ** (np.float32(2) * (dim_t // 2) / np.float32(f))

  def encode(v):
    p = v[:, None] / dim_t
    return np.stack((np.sin(p[:, 0::2]), np.cos(p[:, 1::2])), axis=2).reshape(len(v), f)

  py, px = encode(y), encode(x)
  pos = np.concatenate([
      np.broadcast_to(py[:, None, :], (height, width, f)),
      np.broadcast_to(px[None, :, :], (height, width, f)),
  ], axis=-1)
  return np.ascontiguousarray(pos, dtype=np.float32)


def sine_pe_1d(pos: jax.Array, dim: int, temperature: float = 10000.0) -> jax.Array:
  """`get_1d_sine_pe`: concat(sin, cos) (not interleaved), for object-pointer temporal PEs."""
  half = dim // 2
  dim_t = jnp.arange(half, dtype=jnp.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / half)
  p = pos.astype(jnp.float32)[..., None] / dim_t
  return jnp.concatenate([jnp.sin(p), jnp.cos(p)], axis=-1)


class PositionEmbeddingRandom(nnx.Module):
  """Random-Fourier encoding of the prompt encoder; the Gaussian matrix is a checkpoint buffer."""

  def __init__(self, num_pos_feats: int = 128, *, rngs: nnx.Rngs):
    self.positional_encoding_gaussian_matrix = Buffer(
        jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32))

  def encode(self, coords: jax.Array) -> jax.Array:
    """Encodes points normalized to [0, 1]^2, (..., 2) ordered (x, y) -> (..., 2F)."""
    c = 2.0 * coords.astype(jnp.float32) - 1.0
    c = jnp.matmul(c, self.positional_encoding_gaussian_matrix[...])
    c = 2.0 * np.pi * c
    return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)

  def dense(self, height: int, width: int) -> jax.Array:
    """The (H, W, 2F) grid encoding at cell centres (`get_dense_pe`, channels last)."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return self.encode(grid)

  def encode_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """`forward_with_coords`: pixel coords (..., 2) in an (H, W) input frame."""
    h, w = image_size
    norm = coords.astype(jnp.float32) / jnp.array([w, h], jnp.float32)
    return self.encode(norm)

"""Axial rotary position encoding of SAM2's memory attention (`compute_axial_cis`).

Channel pair k = (2k, 2k+1) of a head is rotated by an angle that depends on the token's grid
position: the first quarter of the head dim pairs by x·f_k, the second by y·f_k, with
f_k = theta^(-4k/dim). PyTorch multiplies complex numbers; here the same rotation is done with
float32 cos/sin tables, so no complex dtype enters jitted code.

Keys may be longer than the query grid (memories of several frames): key t then uses row
t mod N of the table, and a trailing block of keys (object pointers) is left unrotated.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def axial_rope_tables(end_x: int, end_y: int, dim: int,
                      theta: float = 10000.0) -> Tuple[np.ndarray, np.ndarray]:
  """(cos, sin) tables, each (end_x·end_y, dim/2) float32, for a row-major end_y×end_x grid.

  Token t sits at x = t mod end_x, y = t div end_x. Computed in float32 in PyTorch's order.
  """
  if dim % 4:
    raise ValueError(f"axial RoPE needs a head dim divisible by 4, got {dim}")
  exponent = np.arange(0, dim, 4, dtype=np.float32)[: dim // 4] / np.float32(dim)
  freqs = np.float32(1.0) / (np.float32(theta) ** exponent)
  t = np.arange(end_x * end_y)
  t_x = (t % end_x).astype(np.float32)
  t_y = (t // end_x).astype(np.float32)
  angles = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1)
  angles = angles.astype(np.float32)
  return np.cos(angles), np.sin(angles)


def grid_rope_tables(num_tokens: int, dim: int,
                     theta: float = 10000.0) -> Tuple[np.ndarray, np.ndarray]:
  """Tables for a square √N×√N query grid, as `RoPEAttention` rebuilds them for any size."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(f"RoPE needs a square token grid, got {num_tokens} query tokens")
  return axial_rope_tables(side, side, dim, theta)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs of x (..., n, heads, dim) with (n, dim/2) tables."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  re, im = xf[..., 0], xf[..., 1]
  c = cos[:, None, :]  # broadcast over heads
  s = sin[:, None, :]
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *,
               num_exclude: int = 0) -> jax.Array:
  """Applies axial RoPE to x (B, L, heads, dim), tiling the tables over L.

  Args:
    x: queries or keys, batch-first with heads split off.
    cos, sin: (N, dim/2) tables of the query grid (`grid_rope_tables`).
    num_exclude: the last `num_exclude` tokens stay unrotated (object pointers). The
      remaining L − num_exclude tokens must be a whole number of N-token frames; token t
      uses table row t mod N (PyTorch's `repeat_freqs_k`).

  Returns:
    x rotated, same shape and dtype (the rotation itself runs in float32).
  """
  n_tab = cos.shape[0]
  length = x.shape[1]
  n_rot = length - num_exclude
  if num_exclude < 0 or n_rot < 0 or n_rot % n_tab:
    raise ValueError(
        f"RoPE: {length} tokens with {num_exclude} excluded is not a whole number of "
        f"{n_tab}-token frames")
  if n_rot == 0:
    return x
  cos = jnp.asarray(cos, jnp.float32)
  sin = jnp.asarray(sin, jnp.float32)
  b, _, heads, dim = x.shape
  frames = x[:, :n_rot].reshape(b * (n_rot // n_tab), n_tab, heads, dim)
  rotated = _rotate(frames, cos, sin).reshape(b, n_rot, heads, dim)
  if num_exclude == 0:
    return rotated
  return jnp.concatenate([rotated, x[:, n_rot:]], axis=1)

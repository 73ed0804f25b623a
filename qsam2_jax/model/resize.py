"""Exact equivalents of the `torch.nn.functional.interpolate` modes SAM2 uses.

`jax.image.resize` differs from PyTorch (its cubic uses A = -0.5 and renormalises the border
taps; its antialiased borders differ), so every resize here is a pair of separable weight
matrices built once (lru-cached numpy float64, reproducing PyTorch's index rules and its float32
coordinate rounding) and applied as float32 matrix products under `jit`: exact to float rounding
and differentiable. All modes use `align_corners=False`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's Keys cubic coefficient (PIL's antialiased bicubic uses -0.5)


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
  """Half-pixel source coordinates `scale·(i + 0.5) − 0.5` (float32 values), like PyTorch.

  PyTorch computes them in float32 with a fused multiply-add; near 10^3 pixels float64
  coordinates differ by up to ~6e-5, visible at 1e-5 tolerance. The float64 product of the
  float32 scale and i + 0.5 is exact, so one rounding to float32 reproduces the FMA.
  """
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  return (scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)


def _frozen(m: np.ndarray) -> np.ndarray:
  m.flags.writeable = False  # the arrays are cached and shared
  return m


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights of taps (x0-1, x0, x0+1, x0+2) for fractional offsets t, shape (n, 4)."""
  a = _CUBIC_A

  def near(d):  # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 matrix of `interpolate(mode="bicubic", align_corners=False)`.

  Half-pixel source coordinates (not clamped, unlike bilinear), four taps whose indices are
  clamped to the border, so border taps accumulate onto the edge pixels.
  """
  src = _source_coords(n_in, n_out)
  x0 = np.floor(src)
  w = _cubic_weights((src - x0).astype(np.float64))
  idx = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.ravel()), w.ravel())
  return _frozen(m)


def _bilinear_plain(n_in: int, n_out: int) -> np.ndarray:
  src = np.maximum(_source_coords(n_in, n_out), np.float32(0))
  x0 = np.floor(src)
  lam = np.clip(src - x0, np.float32(0), np.float32(1))  # float32, as in PyTorch
  x0 = x0.astype(np.int64)
  x1 = np.where(x0 < n_in - 1, x0 + 1, x0)
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(m, (rows, x0), (np.float32(1) - lam).astype(np.float64))
  np.add.at(m, (rows, x1), lam.astype(np.float64))
  return m


def _bilinear_antialias(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's separable antialiased bilinear (`_upsample_bilinear2d_aa`).

  Output i is centred at scale·(i + 0.5) in input pixels; a triangle filter stretched by the
  scale (support = scale when downsampling, 1 otherwise) is sampled at the input pixel centres
  inside the support and normalised to sum 1, which renormalises the border rows. Computed in
  float32 step by step like PyTorch's kernel (its rounding is visible at 1e-5).
  """
  f = np.float32
  scale = f(n_in) / f(n_out)
  support = scale if scale >= 1.0 else f(1)
  invscale = f(1) / scale if scale >= 1.0 else f(1)
  max_taps = int(math.ceil(support)) * 2 + 1
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (f(i) + f(0.5))
    xmin = max(int(center - support + f(0.5)), 0)  # int() truncates toward zero, like C++
    xsize = min(int(center + support + f(0.5)), n_in) - xmin
    xsize = min(max(xsize, 0), max_taps)
    j = np.arange(xmin, xmin + xsize)
    w = np.maximum(f(0), f(1) - np.abs((j.astype(f) - center + f(0.5)) * invscale))
    total = f(0)
    for wj in w:  # sequential float32 sum
      total = f(total + wj)
    if total != 0:
      w = w / total
    m[i, j] = w.astype(np.float64)
  return m


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """(n_out, n_in) float64 matrix of `interpolate(mode="bilinear", align_corners=False)`.

  Plain: half-pixel coordinates with negative sources clamped to 0, two taps. Antialiased:
  see `_bilinear_antialias` (on upsampled axes it reduces to the plain weights).
  """
  m = _bilinear_antialias(n_in, n_out) if antialias else _bilinear_plain(n_in, n_out)
  return _frozen(m)


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear",
                  antialias: bool = False) -> np.ndarray:
  """The (n_out, n_in) weights of one axis for `mode` in {"bilinear", "bicubic"}."""
  if mode == "bilinear":
    return bilinear_matrix(n_in, n_out, antialias)
  if mode == "bicubic":
    if antialias:
      raise ValueError("antialiased bicubic is not implemented (SAM2 never uses it)")
    return bicubic_matrix(n_in, n_out)
  raise ValueError(f"unknown resize mode {mode!r}; expected 'bilinear' or 'bicubic'")


def _apply(x: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  letters = "abcdefghijklmnopqrstuvwxyz"
  src = letters[: x.ndim]
  dst = src[:axis] + "Z" + src[axis + 1:]
  return jnp.einsum(f"Z{src[axis]},{src}->{dst}", jnp.asarray(m, jnp.float32), x,
                    precision=jax.lax.Precision.HIGHEST)


def resize_2d(x: jax.Array, out_hw: Sequence[int], *, axes: Tuple[int, int] = (-2, -1),
              mode: str = "bilinear", antialias: bool = False) -> jax.Array:
  """Resizes two axes of `x` to `out_hw` like `F.interpolate(..., align_corners=False)`.

  Args:
    x: any array; masks are (B, M, H, W) with the default axes, NHWC images use (-3, -2).
    out_hw: output sizes of the two axes.
    axes: the (height, width) axes.
    mode: "bilinear" or "bicubic".
    antialias: torch's `antialias=True` (bilinear only).

  Returns:
    The resized array, in `x`'s dtype for floating inputs and float32 otherwise. The products run
    in float32 at highest precision (TF32/bf16 passes would cost ~1e-3 relative error).
  """
  ax = [a % x.ndim for a in axes]
  if ax[0] == ax[1]:
    raise ValueError(f"resize_2d needs two distinct axes, got {axes}")
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  y = x.astype(jnp.float32)
  mats = [(a, resize_matrix(x.shape[a], int(n), mode, antialias)) for a, n in zip(ax, out_hw)]
  mats = [(a, m) for a, m in mats if m.shape[0] != m.shape[1]]  # equal size: torch copies
  # Contract the axis that shrinks the intermediate most first (fewer FLOPs, same result).
  mats.sort(key=lambda am: am[1].shape[0] / am[1].shape[1])
  for a, m in mats:
    y = _apply(y, m, a)
  return y.astype(out_dtype)

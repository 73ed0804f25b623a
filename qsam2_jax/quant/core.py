"""Uniform fake quantization: the one bound convention, the STE and the range searches.

Bound convention (the same function serves training, evaluation and export):

  A quantized group (a whole tensor, a channel or a token) has a real range [lo, hi] and
  n = `num_steps(bits)` steps. Its levels are `lo + s * u` for the integer codes u = 0 .. n,
  with the step s = (hi - lo) / n, so lo and hi are themselves the outermost levels:

      u     = round_half_even(clip((x - lo) / s, 0, n))        (`quantize`)
      x_hat = lo + s * u                                        (`dequantize`)

  n = 2^b - 1 (2^b levels) except on the "restricted" symmetric grid, n = 2^b - 2. So a
  symmetric range [-a, a] on the full grid has the levels (k + 1/2) s, k = -2^(b-1) .. 2^(b-1)-1
  (2 bits: -a, -a/3, a/3, a; zero is not a level), and on the restricted grid k s,
  k = -(2^(b-1)-1) .. 2^(b-1)-1 (zero is a level). Codes are stored unsigned (u); the signed
  code of a symmetric grid is u - 2^(b-1). The zero point is the real number lo (not rounded
  to the grid). 16 bits means no quantization at all (exact identity).

Rounding is `jnp.round` (half to even, like numpy and torch). All quantizer math is float32.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

sg = jax.lax.stop_gradient

PASSTHROUGH_BITS = 16
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, PASSTHROUGH_BITS)
# Smallest step, so that a constant group (a dead channel, zero padding) quantizes to itself
# instead of dividing by zero.
MIN_STEP = 1e-12
# MSE-optimal symmetric clip of a unit Gaussian for a uniform quantizer (Banner et al., ACIQ),
# the fallback init of LSC factors when no calibration batch was seen.
GAUSSIAN_CLIP = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92}


def check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS} (16 = float passthrough), got {bits}")


def num_steps(bits: int, restricted: bool = False) -> int:
  """n, the number of steps between the outermost levels (codes run 0 .. n)."""
  check_bits(bits)
  return 2 ** bits - (2 if restricted else 1)


def ste_round(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward; `x - sg(x)` is exactly 0, so the value is round(x)."""
  return x - sg(x) + sg(jnp.round(x))


def scale_grad(x: jax.Array, g) -> jax.Array:
  """x forward (bit-exact), gradient multiplied by g (LSQ's gradient scale)."""
  return sg(x) + (x * g - sg(x * g))


def step_size(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
  return jnp.maximum((hi - lo) / n, MIN_STEP)


def quantize(x: jax.Array, lo: jax.Array, scale: jax.Array, n: int) -> jax.Array:
  """Integer codes 0..n as float32 (no gradient path); see the module docstring."""
  return jnp.round(jnp.clip((x - lo) / scale, 0, n))


def dequantize(codes: jax.Array, lo: jax.Array, scale: jax.Array) -> jax.Array:
  """lo + scale * codes: shared by the fake-quant forward and export, hence bit-identical.

  Bit-identical when both sides run the same way: compiled (XLA contracts lo + scale * u
  into one FMA) or both eager / numpy (rounded product, then sum); across the two they can
  differ in the last bit.
  """
  return lo + scale * jnp.asarray(codes, jnp.float32)


def fake_quant(x: jax.Array, lo: jax.Array, scale: jax.Array, n: int) -> jax.Array:
  """Quantize-dequantize with the STE on the rounding only.

  The clip keeps its natural gradient (zero outside [lo, hi]), so lo and scale get the LSQ /
  LSQ+ gradients by autodiff: d/dscale = round(v) - v inside, the clipped code outside.
  """
  v = jnp.clip((x - lo) / scale, 0, n)
  return dequantize(ste_round(v), lo, scale)


def fake_quant_range(x: jax.Array, lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
  return fake_quant(x, lo, step_size(lo, hi, n), n)


# ---------------------------------------------------------------------------- statistics


def reduce_axes(ndim: int, granularity: str, channel_axis: int = -1) -> Tuple[int, ...]:
  """Axes reduced to one statistic per group: all (tensor), all but one (channel), last (token)."""
  if granularity == "per_tensor":
    return tuple(range(ndim))
  if granularity == "per_channel":
    c = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != c)
  if granularity == "per_token":
    return (ndim - 1,)
  raise ValueError(f"unknown granularity {granularity!r}")


def moments(x: jax.Array, axes: Sequence[int]) -> Tuple[jax.Array, jax.Array]:
  """Mean and std (two-pass, float32, keepdims), without gradient."""
  x = sg(x).astype(jnp.float32)
  mu = jnp.mean(x, axis=tuple(axes), keepdims=True)
  sd = jnp.sqrt(jnp.mean(jnp.square(x - mu), axis=tuple(axes), keepdims=True))
  return mu, sd


def min_max(x: jax.Array, axes: Sequence[int]) -> Tuple[jax.Array, jax.Array]:
  x = sg(x).astype(jnp.float32)
  return (jnp.min(x, axis=tuple(axes), keepdims=True),
          jnp.max(x, axis=tuple(axes), keepdims=True))


def clip_grid(num: int) -> np.ndarray:
  """Shrink factors t searched by the MSE range search: geometric from 0.01 to 1.

  Geometric spacing keeps the relative resolution (7.6 % at 64 points) where heavy-tailed
  tensors have their optimum, a few percent of the maximum.
  """
  return np.geomspace(0.01, 1.0, num).astype(np.float32)


def _sq_err(x, lo, hi, n, axes):
  scale = step_size(lo, hi, n)
  q = dequantize(quantize(x, lo, scale, n), lo, scale)
  return jnp.sum(jnp.square(q - x), axis=tuple(axes), keepdims=True)


def search_range(x: jax.Array, make_bounds, n: int, axes: Sequence[int], grid: jax.Array
                 ) -> Tuple[jax.Array, jax.Array]:
  """The bounds `make_bounds(t) -> (lo, hi)` of least squared error over t in `grid`, per group.

  One pass per candidate (`lax.map`), so memory stays at one tensor whatever the grid size.
  """
  errs = jax.lax.map(lambda t: _sq_err(x, *make_bounds(t), n, axes), grid)   # (K, *group)
  return make_bounds(grid[jnp.argmin(errs, axis=0)])


def mse_range(x: jax.Array, lo: jax.Array, hi: jax.Array, center: jax.Array, n: int,
              axes: Sequence[int], num_points: int = 64, refine: bool = False
              ) -> Tuple[jax.Array, jax.Array]:
  """MSE-optimal clipping range inside [lo, hi] (keepdims groups), without gradient.

  Both bounds shrink towards `center` by one factor t from `clip_grid`. With `refine`
  (asymmetric tensors), the upper and then the lower bound are searched again on the same grid
  with the other bound held, which can only lower the error.
  """
  x = sg(x).astype(jnp.float32)
  lo, hi, c = sg(lo), sg(hi), sg(center)
  grid = jnp.asarray(clip_grid(num_points))
  lo1, hi1 = search_range(x, lambda t: (c + t * (lo - c), c + t * (hi - c)), n, axes, grid)
  if not refine:
    return lo1, hi1
  _, hi2 = search_range(x, lambda t: (lo1, c + t * (hi - c)), n, axes, grid)
  lo2, _ = search_range(x, lambda t: (c + t * (lo - c), hi2), n, axes, grid)
  return lo2, hi2


@functools.partial(jax.jit, static_argnames=("bits", "axis", "num_points", "restricted"))
def mse_quantize_symmetric(w: jax.Array, bits: int, axis: Optional[int] = -1,
                           num_points: int = 64, restricted: bool = False) -> jax.Array:
  """Q(w) with a symmetric, MSE-clipped range per channel along `axis` (None: per tensor).

  The weight quantizer VRC's auto-lambda measures against, and the `mse` weight method.
  """
  w = w.astype(jnp.float32)
  axes = tuple(range(w.ndim)) if axis is None else reduce_axes(w.ndim, "per_channel", axis)
  n = num_steps(bits, restricted)
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  lo, hi = mse_range(w, -amax, amax, jnp.zeros_like(amax), n, axes, num_points)
  scale = step_size(lo, hi, n)
  return dequantize(quantize(w, lo, scale, n), lo, scale)

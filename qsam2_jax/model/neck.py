"""SAM2's FPN neck (`sam2.modeling.backbones.image_encoder.FpnNeck`), channels last."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.position_encoding import sine_pe_2d


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """`F.interpolate(scale_factor=2, mode="nearest")` on NHWC: each pixel repeated 2×2."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class _Lateral(nnx.Module):
  """PyTorch's `nn.Sequential(conv=Conv2d(C, d_model, 1))`: keys `convs.k.conv.*`."""

  def __init__(self, in_dim: int, d_model: int, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.conv = layers.Conv(in_dim, d_model, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class FpnNeck(nnx.Module):
  """1×1 laterals to d_model, nearest ×2 top-down fusion on `fpn_top_down_levels`, sine PEs.

  `convs` follow `backbone_channel_list` (lowest resolution first), so `convs[0]` acts on the
  last trunk stage. Fused levels are computed in float32 like PyTorch (which casts the top-down
  path to float32 even under autocast); lateral-only levels stay in the compute dtype.
  """

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.d_model = cfg.d_model
    self.fpn_top_down_levels = tuple(cfg.fpn_top_down_levels)
    self.convs = nnx.List([_Lateral(c, cfg.d_model, dtype=dtype, rngs=rngs)
                           for c in cfg.hiera.backbone_channel_list])

  def __call__(self, xs: Sequence[jax.Array]) -> Tuple[List[jax.Array], List[jax.Array]]:
    """Trunk stages NHWC, highest resolution first -> (features, position encodings), same order."""
    n = len(self.convs) - 1
    if len(xs) != n + 1:
      raise ValueError(f"FpnNeck expects {n + 1} trunk stages, got {len(xs)}")
    out: List[jax.Array] = [None] * (n + 1)
    pos: List[jax.Array] = [None] * (n + 1)
    prev = None
    for i in range(n, -1, -1):  # top-down: lowest resolution first
      lateral = self.convs[n - i](xs[i])
      if i in self.fpn_top_down_levels and prev is not None:
        prev = lateral.astype(jnp.float32) + upsample_nearest_2x(prev.astype(jnp.float32))
      else:
        prev = lateral
      out[i] = prev
      b, h, w, _ = prev.shape
      pe = jnp.asarray(sine_pe_2d(h, w, self.d_model), prev.dtype)
      pos[i] = jnp.broadcast_to(pe[None], (b, h, w, self.d_model))
    return out, pos

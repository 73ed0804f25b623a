"""SAM2's memory encoder (`sam2.modeling.memory_encoder`): fuses a frame's features with its
predicted mask into the 64-d memory stored in the bank.

`out_proj(fuser(pix_feat_proj(feat) + mask_downsampler(mask)))` plus a 64-channel sine PE.
NHWC throughout; every LayerNorm2d is a channels-last LayerNorm with eps 1e-6 and GELU is exact.
`fuser.proj` is an `nn.Identity` in PyTorch (no parameters), so it has no counterpart here.
"""

from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.position_encoding import sine_pe_2d

LN2D_EPS = 1e-6
CX_KERNEL = 7
CX_PADDING = 3
NUM_FUSER_LAYERS = 2


class MaskDownSampler(nnx.Module):
  """`MaskDownSampler(kernel_size=3, stride=2, padding=1)`: mask (image_size²) -> embedding grid.

  `encoder` slots 3i / 3i+1 / 3i+2 are Conv(k3, s2, p1) / LayerNorm2d / GELU, channels ×4 per
  stage, then a final 1×1 Conv to `embed_dim`. log2(total_stride) stages: 4 for stride 16.
  """

  def __init__(self, embed_dim: int = 256, total_stride: int = 16, *,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    num_stages = int(round(math.log2(total_stride)))
    if 2**num_stages != total_stride:
      raise ValueError(f"total_stride must be a power of 2, got {total_stride}")
    slots = []
    c_in = 1
    for _ in range(num_stages):
      c_out = c_in * 4
      slots += [layers.Conv(c_in, c_out, 3, stride=2, padding=1, dtype=dtype, rngs=rngs),
                layers.LayerNorm(c_out, eps=LN2D_EPS),
                layers.Activation(layers.gelu)]
      c_in = c_out
    slots.append(layers.Conv(c_in, embed_dim, 1, dtype=dtype, rngs=rngs))
    self.encoder = layers.Sequential(slots)

  def __call__(self, mask: jax.Array) -> jax.Array:
    """(B, H, W, 1) -> (B, H/stride, W/stride, embed_dim)."""
    return self.encoder(mask)


class CXBlock(nnx.Module):
  """ConvNeXt block: depthwise 7×7 -> LN2d -> Linear ×4 -> GELU -> Linear -> ·gamma, residual."""

  def __init__(self, dim: int, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.dwconv = layers.Conv(dim, dim, CX_KERNEL, padding=CX_PADDING, groups=dim, dtype=dtype,
                              rngs=rngs)
    self.norm = layers.LayerNorm(dim, eps=LN2D_EPS)
    self.pwconv1 = layers.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.pwconv2 = layers.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32))  # torch's layer-scale init

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.pwconv2(layers.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
    return x + self.gamma[...].astype(h.dtype) * h


class Fuser(nnx.Module):
  """A stack of CXBlocks (`fuser.layers.{i}`)."""

  def __init__(self, dim: int, num_layers: int, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.layers = nnx.List([CXBlock(dim, dtype=dtype, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class MemoryEncoder(nnx.Module):
  """`MemoryEncoder` (keys `memory_encoder.{mask_downsampler,pix_feat_proj,fuser,out_proj}.*`)."""

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    d, m = cfg.d_model, cfg.mem_dim
    self.mask_downsampler = MaskDownSampler(d, cfg.backbone_stride, dtype=dtype, rngs=rngs)
    self.pix_feat_proj = layers.Conv(d, d, 1, dtype=dtype, rngs=rngs)
    self.fuser = Fuser(d, NUM_FUSER_LAYERS, dtype=dtype, rngs=rngs)
    self.out_proj = layers.Conv(d, m, 1, dtype=dtype, rngs=rngs)
    self.mem_dim = m

  def __call__(self, pix_feat: jax.Array, masks: jax.Array,
               skip_mask_sigmoid: bool = False) -> Dict[str, object]:
    """Encodes one memory per batch item.

    Args:
      pix_feat: (B, h, w, d_model) raw (not memory-conditioned) lowest FPN level.
      masks: (B, H, W) mask logits at the image size (H = 16·h), or, with
        `skip_mask_sigmoid=True`, values already mapped by the caller (SAM2Base passes
        sigmoid·20 − 10).
      skip_mask_sigmoid: static; False applies a float32 sigmoid first.

    Returns:
      {"vision_features": (B, h, w, mem_dim), "vision_pos_enc": [(B, h, w, mem_dim) sine PE]}.
    """
    m = masks[..., None]
    if not skip_mask_sigmoid:
      m = jax.nn.sigmoid(m.astype(jnp.float32)).astype(masks.dtype)
    m = self.mask_downsampler(m)
    x = self.pix_feat_proj(pix_feat) + m
    x = self.out_proj(self.fuser(x))
    h, w = x.shape[1:3]
    pos = jnp.broadcast_to(jnp.asarray(sine_pe_2d(h, w, self.mem_dim), x.dtype), x.shape)
    return {"vision_features": x, "vision_pos_enc": [pos]}

"""Hiera trunk of SAM2 (`sam2.modeling.backbones.hieradet.Hiera`), channels last.

Everything stays NHWC. Windows are cut by pad + reshape + transpose (no gathers, no Python loop
over windows) and attention runs on (B·windows, L, heads, head_dim) through `layers.attention`,
so XLA can fuse the layout changes into the neighbouring norms and matmuls and the attention
backend (cuDNN flash attention on GPU) sees one batched call per block.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import HieraConfig
from qsam2_jax.model.resize import bicubic_matrix

_LN_EPS = 1e-6


def max_pool(x: jax.Array, stride: Tuple[int, int]) -> jax.Array:
  """`nn.MaxPool2d(kernel=stride, stride=stride, ceil_mode=False)` on (N, H, W, C)."""
  n, h, w, c = x.shape
  sh, sw = stride
  ho, wo = h // sh, w // sw
  x = x[:, : ho * sh, : wo * sw]
  return jnp.max(x.reshape(n, ho, sh, wo, sw, c), axis=(2, 4))


def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
  """(B, H, W, C) -> (B·nh·nw, window, window, C) windows, zero padded bottom/right.

  The padding is not masked later: pad tokens are real keys and values, as in PyTorch.
  Returns the windows and the window grid (nh, nw).
  """
  b, h, w, c = x.shape
  nh, nw = -(-h // window), -(-w // window)
  pad_h, pad_w = nh * window - h, nw * window - w
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, window, window, c), (nh, nw)


def window_unpartition(windows: jax.Array, grid: Tuple[int, int], hw: Tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: (B·nh·nw, ws, ws, C) -> (B, H, W, C), padding cropped."""
  nh, nw = grid
  _, ws, _, c = windows.shape
  x = windows.reshape(-1, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(-1, nh * ws, nw * ws, c)
  h, w = hw
  if nh * ws != h or nw * ws != w:
    x = x[:, :h, :w]
  return x


class PatchEmbed(nnx.Module):
  """Conv(3→E, k7, s4, p3); NHWC in and out (PyTorch permutes to NHWC after the conv)."""

  def __init__(self, embed_dim: int, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.proj = layers.Conv(3, embed_dim, 7, stride=4, padding=3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class MultiScaleAttention(layers.AttentionSlots, nnx.Module):
  """Attention inside windows, with optional max pooling of q (the stage-change downsampling)."""

  def __init__(self, dim: int, dim_out: int, num_heads: int,
               q_stride: Optional[Tuple[int, int]] = None, *, dtype: layers.Dtype = None,
               rngs: nnx.Rngs):
    self.dim_out = dim_out
    self.num_heads = num_heads
    self.q_stride = q_stride
    self.qkv = layers.Linear(dim, 3 * dim_out, dtype=dtype, rngs=rngs)
    self.proj = layers.Linear(dim_out, dim_out, dtype=dtype, rngs=rngs)
    self._init_slots()

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, h, w, dim) windows -> (N, h', w', dim_out), h' = h / q_stride on pooling blocks."""
    n, h, w, _ = x.shape
    heads = self.num_heads
    # The 3 is the outer split and heads are head-major, as in PyTorch's reshape.
    qkv = self.qkv(x).reshape(n, h * w, 3, heads, self.dim_out // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_stride:
      q = max_pool(q.reshape(n, h, w, self.dim_out), self.q_stride)
      h, w = q.shape[1:3]
      q = q.reshape(n, h * w, heads, -1)
    out = self._attend(q, k, v)
    return self.proj(out.reshape(n, h, w, self.dim_out))


class MultiScaleBlock(nnx.Module):
  """Pre-norm Hiera block: (pooled) window attention then an exact-GELU MLP, both residual."""

  def __init__(self, dim: int, dim_out: int, num_heads: int, *, mlp_ratio: float = 4.0,
               q_stride: Optional[Tuple[int, int]] = None, window_size: int = 0,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.dim = dim
    self.dim_out = dim_out
    self.window_size = window_size
    self.q_stride = tuple(q_stride) if q_stride else None
    self.norm1 = layers.LayerNorm(dim, eps=_LN_EPS)
    self.attn = MultiScaleAttention(dim, dim_out, num_heads, self.q_stride, dtype=dtype,
                                    rngs=rngs)
    self.norm2 = layers.LayerNorm(dim_out, eps=_LN_EPS)
    self.mlp = layers.MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2,
                          activation=layers.gelu, dtype=dtype, rngs=rngs)
    if dim != dim_out:
      self.proj = layers.Linear(dim, dim_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x
    x = self.norm1(x)
    if self.dim != self.dim_out:
      # Stage change: the residual is projected from the normalised map and pooled on the full,
      # unwindowed map (not per window).
      shortcut = self.proj(x)
      if self.q_stride:
        shortcut = max_pool(shortcut, self.q_stride)
    if self.window_size > 0:
      x, grid = window_partition(x, self.window_size)
      x = self.attn(x)
      x = window_unpartition(x, grid, shortcut.shape[1:3])
    else:
      x = self.attn(x)
    x = shortcut + x.astype(shortcut.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


def block_specs(cfg: HieraConfig) -> List[dict]:
  """Per-block (dim, dim_out, num_heads, q_stride, window_size) exactly as PyTorch builds them.

  The window size lags a block behind the stage: a stage's first (pooling) block still uses the
  previous stage's window. Global-attention blocks get window 0.
  """
  specs, dim, heads, stage = [], cfg.embed_dim, cfg.num_heads, 1
  stage_ends, q_pool_blocks = cfg.stage_ends, cfg.q_pool_blocks
  for i in range(cfg.depth):
    dim_out = dim
    window = 0 if i in cfg.global_att_blocks else cfg.window_spec[stage - 1]
    if i - 1 in stage_ends:
      dim_out, heads, stage = 2 * dim, 2 * heads, stage + 1
    specs.append(dict(dim=dim, dim_out=dim_out, num_heads=heads, window_size=window,
                      q_stride=tuple(cfg.q_stride) if i in q_pool_blocks else None))
    dim = dim_out
  return specs


@nnx.remat
def _remat_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  return block(x)


def set_remat(model: nnx.Module, on: bool = True) -> nnx.Module:
  """Switch block rematerialization of every Hiera trunk in `model` (see `Hiera`)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Hiera):
      node.remat = on
  return model


class Hiera(nnx.Module):
  """Hierarchical ViT trunk; returns the four stage outputs NHWC, highest resolution first.

  `pos_embed` (1, bh, bw, E) and `pos_embed_window` (1, w0, w0, E) are stored NHWC (PyTorch
  NCHW). The background table is resized bicubically (PyTorch's exact weights) to the patch grid
  and the window table tiled over it, so any input size whose patch grid is a multiple of w0
  works (image_size a multiple of 32 with the released window specs).

  `remat` (a plain attribute, off by default; `set_remat`): each block's internals are
  recomputed in the backward pass instead of stored, so training holds only the block
  boundaries of every frame. Values are unchanged.
  """

  def __init__(self, cfg: HieraConfig, image_size: int = 1024, *, dtype: layers.Dtype = None,
               rngs: nnx.Rngs):
    self.image_size = image_size
    self.dtype = dtype
    self.remat = False
    self.stage_ends = tuple(cfg.stage_ends)
    grid = image_size // 4
    if image_size % 4 or grid % cfg.window_spec[0]:
      raise ValueError(f"image_size {image_size}: the patch grid ({grid}) must be a multiple of "
                       f"the first window ({cfg.window_spec[0]})")
    e = cfg.embed_dim
    self.patch_embed = PatchEmbed(e, dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((1, *cfg.window_pos_embed_bkg_spatial_size, e)))
    w0 = cfg.window_spec[0]
    self.pos_embed_window = nnx.Param(jnp.zeros((1, w0, w0, e)))
    self.blocks = nnx.List([
        MultiScaleBlock(mlp_ratio=cfg.mlp_ratio, dtype=dtype, rngs=rngs, **spec)
        for spec in block_specs(cfg)])

  def _pos_embed(self, h: int, w: int) -> jax.Array:
    """(1, h, w, E) float32: bicubic(pos_embed → h×w) + tiled pos_embed_window."""
    table = self.pos_embed[...]
    mh = jnp.asarray(bicubic_matrix(table.shape[1], h), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(table.shape[2], w), jnp.float32)
    pos = jnp.einsum("yi,bijc,xj->byxc", mh, table, mw, precision=jax.lax.Precision.HIGHEST)
    win = self.pos_embed_window[...]
    wh, ww = win.shape[1:3]
    if h % wh or w % ww:
      raise ValueError(f"patch grid {h}x{w} is not a multiple of the window table {wh}x{ww}; "
                       "use an image size that is a multiple of 32")
    return pos + jnp.tile(win, (1, h // wh, w // ww, 1))

  def __call__(self, x: jax.Array) -> List[jax.Array]:
    """(B, H, W, 3) normalised image -> [(B, H/4, W/4, E), …, (B, H/32, W/32, 8E)]."""
    x = self.patch_embed(x)
    pos = self._pos_embed(x.shape[1], x.shape[2])
    # The residual stream runs in the compute dtype; the sum with the table in float32.
    x = (x.astype(jnp.float32) + pos).astype(self.dtype or jnp.float32)
    outputs = []
    for i, blk in enumerate(self.blocks):
      x = _remat_block(blk, x) if self.remat else blk(x)
      if i in self.stage_ends:
        outputs.append(x)
    return outputs

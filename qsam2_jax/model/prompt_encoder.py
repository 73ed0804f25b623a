"""SAM2's prompt encoder (`sam2.modeling.sam.prompt_encoder.PromptEncoder`), channels last.

Points and box corners become sparse tokens (random-Fourier PE of the pixel centre plus a learned
label embedding); a low-res mask logit map becomes the dense embedding, or the learned
`no_mask_embed` is broadcast when there is none. Labels may contain -1 pads, so prompts of
different lengths can share one static batch shape under `jit`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.position_encoding import PositionEmbeddingRandom

NUM_POINT_EMBEDDINGS = 4  # negative click, positive click, box top-left, box bottom-right


class PromptEncoder(nnx.Module):
  """Encodes clicks, boxes and mask prompts for the mask decoder.

  Coordinates are pixels in the model-input frame (`cfg.image_size` square); the dense outputs
  live on the `cfg.image_embedding_size` grid.
  """

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    dim = cfg.d_model
    mask_in_chans = 16
    self.embed_dim = dim
    self.input_image_size = (cfg.image_size, cfg.image_size)
    self.image_embedding_size = (cfg.image_embedding_size, cfg.image_embedding_size)
    self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
    self.dtype = dtype
    self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
    self.point_embeddings = nnx.List(
        [layers.Embedding(1, dim, rngs=rngs) for _ in range(NUM_POINT_EMBEDDINGS)])
    self.not_a_point_embed = layers.Embedding(1, dim, rngs=rngs)
    self.no_mask_embed = layers.Embedding(1, dim, rngs=rngs)
    self.mask_downscaling = layers.Sequential([
        layers.Conv(1, mask_in_chans // 4, 2, stride=2, dtype=dtype, rngs=rngs),
        layers.LayerNorm(mask_in_chans // 4, eps=1e-6),
        layers.Activation(layers.gelu),
        layers.Conv(mask_in_chans // 4, mask_in_chans, 2, stride=2, dtype=dtype, rngs=rngs),
        layers.LayerNorm(mask_in_chans, eps=1e-6),
        layers.Activation(layers.gelu),
        layers.Conv(mask_in_chans, dim, 1, dtype=dtype, rngs=rngs),
    ])

  def get_dense_pe(self) -> jax.Array:
    """The PE of every image-embedding cell, (1, h, w, C): the decoder's key PE."""
    return self.pe_layer.dense(*self.image_embedding_size)[None]

  def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    coords = coords.astype(jnp.float32) + 0.5  # pixel centre
    labels = labels.astype(jnp.int32)
    if pad:
      # Without a box SAM appends one not-a-point token (it was trained that way).
      b = coords.shape[0]
      coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), coords.dtype)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
    pe = self.pe_layer.encode_coords(coords, self.input_image_size)
    lab = labels[..., None]
    # Same order of operations as torch: -1 replaces the PE; 0..3 add their embedding.
    out = jnp.where(lab == -1, jnp.zeros_like(pe) + self.not_a_point_embed()[0], pe)
    for i, emb in enumerate(self.point_embeddings):
      out = jnp.where(lab == i, out + emb()[0], out)
    return out

  def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
    corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
    pe = self.pe_layer.encode_coords(corners, self.input_image_size)
    corner_embed = jnp.concatenate([self.point_embeddings[2](), self.point_embeddings[3]()], 0)
    return pe + corner_embed

  def __call__(self, points: Optional[Tuple[jax.Array, jax.Array]] = None,
               boxes: Optional[jax.Array] = None,
               masks: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Embeds the prompts.

    Args:
      points: (coords (B, N, 2) float (x, y) pixels, labels (B, N) int in {-1, 0, 1, 2, 3}).
      boxes: (B, 4) as (x0, y0, x1, y1) pixels.
      masks: (B, 4h, 4w) or (B, 4h, 4w, 1) mask logits.

    Returns:
      sparse (B, N', C) float32 (N' = N + 1 pad without boxes, + 2 per box) and dense
      (B, h, w, C) channels last.
    """
    if points is not None:
      bs = points[0].shape[0]
    elif boxes is not None:
      bs = boxes.shape[0]
    elif masks is not None:
      bs = masks.shape[0]
    else:
      bs = 1
    sparse = [jnp.zeros((bs, 0, self.embed_dim), jnp.float32)]
    if points is not None:
      sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
    if boxes is not None:
      sparse.append(self._embed_boxes(boxes))
    sparse = jnp.concatenate(sparse, axis=1)

    if masks is not None:
      if masks.ndim == 3:
        masks = masks[..., None]
      dense = self.mask_downscaling(masks)
    else:
      h, w = self.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed()[0], (bs, h, w, self.embed_dim))
    return sparse, dense

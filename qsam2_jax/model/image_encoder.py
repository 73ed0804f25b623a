"""SAM2 image encoder: Hiera trunk + FPN neck, minus the `scalp` lowest-resolution levels."""

from __future__ import annotations

from typing import Dict

import jax
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.hiera import Hiera
from qsam2_jax.model.neck import FpnNeck


class ImageEncoder(nnx.Module):
  """`sam2.modeling.backbones.image_encoder.ImageEncoder`, channels last.

  Keys mirror PyTorch: `trunk.*` and `neck.*` (prefix `image_encoder.` in a SAM2 state dict).
  """

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.scalp = cfg.scalp
    self.trunk = Hiera(cfg.hiera, cfg.image_size, dtype=dtype, rngs=rngs)
    self.neck = FpnNeck(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> Dict[str, object]:
    """Encodes a normalised image batch.

    Args:
      x: (B, S, S, 3) image, already resized and mean/std normalised, NHWC.

    Returns:
      dict with `backbone_fpn` and `vision_pos_enc`: lists of (B, h, w, 256) levels, highest
      resolution first (S/4, S/8, S/16 with scalp=1), and `vision_features` = the last (S/16)
      level.
    """
    features, pos = self.neck(self.trunk(x))
    if self.scalp > 0:
      features, pos = features[: -self.scalp], pos[: -self.scalp]
    return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}

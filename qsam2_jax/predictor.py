"""`ImagePredictor`: the `SAM2ImagePredictor` API on the Flax model, jitted end to end.

Pre-processing (antialiased bilinear resize to the model size, ImageNet normalisation) and
post-processing (bilinear upsampling of the low-res logits to the original size) run inside the
same jitted functions as the model, so repeated calls with the same shapes never recompile.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.checkpoint import load_sam2
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.resize import resize_2d
from qsam2_jax.model.sam2 import SAM2Base
from qsam2_jax.parallel import commit_to_device
from qsam2_jax.prompt_checks import PromptError, check_boxes, check_finite, check_image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: jax.Array, size: int) -> jax.Array:
  """uint8 (H, W, 3) -> normalized (size, size, 3) float32, as `SAM2Transforms` (torch path)."""
  x = image.astype(jnp.float32) / 255.0
  x = resize_2d(x, (size, size), axes=(0, 1), mode="bilinear", antialias=True)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Accepts HxWx3 uint8 RGB arrays or PIL images; converts grayscale and RGBA; else raises."""
  try:
    from PIL import Image
    if isinstance(image, Image.Image):
      return np.asarray(image.convert("RGB"))
  except ImportError:  # pragma: no cover - pillow is a dependency
    pass
  if not isinstance(image, np.ndarray):
    raise PromptError(f"set_image expects an HxWx3 uint8 numpy array or a PIL image, got "
                      f"{type(image).__name__}")
  if image.dtype != np.uint8:
    raise PromptError(f"set_image expects uint8 pixel values in [0, 255], got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise PromptError(f"set_image expects an image of shape HxW, HxWx1, HxWx3 or HxWx4, got "
                      f"shape {image.shape}")
  check_image_size(image.shape[0], image.shape[1])
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


class ImagePredictor:
  """Segment an image from point, box and mask prompts (mirrors `SAM2ImagePredictor`)."""

  mask_threshold = 0.0

  def __init__(self, model: SAM2Base):
    self.model = model
    self.cfg: SAM2Config = model.cfg
    self._graphdef, self._state = nnx.split(model)
    # Committed to one device, like every jitted output fed back in: jit's executable cache
    # is keyed on committedness, so mixing the two would compile again.
    self._state = commit_to_device(self._state)
    self._features = None
    self._orig_hw: Optional[Tuple[int, int]] = None
    # Per-instance jitted functions: one compile per input shape, none after.
    self._encode = jax.jit(self._encode_impl)
    self._decode = jax.jit(self._decode_impl, static_argnums=(5, 6, 7, 8))

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, config: Optional[str] = None, dtype=None,
                      image_size: Optional[int] = None, keep_packed: bool = False
                      ) -> "ImagePredictor":
    """Loads an Orbax directory (from `convert.from_torch` or training) or an official `.pt`.

    `keep_packed`: a packed low-bit file stays packed in memory (codes dequantized inside the
    jitted forward, `qsam2_jax.quant.packed_model`).
    """
    return cls(load_sam2(path, config=config, dtype=dtype, image_size=image_size,
                         keep_packed=keep_packed)[0])

  # ------------------------------------------------------------------------------ jitted parts

  def _encode_impl(self, state, image_u8):
    model = nnx.merge(self._graphdef, state)
    x = preprocess(image_u8, self.cfg.image_size)[None]
    return model.image_features(x)

  def _decode_impl(self, state, features, coords, labels, mask_input, multimask_output, repeat_image,
              orig_hw, return_logits):
    model = nnx.merge(self._graphdef, state)
    embed, high_res = features
    low_res, iou, _, _ = model.decode_prompts(
        embed, high_res, coords, labels, mask_input,
        multimask_output=multimask_output, repeat_image=repeat_image)
    low_res = low_res.astype(jnp.float32)
    masks = resize_2d(low_res, orig_hw, axes=(-2, -1), mode="bilinear", antialias=False)
    if not return_logits:
      masks = masks > self.mask_threshold
    return masks, iou.astype(jnp.float32), jnp.clip(low_res, -32.0, 32.0)

  # ------------------------------------------------------------------------------ public API

  def set_image(self, image: Any) -> None:
    """Computes the image embedding (an HxWx3 uint8 RGB array or a PIL image)."""
    arr = to_rgb_uint8(image)
    self._orig_hw = tuple(arr.shape[:2])
    self._features = self._encode(self._state, jnp.asarray(arr))

  def reset_predictor(self) -> None:
    self._features = None
    self._orig_hw = None

  @property
  def is_image_set(self) -> bool:
    return self._features is not None

  def get_image_embedding(self) -> np.ndarray:
    """(1, h, w, 256) channels-last embedding of the current image."""
    if self._features is None:
      raise RuntimeError("An image must be set with .set_image(...) before this call.")
    return np.asarray(self._features[0])

  def _prep_prompts(self, point_coords, point_labels, box, mask_input, normalize_coords):
    h, w = self._orig_hw
    scale = np.array([self.cfg.image_size / w, self.cfg.image_size / h], np.float32) \
        if normalize_coords else np.float32(self.cfg.image_size)
    coords = labels = None
    if point_coords is not None:
      if point_labels is None:
        raise PromptError("point_labels must be supplied if point_coords is supplied")
      coords = np.asarray(point_coords, np.float32)
      labels = np.asarray(point_labels, np.int32)
      if coords.ndim == 2:
        coords, labels = coords[None], labels[None]
      if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
        raise PromptError(f"point_coords must be (N, 2) or (B, N, 2) with point_labels (N,) or "
                          f"(B, N); got {np.shape(point_coords)} and {np.shape(point_labels)}")
      if np.any((labels < 0) | (labels > 1)):
        raise PromptError("point_labels must be 1 (foreground) or 0 (background)")
      check_finite(coords, "point_coords")
      coords = coords * scale
    if box is not None:
      boxes = check_boxes(box)
      box_coords = boxes.reshape(-1, 2, 2) * scale
      box_labels = np.tile(np.array([[2, 3]], np.int32), (len(boxes), 1))
      if coords is not None:
        if coords.shape[0] != box_coords.shape[0]:
          raise PromptError(f"{len(box_coords)} boxes but {coords.shape[0]} point sets: give "
                            "one point set per box")
        coords = np.concatenate([box_coords, coords], axis=1)
        labels = np.concatenate([box_labels, labels], axis=1)
      else:
        coords, labels = box_coords, box_labels
    masks = None
    if mask_input is not None:
      masks = np.asarray(mask_input, np.float32)
      if masks.ndim == 3:
        masks = masks[None]
      side = self.cfg.low_res_mask_size
      if masks.ndim != 4 or masks.shape[1:] != (1, side, side):
        raise PromptError(f"mask_input must be (1, {side}, {side}) or (B, 1, {side}, {side}) "
                          f"low-res logits, got {np.shape(mask_input)}")
      masks = masks[:, 0]
    return coords, labels, masks

  def predict(self, point_coords: Optional[np.ndarray] = None,
              point_labels: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
              mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
              return_logits: bool = False, normalize_coords: bool = True
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks for the prompts on the current image.

    Returns numpy `(masks, iou_predictions, low_res_masks)`: (C, H, W), (C,), (C, 256, 256) for
    one prompt set, with a leading batch axis for B > 1 boxes/point sets (as `sam2`).
    """
    if self._features is None:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
    if point_coords is None and box is None and mask_input is None:
      raise PromptError("predict needs a prompt: point_coords/point_labels, box or mask_input")
    coords, labels, masks = self._prep_prompts(point_coords, point_labels, box, mask_input,
                                               normalize_coords)
    batch = coords.shape[0] if coords is not None else masks.shape[0]
    if masks is not None and coords is not None and masks.shape[0] not in (1, batch):
      raise PromptError(f"mask_input has {masks.shape[0]} masks for {batch} prompt sets")
    out = self._decode(self._state, self._features, coords, labels, masks,
                       bool(multimask_output), coords is not None and coords.shape[0] > 1,
                       self._orig_hw, bool(return_logits))
    out = [np.asarray(o) for o in out]
    if out[0].shape[0] == 1:
      out = [o[0] for o in out]
    return tuple(out)


# The video predictor lives in its own module; re-exported so both predictors import from here.
from qsam2_jax.video_predictor import InferenceState, VideoPredictor  # noqa: E402,F401

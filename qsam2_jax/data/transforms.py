"""Image and mask geometry for training: resize (square, or longest side + pad), flip, normalise.

The default is a plain **square** resize to `size x size` (aspect ratio not kept): SAM2's
training transforms (`RandomResizeAPI(square=True)`) and its image predictor (`SAM2Transforms`)
both do that, so a model fine-tuned here sees the same geometry it is evaluated with. The
`"longest"` mode (SAM1 style: scale the longest side to `size`, pad bottom/right) keeps aspect
ratios for data where that matters; padded pixels are 0 after normalisation (the mean colour)
and False in masks.

Images are resized with PIL's bilinear filter, which widens its support when shrinking
(antialiased, like the predictor's `antialias=True`); masks are resized the same way as 0/255
images and thresholded at one half, so thin parts survive downscaling better than with nearest.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE_MODES = ("square", "longest")


def content_hw(height: int, width: int, size: int, mode: str = "square") -> tuple[int, int]:
  """Size of the resized image inside the `size x size` canvas (the rest is padding)."""
  if mode == "square":
    return size, size
  if mode == "longest":
    scale = size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))
  raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def resize_image(image: np.ndarray, size: int, mode: str = "square") -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (size, size, 3) float32, ImageNet-normalised, zero-padded."""
  h, w = content_hw(image.shape[0], image.shape[1], size, mode)
  resized = Image.fromarray(image).resize((w, h), Image.BILINEAR)
  x = (np.asarray(resized, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  out = np.zeros((size, size, 3), np.float32)
  out[:h, :w] = x
  return out


def resize_mask(mask: np.ndarray, size: int, mode: str = "square") -> np.ndarray:
  """(H, W) bool -> (size, size) bool, with the same geometry as `resize_image`."""
  h, w = content_hw(mask.shape[0], mask.shape[1], size, mode)
  img = Image.fromarray(np.asarray(mask, np.uint8) * 255)
  resized = np.asarray(img.resize((w, h), Image.BILINEAR)) >= 128
  out = np.zeros((size, size), bool)
  out[:h, :w] = resized
  return out


def hflip(array: np.ndarray) -> np.ndarray:
  """Mirror left-right ((H, W, ...) arrays); applied to an image and all its masks alike."""
  return np.ascontiguousarray(array[:, ::-1])

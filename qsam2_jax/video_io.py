"""Video frames in, the way `sam2.utils.misc.load_video_frames` reads them.

Each frame goes through Pillow: `convert("RGB").resize((S, S))` (Pillow's default bicubic,
antialiased, on uint8), which is what makes video and image preprocessing differ (the image
predictor resizes float data). Frames are kept as uint8 (4× smaller than PyTorch's float32 copy);
`normalize_frame` turns one into the model input exactly as PyTorch does (/255, then ImageNet
mean/std, in float32).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qsam2_jax.errors import UserError
from qsam2_jax.prompt_checks import check_image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG")


class VideoError(UserError):
  """A video that cannot be read: says which file or frame and why."""


def _resize_uint8(frame: Any, image_size: int) -> np.ndarray:
  from PIL import Image
  img = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
  return np.asarray(img.convert("RGB").resize((image_size, image_size)), dtype=np.uint8)


def list_jpeg_frames(folder: str | os.PathLike) -> list[str]:
  """JPEG paths of a frame folder, sorted by their integer stem (`00000.jpg`, `1.jpg`, ...)."""
  folder = os.fspath(folder)
  names = [p for p in os.listdir(folder) if os.path.splitext(p)[-1] in JPEG_EXTENSIONS]
  try:
    names.sort(key=lambda p: int(os.path.splitext(p)[0]))
  except ValueError as e:
    raise VideoError(f"{folder}: JPEG frames must be named by their frame index "
                     f"(e.g. 00000.jpg), got {sorted(names)[:3]}...") from e
  if not names:
    raise VideoError(f"no JPEG frames (*.jpg / *.jpeg) found in {folder}")
  return [os.path.join(folder, n) for n in names]


def load_video_frames(video: Any, image_size: int) -> Tuple[np.ndarray, int, int]:
  """Reads a video as resized uint8 frames.

  Args:
    video: a folder of JPEG frames named by index, or a sequence / (T, H, W, 3) array of
      HxWx3 uint8 RGB frames (PIL images also accepted).
    image_size: the model input side S.

  Returns:
    (frames (T, S, S, 3) uint8, video_height, video_width). Like PyTorch, the original size is
    that of the last frame read (frames of one video share it).
  """
  from PIL import Image
  if isinstance(video, (str, os.PathLike)):
    path = os.fspath(video)
    if not os.path.isdir(path):
      if os.path.splitext(path)[-1].lower() == ".mp4":
        raise VideoError(f"{path}: mp4 input is not supported; extract JPEG frames first, e.g. "
                         f"ffmpeg -i {path} -q:v 2 -start_number 0 <dir>/'%05d.jpg'")
      raise VideoError(f"video folder not found: {path}")
    frames, height, width = [], 0, 0
    for p in list_jpeg_frames(path):
      try:
        with Image.open(p) as img:
          width, height = img.size
          frames.append(_resize_uint8(img, image_size))
      except OSError as e:
        raise VideoError(f"{p}: cannot read this JPEG frame: {e}") from e
    return np.stack(frames), height, width

  if isinstance(video, np.ndarray) and video.ndim == 4:
    seq: Sequence[Any] = list(video)
  elif isinstance(video, (list, tuple)):
    seq = video
  else:
    raise VideoError("init_state expects a folder of JPEG frames, a list of HxWx3 uint8 frames "
                     f"or a (T, H, W, 3) uint8 array; got {type(video).__name__}")
  if not seq:
    raise VideoError("the video has no frames")
  frames, height, width = [], 0, 0
  for i, f in enumerate(seq):
    if isinstance(f, Image.Image):
      width, height = f.size
    else:
      f = np.asarray(f)
      if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
        raise VideoError(f"frame {i}: expected an HxWx3 uint8 RGB array, got dtype {f.dtype} "
                         f"and shape {f.shape}")
      height, width = f.shape[:2]
    check_image_size(height, width, f"image (frame {i})", VideoError)
    frames.append(_resize_uint8(f, image_size))
  return np.stack(frames), height, width


@functools.lru_cache(maxsize=1)
def _normalize_table() -> np.ndarray:
  """(256, 3) float32: the normalized value of every uint8 level per channel, in numpy.

  PyTorch divides in float64 then float32 with IEEE division; XLA may turn a division by a
  constant into a multiplication by its reciprocal (one ulp off for half the levels), so the
  exact values are tabulated on the host instead.
  """
  x = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)[:, None]
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  table = (x - mean) / std
  table.flags.writeable = False
  return table


def normalize_frame(frame_u8: jax.Array) -> jax.Array:
  """(..., 3) uint8 -> float32 model input, bit-identical to PyTorch's x/255, −mean, /std."""
  table = jnp.asarray(_normalize_table())
  return table[frame_u8.astype(jnp.int32), jnp.arange(3)]

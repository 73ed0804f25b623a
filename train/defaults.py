"""The embedded defaults every command runs on when given no checkpoint or data.

A random-weight SAM2.1-t in the official format (built once with the `sam2` package, since the
real weights cannot be downloaded here), converted to Orbax at a reduced image size, and small
synthetic datasets. They are generated on first use into a cache folder (`$QSAM2_CACHE`, default
`~/.cache/qsam2_jax`) and reused afterwards.
"""

from __future__ import annotations

import os

from qsam2_jax import checkpoint
from qsam2_jax.model.configs import get_config

DEFAULT_CONFIG = "sam2.1_hiera_t"
DEFAULT_IMAGE_SIZE = 256


def cache_dir() -> str:
  root = os.environ.get("QSAM2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "qsam2_jax")
  os.makedirs(root, exist_ok=True)
  return root


def default_checkpoint(image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0) -> str:
  """Orbax directory of the embedded random SAM2.1-t (created on first use)."""
  out = os.path.join(cache_dir(), f"{DEFAULT_CONFIG}_random{seed}_{image_size}")
  if os.path.isdir(out):
    return out
  pt = os.path.join(cache_dir(), f"{DEFAULT_CONFIG}_random{seed}.pt")
  if not os.path.exists(pt):
    from convert import random_checkpoint  # needs torch and sam2 (installed by `make setup`)
    random_checkpoint.save_official(
        random_checkpoint.build_torch_sam2(get_config(DEFAULT_CONFIG), seed=seed), pt)
  sd = checkpoint.read_torch_state_dict(pt)
  cfg = get_config(DEFAULT_CONFIG, image_size=image_size)
  model = checkpoint.model_from_state_dict(sd, cfg, source=pt)
  meta = {"config": cfg.name, "image_size": image_size, "kind": "fp", "source": pt}
  try:
    checkpoint.save_model(out, model, meta)
  except checkpoint.CheckpointError:
    pass  # another process created it meanwhile
  return out


def default_image_data(num_images: int = 32, image_size: int = DEFAULT_IMAGE_SIZE,
                       seed: int = 0) -> str:
  """A synthetic COCO-format dataset folder (images + annotations.json)."""
  from qsam2_jax.data.synthetic import make_image_dataset
  out = os.path.join(cache_dir(), f"synthetic_images_{num_images}_{image_size}_{seed}")
  if not os.path.exists(os.path.join(out, "annotations.json")):
    try:
      make_image_dataset(out, num_images, size=(image_size, image_size), seed=seed)
    except FileExistsError:
      pass
  return out


def default_video_data(num_videos: int = 2, num_frames: int = 8,
                       image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0) -> str:
  """A synthetic DAVIS-layout video dataset folder (JPEGImages/, Annotations/)."""
  from qsam2_jax.data.synthetic import make_video_dataset
  out = os.path.join(cache_dir(),
                     f"synthetic_videos_{num_videos}x{num_frames}_{image_size}_{seed}")
  if not os.path.isdir(os.path.join(out, "Annotations")):
    try:
      make_video_dataset(out, num_videos, num_frames, size=(image_size, image_size), seed=seed)
    except FileExistsError:
      pass
  return out

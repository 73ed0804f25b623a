"""Prompt simulation for promptable-segmentation training: boxes and clicks from GT masks.

Follows SAM2's image-path simulation where it is defined: the box is the mask's tight box
(inclusive pixel indices, as `sam2.utils.misc.mask_to_box`) with corners jittered by up to 10 % of
its width / height, at most 20 px (`sam2_utils.sample_box_points`); clicks are integer pixel
indices (x = column, y = row) in the model-input frame; a mask is prompted by a box alone with
probability `box_prob`, otherwise by 1..`max_pos_points` positive clicks inside the mask and
0..`max_neg_points` negative clicks outside it (taken near the object when possible, which is where
SAM's corrective negative clicks land). SAM2's iterative correction clicks need the model's own
predictions and belong to the training step, not to the input pipeline.

Every array has a static shape: unused clicks carry label -1 (SAM's "not a point"), and a capped
number of masks per image is padded with `valid = False` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import jax.numpy as jnp
import numpy as np

PAD_LABEL, NEG_LABEL, POS_LABEL, BOX_TL_LABEL, BOX_BR_LABEL = -1, 0, 1, 2, 3


@dataclass(frozen=True)
class PromptConfig:
  """How many masks per image and how each is prompted."""
  max_masks: int = 8  # K: masks sampled per image (padded to K)
  max_pos_points: int = 2
  max_neg_points: int = 1
  box_prob: float = 0.5  # probability that a mask is prompted by its (jittered) box alone
  box_noise: float = 0.1  # corner jitter as a fraction of the box width / height
  box_noise_bound: float = 20.0  # ... and at most this many pixels (SAM's defaults)
  min_area: float = 0.0  # annotations smaller than this (original pixels) are never sampled

  @property
  def num_points(self) -> int:
    """P: click slots per mask."""
    return self.max_pos_points + self.max_neg_points

  def __post_init__(self):
    if self.max_masks < 1 or self.max_pos_points < 1 or self.max_neg_points < 0:
      raise ValueError(f"need max_masks >= 1, max_pos_points >= 1, max_neg_points >= 0: {self}")
    if not 0.0 <= self.box_prob <= 1.0:
      raise ValueError(f"box_prob must be in [0, 1], got {self.box_prob}")


def mask_to_box(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool -> (4,) float32 [x0, y0, x1, y1], inclusive pixel indices; zeros if empty."""
  ys, xs = np.nonzero(mask)
  if ys.size == 0:
    return np.zeros(4, np.float32)
  return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, height: int, width: int,
               noise: float = 0.1, bound: float = 20.0) -> np.ndarray:
  """Moves each corner by U(-1, 1)·min(noise·side, bound) and clamps to the image."""
  if noise <= 0:
    return box.astype(np.float32)
  max_dx = min((box[2] - box[0]) * noise, bound)
  max_dy = min((box[3] - box[1]) * noise, bound)
  delta = (2.0 * rng.random(4) - 1.0) * np.array([max_dx, max_dy, max_dx, max_dy])
  lo = np.zeros(4)
  hi = np.array([width - 1, height - 1, width - 1, height - 1], np.float64)
  return np.clip(box + delta, lo, hi).astype(np.float32)


def _pick(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """`count` distinct (x, y) pixels of a bool region (fewer if it is smaller)."""
  ys, xs = np.nonzero(region)
  if ys.size == 0 or count <= 0:
    return np.zeros((0, 2), np.float32)
  idx = rng.choice(ys.size, size=min(count, ys.size), replace=False)
  return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


def sample_points(mask: np.ndarray, rng: np.random.Generator, num_pos: int, num_neg: int,
                  num_points: int) -> Tuple[np.ndarray, np.ndarray]:
  """Positive clicks inside the mask, negative ones outside, padded to `num_points` slots.

  Negatives come from the background within the tight box grown by a quarter of its size
  (at least 8 px) on each side, or from anywhere outside the mask if that ring is empty.

  Returns:
    coords (num_points, 2) float32 (x, y) and labels (num_points,) int32 in {-1, 0, 1}.
  """
  coords = np.zeros((num_points, 2), np.float32)
  labels = np.full((num_points,), PAD_LABEL, np.int32)
  pos = _pick(mask, num_pos, rng)
  neg = np.zeros((0, 2), np.float32)
  if num_neg > 0:
    h, w = mask.shape
    x0, y0, x1, y1 = mask_to_box(mask).astype(int)
    my, mx = max(8, (y1 - y0 + 1) // 4), max(8, (x1 - x0 + 1) // 4)
    near = np.zeros_like(mask)
    near[max(0, y0 - my):min(h, y1 + my + 1), max(0, x0 - mx):min(w, x1 + mx + 1)] = True
    background = ~mask
    neg = _pick(background & near, num_neg, rng)
    if neg.shape[0] == 0:
      neg = _pick(background, num_neg, rng)
  pts = np.concatenate([pos, neg])
  coords[:len(pts)] = pts
  labels[:len(pos)] = POS_LABEL
  labels[len(pos):len(pts)] = NEG_LABEL
  return coords, labels


def sample_prompts(mask: np.ndarray, rng: np.random.Generator, cfg: PromptConfig) -> dict:
  """Prompts for one non-empty mask in the model-input frame.

  Returns:
    dict with point_coords (P, 2) float32, point_labels (P,) int32, box (4,) float32 (jittered,
    always present) and use_box () bool (True: prompt with the box alone, the clicks are all
    padding; False: prompt with the clicks alone).
  """
  h, w = mask.shape
  box = jitter_box(mask_to_box(mask), rng, h, w, cfg.box_noise, cfg.box_noise_bound)
  use_box = bool(rng.random() < cfg.box_prob)
  if use_box:
    coords = np.zeros((cfg.num_points, 2), np.float32)
    labels = np.full((cfg.num_points,), PAD_LABEL, np.int32)
  else:
    num_pos = int(rng.integers(1, cfg.max_pos_points + 1))
    num_neg = int(rng.integers(0, cfg.max_neg_points + 1))
    coords, labels = sample_points(mask, rng, num_pos, num_neg, cfg.num_points)
  return {"point_coords": coords, "point_labels": labels, "box": box, "use_box": np.bool_(use_box)}


def candidate_order(areas: np.ndarray, rng: np.random.Generator, min_area: float = 0.0
                    ) -> np.ndarray:
  """A random order of the annotations eligible for sampling (unknown areas are eligible)."""
  eligible = np.nonzero(~(areas < min_area))[0]
  return rng.permutation(eligible)


def to_point_prompts(point_coords: jnp.ndarray, point_labels: jnp.ndarray, boxes: jnp.ndarray,
                     use_box: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Merges a batch's clicks and boxes into the decoder's point format (jit-friendly).

  SAM2 feeds a box as two corner points labelled 2 and 3; here the corners are appended after the
  click slots, and whichever prompt a mask does not use is relabelled -1 (padding), so every mask
  has the same number of prompt slots.

  Args:
    point_coords: (..., P, 2); point_labels: (..., P); boxes: (..., 4); use_box: (...) bool.

  Returns:
    coords (..., P + 2, 2) float32 and labels (..., P + 2) int32, for `decode_prompts`.
  """
  use_box = jnp.asarray(use_box, bool)
  corners = jnp.reshape(jnp.asarray(boxes, jnp.float32), boxes.shape[:-1] + (2, 2))
  corner_labels = jnp.where(use_box[..., None], jnp.array([BOX_TL_LABEL, BOX_BR_LABEL]),
                            PAD_LABEL)
  click_labels = jnp.where(use_box[..., None], PAD_LABEL, jnp.asarray(point_labels))
  coords = jnp.concatenate([jnp.asarray(point_coords, jnp.float32), corners], axis=-2)
  labels = jnp.concatenate([click_labels, corner_labels], axis=-1).astype(jnp.int32)
  return coords, labels

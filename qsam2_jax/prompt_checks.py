"""The prompt and image checks `ImagePredictor` and `VideoPredictor` share: one wording.

Both predictors refuse the same inputs with the same words (each raises its own `PromptError`
subclass): an empty (0-pixel) image, a non-finite coordinate, a box whose corners are swapped.
Prompts outside the image are accepted and not clipped, as in `sam2`: coordinates are scaled
to the model's input like any other and the prompt encoder encodes them (its Fourier features
are defined everywhere); the mask is whatever the model predicts for them.
"""

from __future__ import annotations

from typing import Any, Type

import numpy as np

from qsam2_jax.errors import UserError


class PromptError(UserError):
  """Invalid input to a predictor (`set_image` / `predict`, `init_state` / `add_new_*`)."""


def check_image_size(height: int, width: int, what: str = "image",
                     error: Type[UserError] = PromptError) -> None:
  """Refuses an image with no pixels."""
  if height < 1 or width < 1:
    raise error(f"{what} is empty ({height}x{width} pixels); expected at least 1x1")


def check_finite(values: np.ndarray, what: str, error: Type[UserError] = PromptError) -> None:
  """Refuses NaN / inf coordinates (they would turn the whole mask into NaN)."""
  if not np.all(np.isfinite(values)):
    raise error(f"{what} holds a non-finite coordinate (NaN or inf); coordinates are pixels")


def check_boxes(box: Any, error: Type[UserError] = PromptError) -> np.ndarray:
  """(4,) or (B, 4) x0, y0, x1, y1 boxes -> (B, 4) float32, finite, x1 >= x0 and y1 >= y0."""
  boxes = np.asarray(box, np.float32)
  if boxes.ndim == 1:
    boxes = boxes[None]
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise error(f"box must be (4,) or (B, 4) in (x0, y0, x1, y1) format, got shape "
                f"{np.shape(box)}")
  check_finite(boxes, "box", error)
  bad = np.where((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
  if len(bad):
    raise error(f"box {int(bad[0])} = {boxes[bad[0]].tolist()} has x1 < x0 or y1 < y0; boxes "
                "are (x0, y0, x1, y1)")
  return boxes

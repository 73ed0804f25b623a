"""Mask overlays and PNG strips for evaluation reports (video J&F and image mIoU alike).

Pillow only (no matplotlib figure machinery), so a strip of a few frames costs milliseconds.
A *tile* is one image with its masks painted in: each object id gets a fixed bright colour
(1 = blue, 2 = orange, 3 = green, ...) blended into the pixels plus a solid outline, so
overlapping or adjacent objects stay distinguishable. A *strip* is a grid of tiles with row and
column labels, e.g. rows "ground truth" / "prediction" and one column per frame (or image).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# (H, W) integer label map (0 = background) or {object id: (H, W) bool mask}.
Masks = Union[np.ndarray, Mapping[int, np.ndarray]]

LABEL_HEIGHT = 14  # pixels reserved above each column / left of each row for the labels
PAD = 4


# Bright, mutually distinct colours (matplotlib's tab10 without grey), id 1 first; the DAVIS
# palette of the PNGs is too dark to read as a tint.
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))


def color_of(obj_id: int) -> tuple[int, int, int]:
  """The overlay colour of an object id (cycling through `COLORS`)."""
  return COLORS[(int(obj_id) - 1) % len(COLORS)]


def _as_dict(masks: Masks) -> dict[int, np.ndarray]:
  if isinstance(masks, Mapping):
    return {int(k): np.asarray(v).astype(bool) for k, v in masks.items()}
  labels = np.asarray(masks)
  if labels.ndim != 2:
    raise ValueError(f"expected an (H, W) label map, got shape {labels.shape}")
  return {int(k): labels == k for k in np.unique(labels) if k != 0}


def overlay(image: np.ndarray, masks: Masks, *, alpha: float = 0.55, outline: int = 2,
            boxes: Optional[Mapping[int, Sequence[float]]] = None,
            points: Optional[Sequence[tuple[float, float, int]]] = None) -> np.ndarray:
  """The image with each object's mask tinted in its colour and outlined.

  Args:
    image: (H, W, 3) uint8 RGB.
    masks: (H, W) label map or {object id: (H, W) bool}; masks are painted in increasing id
      order, so a higher id is on top where masks overlap.
    alpha: tint strength inside the masks.
    outline: outline width in pixels (0 = none).
    boxes: {object id: (x0, y0, x1, y1)} prompt boxes, drawn in the object's colour.
    points: (x, y, label) clicks: label 1 green, 0 red.

  Returns:
    (H, W, 3) uint8.
  """
  img = np.asarray(image)
  if img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
  out = img.astype(np.float32)
  for obj, m in sorted(_as_dict(masks).items()):
    if m.shape != img.shape[:2]:
      raise ValueError(f"mask of object {obj} has shape {m.shape}, image {img.shape[:2]}")
    if not m.any():
      continue
    col = np.asarray(color_of(obj), np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * col
    if outline > 0:
      edge = m & ~ndimage.binary_erosion(m, iterations=outline, border_value=0)
      out[edge] = col
  pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
  if boxes or points:
    draw = ImageDraw.Draw(pil)
    for obj, box in (boxes or {}).items():
      draw.rectangle([float(v) for v in box], outline=color_of(obj), width=2)
    for x, y, label in points or ():
      r = 4
      draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 220, 0) if label else (230, 0, 0),
                   outline=(255, 255, 255))
  return np.asarray(pil)


def _fit(tile: np.ndarray, max_side: Optional[int]) -> Image.Image:
  img = Image.fromarray(tile)
  if max_side and max(img.size) > max_side:
    scale = max_side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.BILINEAR)
  return img


def grid(tiles: Sequence[Sequence[np.ndarray]], *, row_labels: Sequence[str] = (),
         col_labels: Sequence[str] = (), max_side: Optional[int] = 320,
         background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
  """Lays out rows of (H, W, 3) uint8 tiles, each scaled to at most `max_side` pixels."""
  rows = [[_fit(np.asarray(t), max_side) for t in row] for row in tiles]
  if not rows or not any(rows):
    raise ValueError("grid: no tiles")
  n_cols = max(len(r) for r in rows)
  col_w = [max((r[c].width for r in rows if c < len(r)), default=0) for c in range(n_cols)]
  row_h = [max(t.height for t in r) if r else 0 for r in rows]
  left = max((8 + 6 * len(s) for s in row_labels), default=0)
  top = LABEL_HEIGHT if col_labels else 0
  width = left + sum(col_w) + PAD * (n_cols + 1)
  height = top + sum(row_h) + PAD * (len(rows) + 1)
  canvas = Image.new("RGB", (width, height), background)
  draw = ImageDraw.Draw(canvas)
  x0 = left + PAD
  for c, label in enumerate(col_labels[:n_cols]):
    draw.text((x0 + sum(col_w[:c]) + PAD * c, 1), str(label), fill=(0, 0, 0))
  y = top + PAD
  for r, row in enumerate(rows):
    if r < len(row_labels):
      draw.text((4, y + row_h[r] // 2 - 5), str(row_labels[r]), fill=(0, 0, 0))
    x = x0
    for c, tile in enumerate(row):
      canvas.paste(tile, (x, y))
      x += col_w[c] + PAD
    y += row_h[r] + PAD
  return canvas


def overlay_strip(images: Sequence[np.ndarray], rows: Mapping[str, Sequence[Masks]],
                  path: str | os.PathLike, *, col_labels: Sequence[str] = (),
                  max_side: Optional[int] = 320, alpha: float = 0.55) -> str:
  """Writes a PNG grid: one column per image, one row per mask set (e.g. GT, prediction).

  Args:
    images: the K (H, W, 3) uint8 images (frames of a video, or unrelated images).
    rows: {row label: K masks (label maps or {id: bool mask})}, painted over the images.
    path: output PNG (parent folders are created).
    col_labels: per-column captions (e.g. "t=0").

  Returns:
    The path written.
  """
  tiles = []
  for label, masks in rows.items():
    if len(masks) != len(images):
      raise ValueError(f"row {label!r} has {len(masks)} masks for {len(images)} images")
    tiles.append([overlay(img, m, alpha=alpha) for img, m in zip(images, masks)])
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid(tiles, row_labels=list(rows), col_labels=col_labels, max_side=max_side).save(path)
  return path


def pick_frames(num_frames: int, k: int = 5) -> list[int]:
  """Up to k frame indices spread evenly over a video, first and last included."""
  if num_frames <= 0:
    return []
  k = max(1, min(int(k), num_frames))
  if k == 1:
    return [0]
  return sorted({round(i * (num_frames - 1) / (k - 1)) for i in range(k)})

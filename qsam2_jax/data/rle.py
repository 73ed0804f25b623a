"""COCO mask encodings (run-length and polygons) <-> boolean numpy masks, via pycocotools.

One place for the fiddly parts: pycocotools wants Fortran-ordered uint8 input, returns `counts`
as bytes (JSON needs str), and stores polygons and uncompressed RLE in other shapes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode(mask: np.ndarray) -> dict[str, Any]:
  """(H, W) mask (nonzero = foreground) -> compressed RLE {"size": [H, W], "counts": str}."""
  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f"encode expects a 2-D mask, got shape {m.shape}")
  rle = mask_utils.encode(np.asfortranarray(m != 0, dtype=np.uint8))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
  """Any COCO `segmentation` (polygon list, uncompressed or compressed RLE) -> compressed RLE."""
  if isinstance(segm, list):  # polygons: one instance may have several parts
    return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  if isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
    return mask_utils.frPyObjects(segm, height, width)
  if isinstance(segm, dict) and "counts" in segm:
    counts = segm["counts"]
    size = [int(s) for s in segm["size"]]
    if size != [height, width]:
      raise ValueError(f"RLE size {size} does not match the image size {[height, width]}")
    return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
  raise ValueError(f"unsupported COCO segmentation of type {type(segm).__name__}")


def decode(segm: Any, height: int, width: int) -> np.ndarray:
  """COCO `segmentation` (polygons, uncompressed or compressed RLE) -> (H, W) bool mask."""
  rle = _to_rle(segm, height, width)
  with warnings.catch_warnings():  # pycocotools predates numpy 2's __array__(copy=) protocol
    warnings.simplefilter("ignore", DeprecationWarning)
    return mask_utils.decode(rle).astype(bool)


def area(mask: np.ndarray) -> int:
  """Foreground pixel count (the COCO `area` of a mask annotation)."""
  return int(np.count_nonzero(mask))


def bbox_xywh(mask: np.ndarray) -> list[float]:
  """Tight COCO box [x, y, w, h] of a mask (w = x_max - x_min + 1); zeros when empty."""
  m = np.asarray(mask) != 0
  ys, xs = np.nonzero(m)
  if ys.size == 0:
    return [0.0, 0.0, 0.0, 0.0]
  x0, y0 = int(xs.min()), int(ys.min())
  return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]

"""Segmentation metrics: J, F and J&F as the DAVIS / SA-V evaluators compute them, and mask mIoU.

Pure numpy (plus scipy's exact Euclidean distance transform), so scores do not depend on the
model framework. Per-frame / per-instance primitives return fractions in [0, 1]; per-object and
dataset aggregates are percentages (x100), as the evaluators print them.

Masks are 2-D (H, W) boolean or integer arrays (nonzero = foreground). Float arrays are refused:
threshold logits first (SAM2 thresholds at 0), so a forgotten threshold cannot pass silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import numpy as np
from scipy import ndimage

# COCO area buckets (by ground-truth mask area, in pixels): small < 32², medium < 96², large.
SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
AREA_BUCKETS = ("small", "medium", "large")

# (T, H, W) integer label maps (0 = background, ids 1..K), or {object id: (T, H, W) mask}.
VideoMasks = Union[np.ndarray, Mapping[int, np.ndarray]]


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
  """Binarises a mask (nonzero = foreground), refusing float input (un-thresholded logits)."""
  m = np.asarray(mask)
  if m.dtype == bool:
    return m
  if not (np.issubdtype(m.dtype, np.integer)):
    raise TypeError(f"{name}: expected a boolean or integer mask, got dtype {m.dtype} "
                    "(threshold logits/probabilities first)")
  return m != 0


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
  if p.ndim != 2 or p.shape != g.shape:
    raise ValueError(f"pred and gt must be 2-D masks of the same shape, got {p.shape} and "
                     f"{g.shape}")
  return p, g


# ----------------------------------------------------------------------------------------- J / IoU


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
  """|pred ∩ gt| / |pred ∪ gt|, and 1.0 when both masks are empty (as DAVIS and SA-V score)."""
  p, g = _pair(pred, gt)
  union = np.count_nonzero(p | g)
  if union == 0:
    return 1.0
  return np.count_nonzero(p & g) / union


def region_j(pred: np.ndarray, gt: np.ndarray) -> float:
  """Region similarity J of one frame (the Jaccard index; 1.0 when both masks are empty)."""
  return mask_iou(pred, gt)


# ------------------------------------------------------------------------------------------- F


def boundary_map(mask: np.ndarray) -> np.ndarray:
  """DAVIS `_seg2bmap`: 1-px boundaries, offset half a pixel towards the origin.

  A pixel is on the boundary when it differs from its right, bottom or bottom-right neighbour,
  where neighbours outside the image count as background. The last row is only compared with the
  right neighbour, the last column only with the bottom one, and the bottom-right pixel is never
  a boundary, so the image border itself is not a boundary (an all-ones mask has none).
  """
  seg = _as_bool(mask, "mask")
  if seg.ndim != 2:
    raise ValueError(f"boundary_map expects a 2-D mask, got shape {seg.shape}")
  east = np.zeros_like(seg)
  south = np.zeros_like(seg)
  south_east = np.zeros_like(seg)
  east[:, :-1] = seg[:, 1:]
  south[:-1, :] = seg[1:, :]
  south_east[:-1, :-1] = seg[1:, 1:]
  b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
  b[-1, :] = seg[-1, :] ^ east[-1, :]
  b[:, -1] = seg[:, -1] ^ south[:, -1]
  b[-1, -1] = False
  return b


def boundary_radius(shape: Sequence[int], bound_th: float = 0.008) -> int:
  """Tolerance disk radius in pixels: `bound_th` if >= 1, else ceil(bound_th·‖(H, W)‖₂)."""
  if bound_th <= 0:
    raise ValueError(f"bound_th must be positive, got {bound_th}")
  if bound_th >= 1:
    if bound_th != int(bound_th):
      raise ValueError(f"a pixel tolerance (bound_th >= 1) must be an integer, got {bound_th}")
    return int(bound_th)
  return int(math.ceil(bound_th * math.hypot(*shape[-2:])))


def disk(radius: int) -> np.ndarray:
  """skimage's `disk(r)`: the (2r+1)² footprint {(y, x): x² + y² <= r²}."""
  r = np.arange(-radius, radius + 1)
  return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def _count_near(src: np.ndarray, target: np.ndarray, radius: int) -> int:
  """Pixels of `src` inside `target` dilated by disk(radius).

  Dilation by a disk of radius r marks exactly the pixels whose squared distance to the nearest
  target pixel is <= r², which the exact Euclidean distance transform gives in O(HW) (cv2.dilate
  with the disk costs O(HW·r²)). `target` must not be empty.
  """
  dist = ndimage.distance_transform_edt(~target)
  return int(np.count_nonzero(src & (dist <= radius)))


def boundary_precision_recall(pred: np.ndarray, gt: np.ndarray,
                              bound_th: float = 0.008) -> tuple[float, float]:
  """Boundary precision and recall with the DAVIS edge cases.

  P = |B_pred ∩ dil(B_gt)| / |B_pred|, R = |B_gt ∩ dil(B_pred)| / |B_gt|. With no predicted
  boundary: P = 1, R = 0 (GT has one) or P = R = 1 (neither has one); with no GT boundary but a
  predicted one: P = 0, R = 1.
  """
  p, g = _pair(pred, gt)
  radius = boundary_radius(p.shape, bound_th)
  bp, bg = boundary_map(p), boundary_map(g)
  n_pred, n_gt = int(np.count_nonzero(bp)), int(np.count_nonzero(bg))
  if n_pred == 0 and n_gt == 0:
    return 1.0, 1.0
  if n_pred == 0:
    return 1.0, 0.0
  if n_gt == 0:
    return 0.0, 1.0
  return _count_near(bp, bg, radius) / n_pred, _count_near(bg, bp, radius) / n_gt


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
  """Boundary F-measure of one frame: 2PR / (P + R), or 0 when P + R = 0."""
  precision, recall = boundary_precision_recall(pred, gt, bound_th)
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------- video


def _frame_getter(masks: VideoMasks, name: str) -> tuple[int, tuple[int, int],
                                                        Callable[[int, int], np.ndarray],
                                                        Callable[[int], set[int]]]:
  """Uniform per-(object, frame) access to label maps or per-object mask stacks.

  Returns (num_frames, (H, W), get(obj_id, t) -> bool (H, W), ids_in_frame(t) -> set).
  """
  if isinstance(masks, Mapping):
    stacks = {int(k): _as_bool(v, f"{name}[{k}]") for k, v in masks.items()}
    shapes = {v.shape for v in stacks.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
      raise ValueError(f"{name}: every object needs a (T, H, W) mask stack of one shape, "
                       f"got {sorted(shapes)}")
    t, h, w = next(iter(shapes))
    empty = np.zeros((h, w), bool)

    def get(obj: int, i: int) -> np.ndarray:
      return stacks[obj][i] if obj in stacks else empty

    def ids(i: int) -> set[int]:
      return {k for k, v in stacks.items() if k != 0 and v[i].any()}

    return t, (h, w), get, ids

  labels = np.asarray(masks)
  if labels.ndim != 3 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f"{name}: expected (T, H, W) integer label maps or a mapping "
                     f"{{object id: (T, H, W) mask}}, got {labels.dtype} {labels.shape}")
  labels = labels.astype(np.int64) if labels.dtype == bool else labels

  def get_l(obj: int, i: int) -> np.ndarray:
    return labels[i] == obj

  def ids_l(i: int) -> set[int]:
    return {int(k) for k in np.unique(labels[i]) if k != 0}

  return labels.shape[0], labels.shape[1:], get_l, ids_l


def jf_video(pred_masks: VideoMasks, gt_masks: VideoMasks, skip_first_last: bool = True, *,
             bound_th: float = 0.008, protocol: str = "davis") -> dict[int, tuple[float, float]]:
  """Per-object (J, F) of one video, in percent (the mean over the scored frames x100).

  Args:
    pred_masks, gt_masks: (T, H, W) integer label maps (0 = background, object ids > 0), or
      mappings {object id: (T, H, W) bool mask}; an object missing from the predictions is an
      empty mask.
    skip_first_last: drop the first and the last frame (the semi-supervised default of DAVIS and
      SA-V: the first frame is the prompt).
    bound_th: boundary tolerance (fraction of the image diagonal, or pixels if >= 1).
    protocol: which objects and frames are scored. "davis" (davis2017-evaluation): every object
      present in any ground-truth frame, over all scored frames. "sav" (SA-V's `sav_benchmark`,
      also used by SAM2 for DAVIS/MOSE): objects present in the ground truth of the scored frames,
      each from the first scored frame where it appears in the ground truth or the prediction.
      The two agree when every object is visible in the first scored frame.

  Returns:
    {object id: (J, F)}; J&F of an object is their mean.
  """
  if protocol not in ("davis", "sav"):
    raise ValueError(f"protocol must be 'davis' or 'sav', got {protocol!r}")
  t_gt, hw_gt, gt_get, gt_ids = _frame_getter(gt_masks, "gt_masks")
  t_pr, hw_pr, pr_get, pr_ids = _frame_getter(pred_masks, "pred_masks")
  if (t_gt, hw_gt) != (t_pr, hw_pr):
    raise ValueError(f"pred_masks has {t_pr} frames of {tuple(hw_pr)}, gt_masks {t_gt} frames "
                     f"of {tuple(hw_gt)}")
  frames = list(range(t_gt))
  if skip_first_last:
    frames = frames[1:-1]
  if not frames:
    raise ValueError(f"no frames to score: {t_gt} frame(s) and skip_first_last={skip_first_last}")

  per_obj: dict[int, list[tuple[float, float]]] = {}
  if protocol == "davis":
    objects = sorted(set().union(*(gt_ids(i) for i in range(t_gt))))
    for t in frames:
      for obj in objects:
        p, g = pr_get(obj, t), gt_get(obj, t)
        per_obj.setdefault(obj, []).append((region_j(p, g), boundary_f(p, g, bound_th)))
  else:
    in_gt: set[int] = set()
    seen: set[int] = set()
    for t in frames:
      ids_gt = gt_ids(t)
      in_gt |= ids_gt
      seen |= ids_gt | pr_ids(t)
      for obj in sorted(seen):
        p, g = pr_get(obj, t), gt_get(obj, t)
        per_obj.setdefault(obj, []).append((region_j(p, g), boundary_f(p, g, bound_th)))
    per_obj = {k: v for k, v in per_obj.items() if k in in_gt}

  return {obj: (100.0 * float(np.mean([s[0] for s in scores])),
                100.0 * float(np.mean([s[1] for s in scores])))
          for obj, scores in sorted(per_obj.items())}


def jf_dataset(per_video: Mapping[str, Mapping[int, tuple[float, float]]]
               | Iterable[Mapping[int, tuple[float, float]]]) -> dict[str, float]:
  """Dataset J, F and J&F = (J + F) / 2 in percent: means over all objects of all videos.

  Args:
    per_video: `jf_video` results, keyed by video name or as a plain iterable.

  Returns:
    {"J", "F", "J&F", "num_objects", "num_videos"}.
  """
  results = list(per_video.values()) if isinstance(per_video, Mapping) else list(per_video)
  scores = [jf for res in results for jf in res.values()]
  if not scores:
    raise ValueError("jf_dataset: no objects to average")
  j = float(np.mean([s[0] for s in scores]))
  f = float(np.mean([s[1] for s in scores]))
  return {"J": j, "F": f, "J&F": (j + f) / 2, "num_objects": len(scores),
          "num_videos": len(results)}


# ----------------------------------------------------------------------------------- image mIoU


def area_bucket(area: float) -> str:
  """COCO area bucket of a ground-truth mask area: small < 32², medium < 96², else large.

  Half-open intervals; COCOeval's ranges are closed, so an area of exactly 32² (96²) counts there
  in both neighbouring buckets.
  """
  if area < SMALL_MAX_AREA:
    return "small"
  if area < MEDIUM_MAX_AREA:
    return "medium"
  return "large"


def miou(ious: Sequence[float], gt_areas: Sequence[float]) -> dict[str, float]:
  """Mean IoU over instances, overall and per COCO area bucket, in percent.

  Args:
    ious: per-instance IoU (`mask_iou` of prediction and ground truth), fractions.
    gt_areas: per-instance ground-truth mask area in pixels (selects the bucket).

  Returns:
    {"mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "num", "num_small", ...}; a bucket with no
    instance has mIoU NaN.
  """
  iou = np.asarray(ious, np.float64).reshape(-1)
  area = np.asarray(gt_areas, np.float64).reshape(-1)
  if iou.shape != area.shape:
    raise ValueError(f"miou: {iou.size} IoUs but {area.size} areas")
  if iou.size == 0:
    raise ValueError("miou: no instances")
  buckets = np.array([area_bucket(a) for a in area])
  out: dict[str, float] = {"mIoU": 100.0 * float(iou.mean()), "num": int(iou.size)}
  for name in AREA_BUCKETS:
    sel = buckets == name
    out[f"mIoU_{name}"] = 100.0 * float(iou[sel].mean()) if sel.any() else float("nan")
    out[f"num_{name}"] = int(sel.sum())
  return out

"""J, F, J&F and mIoU on hand-built masks with hand-computed expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from eval import metrics


def square(shape, top, left, n, w=None):
  m = np.zeros(shape, bool)
  m[top:top + n, left:left + (w or n)] = True
  return m


# ------------------------------------------------------------------------------------------- J


def test_region_j_cases():
  z = np.zeros((8, 8), bool)
  a = square((8, 8), 1, 1, 4)
  assert metrics.region_j(z, z) == 1.0  # both empty
  assert metrics.region_j(a, a) == 1.0
  assert metrics.region_j(a, square((8, 8), 5, 5, 3)) == 0.0  # disjoint
  assert metrics.region_j(z, a) == 0.0
  # 4x4 squares offset by 2 columns: |∩| = 8, |∪| = 24.
  assert metrics.region_j(a, square((8, 8), 1, 3, 4)) == pytest.approx(1 / 3)
  assert metrics.mask_iou(a.astype(np.uint8), square((8, 8), 1, 3, 4).astype(np.int32)) \
      == pytest.approx(1 / 3)


def test_float_masks_and_shape_mismatch_are_refused():
  with pytest.raises(TypeError, match="threshold"):
    metrics.region_j(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool))
  with pytest.raises(ValueError, match="same shape"):
    metrics.boundary_f(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ------------------------------------------------------------------------------------ boundaries


def seg2bmap_loops(seg):
  """The DAVIS boundary definition written pixel by pixel (an independent reference)."""
  h, w = seg.shape
  at = lambda y, x: bool(seg[y, x]) if (y < h and x < w) else False  # noqa: E731
  b = np.zeros_like(seg, bool)
  for y in range(h):
    for x in range(w):
      if y == h - 1 and x == w - 1:
        continue
      if y == h - 1:
        b[y, x] = at(y, x) != at(y, x + 1)
      elif x == w - 1:
        b[y, x] = at(y, x) != at(y + 1, x)
      else:
        b[y, x] = any(at(y, x) != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
  return b


def test_boundary_map_of_a_square_is_a_ring_offset_towards_the_origin():
  m = square((10, 10), 2, 3, 4)  # rows 2..5, cols 3..6
  ring = np.zeros((10, 10), bool)
  ring[1:6, 2:7] = True
  ring[2:5, 3:6] = False  # the 5x5 ring from (1, 2) to (5, 6): 4n = 16 pixels
  np.testing.assert_array_equal(metrics.boundary_map(m), ring)
  assert metrics.boundary_map(m).sum() == 16


def test_boundary_map_image_border_is_not_a_boundary():
  assert not metrics.boundary_map(np.ones((7, 9), bool)).any()
  m = square((10, 10), 2, 5, 4, w=5)  # touches the right border
  b = metrics.boundary_map(m)
  assert not b[2:5, 9].any()  # inner part of the last column
  assert b[1, 9] and b[5, 9]


def test_boundary_map_matches_pixelwise_definition_on_random_masks():
  rng = np.random.default_rng(0)
  for shape in [(7, 9), (12, 5), (1, 6), (6, 1)]:
    for p in (0.2, 0.5, 0.9):
      seg = rng.random(shape) < p
      np.testing.assert_array_equal(metrics.boundary_map(seg), seg2bmap_loops(seg))


def test_boundary_radius():
  assert metrics.boundary_radius((64, 64)) == 1  # 0.008 * 90.5 = 0.72
  assert metrics.boundary_radius((100, 100)) == 2  # 0.008 * 141.4 = 1.13
  assert metrics.boundary_radius((480, 854)) == 8  # DAVIS 480p: 0.008 * 979.6 = 7.84
  assert metrics.boundary_radius((480, 854), bound_th=3) == 3  # >= 1: pixels
  assert metrics.disk(1).sum() == 5 and metrics.disk(2).sum() == 13


def test_distance_transform_equals_disk_dilation():
  rng = np.random.default_rng(1)
  for radius in (1, 2, 3, 5):
    for _ in range(3):
      src = rng.random((23, 31)) < 0.1
      tgt = rng.random((23, 31)) < 0.05
      dil = ndimage.binary_dilation(tgt, structure=metrics.disk(radius))
      assert metrics._count_near(src, tgt, radius) == np.count_nonzero(src & dil)


def brute_force_f(pred, gt, radius):
  bp, bg = seg2bmap_loops(pred), seg2bmap_loops(gt)
  fp = ndimage.binary_dilation(bp, structure=metrics.disk(radius))
  gp = ndimage.binary_dilation(bg, structure=metrics.disk(radius))
  p, r = (bp & gp).sum() / bp.sum(), (bg & fp).sum() / bg.sum()
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_one_pixel_shift_is_inside_the_tolerance():
  gt = square((64, 64), 20, 20, 10)  # radius 1 at 64x64
  pred = square((64, 64), 20, 21, 10)
  assert metrics.boundary_precision_recall(pred, gt) == (1.0, 1.0)
  assert metrics.boundary_f(pred, gt) == 1.0
  assert metrics.region_j(pred, gt) == pytest.approx(90 / 110)


def test_three_pixel_shift_is_outside_the_tolerance():
  # Rings of 40 px (columns a..a+10 vs a+3..a+13). With radius 1, of the predicted ring only
  # 9 px of the top row and 9 of the bottom row (x <= a+11) match, plus the two left-column
  # pixels next to the GT's top and bottom rows: 20 of 40, and the same for the GT ring.
  gt = square((64, 64), 20, 20, 10)
  pred = square((64, 64), 20, 23, 10)
  p, r = metrics.boundary_precision_recall(pred, gt)
  assert (p, r) == (pytest.approx(20 / 40), pytest.approx(20 / 40))
  assert metrics.boundary_f(pred, gt) == pytest.approx(0.5)
  assert metrics.boundary_f(pred, gt) == pytest.approx(brute_force_f(pred, gt, 1))


def test_two_pixel_shift_depends_on_the_image_diagonal():
  # Radius 1 at 64x64: 10 + 10 (top, bottom rows) + 2 (left-column ends) of 40 ring pixels
  # match; radius 2 at 100x100: all match.
  assert metrics.boundary_f(square((64, 64), 20, 22, 10), square((64, 64), 20, 20, 10)) \
      == pytest.approx(22 / 40)
  assert metrics.boundary_f(square((100, 100), 20, 22, 10), square((100, 100), 20, 20, 10)) == 1.0
  # An explicit pixel tolerance overrides the diagonal rule.
  assert metrics.boundary_f(square((64, 64), 20, 22, 10), square((64, 64), 20, 20, 10),
                            bound_th=2) == 1.0


def test_boundary_edge_cases():
  z = np.zeros((64, 64), bool)
  a = square((64, 64), 20, 20, 10)
  assert metrics.boundary_precision_recall(z, a) == (1.0, 0.0)  # no predicted boundary
  assert metrics.boundary_f(z, a) == 0.0
  assert metrics.boundary_precision_recall(a, z) == (0.0, 1.0)  # no GT boundary
  assert metrics.boundary_f(a, z) == 0.0
  assert metrics.boundary_precision_recall(z, z) == (1.0, 1.0)
  assert metrics.boundary_f(z, z) == 1.0
  # DAVIS quirk: an all-ones mask has no boundary, so against an empty GT it scores F = 1.
  assert metrics.boundary_f(np.ones((64, 64), bool), z) == 1.0
  # Both have boundaries, none within the tolerance: P = R = 0 -> F = 0.
  assert metrics.boundary_f(square((64, 64), 2, 2, 5), square((64, 64), 50, 50, 5)) == 0.0


def test_boundary_precision_differs_from_recall():
  gt = square((64, 64), 20, 20, 10)
  pred = gt | square((64, 64), 50, 50, 2)  # extra far 2x2 blob: an 8-px ring, all unmatched
  p, r = metrics.boundary_precision_recall(pred, gt)
  assert (p, r) == (pytest.approx(40 / 48), 1.0)
  assert metrics.boundary_f(pred, gt) == pytest.approx(10 / 11)
  assert metrics.boundary_f(pred, gt) == pytest.approx(brute_force_f(pred, gt, 1))


def test_boundary_f_matches_brute_force_on_random_blobs():
  rng = np.random.default_rng(2)
  for _ in range(5):
    gt = ndimage.gaussian_filter(rng.normal(size=(40, 50)), 3) > 0
    pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(1, 3)))
    pred ^= rng.random(gt.shape) < 0.02
    assert 0 < gt.sum() < gt.size
    assert metrics.boundary_f(pred, gt) == pytest.approx(brute_force_f(pred, gt, 1))


# ----------------------------------------------------------------------------------------- video


def two_object_video(t=4):
  gt = np.zeros((t, 64, 64), np.uint8)
  gt[:, 10:20, 10:20] = 1
  gt[:, 40:50, 40:50] = 2
  pred = gt.copy()
  pred[0][pred[0] == 1] = 0  # object 1 lost on the first and last frames
  pred[-1][pred[-1] == 1] = 0
  return pred, gt


def test_jf_video_skips_first_and_last_frames():
  pred, gt = two_object_video()
  assert metrics.jf_video(pred, gt) == {1: (100.0, 100.0), 2: (100.0, 100.0)}
  res = metrics.jf_video(pred, gt, skip_first_last=False)
  # Frames 0 and 3: J = 0, and F = 0 (no predicted boundary: P = 1, R = 0).
  assert res == {1: (50.0, 50.0), 2: (100.0, 100.0)}
  assert metrics.jf_dataset([res]) == {"J": 75.0, "F": 75.0, "J&F": 75.0, "num_objects": 2,
                                       "num_videos": 1}


def test_jf_video_accepts_per_object_masks():
  pred, gt = two_object_video()
  as_dict = lambda lab: {k: lab == k for k in (1, 2)}  # noqa: E731
  assert metrics.jf_video(as_dict(pred), as_dict(gt), skip_first_last=False) == \
      metrics.jf_video(pred, gt, skip_first_last=False)
  # An object missing from the predictions is an empty mask.
  res = metrics.jf_video({2: gt == 2}, as_dict(gt), skip_first_last=False)
  assert res == {1: (0.0, 0.0), 2: (100.0, 100.0)}


def test_jf_video_protocols_differ_for_late_objects():
  gt = np.zeros((5, 64, 64), np.uint8)
  gt[:, 10:20, 10:20] = 1
  gt[2:, 40:50, 40:50] = 3  # appears at frame 2 and is never predicted
  pred = np.where(gt == 1, 1, 0).astype(np.uint8)
  # DAVIS scores frames 1..3 for every object: frame 1 is empty/empty (J = F = 1), then misses.
  davis = metrics.jf_video(pred, gt)
  assert davis[1] == (100.0, 100.0)
  assert davis[3] == (pytest.approx(100 / 3), pytest.approx(100 / 3))
  # SA-V starts an object at its first appearance: frames 2..3, both misses.
  assert metrics.jf_video(pred, gt, protocol="sav") == {1: (100.0, 100.0), 3: (0.0, 0.0)}


def test_jf_video_errors():
  pred, gt = two_object_video(t=2)
  with pytest.raises(ValueError, match="no frames"):
    metrics.jf_video(pred, gt)
  with pytest.raises(ValueError, match="frames"):
    metrics.jf_video(pred[:1], gt)
  with pytest.raises(ValueError, match="protocol"):
    metrics.jf_video(pred, gt, skip_first_last=False, protocol="mose")


def test_jf_dataset_averages_objects_not_videos():
  res = {"a": {1: (100.0, 80.0), 2: (50.0, 60.0)}, "b": {1: (20.0, 40.0)}}
  out = metrics.jf_dataset(res)
  assert out["J"] == pytest.approx(170 / 3)  # a per-video mean would give 47.5
  assert out["F"] == pytest.approx(60.0)
  assert out["J&F"] == pytest.approx((170 / 3 + 60) / 2)
  assert (out["num_objects"], out["num_videos"]) == (3, 2)


# ------------------------------------------------------------------------------------ image mIoU


def test_area_buckets():
  assert [metrics.area_bucket(a) for a in (0, 1023, 1024, 9215, 9216, 1e6)] == \
      ["small", "small", "medium", "medium", "large", "large"]


def test_miou_overall_and_per_bucket():
  out = metrics.miou([1.0, 0.5, 0.25, 0.75], [100, 1024, 5000, 9216])
  assert out["mIoU"] == pytest.approx(62.5)
  assert out["mIoU_small"] == pytest.approx(100.0)
  assert out["mIoU_medium"] == pytest.approx(37.5)
  assert out["mIoU_large"] == pytest.approx(75.0)
  assert (out["num"], out["num_small"], out["num_medium"], out["num_large"]) == (4, 1, 2, 1)
  only_small = metrics.miou([0.5], [10])
  assert math.isnan(only_small["mIoU_large"]) and only_small["num_large"] == 0
  with pytest.raises(ValueError):
    metrics.miou([0.5, 0.1], [10])
  with pytest.raises(ValueError):
    metrics.miou([], [])


def test_miou_from_masks():
  gt = [square((128, 128), 0, 0, 20), square((128, 128), 0, 0, 100)]
  pred = [square((128, 128), 0, 0, 20, w=10), square((128, 128), 0, 0, 100)]
  ious = [metrics.mask_iou(p, g) for p, g in zip(pred, gt)]
  out = metrics.miou(ious, [g.sum() for g in gt])
  assert (out["mIoU_small"], out["mIoU_large"], out["mIoU"]) == \
      (pytest.approx(50.0), pytest.approx(100.0), pytest.approx(75.0))

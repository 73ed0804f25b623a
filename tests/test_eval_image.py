"""eval.image: mIoU and mask AP against hand-computed values; the CLI end to end; eval.report.

The hand-made set has three rectangles; the fake predictor returns each prompt box shifted
5 px right, so a w-wide rectangle scores IoU (w - 5) / (w + 5).
"""

import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from eval import image as ev

SIDE = 64
# (image id, x0, y0, x1, y1): A 10x10 (small), B 36x40 (medium), C 20x30 (small).
RECTS = {1: (1, 8, 8, 18, 18), 2: (1, 20, 20, 56, 60), 3: (2, 10, 10, 30, 40)}
SHIFT_IOU = {1: 5 / 15, 2: 31 / 41, 3: 15 / 25}


def _rect(x0, y0, x1, y1, shape=(SIDE, SIDE)):
  m = np.zeros(shape, bool)
  m[max(y0, 0):y1, max(x0, 0):x1] = True
  return m


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_coco")
  (root / "images").mkdir()
  images, anns = [], []
  for i in (1, 2):
    Image.fromarray(np.full((SIDE, SIDE, 3), 90 * i, np.uint8)).save(root / "images" / f"{i}.png")
    images.append({"id": i, "file_name": f"images/{i}.png", "height": SIDE, "width": SIDE})
  for aid, (img, x0, y0, x1, y1) in RECTS.items():
    rle = mask_utils.encode(np.asfortranarray(_rect(x0, y0, x1, y1).astype(np.uint8)))
    anns.append({"id": aid, "image_id": img, "category_id": 1, "iscrowd": 0,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
  path = root / "annotations.json"
  path.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": 1, "name": "rect"}]}))
  return str(path)


def _shifted(image, boxes):
  """Each box filled, shifted 5 px right; predicted IoU = width / 50 (B > C > A)."""
  masks = np.stack([_rect(int(x0) + 5, int(y0), int(x1) + 5, int(y1), image.shape[:2])
                    for x0, y0, x1, y1 in boxes])
  return masks, (boxes[:, 2] - boxes[:, 0]) / 50.0


def _filled(image, boxes):
  masks = np.stack([_rect(int(x0), int(y0), int(x1), int(y1), image.shape[:2])
                    for x0, y0, x1, y1 in boxes])
  return masks, np.full(len(boxes), 0.9)


def _run(tiny_coco, predict, detections=None):
  gt, root = ev.load_gt(tiny_coco)
  ids = list(gt.imgs)
  summary, rows, results = ev.evaluate(predict, gt, root, img_ids=ids, detections=detections,
                                       progress=False)
  return summary, rows, ev.coco_mask_ap(gt, results, ids)


def test_miou_matches_hand_computed(tiny_coco):
  summary, rows, ap = _run(tiny_coco, _shifted)
  assert [r["ann_id"] for r in rows] == [1, 2, 3]
  for r in rows:
    assert r["iou"] == pytest.approx(SHIFT_IOU[r["ann_id"]], abs=1e-12)
  assert summary["mIoU"] == pytest.approx(100 * (1 / 3 + 31 / 41 + 3 / 5) / 3)   # 56.33
  assert summary["mIoU_small"] == pytest.approx(100 * (1 / 3 + 3 / 5) / 2)       # 46.67
  assert summary["mIoU_medium"] == pytest.approx(100 * 31 / 41)
  assert math.isnan(summary["mIoU_large"]) and summary["num_small"] == 2
  # AP50 by hand: scores rank B (IoU .76), C (.6), A (.33): TP, TP, FP -> precision 1 up to
  # recall 2/3, so 67 of COCO's 101 recall points (0.00 .. 0.66) have precision 1.
  assert ap["AP50"] == pytest.approx(100 * 67 / 101, abs=1e-6)
  assert ap["AP75"] == pytest.approx(100 * 34 / 101, abs=1e-6)   # only B: recall 1/3


def test_perfect_predictions_score_100(tiny_coco):
  summary, _, ap = _run(tiny_coco, _filled)
  assert summary["mIoU"] == pytest.approx(100.0)
  assert ap["AP"] == pytest.approx(100.0) and ap["AP_small"] == pytest.approx(100.0)


def test_detector_boxes_matched_for_miou(tiny_coco, tmp_path):
  dets = [{"image_id": 1, "category_id": 1, "bbox": [20, 20, 36, 40], "score": 0.8},   # = B
          {"image_id": 1, "category_id": 1, "bbox": [40, 0, 20, 10], "score": 0.9},    # FP
          {"image_id": 2, "category_id": 1, "bbox": [22, 30, 20, 30], "score": 0.5}]   # C, IoU<.5
  path = tmp_path / "dets.json"
  path.write_text(json.dumps(dets))
  gt, _ = ev.load_gt(tiny_coco)
  detections = ev.load_detections(str(path), gt)
  assert [d["score"] for d in detections[1]] == [0.9, 0.8]          # best first
  summary, rows, ap = _run(tiny_coco, _filled, detections)
  assert [r["matched"] for r in rows] == [False, True, False]
  assert summary["mIoU"] == pytest.approx(100 / 3) and summary["num_matched"] == 1
  assert summary["num_prompts"] == 3
  assert 0 < ap["AP50"] < 100
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
  with pytest.raises(ev.UserError, match="image_id 7"):
    ev.load_detections(str(bad), gt)


def test_box_matching_is_greedy_one_to_one():
  gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)
  det = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [100, 100, 110, 110]], np.float32)
  assert ev.match_boxes(gt, det, 0.5) == {0: (1, 1.0), 1: (0, 1.0)}
  assert ev.match_boxes(gt, det[2:], 0.5) == {}


def test_cli_end_to_end_and_report(tmp_path, capsys):
  """The default model on two synthetic images, then a report over the run."""
  from eval import report
  from qsam2_jax import checkpoint
  from convert.random_checkpoint import default_checkpoint
  from qsam2_jax.data.synthetic import default_image_data
  run = tmp_path / "run"
  shutil.copytree(default_checkpoint(), run)
  rc = ev.main(["--ckpt", str(run), "--data", default_image_data(), "--max-images", "2",
                "--overlays", "1", "--no-progress"])
  assert rc == 0
  out = run / "eval"
  metrics = json.loads((out / "image_metrics.json").read_text())
  assert metrics["num"] == len((out / "image_instances.csv").read_text().splitlines()) - 1 > 0
  assert 0 <= metrics["mIoU"] <= 100 and metrics["model_kind"] == "fp"
  assert len(os.listdir(out / "overlays")) == 1
  assert checkpoint.read_meta(run)["step"] == 0   # the eval folder does not disturb Orbax
  assert "mIoU" in capsys.readouterr().out

  from eval import size as size_cli
  assert size_cli.main(["--ckpt", str(run), "--json", str(out / "size.json")]) == 0
  assert "whole model 1.00x" in capsys.readouterr().out      # a float model: all 16-bit

  with open(run / "metrics.jsonl", "w") as f:
    for s in range(5):
      f.write(json.dumps({"step": s, "loss": 1.0 / (s + 1), "lr": 1e-4}) + "\n")
    f.write("{truncated")
  (run / "vrc_weights.png").write_bytes((out / "overlays" / os.listdir(out / "overlays")[0])
                                        .read_bytes())
  md = tmp_path / "r" / "report.md"
  assert report.main(["--runs", str(run), "--out", str(md)]) == 0
  lines = md.read_text().splitlines()
  head = lines.index(next(line for line in lines if line.startswith("| run | method")))
  cells = [c.strip() for c in lines[head + 2].strip("|").split("|")]
  assert cells[0] == "run" and cells[1] == "fp" and cells[2] == "FP"
  assert cells[3] == f"{metrics['mIoU']:.2f}" and cells[5] == "–"
  assert cells[6].endswith("(1.00x smaller than BF16)")
  assert (tmp_path / "r" / "report_figures" / "training_curves.png").is_file()
  assert (tmp_path / "r" / "report_figures" / "run_vrc_weights.png").is_file()


def test_cli_errors(tmp_path, capsys):
  assert ev.main(["--ckpt", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
  assert "error:" in capsys.readouterr().err
  assert ev.main(["--max-images", "0"]) == 2
  from eval import report
  assert report.main(["--runs", str(tmp_path / "missing")]) == 2
  assert "no such file" in capsys.readouterr().err


def test_floors_score_as_hand_computed(tiny_coco):
  """The rectangles' box floor is exact (IoU 1); the inscribed ellipse covers about pi/4 of each
  rectangle: its IoU is the ellipse's pixel count over the rectangle's, counted independently."""
  summary, rows, _ = _run(tiny_coco, ev.floor_fn("floor-box"))
  assert all(r["iou"] == 1.0 for r in rows) and summary["mIoU"] == pytest.approx(100.0)
  _, rows, _ = _run(tiny_coco, ev.floor_fn("floor-ellipse"))
  for r in rows:
    _, x0, y0, x1, y1 = RECTS[r["ann_id"]]
    inside = sum(1 for yy in range(y0, y1) for xx in range(x0, x1)
                 if ((xx + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
                 + ((yy + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1)
    assert r["iou"] == pytest.approx(inside / ((x1 - x0) * (y1 - y0)), abs=1e-12)
    assert 0.7 < r["iou"] < 0.85   # about pi / 4


def test_click_prompt_is_the_innermost_pixel(tiny_coco):
  """One click per instance at the pixel farthest from the boundary: for a rectangle the centre
  (first of the tied pixels); a predictor that fills the 10x10 square around the click scores
  the overlap of that square with the rectangle, computed here by hand."""
  seen = []

  def square(image, points):
    seen.extend(map(tuple, points))
    masks = np.stack([_rect(int(x) - 5, int(y) - 5, int(x) + 5, int(y) + 5, image.shape[:2])
                      for x, y in points])
    return masks, np.ones(len(points))

  gt, root = ev.load_gt(tiny_coco)
  summary, rows, _ = ev.evaluate(square, gt, root, img_ids=list(gt.imgs), progress=False,
                                 prompt="click")
  # A (8..18)^2: the centre pixels 12, 13 tie at distance 5 -> the first, (12.5, 12.5).
  assert seen[0] == (12.5, 12.5)
  for (x, y), r in zip(seen, rows):
    _, x0, y0, x1, y1 = RECTS[r["ann_id"]]
    cx, cy = int(x), int(y)
    d = min(cx - x0 + 1, x1 - cx, cy - y0 + 1, y1 - cy)
    assert d == min((x1 - x0 + 1) // 2, (y1 - y0 + 1) // 2)   # no pixel lies deeper
    sq = _rect(cx - 5, cy - 5, cx + 5, cy + 5)
    rect = _rect(x0, y0, x1, y1)
    assert r["iou"] == pytest.approx((sq & rect).sum() / (sq | rect).sum(), abs=1e-12)
  with pytest.raises(ev.UserError, match="--boxes gt"):
    ev.evaluate(square, gt, root, img_ids=list(gt.imgs), progress=False, prompt="click",
                detections={})


def test_floor_cli(tiny_coco, tmp_path):
  out = tmp_path / "floor"
  assert ev.main(["--predict", "floor-box", "--data", tiny_coco, "--out", str(out),
                  "--overlays", "0", "--no-progress"]) == 0
  metrics = json.loads((out / "image_metrics.json").read_text())
  assert metrics["mIoU"] == pytest.approx(100.0) and metrics["predict"] == "floor-box"
  assert ev.main(["--predict", "floor-box", "--prompt", "click", "--data", tiny_coco,
                  "--out", str(out)]) == 2

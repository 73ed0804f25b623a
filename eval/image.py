"""Instance segmentation with box or click prompts on a COCO-format set: mIoU and COCO mask AP.

  python -m eval.image --ckpt runs/w2a2 --data coco/annotations/instances_val2017.json
  python -m eval.image --ckpt w2a2.qsam2 --data coco/... --boxes detections.json
  python -m eval.image --ckpt runs/w2a2 --data coco/... --prompt click
  python -m eval.image --predict floor-ellipse --data coco/...   # a model-free floor
  python -m eval.image                       # embedded random SAM2.1-t on synthetic shapes

Each non-crowd instance is prompted with its ground-truth box (`--boxes gt`) and the model
gives one mask (single-mask output). `--prompt click` prompts each instance with one positive
click instead, at the mask pixel farthest from its boundary (SAM's deterministic first click),
and keeps the best of the three multimask outputs by predicted IoU (SAM2's reading of a
one-point prompt). `--predict floor-box` / `floor-ellipse` replace the model by the prompt box
itself (every pixel centre inside the box) or the ellipse inscribed in it, scored by the same
code: the floor a model has to beat to show it segments rather than copies the box.
mIoU is the mean IoU of predicted and ground-truth masks over instances, overall and per COCO
area bucket (by the annotation's `area`). Mask AP comes from pycocotools' COCOeval on the same
predictions, scored by the predicted IoU.

With `--boxes FILE` (a COCO results file: image_id, category_id, bbox [x, y, w, h], score) the
detections are the prompts: every detection (up to --max-dets per image, best first) gives one
mask for AP, scored predicted IoU x detector score, with the detector's category. For mIoU each
ground-truth instance is matched, class-agnostically and one-to-one, to the detection whose box
overlaps it most (greedy on box IoU, at least --match-iou); an unmatched instance scores IoU 0.

Outputs in --out (default: <ckpt>/eval for a run directory): image_metrics.json (summary),
image_instances.csv (one row per ground-truth instance), overlays/ (first --overlays images).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from qsam2_jax.cli import (
  ArgumentParser,
  image_size,
  nonnegative_float,
  nonnegative_int,
  positive_int,
)
from qsam2_jax.errors import UserError, report_user_errors

# predict(image (H, W, 3) uint8, prompts) -> (masks (K, H, W) bool, pred_iou (K,)); prompts are
# boxes (K, 4) xyxy, or with `prompt="click"` one positive click per instance, (K, 2) xy.
PredictFn = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]
PROMPTS = ("box", "click")
PREDICTORS = ("model", "floor-box", "floor-ellipse")
CSV_FIELDS = ("image_id", "ann_id", "category_id", "area", "bucket", "iou", "pred_iou",
              "det_score", "box_iou", "matched")


# ---------------------------------------------------------------------------- data


def _quiet():
  """pycocotools prints progress to stdout; keep the command's output readable."""
  return contextlib.redirect_stdout(io.StringIO())


def load_gt(data: str):
  """(pycocotools COCO, image folder) of a COCO JSON, or a folder holding annotations.json."""
  from pycocotools.coco import COCO

  from qsam2_jax.data.coco import CocoSource
  src = CocoSource(data, include_crowd=True)   # validates the file, finds the image folder
  with _quiet():
    gt = COCO(str(src.path))
  return gt, str(src.image_root)


def read_image(gt, image_root: str, img_id: int) -> np.ndarray:
  from PIL import Image
  info = gt.imgs[img_id]
  path = os.path.join(image_root, info["file_name"])
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise UserError(f"cannot read image {path} (image id {img_id}): {e}") from e


def xywh_to_xyxy(b: Sequence[float]) -> np.ndarray:
  x, y, w, h = (float(v) for v in b)
  return np.array([x, y, x + w, y + h], np.float32)


def load_detections(path: str, gt, max_dets: int = 100) -> Dict[int, List[Dict[str, Any]]]:
  """A COCO results file -> image id -> detections (best `max_dets` first)."""
  import json
  try:
    with open(path) as f:
      dets = json.load(f)
  except FileNotFoundError as e:
    raise UserError(f"--boxes {path}: no such file") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"--boxes {path}: not valid JSON ({e})") from e
  if not isinstance(dets, list):
    raise UserError(f"--boxes {path}: expected a COCO results list of detections")
  out: Dict[int, List[Dict[str, Any]]] = {}
  for k, d in enumerate(dets):
    ok = (isinstance(d, dict) and "image_id" in d and isinstance(d.get("bbox"), list)
          and len(d["bbox"]) == 4 and "category_id" in d)
    if not ok:
      raise UserError(f"--boxes {path}: detection {k} lacks image_id, category_id or a "
                      "4-number bbox")
    b = d["bbox"]
    if not (all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
            and b[2] >= 0 and b[3] >= 0):
      raise UserError(f"--boxes {path}: detection {k} has bbox {b}; expected finite "
                      "[x, y, width, height] with width, height >= 0")
    if d["image_id"] not in gt.imgs:
      raise UserError(f"--boxes {path}: detection {k} refers to image_id {d['image_id']!r}, "
                      "which the annotation file does not have")
    out.setdefault(d["image_id"], []).append(d)
  return {i: sorted(v, key=lambda d: -float(d.get("score", 1.0)))[:max_dets]
          for i, v in out.items()}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, 4) x (M, 4) xyxy boxes -> (N, M) IoU."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(gt_boxes: np.ndarray, det_boxes: np.ndarray, min_iou: float
                ) -> Dict[int, Tuple[int, float]]:
  """Greedy one-to-one matching, highest box IoU first: gt index -> (det index, box IoU)."""
  if len(gt_boxes) == 0 or len(det_boxes) == 0:
    return {}
  iou = box_iou(gt_boxes, det_boxes)
  order = np.argsort(-iou, axis=None, kind="stable")
  out: Dict[int, Tuple[int, float]] = {}
  used = set()
  for flat in order:
    g, d = divmod(int(flat), iou.shape[1])
    if iou[g, d] < min_iou or iou[g, d] <= 0:
      break
    if g in out or d in used:
      continue
    out[g] = (d, float(iou[g, d]))
    used.add(d)
  return out


# ---------------------------------------------------------------------------- evaluation


def center_click(mask: np.ndarray) -> np.ndarray:
  """(x, y) of the mask pixel farthest from the mask's boundary (outside the image counts as
  background), the first of ties in row-major order: SAM's deterministic first click."""
  from scipy import ndimage
  if not mask.any():
    raise ValueError("an empty mask has no pixel to click")
  dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
  y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
  return np.array([x + 0.5, y + 0.5], np.float32)   # the pixel's centre


def box_floor_masks(boxes: np.ndarray, shape: Tuple[int, int], *, ellipse: bool) -> np.ndarray:
  """(K, H, W): the pixels whose centre lies in each xyxy box, or in the ellipse inscribed in
  it (axes along the box's sides)."""
  h, w = shape
  y = np.arange(h, dtype=np.float64)[:, None] + 0.5
  x = np.arange(w, dtype=np.float64)[None, :] + 0.5
  out = np.zeros((len(boxes), h, w), bool)
  for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
    if ellipse:
      a, b = (x1 - x0) / 2, (y1 - y0) / 2
      if a > 0 and b > 0:
        out[k] = ((x - (x0 + x1) / 2) / a) ** 2 + ((y - (y0 + y1) / 2) / b) ** 2 <= 1.0
    else:
      out[k] = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
  return out


def floor_fn(kind: str) -> PredictFn:
  """`--predict floor-box` / `floor-ellipse`: the prompt box as the mask (predicted IoU 1)."""
  if kind not in ("floor-box", "floor-ellipse"):
    raise ValueError(f"unknown floor {kind!r}")

  def predict(image: np.ndarray, boxes: np.ndarray):
    return (box_floor_masks(boxes, image.shape[:2], ellipse=kind == "floor-ellipse"),
            np.ones(len(boxes)))
  return predict


def evaluate(predict: PredictFn, gt, image_root: str, *, img_ids: Sequence[int],
             detections: Optional[Dict[int, List[Dict[str, Any]]]] = None,
             match_iou: float = 0.5, overlays: int = 0, overlay_dir: Optional[str] = None,
             progress: bool = True, prompt: str = "box") -> Tuple[Dict[str, Any],
                                                                 List[Dict[str, Any]],
                                                                 List[Dict[str, Any]]]:
  """Runs `predict` on every image; returns (summary, per-instance rows, COCO results).

  `prompt`: "box" (each instance's ground-truth box, or the detections) or "click" (one
  positive click per ground-truth instance, `center_click`; `predict` then gets (K, 2) points).
  The summary holds `eval.metrics.miou`'s keys (percent), the number of prompts, and, with
  detections, how many instances were matched.
  """
  from tqdm import tqdm

  from eval.metrics import area_bucket, mask_iou, miou
  from qsam2_jax.data import rle
  if prompt not in PROMPTS:
    raise UserError(f"--prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
  if prompt == "click" and detections is not None:
    raise UserError("--prompt click prompts the ground-truth instances: use it with --boxes gt")
  rows: List[Dict[str, Any]] = []
  results: List[Dict[str, Any]] = []
  prompts = 0
  for n, img_id in enumerate(tqdm(img_ids, desc="images", unit="img", disable=not progress)):
    anns = [a for a in gt.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
    dets = None if detections is None else detections.get(img_id, [])
    if not anns and not dets:
      continue
    image = read_image(gt, image_root, img_id)
    gt_masks = []
    for ann in anns:
      try:
        gt_masks.append(rle.decode(ann["segmentation"], *image.shape[:2]))
      except ValueError as e:
        raise UserError(f"annotation {ann.get('id')!r} of image {img_id}: {e}") from e
    gt_boxes = np.stack([xywh_to_xyxy(a["bbox"]) for a in anns]) if anns \
        else np.zeros((0, 4), np.float32)
    if dets is None:
      boxes, scores = gt_boxes, np.ones(len(anns))
      cats = [a["category_id"] for a in anns]
    else:
      boxes = np.stack([xywh_to_xyxy(d["bbox"]) for d in dets]) if dets \
          else np.zeros((0, 4), np.float32)
      scores = np.array([float(d.get("score", 1.0)) for d in dets])
      cats = [d["category_id"] for d in dets]
    if prompt == "click":   # instances whose mask decodes empty cannot be clicked: IoU 0
      clickable = [g for g, m in enumerate(gt_masks) if m.any()]
      inputs = (np.stack([center_click(gt_masks[g]) for g in clickable]) if clickable
                else np.zeros((0, 2), np.float32))
      index = {g: k for k, g in enumerate(clickable)}
    else:
      inputs, index = boxes, None
    masks, pred_iou = predict(image, inputs) if len(inputs) else (
        np.zeros((0,) + image.shape[:2], bool), np.zeros(0))
    prompts += len(inputs)
    for k in range(len(inputs)):
      src = k if index is None else clickable[k]
      results.append({"image_id": img_id, "category_id": cats[src],
                      "segmentation": rle.encode(masks[k]),
                      "score": float(pred_iou[k]) * float(scores[src])})
    if dets is not None:
      match = match_boxes(gt_boxes, boxes, match_iou)
    elif index is not None:
      match = {g: (k, 1.0) for g, k in index.items()}
    else:
      match = {g: (g, 1.0) for g in range(len(anns))}
    for g, ann in enumerate(anns):
      gmask = gt_masks[g]
      area = float(ann["area"]) if isinstance(ann.get("area"), (int, float)) \
          else float(gmask.sum())
      d, biou = match.get(g, (None, 0.0))
      score_d = d if index is None else (clickable[d] if d is not None else None)
      rows.append({"image_id": img_id, "ann_id": ann.get("id"),
                   "category_id": ann["category_id"], "area": area, "bucket": area_bucket(area),
                   "iou": mask_iou(masks[d], gmask) if d is not None else 0.0,
                   "pred_iou": float(pred_iou[d]) if d is not None else float("nan"),
                   "det_score": float(scores[score_d]) if d is not None else float("nan"),
                   "box_iou": biou, "matched": d is not None})
    if n < overlays and overlay_dir is not None:
      write_overlay(os.path.join(overlay_dir, f"{n:04d}_image{img_id}.png"), image, gt_masks,
                    gt_boxes, masks, boxes if index is None else gt_boxes[clickable])
  if not rows:
    raise UserError("no ground-truth instance to evaluate in the selected images")
  summary = miou([r["iou"] for r in rows], [r["area"] for r in rows])
  summary.update(num_images=len(img_ids), num_prompts=prompts,
                 num_matched=int(sum(r["matched"] for r in rows)))
  return summary, rows, results


def coco_mask_ap(gt, results: List[Dict[str, Any]], img_ids: Sequence[int]) -> Dict[str, float]:
  """COCO mask AP (percent) of `results` on `img_ids` through pycocotools' COCOeval."""
  from pycocotools.cocoeval import COCOeval
  names = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
  if not results:
    return {k: 0.0 for k in names}
  with _quiet():
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iouType="segm")
    ev.params.imgIds = list(img_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  # COCOeval reports -1 where a bucket has no ground truth.
  return {k: (100.0 * float(v) if v >= 0 else float("nan")) for k, v in zip(names, ev.stats)}


def write_overlay(path: str, image: np.ndarray, gt_masks, gt_boxes, masks, boxes) -> str:
  """Ground truth and prediction side by side, each instance in its own colour."""
  from eval import plots
  gt_tile = plots.overlay(image, {i + 1: m for i, m in enumerate(gt_masks)},
                          boxes={i + 1: b for i, b in enumerate(gt_boxes)})
  pr_tile = plots.overlay(image, {i + 1: m for i, m in enumerate(masks)},
                          boxes={i + 1: b for i, b in enumerate(boxes)})
  img = plots.grid([[gt_tile, pr_tile]], col_labels=["ground truth", "prediction"],
                   max_side=480)
  from qsam2_jax.files import atomic_path
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return path


# ---------------------------------------------------------------------------- the model


def _bucket(n: int, smallest: int, chunk: int) -> int:
  b = smallest
  while b < n and b < chunk:
    b *= 2
  return min(b, chunk)


def predictor_fn(predictor, *, chunk: int = 32, smallest: int = 4,
                 prompt: str = "box") -> PredictFn:
  """Batches an image's prompts into one `predict` call, padded to a power of two.

  Padding (repeating the last prompt) bounds the compiled shapes to log2(chunk / smallest) + 1.
  Boxes give the single-mask output; a click the best of the three multimask outputs by
  predicted IoU.
  """
  def predict(image: np.ndarray, prompts: np.ndarray):
    predictor.set_image(image)
    masks, ious = [], []
    for s in range(0, len(prompts), chunk):
      part = np.asarray(prompts[s:s + chunk], np.float32)
      size = _bucket(len(part), smallest, chunk)
      padded = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
      if prompt == "click":
        m, iou, _ = predictor.predict(point_coords=padded[:, None, :],
                                      point_labels=np.ones((size, 1), np.int32),
                                      multimask_output=True)
        best = np.argmax(iou, axis=1)[:len(part)]
        rows = np.arange(len(part))
        masks.append(m[rows, best])
        ious.append(iou[rows, best])
      else:
        m, iou, _ = predictor.predict(box=padded, multimask_output=False)
        masks.append(m[:len(part), 0])
        ious.append(iou[:len(part), 0])
    return np.concatenate(masks), np.concatenate(ious)
  return predict


def default_out(ckpt: str) -> str:
  if os.path.isdir(ckpt):
    return os.path.join(ckpt, "eval")
  return os.path.splitext(os.path.abspath(ckpt))[0] + "_eval"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m eval.image", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None,
                 help="run / Orbax checkpoint directory, official .pt or packed file (default: "
                      "the embedded random SAM2.1-t)")
  p.add_argument("--step", type=nonnegative_int, default=None,
                 help="checkpoint step (default: latest)")
  p.add_argument("--data", default=None,
                 help="COCO annotation JSON, or a folder with annotations.json (default: the "
                      "embedded synthetic set)")
  p.add_argument("--boxes", default="gt",
                 help="'gt' (ground-truth boxes) or a COCO results JSON of detections")
  p.add_argument("--prompt", choices=PROMPTS, default="box",
                 help="box: the ground-truth box (or detection); click: one positive click per "
                      "ground-truth instance, at the pixel farthest from its boundary "
                      "(default: box)")
  p.add_argument("--predict", choices=PREDICTORS, default="model",
                 help="model, or a model-free floor: floor-box (mask = the prompt box) or "
                      "floor-ellipse (the ellipse inscribed in it); floors need --prompt box "
                      "and load no checkpoint (default: model)")
  p.add_argument("--image-size", type=image_size, default=None,
                 help="model input size (default: the checkpoint's)")
  p.add_argument("--out", default=None,
                 help="output folder (default: <ckpt>/eval, or <file>_eval for a file; "
                      "runs/eval_image for the embedded checkpoint)")
  p.add_argument("--max-images", type=positive_int, default=None,
                 help="evaluate the first N images")
  p.add_argument("--overlays", type=nonnegative_int, default=4,
                 help="write overlay PNGs for the first K images (default: 4)")
  p.add_argument("--max-dets", type=positive_int, default=100,
                 help="detections per image used from --boxes FILE (default: 100, best first)")
  p.add_argument("--match-iou", type=nonnegative_float, default=0.5,
                 help="least box IoU matching a detection to a ground-truth instance for mIoU "
                      "(default: 0.5)")
  p.add_argument("--chunk", type=positive_int, default=32,
                 help="largest number of boxes decoded in one call (default: 32)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def _fmt(v: float) -> str:
  return "–" if v != v else f"{v:.2f}"


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  from qsam2_jax import checkpoint, preflight
  floor = args.predict != "model"
  if floor and args.prompt != "box":
    raise UserError(f"--predict {args.predict} is the prompt box itself: use it with --prompt box")
  if floor and args.ckpt is not None:
    raise UserError(f"--predict {args.predict} uses no model: leave out --ckpt")
  if floor and args.out is None:
    raise UserError(f"--predict {args.predict}: give --out (there is no checkpoint to write "
                    "beside)")
  if args.prompt == "click" and args.boxes != "gt":
    raise UserError("--prompt click prompts the ground-truth instances: use it with --boxes gt")
  # Validate first: checkpoint, annotations (every one must decode), detections, output folder.
  if args.ckpt is not None:
    checkpoint.check(args.ckpt, "--ckpt", step=args.step)
  if args.data is not None:
    preflight.input_path(args.data, "--data")
  if args.boxes != "gt":
    preflight.input_path(args.boxes, "--boxes", kind="file")
  # The embedded checkpoint lives in a cache: its results go to runs/, not beside it.
  out = os.path.abspath(args.out or (default_out(args.ckpt) if args.ckpt
                                     else os.path.join("runs", "eval_image")))
  preflight.output_folder(out, "--out" if args.out else "--out (default)")
  from qsam2_jax.data.synthetic import default_image_data
  data = args.data or default_image_data()
  gt, image_root = load_gt(data)
  img_ids = list(gt.imgs)
  if args.max_images is not None:
    img_ids = img_ids[:args.max_images]
  detections = None
  if args.boxes != "gt":
    detections = load_detections(args.boxes, gt, args.max_dets)

  from convert.random_checkpoint import default_checkpoint
  from qsam2_jax.checkpoint import load_with_meta
  from qsam2_jax.files import write_csv, write_json
  from qsam2_jax.predictor import ImagePredictor
  ckpt = None if floor else (args.ckpt or default_checkpoint())
  t0 = time.time()
  with preflight.created_by_us(out):
    if floor:
      meta, predict = {"kind": args.predict}, floor_fn(args.predict)
    else:
      model, meta = load_with_meta(ckpt, step=args.step, image_size=args.image_size)
      predict = predictor_fn(ImagePredictor(model), chunk=args.chunk, prompt=args.prompt)
    summary, rows, results = evaluate(
        predict, gt, image_root, img_ids=img_ids, detections=detections,
        match_iou=args.match_iou, overlays=args.overlays,
        overlay_dir=os.path.join(out, "overlays"), progress=not args.no_progress,
        prompt=args.prompt)
    ap = coco_mask_ap(gt, results, img_ids)
    report = {"kind": "eval.image", "ckpt": os.path.abspath(ckpt) if ckpt else None,
              "predict": args.predict, "prompt": args.prompt, "step": meta.get("step"),
              "data": os.path.abspath(data), "boxes": args.boxes, "config": meta.get("config"),
              "image_size": meta.get("image_size"), "quant": meta.get("quant"),
              "model_kind": meta.get("kind"), **summary, **ap,
              "seconds": round(time.time() - t0, 1)}
    write_json(os.path.join(out, "image_metrics.json"), report)
    write_csv(os.path.join(out, "image_instances.csv"), rows, CSV_FIELDS)
  who = report["ckpt"] if not floor else args.predict
  print(f"{who} on {report['data']} ({summary['num']} instances, {len(img_ids)} images, "
        f"{'one click each' if args.prompt == 'click' else f'boxes: {args.boxes}'})")
  print(f"mIoU {_fmt(summary['mIoU'])}  (small {_fmt(summary['mIoU_small'])}, medium "
        f"{_fmt(summary['mIoU_medium'])}, large {_fmt(summary['mIoU_large'])})  "
        f"mask AP {_fmt(ap['AP'])}  AP50 {_fmt(ap['AP50'])}  AP75 {_fmt(ap['AP75'])}")
  if detections is not None:
    print(f"{summary['num_matched']} of {summary['num']} instances matched a detection "
          f"(box IoU >= {args.match_iou})")
  print(f"wrote {out}/image_metrics.json, image_instances.csv"
        + (", overlays/" if args.overlays else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

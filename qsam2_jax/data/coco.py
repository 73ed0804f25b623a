"""Readers for instance-segmentation training data: a COCO JSON with its images, or SA-1B.

Both expose the same random-access interface (`len(src)`, `src[i] -> Example`) that Grain
pipelines wrap. An `Example` carries the decoded RGB image but the masks still encoded: SA-1B
images have ~100 masks at ~1500x2250 pixels, so decoding them all would cost hundreds of MB per
image; the transform decodes only the few it samples (`Example.decode_mask`).

Layouts:
  COCO: one JSON (`images`, `annotations` with `segmentation` as polygons or RLE) and an image
    folder; `file_name` is resolved against the JSON's folder (our synthetic datasets), its
    `images/` subfolder, or COCO's `<root>/<split>/` for
    `<root>/annotations/instances_<split>.json`.
  SA-1B: a folder of `sa_<id>.jpg` + `sa_<id>.json`, the JSON holding `image` (with `height`,
    `width`) and `annotations` (compressed RLE `segmentation`, `area`, ...).

Malformed annotation files raise `AnnotationError` (a `UserError`) naming the file and the
annotation. A COCO file is checked whole when it is opened (every annotation, crowd ones
included, must decode: `segmentation_problem`); there is no skipping policy, a bad annotation
is reported with its index and id so that the file can be fixed. SA-1B files are checked when
their image is read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qsam2_jax.data import rle
from qsam2_jax.errors import UserError

COCO_ANNOTATIONS = "annotations.json"


class AnnotationError(UserError):
  """An annotation file (or the image it points to) cannot be used; the message names it."""


@dataclass(frozen=True)
class Example:
  """One image with its still-encoded instance masks.

  image: (H, W, 3) uint8 RGB. segmentations: COCO `segmentation` objects (polygons, RLE).
  areas: (N,) float32 mask areas in pixels (NaN where the file does not say). source: the
  annotation file, for error messages. index: position in the reader.
  """
  image: np.ndarray
  segmentations: tuple[Any, ...]
  areas: np.ndarray
  ann_ids: tuple[Any, ...]
  source: str
  index: int

  @property
  def height(self) -> int:
    return int(self.image.shape[0])

  @property
  def width(self) -> int:
    return int(self.image.shape[1])

  def decode_mask(self, j: int) -> np.ndarray:
    """(H, W) bool mask of annotation j."""
    try:
      return rle.decode(self.segmentations[j], self.height, self.width)
    except Exception as e:  # pycocotools raises bare TypeErrors/ValueErrors on bad input
      raise AnnotationError(f"{self.source}: annotation {self.ann_ids[j]!r} has an unusable "
                            f"segmentation ({e})") from e


def _load_json(path: Path) -> Any:
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: not valid JSON ({e})") from e
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not valid JSON ({e})") from e


def _require(cond: bool, path: Path, what: str) -> None:
  if not cond:
    raise AnnotationError(f"{path}: malformed annotation file: {what}")


def segmentation_problem(segm: Any, height: int | None = None, width: int | None = None
                         ) -> str | None:
  """Why a COCO `segmentation` cannot be decoded into a mask, or None if it can.

  Polygons: a non-empty list of parts, each an even count of at least 6 numbers (3 x, y
  points). RLE: {"size": [h, w], "counts": str or a list of run lengths summing to h * w}, its
  size the image's when the image's is known. Cheap (no decoding), so readers check every
  annotation when they open a file, before any model is built.
  """
  if isinstance(segm, list):
    if not segm:
      return "an empty polygon list"
    for i, part in enumerate(segm):
      if not isinstance(part, list):
        return f"polygon {i} is a {type(part).__name__}, expected a list of x, y numbers"
      if len(part) < 6 or len(part) % 2:
        return (f"polygon {i} has {len(part)} numbers; expected an even count of at least 6 "
                "(3 x, y points)")
      try:
        total = sum(part)
      except TypeError:
        return f"polygon {i} holds something other than numbers"
      if not math.isfinite(total):
        return f"polygon {i} holds a non-finite coordinate"
    return None
  if isinstance(segm, dict) and "counts" in segm:
    size = segm.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
      return f"RLE 'size' is {size!r}, expected [height, width]"
    if height is not None and size != [height, width]:
      return f"RLE size {size} does not match the image size {[height, width]}"
    counts = segm["counts"]
    if isinstance(counts, list):
      if not all(isinstance(c, int) and c >= 0 for c in counts):
        return "uncompressed RLE 'counts' must be non-negative integers"
      if sum(counts) != size[0] * size[1]:
        return (f"uncompressed RLE 'counts' sum to {sum(counts)}, not height x width = "
                f"{size[0] * size[1]}")
      return None
    if not isinstance(counts, str) or not counts:
      return f"RLE 'counts' is a {type(counts).__name__}, expected a non-empty string or a list"
    return None
  return "no polygon list or RLE object"


def _check_segmentation(ann: Any, path: Path, where: str, height: int | None = None,
                        width: int | None = None) -> None:
  _require(isinstance(ann, dict), path, f"{where} is not an object")
  if "segmentation" not in ann:
    raise AnnotationError(f"{path}: malformed annotation file: {where} has no polygon or RLE "
                          "'segmentation'")
  why = segmentation_problem(ann["segmentation"], height, width)
  if why is not None:
    ident = f" (id {ann['id']!r})" if "id" in ann else ""
    raise AnnotationError(f"{path}: {where}{ident} has an unusable segmentation: {why}")


def _area(ann: dict) -> float:
  a = ann.get("area")
  return float(a) if isinstance(a, (int, float)) else float("nan")


def _read_image(path: Path, source: Path, height: int | None, width: int | None) -> np.ndarray:
  try:
    with Image.open(path) as img:
      image = np.asarray(img.convert("RGB"))
  except FileNotFoundError as e:
    raise AnnotationError(f"{source}: image {path} does not exist") from e
  except OSError as e:
    raise AnnotationError(f"{source}: cannot read image {path} ({e})") from e
  if height is not None and image.shape[:2] != (height, width):
    raise AnnotationError(f"{source}: image {path} is {image.shape[1]}x{image.shape[0]} but the "
                          f"annotations say {width}x{height}")
  return image


class CocoSource:
  """Instance masks from a COCO-format JSON; images without usable annotations are skipped.

  Args:
    path: the JSON file, or a folder holding `annotations.json`.
    image_root: folder that `file_name`s are relative to (default: found next to the JSON).
    include_crowd: keep `iscrowd` annotations (SAM-style training usually drops them).
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
               include_crowd: bool = False):
    path = Path(path)
    if path.is_dir():
      path = path / COCO_ANNOTATIONS
    if not path.is_file():
      raise UserError(f"COCO annotation file {path} does not exist")
    self.path = path
    data = _load_json(path)
    _require(isinstance(data, dict), path, "top level is not an object")
    _require(isinstance(data.get("images"), list), path, "no 'images' list")
    _require(isinstance(data.get("annotations"), list), path, "no 'annotations' list")
    images = {}
    for k, img in enumerate(data["images"]):
      ok = (isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)
            and isinstance(img.get("height"), int) and isinstance(img.get("width"), int))
      _require(ok, path, f"images[{k}] lacks id, file_name, height or width")
      images[img["id"]] = img
    per_image: dict[Any, list[dict]] = {}
    for k, ann in enumerate(data["annotations"]):
      _require(isinstance(ann, dict), path, f"annotations[{k}] is not an object")
      _require(ann.get("image_id") in images, path,
               f"annotations[{k}] refers to unknown image_id {ann.get('image_id')!r}")
      img = images[ann["image_id"]]
      _check_segmentation(ann, path, f"annotations[{k}]", img["height"], img["width"])
      if ann.get("iscrowd", 0) and not include_crowd:
        continue
      per_image.setdefault(ann["image_id"], []).append(ann)
    # Keep the JSON's image order: the pipeline's shuffle is what randomises.
    self._items = [(images[i], per_image[i]) for i in images if i in per_image]
    if not self._items:
      raise AnnotationError(f"{path}: no image has a usable instance annotation")
    self.image_root = Path(image_root) if image_root is not None else self._find_root()

  def _find_root(self) -> Path:
    first = self._items[0][0]["file_name"]
    here = self.path.parent
    candidates = [here, here / "images"]
    stem = self.path.stem
    if stem.startswith("instances_"):  # COCO: annotations/instances_train2017.json
      candidates.append(here.parent / stem[len("instances_"):])
    candidates.append(here.parent / "images")
    for root in candidates:
      if (root / first).is_file():
        return root
    tried = ", ".join(str(c / first) for c in candidates)
    raise AnnotationError(f"{self.path}: cannot find the image {first!r} (tried {tried}); pass "
                          f"the image folder explicitly")

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> Example:
    img, anns = self._items[index]
    image = _read_image(self.image_root / img["file_name"], self.path, img["height"],
                        img["width"])
    return Example(image=image, segmentations=tuple(a["segmentation"] for a in anns),
                   areas=np.array([_area(a) for a in anns], np.float32),
                   ann_ids=tuple(a.get("id", k) for k, a in enumerate(anns)),
                   source=str(self.path), index=index)


class SA1BSource:
  """SA-1B layout: `sa_*.jpg` with a `sa_*.json` beside each (searched recursively if the folder
  itself holds none). The per-image JSON is read lazily, when the image is."""

  def __init__(self, root: str | os.PathLike):
    root = Path(root)
    if not root.is_dir():
      raise UserError(f"SA-1B folder {root} does not exist")
    self.root = root
    jsons = sorted(root.glob("sa_*.json")) or sorted(root.rglob("sa_*.json"))
    self._items = [(j.with_suffix(".jpg"), j) for j in jsons if j.with_suffix(".jpg").is_file()]
    if not self._items:
      raise UserError(f"{root}: neither a COCO {COCO_ANNOTATIONS} nor SA-1B files (sa_*.jpg "
                      f"each with a matching sa_*.json) found")

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> Example:
    image_path, json_path = self._items[index]
    data = _load_json(json_path)
    _require(isinstance(data, dict), json_path, "top level is not an object")
    _require(isinstance(data.get("annotations"), list), json_path, "no 'annotations' list")
    info = data.get("image") if isinstance(data.get("image"), dict) else {}
    height, width = info.get("height"), info.get("width")
    if not (isinstance(height, int) and isinstance(width, int)):
      height = width = None
    anns = data["annotations"]
    for k, ann in enumerate(anns):
      _check_segmentation(ann, json_path, f"annotations[{k}]", height, width)
    _require(len(anns) > 0, json_path, "no annotations")
    image = _read_image(image_path, json_path, height, width)
    return Example(image=image, segmentations=tuple(a["segmentation"] for a in anns),
                   areas=np.array([_area(a) for a in anns], np.float32),
                   ann_ids=tuple(a.get("id", k) for k, a in enumerate(anns)),
                   source=str(json_path), index=index)


def open_source(path: str | os.PathLike) -> CocoSource | SA1BSource:
  """`--data`: a COCO JSON, a folder with `annotations.json`, or an SA-1B folder."""
  p = Path(path)
  if not p.exists():
    raise UserError(f"data path {p} does not exist")
  if p.is_file():
    if p.suffix.lower() != ".json":
      raise UserError(f"data path {p} is a file but not a COCO .json annotation file")
    return CocoSource(p)
  if (p / COCO_ANNOTATIONS).is_file():
    return CocoSource(p)
  return SA1BSource(p)


def describe(src: CocoSource | SA1BSource) -> str:
  """One line for logs: kind, location and size."""
  kind = "COCO" if isinstance(src, CocoSource) else "SA-1B"
  where = getattr(src, "path", getattr(src, "root", "?"))
  return f"{kind} dataset {where}: {len(src)} images"

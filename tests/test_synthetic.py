"""Synthetic COCO / DAVIS datasets: formats, ground truth = drawn masks, determinism, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from qsam2_jax.data import rle, synthetic

# pycocotools' own decode predates numpy 2's __array__(copy=) protocol.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
IMG_SIZE, NUM_IMAGES = (64, 96), 3
VID_SIZE, NUM_VIDEOS, NUM_FRAMES = (64, 64), 2, 6


def tree_bytes(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def image_ds(tmp_path_factory):
  out = tmp_path_factory.mktemp("img") / "coco"
  return synthetic.make_image_dataset(out, NUM_IMAGES, IMG_SIZE, seed=3)


@pytest.fixture(scope="module")
def video_ds(tmp_path_factory):
  out = tmp_path_factory.mktemp("vid") / "davis"
  return synthetic.make_video_dataset(out, NUM_VIDEOS, NUM_FRAMES, VID_SIZE, seed=5)


# -------------------------------------------------------------------------------------- images


def test_coco_dataset_loads_and_masks_equal_the_drawn_ones(image_ds):
  coco = COCO(str(image_ds / "annotations.json"))
  info = json.loads((image_ds / "annotations.json").read_text())["info"]
  assert sorted(coco.getImgIds()) == [1, 2, 3]
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["ellipse", "polygon",
                                                                   "rectangle"]
  total = 0
  for i in range(NUM_IMAGES):
    img = coco.loadImgs(i + 1)[0]
    assert (img["height"], img["width"]) == IMG_SIZE
    pixels = np.asarray(Image.open(image_ds / img["file_name"]))
    sample = synthetic.synth_image(3, i, IMG_SIZE)
    assert pixels.shape == (*IMG_SIZE, 3)
    assert np.abs(pixels.astype(float) - sample.image).mean() < 8  # JPEG of the same picture
    # Expected: every drawn shape whose visible part is large enough, in drawing order.
    expected = [(sample.labels == k, cat) for k, cat in enumerate(sample.categories, 1)
                if (sample.labels == k).sum() >= info["min_area"]]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
    assert len(anns) == len(expected) >= 1  # every image has an annotation
    for ann, (mask, cat) in zip(anns, expected):
      decoded = coco.annToMask(ann).astype(bool)
      np.testing.assert_array_equal(decoded, mask)
      assert ann["category_id"] == cat and ann["iscrowd"] == 0
      assert isinstance(ann["segmentation"]["counts"], str)
      ys, xs = np.nonzero(mask)
      assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      assert ann["area"] == mask.sum()
    total += len(anns)
  assert total > 0
  ids = coco.getAnnIds()
  assert len(set(ids)) == len(ids) == total


def test_occlusion_hides_earlier_shapes():
  # Over a few images, some shape must lose pixels to a later one (labels keep the top shape).
  for i in range(10):
    s = synthetic.synth_image(0, i, (64, 64))
    if len(np.unique(s.labels)) - 1 < len(s.categories):
      return
  pytest.fail("no shape was ever occluded or off-image")


def test_every_image_has_an_annotatable_shape():
  for i in range(20):
    s = synthetic.synth_image(7, i, (16, 24))
    areas = [(s.labels == k).sum() for k in range(1, len(s.categories) + 1)]
    assert max(areas) >= synthetic.default_min_area((16, 24))


def test_polygon_rasterisation_matches_matplotlib():
  from matplotlib.path import Path as MplPath
  rng = np.random.default_rng(0)
  checked = 0
  while checked < 5:
    shape = synthetic._random_shape(rng, 20.0)
    if shape.kind != "polygon":
      continue
    ys, xs = np.mgrid[-25:26, -25:26].astype(float)
    ours = synthetic._inside(shape, xs, ys)
    theirs = MplPath(shape.poly_xy).contains_points(np.stack([xs.ravel(), ys.ravel()], 1))
    # Pixel centres lying exactly on an edge may go either way.
    assert np.mean(ours.ravel() != theirs) < 0.01
    assert ours.sum() > 50
    checked += 1


def test_rle_roundtrip_and_formats():
  m = np.zeros((5, 7), bool)
  m[1:3, 2:5] = True
  enc = rle.encode(m)
  assert enc["size"] == [5, 7] and isinstance(enc["counts"], str)
  np.testing.assert_array_equal(rle.decode(enc, 5, 7), m)
  np.testing.assert_array_equal(rle.decode(json.loads(json.dumps(enc)), 5, 7), m)
  assert rle.area(m) == 6 and rle.bbox_xywh(m) == [2.0, 1.0, 3.0, 2.0]
  poly = rle.decode([[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]], 5, 7)
  assert poly.dtype == bool and poly.sum() > 0
  with pytest.raises(ValueError, match="size"):
    rle.decode(enc, 6, 7)


def test_image_dataset_is_deterministic(tmp_path, image_ds):
  again = synthetic.make_image_dataset(tmp_path / "again", NUM_IMAGES, IMG_SIZE, seed=3)
  assert tree_bytes(again) == tree_bytes(image_ds)
  other = synthetic.make_image_dataset(tmp_path / "other", NUM_IMAGES, IMG_SIZE, seed=4)
  assert tree_bytes(other)["images/000001.jpg"] != tree_bytes(image_ds)["images/000001.jpg"]


def test_writes_atomically_and_refuses_to_clobber(tmp_path):
  out = tmp_path / "ds"
  synthetic.make_image_dataset(out, 1, (32, 32), seed=0)
  with pytest.raises(FileExistsError, match="overwrite"):
    synthetic.make_image_dataset(out, 1, (32, 32), seed=1)
  synthetic.make_image_dataset(out, 2, (32, 32), seed=1, overwrite=True)
  assert len(json.loads((out / "annotations.json").read_text())["images"]) == 2
  with pytest.raises(ValueError):
    synthetic.make_image_dataset(tmp_path / "bad", 1, (32, 8))
  assert os.listdir(tmp_path) == ["ds"]  # no temporary or old directories left behind


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_images=0), "num_images"),
    (dict(size=(0, 32)), "size"),
    (dict(size=(32,)), "size"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(tmp_path, kwargs, match):
  args = dict(out_dir=tmp_path / "x", num_images=1, size=(32, 32), seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    synthetic.make_image_dataset(**args)


# --------------------------------------------------------------------------------------- video


def read_video(ds: Path, name: str) -> tuple[list[Path], np.ndarray]:
  jpgs = sorted((ds / "JPEGImages" / name).iterdir())
  pngs = sorted((ds / "Annotations" / name).iterdir())
  assert [p.stem for p in jpgs] == [p.stem for p in pngs] == [f"{t:05d}" for t in range(len(pngs))]
  labels = []
  for p in pngs:
    img = Image.open(p)
    assert img.mode == "P"
    assert img.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # DAVIS palette
    labels.append(np.asarray(img))
  return jpgs, np.stack(labels)


def test_video_dataset_layout_and_ids(video_ds):
  meta = json.loads((video_ds / "meta.json").read_text())
  names = sorted(os.listdir(video_ds / "JPEGImages"))
  assert names == sorted(os.listdir(video_ds / "Annotations")) == sorted(meta["videos"])
  assert len(names) == NUM_VIDEOS
  for i, name in enumerate(names):
    jpgs, labels = read_video(video_ds, name)
    assert len(jpgs) == NUM_FRAMES and labels.shape == (NUM_FRAMES, *VID_SIZE)
    assert Image.open(jpgs[0]).size == VID_SIZE[::-1]
    k = meta["videos"][name]["num_objects"]
    assert 2 <= k <= 4
    assert set(np.unique(labels[0])) == set(range(k + 1))  # every object visible in frame 0
    assert set(np.unique(labels)) <= set(range(k + 1))
    video = synthetic.synth_video(5, i, NUM_FRAMES, VID_SIZE)
    np.testing.assert_array_equal(labels, video.labels)


def test_video_dataset_is_deterministic(tmp_path, video_ds):
  again = synthetic.make_video_dataset(tmp_path / "again", NUM_VIDEOS, NUM_FRAMES, VID_SIZE, seed=5)
  assert tree_bytes(again) == tree_bytes(video_ds)


def test_default_size_video_has_an_object_leaving_and_reentering(tmp_path):
  ds = synthetic.make_video_dataset(tmp_path / "d", 1, NUM_FRAMES)  # default size
  _, labels = read_video(ds, "synth_0000")
  assert labels.shape[1:] == (256, 256)
  found = False
  for obj in range(1, labels.max() + 1):
    area = (labels == obj).sum(axis=(1, 2))
    gone = np.nonzero(area == 0)[0]
    if area[0] > 0 and gone.size and (area[gone.max() + 1:] > 0).any():
      found = True
  assert found, "no object leaves the frame and comes back"


def test_video_objects_move_and_occlude():
  video = synthetic.synth_video(0, 1, 8, (96, 96))
  visible = np.stack([(video.labels == k + 1) for k in range(video.full_masks.shape[0])])
  assert (visible <= video.full_masks).all()  # visible pixels are part of the footprint
  assert (visible != video.full_masks).any()  # ... and some are hidden by another object
  w = video.wanderer
  assert w and not video.full_masks[w - 1, (8 - 1) // 2].any()  # out of the frame mid-video
  assert not np.array_equal(video.labels[0], video.labels[1])  # things move


# ---------------------------------------------------------------------------- the varied style


def _floors(masks: list[np.ndarray]) -> tuple[float, float]:
  """Mean IoU of mask = its tight box (the box holds the mask: area / box area) and of mask =
  the ellipse inscribed in that box (`eval.image`'s floor, pixel centres inside)."""
  box, ell = [], []
  for m in masks:
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box.append(m.sum() / ((y1 - y0) * (x1 - x0)))
    yy, xx = np.mgrid[:m.shape[0], :m.shape[1]] + 0.5
    e = (((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
         + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) <= 1
    ell.append((e & m).sum() / (e | m).sum())
  return float(np.mean(box)), float(np.mean(ell))


def _annotated(style: str, n: int, size=(128, 128)) -> list[np.ndarray]:
  masks = []
  for i in range(n):
    s = synthetic.synth_image(1, i, size, style)
    masks += [m for m, _ in _drawn_annotations(s, synthetic.default_min_area(size))]
  return masks


def _drawn_annotations(s, min_area):
  return [(s.labels == k, cat) for k, cat in enumerate(s.categories, 1)
          if k not in s.hidden and (s.labels == k).sum() >= min_area]


def test_varied_style_lowers_the_box_and_ellipse_floors():
  """The point of the style: a box (or the ellipse inscribed in it) is a poor mask. Measured on
  64 images at 128² (`eval.image --predict floor-*`): basic 0.66 / 0.71, varied 0.49 / 0.52."""
  basic, varied = _floors(_annotated("basic", 16)), _floors(_annotated("varied", 16))
  assert basic[0] > 0.6 and basic[1] > 0.65
  assert varied[0] < 0.55 and varied[1] < 0.57
  assert varied[0] < basic[0] - 0.1 and varied[1] < basic[1] - 0.1


def test_varied_kinds_rasterise_to_their_areas():
  """Pixel areas of the varied kinds against their closed forms (radius 40, 0.25 px grid)."""
  rng = np.random.default_rng(1)
  ys, xs = np.mgrid[-60:60:0.25, -60:60:0.25]
  seen = set()
  while len(seen) < 5:
    shape = synthetic._random_varied_shape(rng, 40.0)
    a, b = shape.radius, shape.radius * shape.aspect
    p = shape.params
    area = None
    if shape.kind == "bar":
      area = 4 * a * b
    elif shape.kind == "ring":
      area = math.pi * a * b * (1 - p[0] ** 2)
    elif shape.kind == "lshape":   # the rectangle less the corner u > p0 a, v > p1 b
      area = 4 * a * b - (a - p[0] * a) * (b - p[1] * b)
    elif shape.kind == "cross":    # two arms of half-width p0 b, overlapping in a square
      hw = p[0] * b
      area = 2 * a * 2 * hw + 2 * hw * 2 * b - (2 * hw) ** 2
    elif shape.kind == "star":   # star-shaped polygon: matplotlib's point-in-polygon
      from matplotlib.path import Path as MplPath
      area = np.mean(MplPath(shape.poly_xy).contains_points(
          np.stack([xs.ravel(), ys.ravel()], 1))) * 120 ** 2
    if area is None:
      continue
    ours = synthetic._inside(shape, xs, ys).sum() * 0.25 ** 2
    assert ours == pytest.approx(area, rel=0.02), shape.kind
    seen.add(shape.kind)


def test_varied_annotations_are_visible_and_large_enough(tmp_path):
  """Every annotation of a varied dataset: at least the minimum area, and (on the written JPEG)
  its mean colour differs from its surroundings'; hidden shapes get none. Deterministic."""
  ds = synthetic.make_image_dataset(tmp_path / "v", 6, (96, 96), seed=2, style="varied")
  coco = json.loads((ds / "annotations.json").read_text())
  assert coco["info"]["style"] == "varied"
  assert [c["name"] for c in coco["categories"]] == list(synthetic.ALL_SHAPES)
  min_area = synthetic.default_min_area((96, 96))
  for img in coco["images"]:
    pixels = np.asarray(Image.open(ds / img["file_name"]), np.float64)
    sample = synthetic.synth_image(2, img["id"] - 1, (96, 96), "varied")
    anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
    expected = _drawn_annotations(sample, min_area)
    assert len(anns) == len(expected) > 0
    for ann, (mask, cat) in zip(anns, expected):
      np.testing.assert_array_equal(rle.decode(ann["segmentation"], 96, 96).astype(bool), mask)
      assert ann["category_id"] == cat and ann["area"] >= min_area
      assert synthetic.contrast(pixels, mask) > synthetic.MIN_CONTRAST / 2
  again = synthetic.make_image_dataset(tmp_path / "w", 6, (96, 96), seed=2, style="varied")
  assert tree_bytes(again) == tree_bytes(ds)


def test_varied_hidden_shapes_get_no_annotation():
  for i in range(40):
    s = synthetic.synth_image(1, i, (128, 128), "varied")
    if s.hidden:
      anns = synthetic.image_annotations(s, 1, 1, min_area=1)
      ids = {k for k in range(1, len(s.categories) + 1) if (s.labels == k).any()}
      assert len(anns) == len(ids - set(s.hidden))
      return
  pytest.fail("no hidden shape in 40 images")


def test_varied_video_objects_move_occlude_and_stand_out():
  video = synthetic.synth_video(2, 0, 8, (96, 96), style="varied")
  k = video.full_masks.shape[0]
  assert 3 <= k <= 5
  visible = np.stack([(video.labels == j + 1) for j in range(k)])
  assert (visible <= video.full_masks).all()
  f0 = video.frames[0].astype(np.float64)
  for j in range(k):
    assert visible[j, 0].sum() >= round(0.004 * 96 * 96)
    assert synthetic.contrast(f0, visible[j, 0]) >= synthetic.MIN_CONTRAST
  assert video.wanderer and not video.full_masks[video.wanderer - 1, 3].any()
  basic = synthetic.synth_video(2, 0, 8, (96, 96))
  assert not np.array_equal(basic.frames, video.frames)


def test_bad_style():
  with pytest.raises(ValueError, match="style must be one of basic, varied"):
    synthetic.synth_image(0, 0, (32, 32), style="hard")
  with pytest.raises(ValueError, match="style"):
    synthetic.default_image_data(1, 32, style="hard")


# ----------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "eval.synthetic", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_images_and_video(tmp_path):
  r = run_cli("images", "--out", str(tmp_path / "img"), "--images", "2", "--size", "32", "48",
              "--seed", "1")
  assert r.returncode == 0, r.stderr
  coco = json.loads((tmp_path / "img" / "annotations.json").read_text())
  assert len(coco["images"]) == 2 and coco["images"][0]["height"] == 32
  assert "2/2" in r.stderr  # the tqdm bar
  r = run_cli("video", "--out", str(tmp_path / "vid"), "--videos", "1", "--frames", "3",
              "--size", "32", "32", "--quiet")
  assert r.returncode == 0, r.stderr
  assert len(os.listdir(tmp_path / "vid" / "Annotations" / "synth_0000")) == 3
  r = run_cli("video", "--out", str(tmp_path / "vv"), "--videos", "1", "--frames", "3",
              "--size", "48", "48", "--quiet", "--style", "varied")
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "vv" / "meta.json").read_text())["style"] == "varied"


def test_cli_help_and_errors(tmp_path, capsys):
  r = run_cli("--help")
  assert r.returncode == 0 and "images" in r.stdout and "video" in r.stdout
  from eval import synthetic as cli  # the error paths in-process: no interpreter start-up each

  def fails(*args: str) -> str:
    assert cli.main(list(args)) == 2   # the shared parser: one `error:` line, status 2
    return capsys.readouterr().err

  cli.build_parser().parse_args(["video", "--out", "x"])  # defaults are valid
  with pytest.raises(SystemExit) as e:
    cli.main(["video", "--help"])
  assert e.value.code == 0 and "--frames" in capsys.readouterr().out
  assert "positive integer" in fails("images", "--out", str(tmp_path / "x"), "--size", "0", "32")
  assert ">= 16" in fails("images", "--out", str(tmp_path / "x"), "--size", "8", "32")
  assert "--frames" in fails("video", "--out", str(tmp_path / "x"), "--frames", "-3")
  assert "non-negative" in fails("video", "--out", str(tmp_path / "x"), "--seed", "-1")
  assert "required" in fails("images")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "f").write_text("")
  assert "overwrite" in fails("images", "--out", str(tmp_path / "full"), "--images", "1",
                              "--size", "16", "16", "--quiet")
  assert not (tmp_path / "x").exists()
  assert os.listdir(tmp_path / "full") == ["f"]

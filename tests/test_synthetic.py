"""Synthetic COCO / DAVIS datasets: formats, ground truth = drawn masks, determinism, the CLI."""

from __future__ import annotations

import json
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

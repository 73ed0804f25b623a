"""Clip readers (DAVIS palette PNGs, SA-V per-object PNGs, SA-V RLE JSON, synthetic) and the
Grain clip pipeline: same masks from every layout, SAM2's clip sampling rules, fixed shapes,
deterministic and resumable streams."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from qsam2_jax.data import clips, rle, synthetic, transforms

T_VIDEO, HW = 6, (40, 48)


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
  return str(synthetic.make_video_dataset(tmp_path_factory.mktemp("d") / "davis", 3, T_VIDEO,
                                          HW, seed=1))


def _labels(root, video, t):
  return np.array(Image.open(os.path.join(root, "Annotations", video, f"{t:05d}.png")))


@pytest.fixture(scope="module")
def sav_layouts(davis, tmp_path_factory):
  """The same videos as SA-V per-object PNG folders and as SA-V RLE JSON (annotated at 6 fps
  of 24 fps JPEGs: every 4th frame; the JPEGs are renamed accordingly)."""
  base = tmp_path_factory.mktemp("s")
  png_root, json_root = base / "sav_png", base / "sav_json"
  shutil.copytree(os.path.join(davis, "JPEGImages"), png_root / "JPEGImages")
  for v in sorted(os.listdir(os.path.join(davis, "JPEGImages"))):
    masklet = []
    (json_root / "JPEGImages" / v).mkdir(parents=True)
    for t in range(T_VIDEO):
      labels = _labels(davis, v, t)
      ids = range(1, 5)
      for k in ids:
        d = png_root / "Annotations" / v / f"{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        if (labels == k).any() or t == 0:
          Image.fromarray(((labels == k) * 255).astype(np.uint8)).save(d / f"{t:05d}.png")
      masklet.append([rle.encode(labels == k) for k in ids])
      shutil.copy(os.path.join(davis, "JPEGImages", v, f"{t:05d}.jpg"),
                  json_root / "JPEGImages" / v / f"{4 * t:05d}.jpg")
    (json_root / "Annotations").mkdir(exist_ok=True)
    (json_root / "Annotations" / f"{v}_manual.json").write_text(
        json.dumps({"masklet": masklet, "fps": 6}))
  return str(png_root), str(json_root)


def test_layouts_give_the_same_masks(davis, sav_layouts):
  src = clips.FolderVideos(davis)
  png, js = (clips.FolderVideos(p) for p in sav_layouts)
  assert [v.kind for v in (src[0], png[0], js[0])] == ["palette", "objects", "rle"]
  for i in range(len(src)):
    assert len(src[i]) == len(png[i]) == len(js[i]) == T_VIDEO
    for t in range(T_VIDEO):
      np.testing.assert_array_equal(src[i].frame(t), js[i].frame(t))
      labels = _labels(davis, src[i].name, t)
      want = {int(k): labels == k for k in np.unique(labels) if k}
      for got in (src[i].masks(t), png[i].masks(t), js[i].masks(t)):
        nonempty = {k: m for k, m in got.items() if m.any()}
        keys = sorted(nonempty)
        # SA-V's JSON numbers objects from 0 (list position); the PNG layouts by id.
        offset = 1 if got and min(got) == 0 else 0
        assert [k + offset for k in keys] == sorted(want)
        for k in keys:
          np.testing.assert_array_equal(nonempty[k], want[k + offset])


def test_make_clip_rules(davis):
  src = clips.FolderVideos(davis)
  cfg = clips.ClipDataConfig(num_frames=4, max_objects=2, image_size=32, hflip_prob=1.0,
                             reverse_time_prob=1.0)
  rng = np.random.default_rng(0)
  for _ in range(10):
    c = clips.make_clip(src[1], rng, cfg, index=1)
    assert c["images"].shape == (4, 32, 32, 3) and c["images"].dtype == np.uint8
    assert c["masks"].shape == (4, 2, 32, 32) and c["valid"].tolist() == [True, True]
    assert c["masks"][0].reshape(2, -1).any(axis=1).all()  # objects visible on the first frame
    # Reversed consecutive frames, flipped: find the start from the pixels.
    frames = [transforms.hflip(src[1].frame(t)) for t in range(T_VIDEO)]
    resized = [np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR)) for f in frames]
    start = next(s for s in range(3, T_VIDEO) if np.array_equal(resized[s], c["images"][0]))
    for j in range(4):
      np.testing.assert_array_equal(c["images"][j], resized[start - j])
      labels = transforms.hflip(_labels(davis, src[1].name, start - j))
      objs = [k for k in np.unique(labels) if k]
      for k in range(2):
        m = c["masks"][j, k]
        if m.any():  # each slot is one object's resized, flipped mask
          assert any(np.array_equal(m, transforms.resize_mask(labels == o, 32)) for o in objs)
  with pytest.raises(clips.VideoDataError, match="fewer than"):
    clips.make_clip(src[0], rng, clips.ClipDataConfig(num_frames=T_VIDEO + 1, image_size=32))
  pad = clips.make_clip(src[0], rng, clips.ClipDataConfig(num_frames=2, max_objects=8,
                                                           image_size=32))
  n = pad["valid"].sum()
  assert 1 <= n < 8 and not pad["masks"][:, n:].any()


def test_pipeline_is_deterministic_and_resumable(davis):
  cfg = clips.ClipDataConfig(num_frames=3, max_objects=2, image_size=32, seed=4, num_threads=1)
  src = clips.FolderVideos(davis)
  it = clips.make_iterator(src, 2, cfg, shard_index=0, shard_count=1)
  first = [next(it) for _ in range(3)]
  assert first[0]["images"].shape == (2, 3, 32, 32, 3)
  assert first[0]["masks"].shape == (2, 3, 2, 32, 32) and first[0]["valid"].shape == (2, 2)
  state = it.get_state()
  want = next(it)
  fresh = clips.make_iterator(src, 2, cfg, shard_index=0, shard_count=1)
  fresh.set_state(state)
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  again = clips.make_iterator(src, 2, cfg, shard_index=0, shard_count=1)
  np.testing.assert_array_equal(next(again)["images"], first[0]["images"])
  # Two processes take the two halves of each global batch.
  halves = [next(clips.make_iterator(src, 2, cfg, shard_index=i, shard_count=2))
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["masks"] for h in halves]), first[0]["masks"])


def test_synthetic_default_and_errors(tmp_path):
  src = clips.open_videos(None, num_frames=4, synthetic_videos=2, synthetic_size=(32, 32))
  c = clips.make_clip(src[1], np.random.default_rng(0),
                      clips.ClipDataConfig(num_frames=4, max_objects=3, image_size=32))
  assert c["valid"].sum() >= 2 and c["masks"][0, :2].any()
  want = synthetic.synth_video(0, 1, 4, (32, 32))
  np.testing.assert_array_equal(src[1].frame(2), want.frames[2])
  with pytest.raises(clips.VideoDataError, match="not found"):
    clips.FolderVideos(tmp_path / "nothing")
  (tmp_path / "x" / "JPEGImages" / "v").mkdir(parents=True)
  with pytest.raises(clips.VideoDataError, match="missing .*Annotations"):
    clips.FolderVideos(tmp_path / "x")
  (tmp_path / "x" / "Annotations").mkdir()
  with pytest.raises(clips.VideoDataError, match="no JPEG frames"):
    clips.FolderVideos(tmp_path / "x")
  src2 = clips.SyntheticVideos(1, 2, (32, 32))
  with pytest.raises(clips.VideoDataError, match="no video has 3 annotated frames"):
    clips.make_dataset(src2, 1, clips.ClipDataConfig(num_frames=3, image_size=32),
                       shard_index=0, shard_count=1)

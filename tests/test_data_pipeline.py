"""Readers (COCO, SA-1B), transforms, prompt sampling and the Grain pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsam2_jax.data import coco, pipeline, prompts, rle, synthetic, transforms
from qsam2_jax.errors import UserError

SIZE = 32  # model input side in these tests


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  return synthetic.make_image_dataset(tmp_path_factory.mktemp("d") / "coco", 10, (40, 56), seed=3)


@pytest.fixture(scope="module")
def sa1b_dir(tmp_path_factory):
  """The SA-1B layout: sa_<id>.jpg + sa_<id>.json per image."""
  from PIL import Image
  root = tmp_path_factory.mktemp("d") / "sa1b"
  root.mkdir()
  for i in range(4):
    sample = synthetic.synth_image(7, i, (48, 40))
    Image.fromarray(sample.image).save(root / f"sa_{i + 1}.jpg", quality=95)
    anns = synthetic.image_annotations(sample, i + 1, 1, min_area=4)
    info = {"image_id": i + 1, "width": 40, "height": 48, "file_name": f"sa_{i + 1}.jpg"}
    (root / f"sa_{i + 1}.json").write_text(json.dumps({"image": info, "annotations": anns}))
  return root


def _cfg(**kw):
  base = dict(image_size=SIZE, prompts=prompts.PromptConfig(max_masks=3), num_threads=2,
              prefetch_buffer_size=2, seed=11)
  base.update(kw)
  return pipeline.DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------ readers


def test_coco_reader(coco_dir):
  data = json.loads((coco_dir / "annotations.json").read_text())
  for path in (coco_dir, coco_dir / "annotations.json"):
    src = coco.open_source(path)
    assert isinstance(src, coco.CocoSource) and len(src) == 10
  ex = src[2]
  assert ex.image.shape == (40, 56, 3) and ex.image.dtype == np.uint8
  anns = [a for a in data["annotations"] if a["image_id"] == data["images"][2]["id"]]
  assert len(ex.segmentations) == len(anns)
  np.testing.assert_array_equal(ex.areas, [a["area"] for a in anns])
  np.testing.assert_array_equal(ex.decode_mask(1), rle.decode(anns[1]["segmentation"], 40, 56))


def test_coco_reader_finds_the_split_folder(coco_dir, tmp_path):
  """COCO's own layout: annotations/instances_<split>.json and <split>/<file_name>."""
  data = json.loads((coco_dir / "annotations.json").read_text())
  (tmp_path / "annotations").mkdir()
  (tmp_path / "val").mkdir()
  for img in data["images"]:
    name = img["file_name"].split("/")[-1]
    (tmp_path / "val" / name).write_bytes((coco_dir / img["file_name"]).read_bytes())
    img["file_name"] = name
  (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
  src = coco.open_source(tmp_path / "annotations" / "instances_val.json")
  assert src.image_root == tmp_path / "val"
  assert src[0].image.shape == (40, 56, 3)


def test_sa1b_reader(sa1b_dir):
  src = coco.open_source(sa1b_dir)
  assert isinstance(src, coco.SA1BSource) and len(src) == 4
  ex = src[1]
  assert ex.image.shape == (48, 40, 3)
  want = synthetic.synth_image(7, 1, (48, 40)).labels
  masks = [ex.decode_mask(j) for j in range(len(ex.segmentations))]
  assert all(m.shape == (48, 40) and m.any() for m in masks)
  assert any(np.array_equal(masks[0], want == k) for k in range(1, want.max() + 1))


@pytest.mark.parametrize("text,match", [
    ('{"images": [], "annotations": [', "not valid JSON"),
    ('[1, 2]', "top level is not an object"),
    ('{"images": []}', "no 'annotations' list"),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] lacks"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], '
     '"annotations": [{"image_id": 2, "segmentation": [[0, 0, 1, 1, 2, 0]]}]}', "unknown image_id"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], '
     '"annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}', "no polygon or RLE"),
])
def test_malformed_coco_json_names_the_file(tmp_path, text, match):
  path = tmp_path / "broken.json"
  path.write_text(text)
  with pytest.raises(coco.AnnotationError, match=match) as e:
    coco.open_source(path)
  assert str(path) in str(e.value)
  assert isinstance(e.value, UserError)


def test_malformed_sa1b_json_names_the_file_through_the_pipeline(sa1b_dir, tmp_path):
  bad = tmp_path / "sa1b_bad"
  bad.mkdir()
  for f in sa1b_dir.iterdir():
    (bad / f.name).write_bytes(f.read_bytes())
  (bad / "sa_3.json").write_text('{"image": {"height": 48, "width": 40}, "annotations": [{')
  src = coco.open_source(bad)
  with pytest.raises(coco.AnnotationError, match="sa_3.json: not valid JSON"):
    src[2]
  it = pipeline.make_iterator(src, 4, _cfg(shuffle=False), shard_index=0, shard_count=1)
  with pytest.raises(coco.AnnotationError, match="sa_3.json"):
    next(it)


def test_bad_rle_names_the_file_and_annotation(coco_dir, tmp_path):
  data = json.loads((coco_dir / "annotations.json").read_text())
  data["annotations"][0]["segmentation"] = {"size": [3, 3], "counts": "xyz"}
  path = tmp_path / "bad_rle.json"
  path.write_text(json.dumps(data))
  # Checked when the file is opened, before any image is read or model built.
  with pytest.raises(coco.AnnotationError, match=r"bad_rle.json: annotations\[0\] \(id 1\) "
                     r"has an unusable segmentation: RLE size \[3, 3\] does not match"):
    coco.CocoSource(path, image_root=coco_dir)


@pytest.mark.parametrize("name,match", [
    ("missing", "does not exist"), ("x.txt", "not a COCO .json"),
    ("", "neither a COCO annotations.json nor SA-1B")])
def test_open_source_errors(tmp_path, name, match):
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(UserError, match=match):
    coco.open_source(tmp_path / name)


# ------------------------------------------------------------------------ transforms, prompts


def test_resize_geometry():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = 255
  sq = transforms.resize_image(img, 16, "square")
  assert sq.shape == (16, 16, 3) and sq.dtype == np.float32
  np.testing.assert_allclose(sq[0, 0], (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD,
                             rtol=1e-6)
  lg = transforms.resize_image(img, 16, "longest")
  assert transforms.content_hw(20, 40, 16, "longest") == (8, 16)
  assert np.all(lg[8:] == 0) and not np.all(lg[:8] == 0)  # padded with the mean (0)
  mask = np.zeros((20, 40), bool)
  mask[:, :20] = True
  m = transforms.resize_mask(mask, 16, "longest")
  assert m[:8, :8].all() and not m[:8, 8:].any() and not m[8:].any()
  np.testing.assert_array_equal(transforms.resize_mask(mask, 16), np.tile(np.arange(16) < 8,
                                                                           (16, 1)))


def test_prompts_follow_the_mask():
  rng = np.random.default_rng(0)
  mask = np.zeros((64, 64), bool)
  mask[10:30, 20:50] = True
  np.testing.assert_array_equal(prompts.mask_to_box(mask), [20, 10, 49, 29])
  for _ in range(20):
    box = prompts.jitter_box(prompts.mask_to_box(mask), rng, 64, 64)
    assert np.all(np.abs(box - [20, 10, 49, 29]) <= [2.9, 1.9, 2.9, 1.9])
    coords, labels = prompts.sample_points(mask, rng, 2, 2, 5)
    assert labels.tolist() == [1, 1, 0, 0, -1]
    xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert mask[ys[:2], xs[:2]].all() and not mask[ys[2:4], xs[2:4]].any()
  full = np.ones((8, 8), bool)  # no background: negatives stay padding
  assert prompts.sample_points(full, rng, 1, 2, 3)[1].tolist() == [1, -1, -1]


def test_to_point_prompts():
  coords = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  labels = np.array([[1, 0, -1], [1, 1, 0]], np.int32)
  boxes = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
  c, l = prompts.to_point_prompts(coords, labels, boxes, np.array([True, False]))
  assert c.shape == (2, 5, 2)
  np.testing.assert_array_equal(np.asarray(l), [[-1, -1, -1, 2, 3], [1, 1, 0, -1, -1]])
  np.testing.assert_array_equal(np.asarray(c[0, 3:]), [[1, 2], [3, 4]])


def test_make_example_is_consistent(coco_dir):
  src = coco.open_source(coco_dir)
  cfg = _cfg(mask_size=SIZE // 4, prompts=prompts.PromptConfig(max_masks=6, box_prob=0.5))
  shapes = pipeline.batch_shapes(1, cfg)
  for i in range(len(src)):
    el = pipeline.make_example(src[i], pipeline.element_rng(cfg.seed, i), cfg)
    for k, (shape, dtype) in shapes.items():
      assert el[k].shape == shape[1:] and el[k].dtype == dtype, k
    n = int(el["valid"].sum())
    assert 1 <= n <= min(6, len(src[i].segmentations))
    assert not el["valid"][n:].any() and not el["gt_masks"][n:].any()
    for r in range(n):
      assert el["gt_masks"][r].any()
      labels = el["point_labels"][r]
      if el["use_box"][r]:
        assert (labels == -1).all()
      else:
        assert labels[0] == 1
        # Clicks at model resolution vs GT at 1/4: positives land in the (coarse) mask's box.
        pos = el["point_coords"][r][labels == 1] / 4
        ys, xs = np.nonzero(el["gt_masks"][r])
        assert np.all((pos[:, 0] >= xs.min() - 1) & (pos[:, 0] <= xs.max() + 1))
        assert np.all((pos[:, 1] >= ys.min() - 1) & (pos[:, 1] <= ys.max() + 1))


def test_hflip_mirrors_image_masks_and_prompts(coco_dir):
  src = coco.open_source(coco_dir)
  ex = src[4]
  rng = lambda: pipeline.element_rng(0, 4)  # noqa: E731
  a = pipeline.make_example(ex, rng(), _cfg(hflip_prob=0.0, image_size=56))
  flipped = coco.Example(ex.image[:, ::-1], ex.segmentations, ex.areas, ex.ann_ids, ex.source,
                         ex.index)
  # Draw the same random numbers: hflip_prob=1 consumes the flip draw like hflip_prob=0.
  b = pipeline.make_example(ex, rng(), _cfg(hflip_prob=1.0, image_size=56))
  c = pipeline.make_example(flipped, rng(), _cfg(hflip_prob=0.0, image_size=56))
  np.testing.assert_array_equal(b["image"], c["image"])
  assert not np.array_equal(a["image"], b["image"])
  # Same annotations chosen; the flipped GT masks are the mirrored ones.
  for r in np.nonzero(a["valid"])[0]:
    match = [np.array_equal(b["gt_masks"][q], a["gt_masks"][r][:, ::-1])
             for q in np.nonzero(b["valid"])[0]]
    assert any(match)


# ------------------------------------------------------------------------------------ pipeline


def test_batches_are_deterministic(coco_dir):
  src = coco.open_source(coco_dir)
  a = _take(pipeline.make_iterator(src, 4, _cfg(), shard_index=0, shard_count=1), 4)
  b = _take(pipeline.make_iterator(src, 4, _cfg(num_threads=1), shard_index=0, shard_count=1), 4)
  _assert_same(a, b)
  shapes = pipeline.batch_shapes(4, _cfg())
  for k, (shape, dtype) in shapes.items():
    assert a[0][k].shape == shape and a[0][k].dtype == dtype, k
  c = _take(pipeline.make_iterator(src, 4, _cfg(seed=12), shard_index=0, shard_count=1), 1)
  assert a[0]["index"].tolist() != c[0]["index"].tolist()


def test_epochs_are_permutations(coco_dir):
  src = coco.open_source(coco_dir)
  it = pipeline.make_iterator(src, 2, _cfg(num_epochs=2), shard_index=0, shard_count=1)
  order = np.concatenate([b["index"] for b in it])
  assert len(order) == 20
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
  assert order[:10].tolist() != order[10:].tolist()  # reshuffled each epoch
  it = pipeline.make_iterator(src, 4, _cfg(num_epochs=1), shard_index=0, shard_count=1)
  assert len(list(it)) == 2  # whole global batches only


def test_shards_are_disjoint_and_assemble_the_global_batch(coco_dir):
  src = coco.open_source(coco_dir)
  whole = _take(pipeline.make_iterator(src, 4, _cfg(), shard_index=0, shard_count=1), 5)
  parts = [_take(pipeline.make_iterator(src, 4, _cfg(), shard_index=p, shard_count=2), 5)
           for p in range(2)]
  for t in range(5):
    joined = {k: np.concatenate([parts[0][t][k], parts[1][t][k]]) for k in whole[t]}
    _assert_same([joined], [whole[t]])
  seen = [np.concatenate([b["index"] for b in part]) for part in parts]
  first_epoch = [s[:4] for s in seen]  # 2 steps x 2 rows x 2 shards = 8 of 10 images
  assert not set(first_epoch[0]) & set(first_epoch[1])
  assert set(seen[0]) | set(seen[1]) == set(range(10))
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    pipeline.make_dataset(src, 3, _cfg(), shard_index=0, shard_count=2)


def test_iterator_state_restores_exactly(coco_dir):
  src = coco.open_source(coco_dir)
  it = pipeline.make_iterator(src, 4, _cfg(), shard_index=1, shard_count=2)
  _take(it, 3)
  state = it.get_state()
  rest = _take(it, 4)  # crosses an epoch boundary (10 images, 2 rows per shard)
  fresh = pipeline.make_iterator(src, 4, _cfg(), shard_index=1, shard_count=2)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), rest)


def test_iterator_state_in_an_orbax_checkpoint(coco_dir, tmp_path):
  import orbax.checkpoint as ocp
  src = coco.open_source(coco_dir)
  it = pipeline.make_iterator(src, 2, _cfg(), shard_index=0, shard_count=1)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=pipeline.save_args(it),
                                         meta=ocp.args.JsonSave({"step": 2})))
    mngr.wait_until_finished()
  rest = _take(it, 3)
  fresh = pipeline.make_iterator(src, 2, _cfg(), shard_index=0, shard_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        data=pipeline.restore_args(fresh), meta=ocp.args.JsonRestore()))
  assert out["meta"] == {"step": 2}
  _assert_same(_take(fresh, 3), rest)

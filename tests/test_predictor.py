"""ImagePredictor end to end vs the real `SAM2ImagePredictor` on the same random weights.

Includes pre-processing (antialiased resize of a non-square image, normalisation) and
post-processing (bilinear upsampling to the original size), every prompt kind, batched boxes,
the no-recompile guarantee and the input errors.
"""

import numpy as np
import pytest

from torch_reference import build_torch_sam2, rel_err, save_official
from qsam2_jax.model.configs import get_config
from qsam2_jax.predictor import ImagePredictor, PromptError

H, W = 480, 640


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  return _pair(tmp_path_factory, 256)


def _pair(tmp_path_factory, image_size):
  import torchvision_stub
  torchvision_stub.install()
  from sam2.sam2_image_predictor import SAM2ImagePredictor

  cfg = get_config("sam2.1_hiera_t", image_size=image_size)
  tmodel = build_torch_sam2(cfg, seed=3)
  path = save_official(tmodel, tmp_path_factory.mktemp("pred") / "t.pt")
  ours = ImagePredictor.from_checkpoint(path, image_size=image_size)
  ref = SAM2ImagePredictor(tmodel)
  side = cfg.image_embedding_size  # the reference hard-codes the 1024² feature sizes
  ref._bb_feat_sizes = [(side * 4, side * 4), (side * 2, side * 2), (side, side)]
  rng = np.random.default_rng(0)
  # A smooth image with structure (pure noise would make the antialiasing filter moot).
  yy, xx = np.mgrid[0:H, 0:W]
  img = np.stack([128 + 100 * np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
  img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
  ours.set_image(img)
  ref.set_image(img)
  return ours, ref, img


PROMPTS = {
    "one_click": dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1])),
    "three_clicks": dict(point_coords=np.array([[300.0, 200.0], [100, 400], [620, 30]]),
                         point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([120.0, 80.0, 500.0, 400.0])),
    "box_and_points": dict(box=np.array([120.0, 80.0, 500.0, 400.0]),
                           point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([0])),
    "batched_boxes": dict(box=np.array([[120.0, 80, 500, 400], [10, 10, 200, 150],
                                        [400, 300, 639, 479]])),
}


def _compare(ours_out, ref_out):
  (m, iou, low), (tm, tiou, tlow) = ours_out, ref_out
  assert m.shape == tm.shape and iou.shape == tiou.shape and low.shape == tlow.shape
  assert rel_err(low, tlow) <= 1e-4
  assert rel_err(iou, tiou) <= 1e-4
  if m.dtype == bool:
    assert np.mean(m == tm) >= 0.999
  else:
    assert rel_err(m, tm) <= 1e-4
  # Same best-mask choice.
  np.testing.assert_array_equal(np.argmax(iou, axis=-1), np.argmax(tiou, axis=-1))


@pytest.mark.parametrize("name", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_sam2(pair, name, multimask):
  ours, ref, _ = pair
  kw = PROMPTS[name]
  _compare(ours.predict(multimask_output=multimask, **kw),
           ref.predict(multimask_output=multimask, **kw))


def test_logits_and_mask_input(pair):
  ours, ref, _ = pair
  kw = PROMPTS["one_click"]
  _, _, low = ref.predict(multimask_output=False, **kw)
  out = ours.predict(mask_input=low, multimask_output=False, return_logits=True, **kw)
  _compare(out, ref.predict(mask_input=low, multimask_output=False, return_logits=True, **kw))
  # Mask only, no sparse prompt.
  _compare(ours.predict(mask_input=low, multimask_output=True),
           ref.predict(mask_input=low, multimask_output=True))


def test_image_embedding_matches(pair):
  ours, ref, _ = pair
  emb = ours.get_image_embedding()
  temb = ref.get_image_embedding().numpy().transpose(0, 2, 3, 1)
  assert rel_err(emb, temb) <= 1e-4
  for a, b in zip(ours._features[1], ref._features["high_res_feats"]):
    assert rel_err(np.asarray(a), b.numpy().transpose(0, 2, 3, 1)) <= 1e-4


def test_no_recompile(pair):
  ours, _, img = pair
  kw = PROMPTS["box"]
  ours.predict(multimask_output=False, **kw)
  n_dec = ours._decode._cache_size()
  ours.predict(multimask_output=False, box=kw["box"] + 3.0)
  ours.set_image(img[::-1].copy())
  n_enc = ours._encode._cache_size()
  ours.set_image(img)
  ours.predict(multimask_output=False, **kw)
  assert ours._decode._cache_size() == n_dec
  assert ours._encode._cache_size() == n_enc


def test_grayscale_rgba_and_pil(pair):
  from PIL import Image
  ours, _, img = pair
  gray = img[:, :, 0]
  ours.set_image(gray)
  a = ours.get_image_embedding()
  ours.set_image(np.repeat(gray[:, :, None], 3, axis=2))
  np.testing.assert_array_equal(a, ours.get_image_embedding())
  rgba = np.concatenate([img, np.full((H, W, 1), 7, np.uint8)], axis=2)
  ours.set_image(rgba)
  b = ours.get_image_embedding()
  ours.set_image(Image.fromarray(img))
  np.testing.assert_array_equal(b, ours.get_image_embedding())
  ours.set_image(img)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 5, 6, 3), np.uint8), "shape"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    ([[1, 2], [3, 4]], "numpy array or a PIL image"),
])
def test_bad_images(pair, bad, match):
  ours, _, _ = pair
  with pytest.raises(PromptError, match=match):
    ours.set_image(bad)


def test_bad_prompts(pair):
  ours, _, _ = pair
  with pytest.raises(PromptError, match="needs a prompt"):
    ours.predict()
  with pytest.raises(PromptError, match="x1 < x0"):
    ours.predict(box=np.array([300.0, 10, 100, 200]))
  with pytest.raises(PromptError, match="point_labels must be supplied"):
    ours.predict(point_coords=np.array([[1.0, 2.0]]))
  fresh = ImagePredictor(ours.model)
  with pytest.raises(RuntimeError, match="set_image"):
    fresh.predict(box=np.array([0.0, 0, 10, 10]))


@pytest.mark.slow
def test_predict_matches_sam2_1024(tmp_path_factory):
  ours, ref, _ = _pair(tmp_path_factory, 1024)
  for name, kw in PROMPTS.items():
    for mm in (True, False):
      _compare(ours.predict(multimask_output=mm, **kw), ref.predict(multimask_output=mm, **kw))

"""The clip training forward (`train.clip_forward`, SAM2Train in JAX).

- Parity: with the GT mask on frame 0, no clicks and no quantization, the forward over an
  8-frame clip gives the per-frame low-res logits of PyTorch's `SAM2VideoPredictor` propagating
  the same frames from the same masks (randomized SAM2.1-t at 128², two objects).
- Correction clicks on hand-built masks land where SAM2's sampler puts them.
- Plans follow SAM2Train's rules.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qsam2_jax.checkpoint import model_from_state_dict
from qsam2_jax.data.synthetic import make_video_dataset
from qsam2_jax.model.configs import get_config
from torch_reference import build_torch_sam2, rel_err, to_numpy
from train import clip_forward as cf

T = 8
SIZE = 128
LOGIT_TOL = 1e-3


def _rect(y0, y1, x0, x1):
  m = np.zeros((SIZE, SIZE), bool)
  m[y0:y1, x0:x1] = True
  return m


@pytest.fixture(scope="module")
def _one_torch_thread():
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)


def test_clip_forward_matches_video_predictor(tmp_path, _one_torch_thread):
  cfg = get_config("sam2.1_hiera_t", image_size=SIZE)
  tp = build_torch_sam2(cfg, seed=0, video=True)
  forward = tp.memory_attention.forward

  def upcast(*args, memory=None, **kwargs):  # bf16 memories into fp32 linears on CPU
    return forward(*args, memory=memory.float(), **kwargs)

  tp.memory_attention.forward = upcast
  root = make_video_dataset(tmp_path / "v", 1, T, (SIZE, SIZE), seed=5)
  # Bands across the frame on the 8-px grid: the predictor encodes a mask prompt's memory from
  # the low-res logits upsampled and binarized, SAM2Train from the full-res mask; on such masks
  # (no corners, which the round trip rounds off) both see the same mask (checked below), so
  # the two protocols must agree to rounding.
  masks = [_rect(16, 56, 0, SIZE), _rect(0, SIZE, 72, 112)]
  with torch.inference_mode():
    ts = tp.init_state(os.path.join(root, "JPEGImages", "synth_0000"))
    for i, m in enumerate(masks):
      tp.add_new_mask(ts, 0, i + 1, m)
    list(tp.propagate_in_video(ts))
  for i, m in enumerate(masks):  # the predictor's cond-frame memory saw exactly this mask
    low = ts["output_dict_per_obj"][i]["cond_frame_outputs"][0]["pred_masks"]
    up = torch.nn.functional.interpolate(low.float(), (SIZE, SIZE), mode="bilinear",
                                         align_corners=False)
    np.testing.assert_array_equal(to_numpy(up[0, 0]) > 0, m)

  model = model_from_state_dict({k: to_numpy(v) for k, v in tp.state_dict().items()}, cfg)
  assert model.sam_mask_decoder.dynamic_multimask_via_stability  # eval rules, as the predictor
  images = jnp.asarray(to_numpy(ts["images"]).transpose(0, 2, 3, 1))[None]
  gt = np.zeros((1, T, 2, SIZE, SIZE), bool)
  gt[0, 0] = np.stack(masks)  # later frames' GT only feeds losses and clicks: unused here
  ccfg = cf.ClipConfig(correction_clicks=0, memory_dtype="bfloat16", only_past_pointers=True)
  plan = cf.mask_prompt_plan(1, T)
  gd, state = nnx.split(model)
  run = jax.jit(lambda st, im, g: cf.clip_forward(nnx.merge(gd, st), im, g, plan,
                                                   jax.random.key(0), ccfg))
  out = run(state, images, jnp.asarray(gt))
  assert out.pred_masks.shape == (T, 2, 1, SIZE // 4, SIZE // 4)
  assert out.step_masks.shape == (T, 2, 1, 3, SIZE // 4, SIZE // 4)
  assert np.asarray(out.step_valid).all()
  for i in range(2):
    outs = ts["output_dict_per_obj"][i]
    for f in range(T):
      d = outs["cond_frame_outputs"] if f == 0 else outs["non_cond_frame_outputs"]
      want = to_numpy(d[f]["pred_masks"][0, 0])
      got = np.asarray(out.pred_masks[f, i, 0])
      assert (want > 0).any() and (want <= 0).any(), f"reference obj {i} frame {f} constant"
      assert rel_err(got, want) <= LOGIT_TOL, f"obj {i} frame {f}: {rel_err(got, want):.2e}"
      want_ptr = to_numpy(d[f]["obj_ptr"][0])
      assert rel_err(np.asarray(out.obj_ptr[f, i]), want_ptr) <= LOGIT_TOL, (i, f)


# ------------------------------------------------------------------------------ clicks


def _torch_sampler(gt, pred, seed):
  from sam2.modeling.sam2_utils import sample_random_points_from_errors
  torch.manual_seed(seed)
  g = torch.from_numpy(gt)[:, None]
  p = None if pred is None else torch.from_numpy(pred)[:, None]
  pts, labels = sample_random_points_from_errors(g, p)
  return pts.numpy(), labels.numpy()


def test_correction_clicks_land_in_the_error_region():
  """Hand-built GT / prediction pairs: FN-only, FP-only, both, all correct, empty prediction."""
  h = w = 24
  gt = np.zeros((5, h, w), bool)
  pred = np.zeros((5, h, w), bool)
  gt[0, 4:12, 4:12] = True
  pred[0, 4:12, 4:8] = True  # FN: columns 8..11
  gt[1, 4:12, 4:12] = True
  pred[1, 4:12, 4:16] = True  # FP: columns 12..15
  gt[2, 2:6, 2:6] = True
  pred[2, 14:20, 14:20] = True  # FN (GT) and FP (prediction), disjoint
  gt[3, 5:9, 5:9] = True
  pred[3] = gt[3]  # all correct: a negative click on the background
  gt[4, 10:13, 3:20] = True  # pred empty: a positive click in the GT
  fn, fp = gt & ~pred, ~gt & pred
  seen = {i: set() for i in range(5)}
  sample = jax.jit(jax.vmap(lambda k: cf.sample_error_clicks(k, jnp.asarray(gt),
                                                             jnp.asarray(pred))))
  all_pts, all_labels = jax.device_get(sample(jax.random.split(jax.random.key(0), 200)))
  assert all_pts.dtype == np.float32 and all_labels.dtype == np.int32
  for pts, labels in zip(all_pts[:, :, 0], all_labels[:, :, 0]):
    for i in range(5):
      x, y = int(pts[i, 0]), int(pts[i, 1])
      assert pts[i, 0] == x and pts[i, 1] == y  # integer pixel indices, (x, y)
      if labels[i] == 1:
        assert fn[i, y, x], (i, x, y)
      else:
        assert labels[i] == 0
        region = fp[i] if fp[i].any() else ~gt[i]
        assert region[y, x], (i, x, y)
      seen[i].add((labels[i], x, y))
  assert {l for l, _, _ in seen[0]} == {1} and {l for l, _, _ in seen[1]} == {0}
  assert {l for l, _, _ in seen[3]} == {0} and {l for l, _, _ in seen[4]} == {1}
  # Uniform over the error region: case 2 has 16 FN and 36 FP pixels.
  labels2 = [l for l, _, _ in seen[2]]
  assert 0 in labels2 and 1 in labels2
  assert len(seen[0]) > 25  # 32 FN pixels, 200 draws: most of them hit
  # Same support and labels as SAM2's own sampler on the same masks.
  for seed in range(50):
    tp, tl = _torch_sampler(gt, pred, seed)
    for i in range(5):
      x, y = int(tp[i, 0, 0]), int(tp[i, 0, 1])
      assert (tl[i, 0] == 1) == bool(fn[i, y, x])
  # pred=None is an empty prediction (the initial click on a conditioning frame).
  pts, labels = cf.sample_error_clicks(jax.random.key(0), jnp.asarray(gt[4:5]), None)
  x, y = np.asarray(pts)[0, 0].astype(int)
  assert int(labels[0, 0]) == 1 and gt[4, y, x]


def test_label_frequencies_follow_region_sizes():
  """16 FN vs 48 FP pixels: P(positive) = 1/4, like SAM2's max-of-uniforms rule."""
  gt = np.zeros((1, 16, 16), bool)
  pred = np.zeros((1, 16, 16), bool)
  gt[0, 0:4, 0:4] = True
  pred[0, 8:16, 8:14] = True
  keys = jax.random.split(jax.random.key(7), 2000)
  labels = jax.jit(jax.vmap(lambda k: cf.sample_error_clicks(k, jnp.asarray(gt),
                                                             jnp.asarray(pred))[1]))(keys)
  frac = float(np.mean(np.asarray(labels)))
  assert abs(frac - 0.25) < 0.04, frac


def test_box_points_match_sam2():
  from sam2.modeling.sam2_utils import sample_box_points
  m = np.zeros((3, 40, 50), bool)
  m[0, 5:20, 10:30] = True
  m[1, 0:40, 0:50] = True
  m[2, 30:31, 48:50] = True
  want, labels = sample_box_points(torch.from_numpy(m)[:, None], noise=0.0)
  got = cf.sample_box_points(jax.random.key(0), jnp.asarray(m), noise=0.0)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  assert labels.tolist() == [[2, 3]] * 3
  noisy = np.asarray(cf.sample_box_points(jax.random.key(1), jnp.asarray(m)))
  box = np.asarray(got)
  side = np.stack([box[:, 1, 0] - box[:, 0, 0], box[:, 1, 1] - box[:, 0, 1]], -1)
  bound = np.minimum(0.1 * side, 20.0)
  assert np.all(np.abs(noisy - box) <= np.tile(bound[:, None], (1, 2, 1)) + 1e-6)
  assert noisy.min() >= 0 and noisy[..., 0].max() <= 49 and noisy[..., 1].max() <= 39


# ------------------------------------------------------------------------------ plans


def test_sample_plan_rules():
  b, t = 256, 8
  plan = jax.jit(cf.sample_plan, static_argnums=(1, 2, 3))
  p = jax.tree.map(np.asarray, plan(jax.random.key(3), b, t, cf.ClipConfig()))
  assert p.init_cond[:, 0].all()
  n_init = p.init_cond.sum(1)
  assert set(n_init.tolist()) == {1, 2}
  assert 0.35 < p.use_points.mean() < 0.65
  # Mask prompts get no clicks; with points, the initial frames are corrected, 1..2 in all.
  assert not p.correct[~p.use_points].any() and not p.use_box[~p.use_points].any()
  pts = p.use_points
  assert (p.correct[pts] >= p.init_cond[pts]).all()
  n_corr = p.correct[pts].sum(1)
  assert n_corr.min() >= 1 and n_corr.max() == 2
  assert (n_corr >= n_init[pts]).all()
  assert not (p.use_box & ~p.init_cond).any()
  assert not (p.from_gt & ~p.correct[..., None]).any()
  frac_gt = p.from_gt[p.correct].mean()
  assert 0.05 < frac_gt < 0.15
  # An image (T = 1) is always point-prompted and corrected.
  q = plan(jax.random.key(0), 64, 1, cf.ClipConfig())
  assert np.asarray(q.use_points).all() and np.asarray(q.correct).all()


# ------------------------------------------------------------------------------ SAM2Train


def _sam2train(cfg, k):
  """PyTorch's `SAM2Train` on the randomized reference weights, training mode, dropout off."""
  import sys
  import types
  if "tensordict" not in sys.modules:  # training.utils.data_utils imports it for a decorator
    try:
      import tensordict  # noqa: F401
    except ImportError:
      stub = types.ModuleType("tensordict")
      stub.tensorclass = lambda cls: cls
      sys.modules["tensordict"] = stub
  from training.model.sam2 import SAM2Train
  tm = build_torch_sam2(cfg, seed=0)
  tm.__class__ = SAM2Train
  tm.num_correction_pt_per_frame = k
  tm.prob_to_sample_from_gt_for_train = 0.0
  tm.add_all_frames_to_correct_as_cond = True
  tm.use_act_ckpt_iterative_pt_sampling = False
  tm.forward_backbone_per_frame_for_eval = False
  tm.train()
  for mod in tm.modules():
    if isinstance(mod, torch.nn.Dropout):
      mod.p = 0.0
    if hasattr(mod, "dropout_p"):
      mod.dropout_p = 0.0
  return tm


@pytest.mark.slow  # one compile of the clip forward with corrections (~1 min on 2 cores)
def test_clip_forward_matches_sam2train_with_corrections(monkeypatch, _one_torch_thread):
  """Points on two initial frames (a click on frame 0, a box on frame 2), correction clicks on
  both and on frame 3 (not an initial frame: it becomes a conditioning frame), tracking on
  frame 1 (which attends to the *future* conditioning frame 2, as in training). PyTorch's click
  sampler is replaced by ours with the same keys, so both sides get the same clicks; every
  prediction step of every frame must then agree."""
  t, n, k, size = 4, 2, 2, SIZE
  cfg = get_config("sam2.1_hiera_t", image_size=size)
  tm = _sam2train(cfg, k)
  import training.model.sam2 as ts
  model = model_from_state_dict({k_: to_numpy(v) for k_, v in tm.state_dict().items()}, cfg)
  model.sam_mask_decoder.dynamic_multimask_via_stability = False  # training rules
  from qsam2_jax.data import synthetic
  from qsam2_jax.video_io import normalize_frame
  v = synthetic.synth_video(2, 0, t, (size, size))
  images = np.asarray(normalize_frame(jnp.asarray(v.frames)))  # (T, S, S, 3)
  gt = np.stack([v.labels == j + 1 for j in range(n)], axis=1)  # (T, N, S, S)
  plan = cf.ClipPlan(
      use_points=jnp.array([True]), init_cond=jnp.array([[True, False, True, False]]),
      use_box=jnp.array([[False, False, True, False]]),
      correct=jnp.array([[True, False, True, True]]), from_gt=jnp.zeros((1, t, k), bool))
  order = [0, 2, 1, 3]
  key = jax.random.key(11)
  keys = [jax.random.split(jax.random.fold_in(key, s), 3) for s in range(t)]

  state = {"s": 0, "k": 0}

  def next_point(gt_masks, pred_masks, method):
    assert method == "uniform"
    kk = jax.random.fold_in(keys[state["s"]][2], state["k"])
    state["k"] += 1
    pred = None if pred_masks is None else jnp.asarray(pred_masks[:, 0].numpy())
    pts, labels = cf.sample_error_clicks(kk, jnp.asarray(gt_masks[:, 0].numpy()), pred)
    return torch.from_numpy(np.array(pts)), torch.from_numpy(np.array(labels))

  monkeypatch.setattr(ts, "get_next_point", next_point)
  track = tm.track_step

  def track_step(**kw):
    state["s"], state["k"] = order.index(kw["frame_idx"]), 0
    return track(**kw)

  tm.track_step = track_step
  g = jnp.asarray(gt)
  c0, l0 = cf.sample_error_clicks(keys[0][1], g[0], None)
  box = cf.sample_box_points(keys[1][0], g[2])
  gt_t = torch.from_numpy(gt)
  backbone = {
      "gt_masks_per_frame": {f: gt_t[f][:, None] for f in range(t)}, "num_frames": t,
      "use_pt_input": True, "init_cond_frames": [0, 2], "frames_not_in_init_cond": [1, 3],
      "mask_inputs_per_frame": {},
      "point_inputs_per_frame": {
          0: {"point_coords": torch.from_numpy(np.array(c0)),
              "point_labels": torch.from_numpy(np.array(l0))},
          2: {"point_coords": torch.from_numpy(np.array(box)),
              "point_labels": torch.tensor([[2, 3]] * n, dtype=torch.int32)}},
      "frames_to_add_correction_pt": [0, 2, 3]}
  img_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  inputs = type("Input", (), {})()  # forward_tracking reads only this field
  inputs.flat_obj_to_img_idx = [torch.full((n,), f, dtype=torch.long) for f in range(t)]
  with torch.no_grad():
    backbone.update(tm.forward_image(img_t))
    want = tm.forward_tracking(backbone, inputs)

  ccfg = cf.ClipConfig(correction_clicks=k)
  gd, st = nnx.split(model)
  out = jax.jit(lambda s_, im, g_: cf.clip_forward(nnx.merge(gd, s_), im, g_, plan, key, ccfg))(
      st, jnp.asarray(images)[None], g[None])
  out = jax.device_get(out)
  corrected = {0: True, 1: False, 2: True, 3: True}
  for f in range(t):
    w = want[f]
    steps = len(w["multistep_pred_multimasks"])
    assert steps == (1 + k if corrected[f] else 1)
    assert out.step_valid[f, :, :steps].all() and not out.step_valid[f, :, steps:].any()
    for j in range(steps):
      wm = to_numpy(w["multistep_pred_multimasks"][j])
      m = wm.shape[1]
      gm = out.step_masks[f, :, j, :m]
      assert rel_err(gm, wm) <= LOGIT_TOL, (f, j, rel_err(gm, wm))
      assert rel_err(out.step_ious[f, :, j, :m], to_numpy(w["multistep_pred_ious"][j])) <= 1e-3
      assert rel_err(out.step_obj[f, :, j],
                     to_numpy(w["multistep_object_score_logits"][j])) <= 1e-3
    assert rel_err(out.pred_masks[f], to_numpy(w["pred_masks"])) <= LOGIT_TOL, f
    # The clicks really were corrections: the prediction changed between steps.
    if corrected[f]:
      assert not np.allclose(out.step_masks[f, :, 0], out.step_masks[f, :, k])


def test_masked_prompt_slots_equal_unpadded_prompts():
  """`predict_masks(prompt_valid=...)`: extra prompt slots marked invalid leave every output
  as without them (and unmasked, the same slots do change the outputs)."""
  from qat_testlib import tiny_config
  from qsam2_jax.model.sam2 import build_sam2
  model = build_sam2(tiny_config(64), seed=2)
  pe, dec = model.sam_prompt_encoder, model.sam_mask_decoder
  rng = np.random.default_rng(0)
  feat = jnp.asarray(rng.normal(size=(2, 4, 4, 256)).astype(np.float32))
  hr = [jnp.asarray(rng.normal(size=(2, 16, 16, 32)).astype(np.float32)),
        jnp.asarray(rng.normal(size=(2, 8, 8, 64)).astype(np.float32))]
  coords = jnp.asarray(rng.uniform(0, 64, (2, 4, 2)).astype(np.float32))
  labels = jnp.array([[1, 0, 1, 3], [2, 3, 0, 1]], jnp.int32)
  valid = jnp.array([[True, False, True, False], [True, True, False, False]])

  @jax.jit
  def run(c, l, v=None):
    sparse, dense = pe(points=(c, l), boxes=None, masks=None)
    if v is not None:
      v = jnp.concatenate([v, jnp.ones((2, 1), bool)], axis=1)  # the encoder's own pad token
    return dec.predict_masks(feat, pe.get_dense_pe(), sparse, dense, repeat_image=False,
                             high_res_features=hr, prompt_valid=v)

  masked = run(coords, labels, valid)
  unmasked = run(coords, labels)
  for row, keep in enumerate(([0, 2], [0, 1])):
    want = run(coords[row:row + 1, keep].repeat(2, 0), labels[row:row + 1, keep].repeat(2, 0))
    for got, ref, other in zip(masked, want, unmasked):
      np.testing.assert_allclose(np.asarray(got[row]), np.asarray(ref[row]), rtol=1e-5,
                                 atol=1e-5)
      assert not np.allclose(np.asarray(other[row]), np.asarray(ref[row]), rtol=1e-3,
                             atol=1e-3)

"""Parity of the video tracking functions (`qsam2_jax.model.tracking`) with `SAM2Base`.

Reference: randomized SAM2.1-t (and SAM2.0-t for the memory bank) at 256², so h = w = 16,
low-res masks 64², high-res masks 256². Memory banks are built from synthetic per-frame outputs
(random bf16 memories and pointers) and fed both to PyTorch's unpadded
`_prepare_memory_conditioned_features` and to our padded, masked `MemoryBank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qsam2_jax.checkpoint import model_from_state_dict
from qsam2_jax.model import tracking
from qsam2_jax.model.configs import get_config
from torch_reference import build_torch_sam2, rel_err, to_numpy

TOL = 1e-4


def _nhwc(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(to_numpy(t).transpose(0, 2, 3, 1))


def _seq_first(t: torch.Tensor) -> torch.Tensor:
  return t.flatten(2).permute(2, 0, 1)


def _setup(cfg, tm):
  """(JAX model with the same weights, torch forward_image outputs on 2 random images)."""
  model = model_from_state_dict({k: to_numpy(v) for k, v in tm.state_dict().items()}, cfg)
  gen = torch.Generator().manual_seed(1)
  img = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
  with torch.no_grad():
    feats = tm.forward_image(img)
  return cfg, tm, model, feats


@pytest.fixture(scope="module")
def t21(torch_t256):
  return _setup(*torch_t256)


@pytest.fixture(scope="module")
def t20():
  cfg = get_config("sam2_hiera_t", image_size=256)
  return _setup(cfg, build_torch_sam2(cfg, seed=0))


@contextlib.contextmanager
def _torch_attrs(tm, **values):
  """Temporarily sets attributes of the (session-shared) torch model."""
  old = {k: getattr(tm, k) for k in values}
  for k, v in values.items():
    setattr(tm, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(tm, k, v)


@contextlib.contextmanager
def _obj_score_shift(tm, model, shift):
  """Shifts the object-score head's last bias on both sides (restored bit-exactly after)."""
  t_bias = tm.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
  saved = t_bias.detach().clone()
  m2 = nnx.clone(model)
  j_bias = m2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
  j_bias.set_value(j_bias.get_value() + shift)
  with torch.no_grad():
    t_bias.add_(shift)
  try:
    yield m2
  finally:
    with torch.no_grad():
      t_bias.copy_(saved)


# --------------------------------------------------------------------------------------------
# Memory selection (host logic), on hand-checked cases.


@dataclasses.dataclass
class _Out:
  name: str
  maskmem_features: object = None
  obj_ptr: object = None


def _outs(frames, tag=""):
  return {t: _Out(f"{tag}{t}") for t in frames}


def test_select_memory_forward_with_future_cond_frame():
  cfg = get_config("sam2.1_hiera_t")
  cond = _outs([0, 12], "c")
  non_cond = _outs(range(1, 10))
  sel = tracking.select_memory(cfg, cond, non_cond, 10, 20)
  # Every cond frame (index 6 = t_pos 0), then frames 4..9 at t_pos 1..6 (index 5..0).
  assert [(i, o.name) for i, o in sel.spatial] == [
      (6, "c0"), (6, "c12"), (5, "4"), (4, "5"), (3, "6"), (2, "7"), (1, "8"), (0, "9")]
  # Pointers: only past cond frames (signed distance), then frames 9..1 at distance 1..9.
  assert [(p, o.name) for p, o in sel.pointers] == [(10, "c0")] + [
      (d, str(10 - d)) for d in range(1, 10)]
  assert sel.t_diff_max == 15


def test_select_memory_reverse_short_video_and_cond_limit():
  cfg = get_config("sam2.1_hiera_t")
  sel = tracking.select_memory(cfg, _outs([3], "c"), _outs([1, 2, 4, 5, 6, 7]), 0, 8,
                               track_in_reverse=True)
  assert [(i, o.name) for i, o in sel.spatial] == [
      (6, "c3"), (5, "6"), (4, "5"), (3, "4"), (1, "2"), (0, "1")]  # 3 is a cond frame
  assert [(p, o.name) for p, o in sel.pointers] == [
      (3, "c3"), (1, "1"), (2, "2"), (4, "4"), (5, "5"), (6, "6"), (7, "7")]
  assert sel.t_diff_max == 7
  # With at most 2 cond frames, the far one (0) is attended as an ordinary past frame.
  sel = tracking.select_memory(cfg, _outs([0, 5, 8], "c"), _outs([9]), 10, 12,
                               max_cond_frames_in_attn=2)
  assert [(i, o.name) for i, o in sel.spatial] == [(6, "c8"), (6, "c5"), (0, "9")]
  assert [(p, o.name) for p, o in sel.pointers] == [(2, "c8"), (5, "c5"), (1, "9"), (10, "c0")]
  assert tracking.bank_slots(cfg, 1) == (7, 16)


# --------------------------------------------------------------------------------------------
# Memory-conditioned features: padded bank vs PyTorch's concatenation.

# (frame_idx, cond frames, non-cond frames, num_frames, reverse, max_cond_frames_in_attn)
SCENARIOS = [
    (5, [0], [1, 2, 3, 4], 8, False, -1),
    (3, [7], [4, 5, 6], 8, True, -1),
    (1, [0, 4], [], 8, False, -1),
    (18, [0, 9], [t for t in range(1, 18) if t != 9], 24, False, -1),
    (0, [3], [1, 2, 4, 5, 6, 7], 8, True, -1),
    (10, [0, 5, 8], [9], 12, False, 2),
]


@functools.partial(jax.jit)
def _conditioned(model, feat, pos, bank):
  return tracking.memory_conditioned_features(model, feat, pos, bank)


@pytest.mark.parametrize("version", ["2.1", "2.0"])
def test_memory_conditioned_features_match_torch(request, version):
  cfg, tm, model, feats = request.getfixturevalue("t21" if version == "2.1" else "t20")
  h, m, c = cfg.image_embedding_size, cfg.mem_dim, cfg.d_model
  feat, pos = feats["backbone_fpn"][-1][:1], feats["vision_pos_enc"][-1][:1]
  mem_pos = tm.memory_encoder.position_encoding(torch.zeros(1, m, h, h))
  gen = torch.Generator().manual_seed(2)
  cond_slots = 4
  n_s, n_p = tracking.bank_slots(cfg, cond_slots)
  b = len(SCENARIOS)
  bank = dict(features=np.zeros((b, n_s, h, h, m), np.float32),
              tpos_index=np.zeros((b, n_s), np.int32), valid=np.zeros((b, n_s), bool),
              obj_ptrs=np.full((b, n_p, c), np.nan, np.float32),  # padding may hold anything
              ptr_pos=np.zeros((b, n_p), np.int32), ptr_valid=np.zeros((b, n_p), bool))
  want = []
  for row, (f, conds, non_conds, num_frames, reverse, max_cond) in enumerate(SCENARIOS):
    t_outs, j_outs = {}, {}
    for t in sorted(set(conds) | set(non_conds)):
      mem = torch.randn(1, m, h, h, generator=gen).to(torch.bfloat16)
      ptr = torch.randn(1, c, generator=gen)
      t_outs[t] = {"maskmem_features": mem, "maskmem_pos_enc": [mem_pos], "obj_ptr": ptr}
      j_outs[t] = _Out(str(t), to_numpy(mem[0]).transpose(1, 2, 0), to_numpy(ptr[0]))
    split = lambda d: ({t: d[t] for t in conds}, {t: d[t] for t in non_conds})
    with torch.no_grad(), _torch_attrs(tm, max_cond_frames_in_attn=max_cond):
      out = tm._prepare_memory_conditioned_features(
          frame_idx=f, is_init_cond_frame=False, current_vision_feats=[_seq_first(feat)],
          current_vision_pos_embeds=[_seq_first(pos)], feat_sizes=[(h, h)],
          output_dict=dict(zip(("cond_frame_outputs", "non_cond_frame_outputs"),
                               split(t_outs))),
          num_frames=num_frames, track_in_reverse=reverse)
    want.append(to_numpy(out)[0].transpose(1, 2, 0))
    sel = tracking.select_memory(cfg, *split(j_outs), f, num_frames, track_in_reverse=reverse,
                                 max_cond_frames_in_attn=max_cond)
    # Odd rows fill the slots from the end: the result must not depend on slot order.
    order = (lambda n, k: range(k)) if row % 2 == 0 else (lambda n, k: range(n - 1, n - 1 - k, -1))
    for slot, (idx, o) in zip(order(n_s, len(sel.spatial)), sel.spatial):
      bank["features"][row, slot] = o.maskmem_features
      bank["tpos_index"][row, slot] = idx
      bank["valid"][row, slot] = True
    for slot, (p, o) in zip(order(n_p, len(sel.pointers)), sel.pointers):
      bank["obj_ptrs"][row, slot] = o.obj_ptr
      bank["ptr_pos"][row, slot] = p
      bank["ptr_valid"][row, slot] = True
  bank["t_diff_max"] = np.array([min(s[3], cfg.max_obj_ptrs_in_encoder) - 1 for s in SCENARIOS],
                                np.int32)
  got = np.asarray(_conditioned(model, jnp.broadcast_to(_nhwc(feat), (b, h, h, c)),
                                jnp.broadcast_to(_nhwc(pos), (b, h, h, c)),
                                tracking.MemoryBank(**bank)))
  for row in range(b):
    assert rel_err(got[row], want[row]) < TOL, (version, SCENARIOS[row])


# --------------------------------------------------------------------------------------------
# SAM heads, mask-as-output, memory encoding.


@functools.partial(jax.jit, static_argnames=("multimask_output",))
def _sam_heads(model, feat, coords, labels, mask_inputs, high_res, multimask_output):
  return tracking.forward_sam_heads(model, feat, coords, labels, mask_inputs, high_res,
                                    multimask_output)


def _compare(got, want, names):
  for name, g, w in zip(names, got, want):
    w = to_numpy(w)
    if g.ndim == 4 and w.shape != g.shape:
      w = w.transpose(0, 2, 3, 1)
    assert g.shape == w.shape, name
    assert rel_err(g, w) < TOL, name


# (points, multimask, mask prompt side (None / low-res 64 / image 256), score shift)
HEAD_CASES = {
    "one_click_multimask": ("click", True, None, 0.0),
    "box_click_prev_logits_single": ("box_click", False, 64, 0.0),
    "image_size_mask_only": (None, False, 256, 0.0),
    "absent_object_gated": (None, True, None, -8.0),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_forward_sam_heads_match_torch(t21, case):
  cfg, tm, model, feats = t21
  points, multimask, mask_side, shift = HEAD_CASES[case]
  gen = torch.Generator().manual_seed(3)
  s = cfg.image_size
  fpn = feats["backbone_fpn"]
  point_inputs = coords = labels = None
  if points == "click":
    coords, labels = torch.rand(2, 1, 2, generator=gen) * s, torch.ones(2, 1, dtype=torch.int32)
  elif points == "box_click":
    coords = torch.rand(2, 3, 2, generator=gen) * s
    labels = torch.tensor([[2, 3, 1], [2, 3, 0]], dtype=torch.int32)
  if coords is not None:
    point_inputs = {"point_coords": coords, "point_labels": labels}
    coords, labels = jnp.asarray(coords.numpy()), jnp.asarray(labels.numpy())
  mask = None if mask_side is None else torch.randn(2, 1, mask_side, mask_side, generator=gen) * 4
  with _obj_score_shift(tm, model, shift) as m2, torch.no_grad():
    want = tm._forward_sam_heads(fpn[2], point_inputs, mask, [fpn[0], fpn[1]], multimask)
    got = _sam_heads(m2, _nhwc(fpn[2]), coords, labels,
                     None if mask is None else jnp.asarray(mask.numpy()),
                     [_nhwc(fpn[0]), _nhwc(fpn[1])], multimask)
  got = [np.asarray(g) for g in got]
  # PyTorch: (low_res_multimasks, high_res_multimasks, ious, low_res, high_res, ptr, score).
  want = [want[0], want[2], want[3], want[4], want[5], want[6]]
  _compare(got, want, tracking.SamOutputs._fields)
  score = to_numpy(want[-1])
  if shift < 0:  # the gate is exercised: every mask is NO_OBJ_SCORE, pointers are no_obj_ptr
    assert np.all(score < 0) and np.all(got[0] == tracking.NO_OBJ_SCORE)
  else:
    assert np.all(score > 0) and np.any(got[2] > 0) and np.any(got[2] < 0)


def test_use_mask_as_output_match_torch(t21):
  cfg, tm, model, feats = t21
  s = cfg.image_size
  fpn = feats["backbone_fpn"]
  yy, xx = np.mgrid[:s, :s]
  blob = ((yy - 100) ** 2 + (xx - 140) ** 2 < 40 ** 2).astype(np.float32)
  masks = np.stack([blob, np.zeros_like(blob)])[:, None]  # second object: empty -> absent
  with torch.no_grad():
    want = tm._use_mask_as_output(fpn[2], [fpn[0], fpn[1]], torch.from_numpy(masks))
  got = jax.jit(tracking.use_mask_as_output)(
      model, _nhwc(fpn[2]), [_nhwc(fpn[0]), _nhwc(fpn[1])], jnp.asarray(masks))
  got = [np.asarray(g) for g in got]
  _compare(got, [want[0], want[2], want[3], want[4], want[5], want[6]],
           tracking.SamOutputs._fields)
  np.testing.assert_array_equal(got[-1][:, 0], [10.0, -10.0])


@pytest.mark.parametrize("is_mask_from_pts", [False, True])
def test_encode_new_memory_match_torch(t21, is_mask_from_pts):
  cfg, tm, model, feats = t21
  s = cfg.image_size
  gen = torch.Generator().manual_seed(4)
  logits = torch.randn(2, 1, s, s, generator=gen) * 3
  scores = torch.tensor([[1.5], [-0.5]])  # the second gets no_obj_embed_spatial
  feat = feats["backbone_fpn"][2]
  with torch.no_grad(), _torch_attrs(tm, binarize_mask_from_pts_for_mem_enc=True):
    want, want_pos = tm._encode_new_memory([_seq_first(feat)], [(feat.shape[2], feat.shape[3])],
                                           logits, scores, is_mask_from_pts)
  enc = jax.jit(tracking.encode_new_memory, static_argnames=("is_mask_from_pts",))
  got, got_pos = enc(model, _nhwc(feat), jnp.asarray(logits.numpy()),
                     jnp.asarray(scores.numpy()), is_mask_from_pts=is_mask_from_pts)
  _compare([np.asarray(got), np.asarray(got_pos)], [want, want_pos[0]], ["mem", "pos"])

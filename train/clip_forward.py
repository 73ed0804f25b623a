"""SAM2's training forward over video clips (`training/model/sam2.py` `SAM2Train`), jittable.

A sample is a clip of T frames with N objects (an image is a 1-frame clip). Per clip, a
`ClipPlan` says how it is prompted, with SAM2Train's rules and probabilities (`ClipConfig`):

- the initial conditioning frames (frame 0, plus up to `num_init_cond_frames - 1` random
  others) get the ground-truth mask (p = 1 - `prob_point`), else points: a noisy box
  (`prob_box`) or one click sampled from the mask;
- with points, `num_frames_to_correct` frames (the initial ones plus random others) get
  `correction_clicks` iterative clicks, each sampled uniformly from the error region between the
  current prediction and the ground truth (false negative: positive click, label 1; false
  positive: negative click, label 0; everything right: a negative click on the background), or
  from the ground truth itself with `prob_sample_from_gt`; the previous low-res logits are fed
  back as the mask prompt; with `add_all_frames_to_correct_as_cond` corrected frames become
  conditioning frames;
- the initial conditioning frames are processed first (no memory: `no_mem_embed`), then the
  others in temporal order, each conditioned on the memory bank (conditioning frames, the 6
  previous frames, object pointers) through `tracking.memory_conditioned_features`, and each
  encoded into memory from its final mask.

Static shapes: the bank has one slot per clip frame (`tracking.MemoryBank`, masked), and the
prompt has `2 + correction_clicks` point slots; slots a frame does not use are masked out of the
decoder's attention (`MaskDecoder.predict_masks(prompt_valid=...)`), so every output equals
PyTorch's computation on the unpadded prompts. Frames are one `lax.scan`, corrections an inner
`lax.scan` under a `lax.cond` (skipped when no clip corrects the frame being processed). Random
choices use explicit keys.

Outputs follow SAM2's loss inputs: every prediction step (the first pass plus each correction)
of every frame and object, with 3 mask slots (a single-mask output is repeated 3 times, which
leaves SAM2's lowest-loss selection and its IoU average unchanged).

Differences from PyTorch: no dropout / drop-path (the Flax model has none); the memory bank
keeps float32 features unless `memory_dtype` says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.data.prompts import BOX_BR_LABEL, BOX_TL_LABEL, PAD_LABEL
from qsam2_jax.model import tracking

INITIAL_SLOTS = 2  # a box (two corners) or one click (+ one unused slot)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """SAM2Train's prompt simulation; defaults are the SAM2.1 training config's."""
  prob_point: float = 0.5  # prob_to_use_pt_input_for_train (else the GT mask is the prompt)
  prob_box: float = 0.5  # prob_to_use_box_input_for_train, among point inputs
  num_init_cond_frames: int = 2  # num_init_cond_frames_for_train
  rand_init_cond_frames: bool = True  # 1..num_init_cond_frames
  num_frames_to_correct: int = 2  # num_frames_to_correct_for_train
  rand_frames_to_correct: bool = True  # num_init..num_frames_to_correct
  correction_clicks: int = 7  # num_correction_pt_per_frame
  prob_sample_from_gt: float = 0.1  # prob_to_sample_from_gt_for_train
  add_all_frames_to_correct_as_cond: bool = True
  box_noise: float = 0.1  # sample_box_points defaults
  box_noise_bound: float = 20.0
  only_past_pointers: bool = False  # True: eval rule (SAM2Train trains on all cond pointers)
  memory_dtype: Optional[str] = None  # e.g. "bfloat16" like the video predictor's memories
  # Recompute each frame (and each correction click) in the backward pass instead of storing
  # its full-resolution intermediates, which dominate the step's memory (8.2 -> 3.1 GB of XLA
  # temporaries for ONE 3-frame clip at 256²); the loss and gradient are the stored step's
  # (test_clip_remat_keeps_values_and_cuts_memory). Off by default until the Hiera block remat
  # it is meant to go with is understood (docs/status.md #11).
  remat: bool = False

  def __post_init__(self):
    for name in ("prob_point", "prob_box", "prob_sample_from_gt"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    if self.num_init_cond_frames < 1:
      raise ValueError("num_init_cond_frames must be >= 1")
    if self.prob_point > 0 and self.num_frames_to_correct < self.num_init_cond_frames:
      raise ValueError("num_frames_to_correct must be >= num_init_cond_frames (SAM2Train)")
    if self.correction_clicks < 0:
      raise ValueError("correction_clicks must be >= 0")


class ClipPlan(NamedTuple):
  """How each of B clips is prompted (all jnp arrays; T = frames, K = correction clicks).

  use_points: (B,) point prompts (box or click) rather than masks on the initial frames.
  init_cond: (B, T) initial conditioning frames (frame 0 always).
  use_box: (B, T) a box rather than a click (initial frames with points).
  correct: (B, T) frames that get K correction clicks.
  from_gt: (B, T, K) a correction click sampled from the GT instead of the error region.
  """
  use_points: jax.Array
  init_cond: jax.Array
  use_box: jax.Array
  correct: jax.Array
  from_gt: jax.Array


class ClipOutputs(NamedTuple):
  """Per frame (T), per object (B·N, clip-major), per prediction step (1 + K).

  step_masks: (T, BN, 1+K, 3, 4h, 4w) low-res mask logits (single-mask steps repeated ×3).
  step_ious: (T, BN, 1+K, 3). step_obj: (T, BN, 1+K, 1) object-score logits.
  step_valid: (T, BN, 1+K) bool: the step happened (corrections only on corrected frames).
  pred_masks: (T, BN, 1, 4h, 4w) the final low-res logits (what is encoded into memory).
  obj_ptr: (T, BN, C) final object pointers.
  """
  step_masks: jax.Array
  step_ious: jax.Array
  step_obj: jax.Array
  step_valid: jax.Array
  pred_masks: jax.Array
  obj_ptr: jax.Array


# ------------------------------------------------------------------------------ plan


def _random_subset(key: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
  """(B, T) bool: `count[b]` distinct frames drawn uniformly among `eligible[b]`."""
  score = jnp.where(eligible, jax.random.uniform(key, eligible.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(score, axis=1), axis=1)
  return eligible & (rank < count[:, None])


def sample_plan(key: jax.Array, batch: int, num_frames: int, cfg: ClipConfig) -> ClipPlan:
  """`SAM2Train.prepare_prompt_inputs` for B clips (its training branch), jittable."""
  k_pt, k_ninit, k_init, k_box, k_ncorr, k_corr, k_gt = jax.random.split(key, 7)
  t = num_frames
  kk = cfg.correction_clicks
  if t == 1:  # an image: point input, one initial frame, corrected (SAM2Train's special case)
    prob_point, n_init_max, n_corr_max = 1.0, 1, 1
  else:
    prob_point = cfg.prob_point
    n_init_max = min(cfg.num_init_cond_frames, t)
    n_corr_max = min(cfg.num_frames_to_correct, t)
  use_points = jax.random.uniform(k_pt, (batch,)) < prob_point
  if cfg.rand_init_cond_frames and n_init_max > 1:
    n_init = jax.random.randint(k_ninit, (batch,), 1, n_init_max + 1)
  else:
    n_init = jnp.full((batch,), n_init_max, jnp.int32)
  frame = jnp.arange(t)[None, :]
  others = jnp.broadcast_to(frame > 0, (batch, t))
  init_cond = (frame == 0) | _random_subset(k_init, others, n_init - 1)
  if cfg.rand_frames_to_correct:
    lo = jnp.minimum(n_init, n_corr_max)
    n_corr = jnp.where(n_corr_max > n_init,
                       jax.random.randint(k_ncorr, (batch,), 0, 2**30) % (n_corr_max - lo + 1)
                       + lo, n_init)
  else:
    n_corr = jnp.maximum(jnp.full((batch,), n_corr_max, jnp.int32), n_init)
  extra = _random_subset(k_corr, ~init_cond, n_corr - n_init)
  correct = use_points[:, None] & (init_cond | extra)
  use_box = jax.random.uniform(k_box, (batch, t)) < cfg.prob_box
  from_gt = jax.random.uniform(k_gt, (batch, t, kk)) < cfg.prob_sample_from_gt
  return ClipPlan(use_points, init_cond, use_box & init_cond & use_points[:, None], correct,
                  from_gt & correct[..., None])


def mask_prompt_plan(batch: int, num_frames: int, correction_clicks: int = 0) -> ClipPlan:
  """The semi-supervised VOS protocol: the GT mask on frame 0, then tracking, no clicks."""
  t = num_frames
  init = jnp.broadcast_to(jnp.arange(t)[None] == 0, (batch, t))
  no = jnp.zeros((batch, t), bool)
  return ClipPlan(jnp.zeros((batch,), bool), init, no, no,
                  jnp.zeros((batch, t, correction_clicks), bool))


# ------------------------------------------------------------------------------ clicks


def sample_error_clicks(key: jax.Array, gt: jax.Array, pred: Optional[jax.Array]
                        ) -> Tuple[jax.Array, jax.Array]:
  """One click per mask, as `sam2_utils.sample_random_points_from_errors` samples it.

  Every pixel gets two uniform draws, one kept on false positives (or, when the prediction is
  entirely right, on the background), one kept on false negatives; the largest kept draw wins.
  So the click is uniform over the error region, labelled 1 (positive) in a false negative and
  0 (negative) in a false positive. `pred=None` means an empty prediction (a first click from
  the GT).

  Args:
    gt, pred: (B, H, W) bool.

  Returns:
    points (B, 1, 2) float32 (x, y) pixel indices and labels (B, 1) int32.
  """
  gt = gt.astype(bool)
  pred = jnp.zeros_like(gt) if pred is None else pred.astype(bool)
  b, h, w = gt.shape
  fp = ~gt & pred
  fn = gt & ~pred
  all_correct = jnp.all(gt == pred, axis=(1, 2))[:, None, None]
  noise = jax.random.uniform(key, (b, h, w, 2))
  keep = jnp.stack([fp | (all_correct & ~gt), fn], axis=-1)
  idx = jnp.argmax(jnp.where(keep, noise, 0.0).reshape(b, -1), axis=1)
  labels = (idx % 2).astype(jnp.int32)
  pix = idx // 2
  points = jnp.stack([pix % w, pix // w], axis=-1).astype(jnp.float32)
  return points[:, None], labels[:, None]


def mask_to_box(masks: jax.Array) -> jax.Array:
  """(B, H, W) bool -> (B, 4) x0, y0, x1, y1 inclusive (empty: W, H, -1, -1, as sam2)."""
  b, h, w = masks.shape
  xs = jnp.arange(w)[None, None, :]
  ys = jnp.arange(h)[None, :, None]
  m = masks.astype(bool)
  return jnp.stack([jnp.min(jnp.where(m, xs, w), axis=(1, 2)),
                    jnp.min(jnp.where(m, ys, h), axis=(1, 2)),
                    jnp.max(jnp.where(m, xs, -1), axis=(1, 2)),
                    jnp.max(jnp.where(m, ys, -1), axis=(1, 2))], axis=-1).astype(jnp.float32)


def sample_box_points(key: jax.Array, masks: jax.Array, noise: float = 0.1,
                      noise_bound: float = 20.0) -> jax.Array:
  """`sam2_utils.sample_box_points`: the tight box, each corner moved by
  U(-1, 1)·min(noise·side, bound), clamped to the image. Returns (B, 2, 2) corners."""
  b, h, w = masks.shape
  box = mask_to_box(masks)
  if noise > 0:
    max_dx = jnp.minimum((box[:, 2] - box[:, 0]) * noise, noise_bound)
    max_dy = jnp.minimum((box[:, 3] - box[:, 1]) * noise, noise_bound)
    u = 2.0 * jax.random.uniform(key, (b, 4)) - 1.0
    box = box + u * jnp.stack([max_dx, max_dy, max_dx, max_dy], axis=-1)
    box = jnp.clip(box, 0.0, jnp.array([w - 1, h - 1, w - 1, h - 1], jnp.float32))
  return box.reshape(b, 2, 2)


# ------------------------------------------------------------------------------ SAM heads


class _Heads(NamedTuple):
  multimasks: jax.Array  # (B, 3, 4h, 4w)
  ious: jax.Array  # (B, 3)
  low_res: jax.Array  # (B, 1, 4h, 4w)
  high_res: jax.Array  # (B, 1, S, S)
  obj_ptr: jax.Array  # (B, C)
  obj: jax.Array  # (B, 1)


def _three(x: jax.Array) -> jax.Array:
  return jnp.repeat(x, 3, axis=1)


def sam_heads(model, pix_feat: jax.Array, high_res_features, coords: jax.Array,
              labels: jax.Array, slot_valid: jax.Array, mask_inputs: Optional[jax.Array],
              multimask: jax.Array) -> _Heads:
  """`_forward_sam_heads` with padded prompt slots and a per-row multimask choice.

  Args:
    pix_feat: (B, h, w, C) memory-conditioned features.
    coords, labels, slot_valid: (B, P, 2), (B, P), (B, P) bool: the prompt points; invalid
      slots are masked out of the decoder (the prompt encoder's own pad token stays).
    mask_inputs: (B, 1, 4h, 4w) previous logits, or None.
    multimask: (B,) bool: 3 outputs (and the best by predicted IoU) instead of 1.
  """
  pe = model.sam_prompt_encoder
  dec = model.sam_mask_decoder
  b = pix_feat.shape[0]
  masks = None if mask_inputs is None else mask_inputs[:, 0]
  sparse, dense = pe(points=(coords, labels), boxes=None, masks=masks)
  valid = jnp.concatenate([slot_valid, jnp.ones((b, sparse.shape[1] - slot_valid.shape[1]),
                                                bool)], axis=1)
  all_masks, all_ious, tokens, obj = dec.predict_masks(
      pix_feat, pe.get_dense_pe(), sparse, dense, repeat_image=False,
      high_res_features=high_res_features, prompt_valid=valid)
  obj = obj.astype(jnp.float32)
  appearing = obj > 0
  all_masks = jnp.where(appearing[:, :, None, None], all_masks.astype(jnp.float32),
                        tracking.NO_OBJ_SCORE)
  all_ious = all_ious.astype(jnp.float32)
  single_m, single_i = all_masks[:, 0:1], all_ious[:, 0:1]
  if dec.dynamic_multimask_via_stability:  # the eval rule (training switches it off)
    single_m, single_i = dec._dynamic_multimask_via_stability(all_masks, all_ious)
  multi = multimask[:, None]
  multimasks = jnp.where(multi[..., None, None], all_masks[:, 1:], _three(single_m))
  ious = jnp.where(multi, all_ious[:, 1:], _three(single_i))
  best = jnp.argmax(all_ious[:, 1:], axis=-1)
  best_mask = jnp.take_along_axis(all_masks[:, 1:], best[:, None, None, None], axis=1)
  low_res = jnp.where(multi[..., None, None], best_mask, single_m)
  token = tokens[:, 0]
  if dec.use_multimask_token_for_obj_ptr:
    best_token = jnp.take_along_axis(tokens[:, 1:], best[:, None, None], axis=1)[:, 0]
    token = jnp.where(multi, best_token, token)
  obj_ptr = tracking._gate_obj_ptr(model, model.obj_ptr_proj(token), appearing)
  return _Heads(multimasks, ious, low_res, tracking._to_image_size(model, low_res), obj_ptr,
                obj)


def _multimask(labels: jax.Array, slot_valid: jax.Array, cfg) -> jax.Array:
  """`_use_multimask` per row: 0 or 1 real points (box corners count, not-a-point does not)."""
  n = jnp.sum(slot_valid & (labels >= 0), axis=1)
  return ((n >= cfg.multimask_min_pt_num) & (n <= cfg.multimask_max_pt_num)
          & tracking.MULTIMASK_OUTPUT_IN_SAM)


def _select(pred: jax.Array, a, b):
  """Row-wise choice between two pytrees whose leaves lead with the batch axis."""
  def one(x, y):
    return jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(one, a, b)


# ------------------------------------------------------------------------------ forward


def _rows(x: jax.Array, n: int) -> jax.Array:
  """(B, ...) per clip -> (B·N, ...) per object."""
  return jnp.repeat(x, n, axis=0)


def _take_frame(x: jax.Array, f: jax.Array) -> jax.Array:
  """x (B, T, ...) at frame f (B,) -> (B, ...)."""
  idx = f.reshape((-1, 1) + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def _memory_bank(cfg, feats, ptrs, processed, cond_out, f, num_frames, n, only_past):
  """The bank of the frames f (B,) from the per-frame stores (SAM2Base's selection rules)."""
  t = jnp.arange(num_frames)[None, :]
  dt = f[:, None] - t  # (B, T) frames between each stored frame and the current one
  cond_slot = processed & cond_out
  prev = processed & ~cond_out & (dt >= 1)
  valid = cond_slot | (prev & (dt <= cfg.num_maskmem - 1))
  # An initial frame has no memory; one dummy slot keeps its (discarded) attention finite.
  valid = valid.at[:, 0].set(valid[:, 0] | ~jnp.any(valid, axis=1))
  tpos = jnp.where(cond_slot, cfg.num_maskmem - 1, jnp.clip(dt - 1, 0, cfg.num_maskmem - 1))
  max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
  ptr_cond = cond_slot & (dt >= 0) if only_past else cond_slot
  ptr_valid = ptr_cond | (prev & (dt <= max_ptrs - 1))
  ptr_pos = dt if cfg.use_signed_tpos_enc_to_obj_ptrs else jnp.abs(dt)
  t_diff_max = jnp.full((f.shape[0],), max(max_ptrs - 1, 1), jnp.int32)
  r = lambda x: _rows(x, n)
  return tracking.MemoryBank(features=feats, tpos_index=r(tpos.astype(jnp.int32)),
                             valid=r(valid), obj_ptrs=ptrs, ptr_pos=r(ptr_pos.astype(jnp.int32)),
                             ptr_valid=r(ptr_valid), t_diff_max=r(t_diff_max))


def clip_forward(model, images: jax.Array, gt_masks: jax.Array, plan: ClipPlan, key: jax.Array,
                 cfg: ClipConfig = ClipConfig(), *, carry_params: bool = False) -> ClipOutputs:
  """SAM2Train's forward over B clips (module docstring).

  Args:
    model: a `SAM2Base` (float or quantized; its non-parameter state, e.g. quantizer
      statistics, is carried through the frame loop and written back).
    images: (B, T, S, S, 3) normalized frames.
    gt_masks: (B, T, N, S, S) bool ground truth at the model's input size (padded objects are
      all False; mask them in the loss).
    plan: the prompts (`sample_plan` or `mask_prompt_plan`).
    key: randomness of the clicks and boxes.
    carry_params: carry the parameters through the frame loop too (range calibration sets
      learnable clip factors inside it); training keeps them loop constants.
  """
  mcfg = model.cfg
  b, t, s = images.shape[:3]
  n = gt_masks.shape[2]
  kk = plan.from_gt.shape[-1]
  if gt_masks.shape != (b, t, n, s, s):
    raise ValueError(f"gt_masks {gt_masks.shape} must be (B, T, N, S, S) = {(b, t, n, s, s)}")
  if s != mcfg.image_size:
    raise ValueError(f"frames are {s}² but the model takes {mcfg.image_size}²")
  if kk != cfg.correction_clicks:
    raise ValueError(f"plan has {kk} correction clicks, config {cfg.correction_clicks}")
  bn = b * n

  out = model.forward_image(images.reshape((b * t,) + images.shape[2:]))
  fpn = [x.reshape((b, t) + x.shape[1:]) for x in out["backbone_fpn"]]
  pos = out["vision_pos_enc"][-1][:1]
  h = fpn[-1].shape[2]
  cond_out = plan.init_cond | (plan.correct if cfg.add_all_frames_to_correct_as_cond else False)
  frames = jnp.arange(t)
  order = jnp.argsort(jnp.where(plan.init_cond, frames - t, frames), axis=1)  # (B, T)
  rank = jnp.argsort(order, axis=1)
  mem_dtype = jnp.dtype(cfg.memory_dtype) if cfg.memory_dtype else jnp.float32

  fixed = nnx.Nothing() if carry_params else nnx.Param  # loop constants; the rest is carried
  carried = nnx.Not(fixed)
  graphdef, params, rest = nnx.split(model, fixed, ...)

  def step(carry, xs):
    feats_mem, ptrs_mem, rest = carry
    si, f = xs  # step index, (B,) frame processed by each clip
    m = nnx.merge(graphdef, params, rest)
    key_s = jax.random.fold_in(key, si)
    k_box, k_click, k_corr = jax.random.split(key_s, 3)
    is_init = _take_frame(plan.init_cond, f)
    has_pts = is_init & plan.use_points
    mask_prompt = is_init & ~plan.use_points
    box_f = _take_frame(plan.use_box, f) & has_pts
    corr = _take_frame(plan.correct, f)
    from_gt = _take_frame(plan.from_gt, f)  # (B, K)
    rows = lambda x: _rows(x, n)
    fpn_f = [rows(_take_frame(x, f)) for x in fpn]
    feat, hr = fpn_f[-1], fpn_f[:-1]
    vpos = jnp.broadcast_to(pos, feat.shape).astype(feat.dtype)
    gt = _take_frame(gt_masks, f).reshape(bn, s, s)

    # Memory-conditioned features, or no_mem_embed on initial conditioning frames.
    processed = rank < si
    bank = _memory_bank(mcfg, feats_mem, ptrs_mem, processed, cond_out, f, t, n,
                        cfg.only_past_pointers)
    with_mem = tracking.memory_conditioned_features(m, feat, vpos, bank)
    pix = jnp.where(rows(is_init)[:, None, None, None],
                    tracking.memory_conditioned_features(m, feat, vpos, None), with_mem)

    # Initial prompt points: a box, one click from the GT, or PyTorch's lone not-a-point.
    corners = sample_box_points(k_box, gt, cfg.box_noise, cfg.box_noise_bound)
    click, click_label = sample_error_clicks(k_click, gt, None)
    r_box, r_pts = rows(box_f), rows(has_pts)
    p = INITIAL_SLOTS + kk
    coords = jnp.zeros((bn, p, 2), jnp.float32)
    coords = coords.at[:, :2].set(jnp.where(r_box[:, None, None], corners,
                                            jnp.concatenate([click, jnp.zeros_like(click)], 1)
                                            * r_pts[:, None, None]))
    labels = jnp.full((bn, p), PAD_LABEL, jnp.int32)
    labels = labels.at[:, 0].set(jnp.where(r_box, BOX_TL_LABEL,
                                           jnp.where(r_pts, click_label[:, 0], PAD_LABEL)))
    labels = labels.at[:, 1].set(jnp.where(r_box, BOX_BR_LABEL, PAD_LABEL))
    slot_valid = jnp.zeros((bn, p), bool).at[:, 0].set(True).at[:, 1].set(r_box)
    heads = sam_heads(m, pix, hr, coords, labels, slot_valid, None,
                      _multimask(labels, slot_valid, mcfg))

    as_out = tracking.use_mask_as_output(m, feat, hr, gt[:, None])
    as_out = _Heads(_three(as_out.low_res_multimasks), _three(as_out.ious), as_out.low_res_masks,
                    as_out.high_res_masks, as_out.obj_ptr, as_out.object_score_logits)
    heads = _select(rows(mask_prompt), as_out, heads)
    first = (heads.multimasks, heads.ious, heads.obj)

    # Iterative correction clicks on the frames to correct.
    r_corr = rows(corr)
    rest = nnx.state(m, carried)

    def corrections(state):
      def click_step(c, k):
        heads, coords, labels, slot_valid, rest = c
        mm = nnx.merge(graphdef, params, rest)
        pred = heads.high_res[:, 0] > 0
        use_gt = rows(from_gt[:, k])
        pt, lab = sample_error_clicks(jax.random.fold_in(k_corr, k), gt,
                                      pred & ~use_gt[:, None, None])
        slot = INITIAL_SLOTS + k
        coords = coords.at[:, slot].set(pt[:, 0])
        labels = labels.at[:, slot].set(lab[:, 0])
        # Frames without initial points drop the not-a-point placeholder (concat_points).
        slot_valid = slot_valid.at[:, slot].set(True).at[:, 0].set(r_pts)
        new = sam_heads(mm, pix, hr, coords, labels, slot_valid, heads.low_res,
                        _multimask(labels, slot_valid, mcfg))
        new = _select(r_corr, new, heads)
        carry = (new, coords, labels, slot_valid, nnx.state(mm, carried))
        return carry, (new.multimasks, new.ious, new.obj)

      body = jax.checkpoint(click_step, prevent_cse=False) if cfg.remat else click_step
      (final, _, _, _, rest), outs = jax.lax.scan(body, state, jnp.arange(kk))
      return final, outs, rest

    def no_corrections(state):
      z = tuple(jnp.zeros((kk,) + x.shape, x.dtype) for x in first)
      return state[0], z, state[-1]

    if kk > 0:
      heads, outs, rest = jax.lax.cond(jnp.any(corr), corrections, no_corrections,
                                       (heads, coords, labels, slot_valid, rest))
      nnx.update(m, rest)
    else:
      outs = tuple(jnp.zeros((0,) + x.shape, x.dtype) for x in first)

    # Memory of this frame (SAM2Train: sigmoid of the final logits, never binarized).
    mem, _ = tracking.encode_new_memory(m, feat, heads.high_res, heads.obj,
                                        is_mask_from_pts=False)
    hit = rows(frames[None, :] == f[:, None])  # (BN, T)
    feats_mem = jnp.where(hit[:, :, None, None, None], mem.astype(mem_dtype)[:, None],
                          feats_mem)
    ptrs_mem = jnp.where(hit[:, :, None], heads.obj_ptr[:, None], ptrs_mem)

    def steps(x0, xk):  # (BN, ...) and (K, BN, ...) -> (BN, 1+K, ...)
      return jnp.concatenate([x0[:, None], jnp.moveaxis(xk, 0, 1)], axis=1)
    valid = jnp.concatenate([jnp.ones((bn, 1), bool),
                             jnp.broadcast_to(r_corr[:, None], (bn, kk))], axis=1)
    y = (steps(first[0], outs[0]), steps(first[1], outs[1]), steps(first[2], outs[2]), valid,
         heads.low_res, heads.obj_ptr)
    return (feats_mem, ptrs_mem, nnx.state(m, carried)), y

  feats0 = jnp.zeros((bn, t, h, h, mcfg.mem_dim), mem_dtype)
  ptrs0 = jnp.zeros((bn, t, mcfg.d_model), jnp.float32)
  body = jax.checkpoint(step, prevent_cse=False) if cfg.remat else step
  (_, _, rest), ys = jax.lax.scan(body, (feats0, ptrs0, rest), (jnp.arange(t), order.T))
  nnx.update(model, rest)
  # Scan outputs are in processing order; put them back in frame order, per clip.
  src = _rows(rank, n).T  # (T, BN): step that processed frame t of each object's clip
  def unorder(y):
    idx = src.reshape(src.shape + (1,) * (y.ndim - 2))
    return jnp.take_along_axis(y, idx, axis=0)
  return ClipOutputs(*(unorder(y) for y in ys))

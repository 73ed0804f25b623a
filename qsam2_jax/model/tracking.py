"""SAM2Base's video methods (`track_step` and its parts) as functions of a `SAM2Base` model.

`sam2.modeling.sam2_base.SAM2Base` mixes two kinds of work in `track_step`: host bookkeeping
(which past frames and object pointers enter the memory bank) and tensor math. Here they are
split so that the math is one jit-friendly function of fixed shapes:

- `select_memory` (plain Python, on the host) picks the memory frames and pointers exactly as
  `_prepare_memory_conditioned_features` does;
- a `MemoryBank` holds them in fixed-size, masked slots, so a jitted step compiles once however
  many frames are remembered;
- `forward_sam_heads`, `use_mask_as_output`, `memory_conditioned_features`,
  `encode_new_memory` and `track_step` are the tensor parts (same names as PyTorch, minus the
  leading underscore).

Layouts: image features channels last (B, h, w, C); masks channels first like PyTorch,
(B, 1, H, W), because they are per-object maps rather than feature maps. `h = w = image_size/16`,
low-res masks are 4h², high-res masks are image_size².

Behaviour flags that every released SAM2 / SAM2.1 config sets the same way are module
constants below; the version differences (spatial no-object embedding, pointer temporal PE) come
from `SAM2Config`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qsam2_jax.model.position_encoding import sine_pe_1d, sine_pe_2d
from qsam2_jax.model.resize import resize_2d

# Logit given to every pixel of an object judged absent (`NO_OBJ_SCORE` in sam2).
NO_OBJ_SCORE = -1024.0
# `_use_mask_as_output`: a binary mask prompt becomes logits ±10 (sigmoid(-10) ≈ 4.5e-5).
MASK_OUT_SCALE = 20.0
MASK_OUT_BIAS = -10.0

# SAM2Base flags, identical in all released configs (sam2/sam2.1 t, s, b+, l YAMLs + code
# defaults) and in `build_sam2_video_predictor(apply_postprocessing=True)`.
USE_MASK_INPUT_AS_OUTPUT_WITHOUT_SAM = True
DIRECTLY_ADD_NO_MEM_EMBED = True
MULTIMASK_OUTPUT_IN_SAM = True
MULTIMASK_OUTPUT_FOR_TRACKING = True
FIXED_NO_OBJ_PTR = True
SOFT_NO_OBJ_PTR = False
ONLY_OBJ_PTRS_IN_THE_PAST_FOR_EVAL = True
BINARIZE_MASK_FROM_PTS_FOR_MEM_ENC = True  # set by the video predictor's post-processing


# ------------------------------------------------------------------------------ memory bank


class MemoryBank(NamedTuple):
  """Fixed-size memory of past frames for B objects (a pytree; all leaves are arrays).

  Spatial slots hold whole frames; empty slots have `valid = False` and are dropped from the
  attention softmax, so the result equals PyTorch's unpadded concatenation. Pointer slots
  likewise. Slot order does not matter (attention is permutation invariant over keys and RoPE
  depends only on the position inside a frame), but `select_memory` keeps PyTorch's order.

  Attributes:
    features: (B, S, h, w, mem_dim) memory features (bf16-rounded values, any float dtype).
    tpos_index: (B, S) int32 row of `maskmem_tpos_enc` (`num_maskmem - t_pos - 1`).
    valid: (B, S) bool.
    obj_ptrs: (B, P, C) object pointers.
    ptr_pos: (B, P) int32 signed temporal distance of each pointer, in frames.
    ptr_valid: (B, P) bool.
    t_diff_max: (B,) int32 normaliser of the pointer PE (`min(num_frames, max_ptrs) - 1`).
  """

  features: jax.Array
  tpos_index: jax.Array
  valid: jax.Array
  obj_ptrs: jax.Array
  ptr_pos: jax.Array
  ptr_valid: jax.Array
  t_diff_max: jax.Array


class MemorySelection(NamedTuple):
  """What `select_memory` picked for one object on one frame (host side).

  spatial: [(tpos_index, output)] frames whose `maskmem_features` enter the bank.
  pointers: [(position, output)] frames whose `obj_ptr` enter the bank.
  t_diff_max: normaliser of the pointer temporal PE.
  """

  spatial: List[Tuple[int, Any]]
  pointers: List[Tuple[int, Any]]
  t_diff_max: int


def select_closest_cond_frames(frame_idx: int, cond_frame_outputs: Mapping[int, Any],
                               max_cond_frame_num: int) -> Tuple[Dict[int, Any], Dict[int, Any]]:
  """`sam2_utils.select_closest_cond_frames`: (selected, unselected) conditioning outputs.

  With a limit, keeps the closest conditioning frame before `frame_idx`, the closest at or
  after it, then the temporally closest others.
  """
  if max_cond_frame_num == -1 or len(cond_frame_outputs) <= max_cond_frame_num:
    return dict(cond_frame_outputs), {}
  if max_cond_frame_num < 2:
    raise ValueError("max_cond_frames_in_attn must be -1 or >= 2")
  selected = {}
  before = max((t for t in cond_frame_outputs if t < frame_idx), default=None)
  if before is not None:
    selected[before] = cond_frame_outputs[before]
  after = min((t for t in cond_frame_outputs if t >= frame_idx), default=None)
  if after is not None:
    selected[after] = cond_frame_outputs[after]
  remain = max_cond_frame_num - len(selected)
  rest = sorted((t for t in cond_frame_outputs if t not in selected),
                key=lambda t: abs(t - frame_idx))[:remain]
  selected.update((t, cond_frame_outputs[t]) for t in rest)
  unselected = {t: v for t, v in cond_frame_outputs.items() if t not in selected}
  return selected, unselected


def select_memory(cfg, cond_outputs: Mapping[int, Any], non_cond_outputs: Mapping[int, Any],
                  frame_idx: int, num_frames: int, *, track_in_reverse: bool = False,
                  max_cond_frames_in_attn: int = -1,
                  memory_temporal_stride: int = 1) -> MemorySelection:
  """The host half of `_prepare_memory_conditioned_features` (frame not an initial cond frame).

  Spatial memories: every selected conditioning frame (t_pos 0), then up to num_maskmem − 1
  previous frames (t_pos 1..6, the last one always the adjacent frame; missing frames are
  skipped). Pointers: selected conditioning frames not in the future, at distance
  (frame_idx − t)·direction (SAM2.1; |frame_idx − t| in 2.0), then up to min(T, max_obj_ptrs) − 1
  previous frames at distances 1, 2, …, stopping at the video edge. In reverse, "previous" and
  "future" swap.

  Args:
    cfg: the model's `SAM2Config`.
    cond_outputs / non_cond_outputs: frame index -> output, for one object.
    frame_idx, num_frames: the current frame and the video length.
    track_in_reverse: propagation direction.
    max_cond_frames_in_attn: -1 (all, released configs) or a limit >= 2.
    memory_temporal_stride: `memory_temporal_stride_for_eval` (1 in released configs).
  """
  if not cond_outputs:
    raise ValueError("a non-initial frame needs at least one conditioning frame")
  num_maskmem = cfg.num_maskmem
  selected, unselected = select_closest_cond_frames(frame_idx, cond_outputs,
                                                    max_cond_frames_in_attn)
  spatial = [(num_maskmem - 1, out) for out in selected.values()]  # t_pos 0
  r = memory_temporal_stride
  for t_pos in range(1, num_maskmem):
    t_rel = num_maskmem - t_pos  # frames before the current one
    if t_rel == 1:
      prev = frame_idx + 1 if track_in_reverse else frame_idx - 1
    elif not track_in_reverse:
      prev = ((frame_idx - 2) // r) * r - (t_rel - 2) * r
    else:
      prev = -(-(frame_idx + 2) // r) * r + (t_rel - 2) * r
    out = non_cond_outputs.get(prev)
    if out is None:
      out = unselected.get(prev)
    if out is not None:
      spatial.append((num_maskmem - t_pos - 1, out))

  max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
  sign = -1 if track_in_reverse else 1
  if ONLY_OBJ_PTRS_IN_THE_PAST_FOR_EVAL:
    ptr_cond = {t: o for t, o in selected.items()
                if (t >= frame_idx if track_in_reverse else t <= frame_idx)}
  else:
    ptr_cond = selected
  signed = cfg.use_signed_tpos_enc_to_obj_ptrs
  pointers = [((frame_idx - t) * sign if signed else abs(frame_idx - t), o)
              for t, o in ptr_cond.items()]
  for t_diff in range(1, max_ptrs):
    t = frame_idx + t_diff if track_in_reverse else frame_idx - t_diff
    if t < 0 or t >= num_frames:
      break
    out = non_cond_outputs.get(t, unselected.get(t))
    if out is not None:
      pointers.append((t_diff, out))
  return MemorySelection(spatial, pointers, max_ptrs - 1)


def bank_slots(cfg, num_cond_slots: int) -> Tuple[int, int]:
  """(spatial slots S, pointer slots P) of a bank holding up to `num_cond_slots` cond frames.

  S = cond + num_maskmem − 1; P = cond + max_obj_ptrs − 1 (15 previous-frame pointers), i.e.
  16 pointers = 64 tokens with one conditioning frame.
  """
  return (num_cond_slots + cfg.num_maskmem - 1,
          num_cond_slots + cfg.max_obj_ptrs_in_encoder - 1)


# ------------------------------------------------------------------------------ SAM heads


class SamOutputs(NamedTuple):
  """`_forward_sam_heads` / `_use_mask_as_output` outputs (masks channels first).

  low_res_multimasks (B, M, 4h, 4w), ious (B, M), low_res_masks (B, 1, 4h, 4w) (the best
  mask), high_res_masks (B, 1, S, S), obj_ptr (B, C), object_score_logits (B, 1).
  PyTorch also returns the high-res version of every multimask output; nothing uses it.
  """

  low_res_multimasks: jax.Array
  ious: jax.Array
  low_res_masks: jax.Array
  high_res_masks: jax.Array
  obj_ptr: jax.Array
  object_score_logits: jax.Array


def _to_image_size(model, low_res: jax.Array) -> jax.Array:
  size = model.cfg.image_size
  return resize_2d(low_res.astype(jnp.float32), (size, size), axes=(-2, -1), mode="bilinear")


def _gate_obj_ptr(model, obj_ptr: jax.Array, is_obj_appearing: jax.Array) -> jax.Array:
  """Replaces the pointer of an absent object by `no_obj_ptr` (hard gate, fixed_no_obj_ptr)."""
  lam = is_obj_appearing.astype(jnp.float32)
  obj_ptr = obj_ptr.astype(jnp.float32)
  if FIXED_NO_OBJ_PTR:
    obj_ptr = lam * obj_ptr
  return obj_ptr + (1.0 - lam) * model.no_obj_ptr[...]


def use_multimask(is_init_cond_frame: bool, num_points: int, cfg) -> bool:
  """`_use_multimask`: 3 masks for 0 or 1 clicks (box corners count as clicks)."""
  return (MULTIMASK_OUTPUT_IN_SAM
          and (is_init_cond_frame or MULTIMASK_OUTPUT_FOR_TRACKING)
          and cfg.multimask_min_pt_num <= num_points <= cfg.multimask_max_pt_num)


def forward_sam_heads(model, backbone_features: jax.Array,
                      point_coords: Optional[jax.Array] = None,
                      point_labels: Optional[jax.Array] = None,
                      mask_inputs: Optional[jax.Array] = None,
                      high_res_features: Optional[Sequence[jax.Array]] = None,
                      multimask_output: bool = False) -> SamOutputs:
  """Prompt encoder + mask decoder on (memory-conditioned) features (`_forward_sam_heads`).

  Args:
    model: a `SAM2Base`.
    backbone_features: (B, h, w, C).
    point_coords, point_labels: (B, N, 2) pixels in the model-input frame and (B, N) int, or
      None (then one (0, 0) not-a-point is used, as in PyTorch).
    mask_inputs: (B, 1, H, W) mask logits; resized (antialiased bilinear) to the decoder's
      mask-input size when H differs.
    high_res_features: [(B, 4h, 4w, C/8), (B, 2h, 2w, C/4)].
    multimask_output: static; 3 masks and the best one by predicted IoU.
  """
  b = backbone_features.shape[0]
  if point_coords is None:
    point_coords = jnp.zeros((b, 1, 2), jnp.float32)
    point_labels = -jnp.ones((b, 1), jnp.int32)
  sam_mask = None
  if mask_inputs is not None:
    size = tuple(model.sam_prompt_encoder.mask_input_size)
    sam_mask = mask_inputs
    if tuple(mask_inputs.shape[-2:]) != size:
      sam_mask = resize_2d(mask_inputs.astype(jnp.float32), size, axes=(-2, -1),
                           mode="bilinear", antialias=True)
    sam_mask = sam_mask[:, 0]
  sparse, dense = model.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None,
                                           masks=sam_mask)
  multimasks, ious, tokens, obj_scores = model.sam_mask_decoder(
      backbone_features, model.sam_prompt_encoder.get_dense_pe(), sparse, dense,
      multimask_output=multimask_output, repeat_image=False,
      high_res_features=high_res_features)
  obj_scores = obj_scores.astype(jnp.float32)
  is_obj_appearing = obj_scores > 0  # (B, 1)
  multimasks = jnp.where(is_obj_appearing[:, :, None, None], multimasks.astype(jnp.float32),
                         NO_OBJ_SCORE)
  ious = ious.astype(jnp.float32)
  token = tokens[:, 0]
  if multimask_output:
    best = jnp.argmax(ious, axis=-1)
    low_res = jnp.take_along_axis(multimasks, best[:, None, None, None], axis=1)
    if tokens.shape[1] > 1:
      token = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
  else:
    low_res = multimasks
  obj_ptr = _gate_obj_ptr(model, model.obj_ptr_proj(token), is_obj_appearing)
  return SamOutputs(multimasks, ious, low_res, _to_image_size(model, low_res), obj_ptr,
                    obj_scores)


def use_mask_as_output(model, backbone_features: jax.Array,
                       high_res_features: Optional[Sequence[jax.Array]],
                       mask_inputs: jax.Array) -> SamOutputs:
  """A binary mask prompt taken as the output (`_use_mask_as_output`).

  Logits are ±10; the object counts as present if any pixel is set; the pointer comes from the
  SAM heads on the *raw* features with the 4× conv-downsampled mask as the only prompt.

  Args:
    backbone_features: (B, h, w, C) raw lowest FPN level (no memory, no no_mem_embed).
    mask_inputs: (B, 1, S, S) binary mask at the image size.
  """
  m = mask_inputs.astype(jnp.float32)
  high_res = m * MASK_OUT_SCALE + MASK_OUT_BIAS
  low_size = (high_res.shape[-2] // 4, high_res.shape[-1] // 4)
  low_res = resize_2d(high_res, low_size, axes=(-2, -1), mode="bilinear", antialias=True)
  ious = jnp.ones((m.shape[0], 1), jnp.float32)
  down = model.mask_downsample(m.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
  ptr = forward_sam_heads(model, backbone_features, mask_inputs=down,
                          high_res_features=high_res_features).obj_ptr
  is_obj_appearing = jnp.any(m.reshape(m.shape[0], -1) > 0.0, axis=1)[:, None]
  lam = is_obj_appearing.astype(jnp.float32)
  scores = MASK_OUT_SCALE * lam + MASK_OUT_BIAS
  obj_ptr = _gate_obj_ptr(model, ptr, is_obj_appearing)
  return SamOutputs(low_res, ious, low_res, high_res, obj_ptr, scores)


# ------------------------------------------------------------------------------ memory


def assemble_memory(model, bank: MemoryBank, hw: Tuple[int, int]
                    ) -> Tuple[jax.Array, jax.Array, jax.Array, int]:
  """Memory tokens, their PEs, the validity mask and the pointer-token count of a bank.

  Returns:
    memory (B, S·h·w + 4P, mem_dim), memory_pos (same), memory_valid (B, S·h·w + 4P) and
    num_obj_ptr_tokens = 4P (static), laid out as PyTorch concatenates them: frames (row-major
    tokens), then each pointer split into C/mem_dim tokens, pointer-major.
  """
  cfg = model.cfg
  h, w = hw
  b, s = bank.valid.shape
  feats = bank.features
  m = feats.shape[-1]
  spatial = feats.astype(jnp.float32).reshape(b, s * h * w, m)
  pe = jnp.asarray(sine_pe_2d(h, w, m)).reshape(1, 1, h * w, m)
  tpos = model.maskmem_tpos_enc[...].reshape(-1, m)[bank.tpos_index]  # (B, S, m)
  spatial_pos = (pe + tpos[:, :, None, :]).reshape(b, s * h * w, m)
  spatial_valid = jnp.repeat(bank.valid.astype(bool), h * w, axis=1)

  ptrs = bank.obj_ptrs.astype(jnp.float32)
  p, c = ptrs.shape[1], ptrs.shape[2]
  if cfg.add_tpos_enc_to_obj_ptrs:
    rel = bank.ptr_pos.astype(jnp.float32) / bank.t_diff_max.astype(jnp.float32)[:, None]
    if cfg.proj_tpos_enc_in_obj_ptrs:
      ptr_pos = model.obj_ptr_tpos_proj(sine_pe_1d(rel, c)).astype(jnp.float32)
    else:
      ptr_pos = sine_pe_1d(rel, m)
  else:
    ptr_pos = jnp.zeros((b, p, m), jnp.float32)
  split = c // m if m < c else 1
  if m < c:
    ptrs = ptrs.reshape(b, p * split, m)
    ptr_pos = jnp.repeat(ptr_pos, split, axis=1)
  ptr_valid = jnp.repeat(bank.ptr_valid.astype(bool), split, axis=1)
  memory = jnp.concatenate([spatial, ptrs], axis=1)
  memory_pos = jnp.concatenate([spatial_pos, ptr_pos], axis=1)
  valid = jnp.concatenate([spatial_valid, ptr_valid], axis=1)
  return memory, memory_pos, valid, p * split


def memory_conditioned_features(model, vision_feat: jax.Array, vision_pos: jax.Array,
                                bank: Optional[MemoryBank],
                                start: Optional[jax.Array] = None) -> jax.Array:
  """`_prepare_memory_conditioned_features`, tensor half.

  Args:
    vision_feat, vision_pos: (B, h, w, C) lowest FPN level and its sine PE.
    bank: the memory, or None on an initial conditioning frame (then `no_mem_embed` is added
      and there is no attention).
    start: optional `model.memory_attention.frame_start` of this frame, (1 or B, h·w, C):
      objects tracked on the same frame compute it once.

  Returns:
    (B, h, w, C) features for the SAM heads.
  """
  b, h, w, c = vision_feat.shape
  if bank is None:
    if not DIRECTLY_ADD_NO_MEM_EMBED:
      raise NotImplementedError("only directly_add_no_mem_embed=True configs are supported")
    return vision_feat + model.no_mem_embed[...].reshape(1, 1, 1, c).astype(vision_feat.dtype)
  memory, memory_pos, valid, n_ptr = assemble_memory(model, bank, (h, w))
  out = model.memory_attention(vision_feat.reshape(b, h * w, c), vision_pos.reshape(b, h * w, c),
                               memory, memory_pos, num_obj_ptr_tokens=n_ptr,
                               memory_valid=valid, start=start)
  return out.reshape(-1, h, w, c)


def encode_new_memory(model, vision_feat: jax.Array, pred_masks_high_res: jax.Array,
                      object_score_logits: jax.Array, is_mask_from_pts: bool
                      ) -> Tuple[jax.Array, jax.Array]:
  """`_encode_new_memory`: the frame's memory from its raw features and predicted mask.

  Args:
    vision_feat: (B, h, w, C) raw lowest FPN level.
    pred_masks_high_res: (B, 1, S, S) mask logits at the image size.
    object_score_logits: (B, 1); an absent object adds `no_obj_embed_spatial` (SAM2.1).
    is_mask_from_pts: static; binarize (> 0) instead of sigmoid (frames with clicks, eval).

  Returns:
    maskmem_features (B, h, w, mem_dim) float32 (PyTorch's video predictor then stores them as
    bfloat16) and maskmem_pos_enc (B, h, w, mem_dim).
  """
  cfg = model.cfg
  logits = pred_masks_high_res.astype(jnp.float32)
  if BINARIZE_MASK_FROM_PTS_FOR_MEM_ENC and is_mask_from_pts:
    mask = (logits > 0).astype(jnp.float32)
  else:
    mask = jax.nn.sigmoid(logits)
  if cfg.sigmoid_scale_for_mem_enc != 1.0:
    mask = mask * cfg.sigmoid_scale_for_mem_enc
  if cfg.sigmoid_bias_for_mem_enc != 0.0:
    mask = mask + cfg.sigmoid_bias_for_mem_enc
  out = model.memory_encoder(vision_feat, mask[:, 0].astype(vision_feat.dtype),
                             skip_mask_sigmoid=True)
  feats = out["vision_features"].astype(jnp.float32)
  if model.no_obj_embed_spatial is not None:
    absent = 1.0 - (object_score_logits > 0).astype(jnp.float32)  # (B, 1)
    feats = feats + absent[:, None, None, :] * model.no_obj_embed_spatial[...].reshape(1, 1, 1, -1)
  return feats, out["vision_pos_enc"][-1]


# ------------------------------------------------------------------------------ track step


class TrackOutputs(NamedTuple):
  """`track_step` outputs. `maskmem_features` is None when the memory encoder did not run."""

  pred_masks: jax.Array  # (B, 1, 4h, 4w) low-res logits
  pred_masks_high_res: jax.Array  # (B, 1, S, S)
  obj_ptr: jax.Array  # (B, C)
  object_score_logits: jax.Array  # (B, 1)
  maskmem_features: Optional[jax.Array]  # (B, h, w, mem_dim) float32


def track_step(model, backbone_fpn: Sequence[jax.Array], vision_pos: jax.Array, *,
               bank: Optional[MemoryBank],
               point_coords: Optional[jax.Array] = None,
               point_labels: Optional[jax.Array] = None,
               mask_inputs: Optional[jax.Array] = None,
               prev_sam_mask_logits: Optional[jax.Array] = None,
               run_mem_encoder: bool = True,
               memory_start: Optional[jax.Array] = None) -> TrackOutputs:
  """`SAM2Base.track_step` for one frame of B objects.

  Args:
    backbone_fpn: [(B, 4h, 4w, C/8), (B, 2h, 2w, C/4), (B, h, w, C)] from `forward_image`
      (conv_s0 / conv_s1 already applied), the image features expanded to the B objects.
    vision_pos: (B, h, w, C) sine PE of the lowest level.
    bank: memory of past frames, or None for an initial conditioning frame (PyTorch's
      `is_init_cond_frame=True`).
    point_coords, point_labels: (B, N, 2) / (B, N) clicks in model-input pixels, or None.
    mask_inputs: (B, 1, S, S) binary mask prompt, or None.
    prev_sam_mask_logits: (B, 1, 4h, 4w) earlier logits fed with new clicks, or None.
    run_mem_encoder: static; also encode this frame's memory.
    memory_start: optional `memory_attention.frame_start` of this frame, shared by objects
      (`memory_conditioned_features`' `start`).
  """
  high_res_features = list(backbone_fpn[:-1])
  feat = backbone_fpn[-1]
  if mask_inputs is not None and USE_MASK_INPUT_AS_OUTPUT_WITHOUT_SAM:
    sam = use_mask_as_output(model, feat, high_res_features, mask_inputs)
  else:
    pix_feat = memory_conditioned_features(model, feat, vision_pos, bank, memory_start)
    if prev_sam_mask_logits is not None:
      if point_coords is None or mask_inputs is not None:
        raise ValueError("prev_sam_mask_logits go with clicks and no mask prompt")
      mask_inputs = prev_sam_mask_logits
    num_points = 0 if point_labels is None else point_labels.shape[1]
    multimask = use_multimask(bank is None, num_points, model.cfg)
    sam = forward_sam_heads(model, pix_feat, point_coords, point_labels, mask_inputs,
                            high_res_features, multimask)
  maskmem = None
  if run_mem_encoder and model.cfg.num_maskmem > 0:
    maskmem, _ = encode_new_memory(model, feat, sam.high_res_masks, sam.object_score_logits,
                                   is_mask_from_pts=point_coords is not None)
  return TrackOutputs(sam.low_res_masks, sam.high_res_masks, sam.obj_ptr,
                      sam.object_score_logits, maskmem)


def apply_non_overlapping_constraints(pred_masks: jax.Array) -> jax.Array:
  """Keeps, at each pixel, only the highest-scoring object; others are clamped to <= −10.

  Args:
    pred_masks: (N_obj, 1, H, W) logits.
  """
  if pred_masks.shape[0] == 1:
    return pred_masks
  best = jnp.argmax(pred_masks, axis=0, keepdims=True)
  keep = best == jnp.arange(pred_masks.shape[0])[:, None, None, None]
  return jnp.where(keep, pred_masks, jnp.minimum(pred_masks, -10.0))


def fill_holes_in_mask_scores(masks: np.ndarray, max_area: int) -> np.ndarray:
  """`sam2.utils.misc.fill_holes_in_mask_scores` on the host (PyTorch needs its CUDA `_C`).

  Background components (logit <= 0, 8-connectivity) of at most `max_area` pixels become 0.1.

  Args:
    masks: (..., H, W) logits (numpy).
  """
  from scipy import ndimage  # scipy ships with jax

  if max_area <= 0:
    raise ValueError("max_area must be positive")
  out = np.array(masks, np.float32, copy=True)
  flat = out.reshape(-1, *out.shape[-2:])
  structure = np.ones((3, 3), bool)
  for m in flat:
    labels, n = ndimage.label(m <= 0, structure=structure)
    if n == 0:
      continue
    areas = np.bincount(labels.ravel())
    hole = (labels > 0) & (areas[labels] <= max_area)
    m[hole] = 0.1
  return out

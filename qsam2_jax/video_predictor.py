"""`VideoPredictor`: the `SAM2VideoPredictor` API on the Flax model.

Semantics follow `sam2.sam2_video_predictor.SAM2VideoPredictor` (sam2 1.1.0): prompts are kept
per object in a temporary dict and turned into memories in a preflight step, conditioning frames
keep their prompted outputs, every other frame is tracked from a memory bank of conditioning
frames, the 6 previous frames and up to 16 object pointers, and the yielded logits are upsampled
to the video size (absent objects −1024).

What differs is the execution, not the results:

- One jitted step per frame runs *all* objects (PyTorch loops over objects with batch 1 on the
  same cached image features): as one batch on accelerators, one object after the other inside
  the step on CPU (`objects_one_by_one`), where a batch outgrows the caches. The part of the
  memory attention that does not see the memory (first self-attention) runs once per frame.
  Objects whose frame is a conditioning frame reuse their stored output.
- The memory bank has fixed-size, masked slots (`tracking.MemoryBank`), filled on the host
  from per-frame device arrays, so propagation compiles once and never again. The number of
  conditioning-frame slots grows in powers of two only if more are ever needed.
- Memories are stored as bfloat16 like PyTorch; logits, pointers and scores as float32.
- Frames are kept as uint8; the next frame's image features are dispatched before the current
  frame's logits are copied to the host, so the device stays busy while Python yields.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.checkpoint import load_sam2
from qsam2_jax.model import tracking
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.resize import resize_2d
from qsam2_jax.model.sam2 import SAM2Base
from qsam2_jax.parallel import commit_to_device
from qsam2_jax.prompt_checks import PromptError, check_boxes, check_finite
from qsam2_jax.video_io import load_video_frames, normalize_frame

COND = "cond_frame_outputs"
NON_COND = "non_cond_frame_outputs"


class VideoPromptError(PromptError):
  """Invalid prompt or call order on the video predictor (the image predictor's words)."""


@dataclasses.dataclass
class FrameOutput:
  """One object's stored result on one frame (PyTorch's compact `current_out`).

  pred_masks: (4h, 4w) float32 low-res logits. obj_ptr: (C,) float32.
  object_score_logits: (1,) float32. maskmem_features: (h, w, mem_dim) bfloat16, or None
  until the memory encoder has run (prompted frames get it in the preflight).
  """

  pred_masks: jax.Array
  obj_ptr: jax.Array
  object_score_logits: jax.Array
  maskmem_features: Optional[jax.Array] = None


def _new_output_dict() -> Dict[str, Dict[int, FrameOutput]]:
  return {COND: {}, NON_COND: {}}


@dataclasses.dataclass
class InferenceState:
  """Everything one video session holds (PyTorch's `inference_state` dict, same field names).

  Also readable as a mapping (`state["obj_ids"]`) for code written against PyTorch.
  """

  images: np.ndarray  # (T, S, S, 3) uint8, resized like sam2
  num_frames: int
  video_height: int
  video_width: int
  point_inputs_per_obj: Dict[int, Dict[int, Tuple[np.ndarray, np.ndarray]]] = \
      dataclasses.field(default_factory=dict)
  mask_inputs_per_obj: Dict[int, Dict[int, jax.Array]] = dataclasses.field(default_factory=dict)
  cached_features: "collections.OrderedDict[int, Tuple[jax.Array, ...]]" = \
      dataclasses.field(default_factory=collections.OrderedDict)
  obj_id_to_idx: "collections.OrderedDict[Any, int]" = \
      dataclasses.field(default_factory=collections.OrderedDict)
  obj_idx_to_id: "collections.OrderedDict[int, Any]" = \
      dataclasses.field(default_factory=collections.OrderedDict)
  obj_ids: List[Any] = dataclasses.field(default_factory=list)
  output_dict_per_obj: Dict[int, Dict[str, Dict[int, FrameOutput]]] = \
      dataclasses.field(default_factory=dict)
  temp_output_dict_per_obj: Dict[int, Dict[str, Dict[int, FrameOutput]]] = \
      dataclasses.field(default_factory=dict)
  frames_tracked_per_obj: Dict[int, Dict[int, Dict[str, bool]]] = \
      dataclasses.field(default_factory=dict)

  def __getitem__(self, key: str) -> Any:
    return getattr(self, key)


def _to_video_res(masks: jax.Array, present: Optional[jax.Array], video_hw: Tuple[int, int],
                  non_overlap: bool) -> jax.Array:
  """(N, 4h, 4w) low-res logits -> (N, 1, H, W) at the video size (`_get_orig_video_res_output`).

  Objects not `present` get −1024 (PyTorch's consolidation placeholder).
  """
  x = resize_2d(masks[:, None].astype(jnp.float32), video_hw, axes=(-2, -1), mode="bilinear")
  if present is not None:
    x = jnp.where(present[:, None, None, None], x, tracking.NO_OBJ_SCORE)
  if non_overlap:
    x = tracking.apply_non_overlapping_constraints(x)
  return x


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class VideoPredictor:
  """Track objects through a video from clicks, boxes or masks (mirrors `SAM2VideoPredictor`).

  Options (PyTorch attributes of the same names; defaults = `build_sam2_video_predictor` with
  post-processing, except hole filling, which needs sam2's CUDA extension there):
    fill_hole_area: fill background holes up to this area in the low-res logits (host-side,
      costs a device round trip per frame; 0 = off, what sam2 does without its `_C`).
    non_overlap_masks: keep only the best object per pixel in the returned logits.
    add_all_frames_to_correct_as_cond: correction clicks make conditioning frames.
    max_cond_frames_in_attn, memory_temporal_stride_for_eval: SAM2Base's memory options.
    feature_cache_size: image features kept per session (PyTorch keeps 1; 2 lets the next
      frame be prefetched).
    show_progress: tqdm bar during propagation.
  """

  mask_threshold = 0.0

  def __init__(self, model: SAM2Base, *, fill_hole_area: int = 0, non_overlap_masks: bool = False,
               add_all_frames_to_correct_as_cond: bool = False,
               max_cond_frames_in_attn: int = -1, memory_temporal_stride_for_eval: int = 1,
               feature_cache_size: int = 2, show_progress: bool = True):
    self.model = model
    self.cfg: SAM2Config = model.cfg
    self.image_size = self.cfg.image_size
    self.fill_hole_area = fill_hole_area
    self.non_overlap_masks = non_overlap_masks
    self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
    self.max_cond_frames_in_attn = max_cond_frames_in_attn
    self.memory_temporal_stride_for_eval = memory_temporal_stride_for_eval
    self.feature_cache_size = max(1, int(feature_cache_size))
    self.show_progress = show_progress
    # Objects run one after the other inside the jitted step on CPU: batched, the activations
    # of 3 objects (a 12288 × 2048 FFN hidden layer, 3 × 4096² score rows) outgrow the caches
    # and every part of the step cost 3.3-4.4× one object's CPU time instead of 3× (2-core
    # EPYC, 32 MB L3). Accelerators keep the batch.
    self.objects_one_by_one = jax.default_backend() == "cpu"
    self._graphdef, self._state = nnx.split(model)
    # Committed to one device, like every jitted output fed back in: jit's executable cache
    # is keyed on committedness, so mixing the two would compile again.
    self._state = commit_to_device(self._state)
    self._cond_slots = 1  # conditioning-frame slots of the memory bank (grows, never shrinks)
    self._zeros: Dict[str, jax.Array] = {}
    # Incremented when a jitted function is traced (i.e. compiled): tests assert it stays flat.
    self.trace_counts: collections.Counter = collections.Counter()
    self._encode = jax.jit(self._encode_impl)
    self._step = jax.jit(self._step_impl,
                         static_argnames=("kind", "run_mem_encoder", "video_hw", "non_overlap"))
    self._memory = jax.jit(self._memory_impl)
    self._video_res = jax.jit(self._video_res_impl, static_argnames=("video_hw", "non_overlap"))
    self._prep_mask = jax.jit(self._prep_mask_impl, static_argnames=("size",))

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, config: Optional[str] = None, dtype=None,
                      image_size: Optional[int] = None, keep_packed: bool = False,
                      **options) -> "VideoPredictor":
    """Loads an Orbax directory or an official `.pt` file; `options` go to the constructor.

    `keep_packed`: a packed low-bit file stays packed in memory (`ImagePredictor`'s option).
    """
    return cls(load_sam2(path, config=config, dtype=dtype, image_size=image_size,
                         keep_packed=keep_packed)[0], **options)

  # ---------------------------------------------------------------------------- jitted parts

  def _encode_impl(self, state, frame_u8):
    self.trace_counts["encode"] += 1
    model = nnx.merge(self._graphdef, state)
    out = model.forward_image(normalize_frame(frame_u8)[None])
    fpn = out["backbone_fpn"]
    return fpn[0], fpn[1], fpn[2], out["vision_pos_enc"][-1]

  def _bank(self, mem_lists, ptr_lists, meta) -> tracking.MemoryBank:
    s, p = len(mem_lists[0]), len(ptr_lists[0])
    features = jnp.stack([jnp.stack(slots) for slots in mem_lists])
    ptrs = jnp.stack([jnp.stack(slots) for slots in ptr_lists])
    return tracking.MemoryBank(
        features=features, tpos_index=meta[:, :s], valid=meta[:, s:2 * s] > 0,
        obj_ptrs=ptrs, ptr_pos=meta[:, 2 * s:2 * s + p],
        ptr_valid=meta[:, 2 * s + p:2 * s + 2 * p] > 0, t_diff_max=meta[:, -1])

  def _step_impl(self, state, feats, bank_in, points, mask_inputs, prev_logits, stored, *,
                 kind: str, run_mem_encoder: bool, video_hw: Optional[Tuple[int, int]],
                 non_overlap: bool):
    """`_run_single_frame_inference` for B objects on one frame (B = 1 for prompts)."""
    self.trace_counts[kind] += 1
    model = nnx.merge(self._graphdef, state)
    bank = None if bank_in is None else self._bank(*bank_in)
    b = 1 if bank is None else bank.valid.shape[0]
    coords = labels = masks = prev = None
    if points is not None:
      coords, labels = points
    if mask_inputs is not None:
      masks = mask_inputs.reshape(1, 1, *mask_inputs.shape[-2:])
    if prev_logits is not None:
      prev = jnp.clip(prev_logits, -32.0, 32.0).reshape(1, 1, *prev_logits.shape[-2:])
    start = None
    if b > 1:  # objects share the frame: the memory-independent start runs once
      feat, pos = feats[2], feats[3]
      hw, c = feat.shape[1] * feat.shape[2], feat.shape[3]
      start = model.memory_attention.frame_start(feat.reshape(1, hw, c), pos.reshape(1, hw, c))
    if b > 1 and self.objects_one_by_one:
      def one_object(bank_row):
        row = jax.tree.map(lambda x: x[None], bank_row)
        out = tracking.track_step(model, list(feats[:3]), pos, bank=row,
                                  run_mem_encoder=run_mem_encoder, memory_start=start)
        return jax.tree.map(lambda x: x[0], out)
      out = jax.lax.map(one_object, bank)
    else:
      expand = lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:])
      fpn0, fpn1, feat, pos = (expand(x) for x in feats)
      out = tracking.track_step(model, [fpn0, fpn1, feat], pos, bank=bank, point_coords=coords,
                                point_labels=labels, mask_inputs=masks,
                                prev_sam_mask_logits=prev, run_mem_encoder=run_mem_encoder,
                                memory_start=start)
    pred = out.pred_masks[:, 0]
    result = {
        "pred_masks": [pred[i] for i in range(b)],
        "obj_ptr": [out.obj_ptr[i] for i in range(b)],
        "object_score_logits": [out.object_score_logits[i] for i in range(b)],
    }
    if run_mem_encoder:
      mem = out.maskmem_features.astype(jnp.bfloat16)  # stored like PyTorch
      result["maskmem_features"] = [mem[i] for i in range(b)]
    if video_hw is not None:
      if stored is not None:
        stored_masks, use_stored = stored
        pred = jnp.where(use_stored[:, None, None], jnp.stack(stored_masks), pred)
      result["video_res_masks"] = _to_video_res(pred, None, video_hw, non_overlap)
    return result

  def _memory_impl(self, state, feats, pred_masks, object_score_logits):
    """Preflight memory of a prompted frame: bilinear ↑ of the stored logits, binarized."""
    self.trace_counts["memory"] += 1
    model = nnx.merge(self._graphdef, state)
    size = self.image_size
    high_res = resize_2d(pred_masks[None, None], (size, size), axes=(-2, -1), mode="bilinear")
    mem, _ = tracking.encode_new_memory(model, feats[2], high_res, object_score_logits[None],
                                        is_mask_from_pts=True)
    return mem[0].astype(jnp.bfloat16)

  def _video_res_impl(self, masks, present, *, video_hw, non_overlap):
    """(N, 1, H, W) logits at the video size; objects not `present` get −1024."""
    self.trace_counts["video_res"] += 1
    return _to_video_res(jnp.stack(masks), present, video_hw, non_overlap)

  def _prep_mask_impl(self, mask, *, size):
    m = mask.astype(jnp.float32)
    if m.shape != (size, size):
      m = resize_2d(m, (size, size), axes=(0, 1), mode="bilinear", antialias=True)
      m = (m >= 0.5).astype(jnp.float32)
    return m

  # ---------------------------------------------------------------------------- helpers

  def _zero(self, name: str, shape: Tuple[int, ...], dtype) -> jax.Array:
    z = self._zeros.get(name)
    if z is None:
      # Committed to the model's device like the jitted outputs it stands in for: jit's cache
      # key includes whether an argument is committed, so a plain jnp.zeros would recompile the
      # step for every mix of real and placeholder bank slots.
      z = self._zeros[name] = commit_to_device(jnp.zeros(shape, dtype),
                                               jax.tree.leaves(self._state)[0].device)
    return z

  def _get_features(self, st: InferenceState, frame_idx: int) -> Tuple[jax.Array, ...]:
    """Image features of a frame (batch 1), from a small LRU cache (`_get_image_feature`)."""
    cache = st.cached_features
    feats = cache.get(frame_idx)
    if feats is None:
      feats = self._encode(self._state, jnp.asarray(st.images[frame_idx]))
      cache[frame_idx] = feats
      while len(cache) > self.feature_cache_size:
        cache.popitem(last=False)
    else:
      cache.move_to_end(frame_idx)
    return feats

  def _bank_inputs(self, st: InferenceState, obj_indices: Sequence[int], frame_idx: int,
                   reverse: bool):
    """Fills the fixed-size bank slots for these objects (host side, no device work)."""
    cfg = self.cfg
    sels = [tracking.select_memory(
        cfg, st.output_dict_per_obj[i][COND], st.output_dict_per_obj[i][NON_COND], frame_idx,
        st.num_frames, track_in_reverse=reverse,
        max_cond_frames_in_attn=self.max_cond_frames_in_attn,
        memory_temporal_stride=self.memory_temporal_stride_for_eval) for i in obj_indices]
    need = max(max(len(s.spatial) - (cfg.num_maskmem - 1), len(s.pointers)
                   - (cfg.max_obj_ptrs_in_encoder - 1)) for s in sels)
    self._cond_slots = max(self._cond_slots, _next_pow2(need))
    n_s, n_p = tracking.bank_slots(cfg, self._cond_slots)
    h = cfg.image_embedding_size
    zero_mem = self._zero("mem", (h, h, cfg.mem_dim), jnp.bfloat16)
    zero_ptr = self._zero("ptr", (cfg.d_model,), jnp.float32)
    meta = np.zeros((len(sels), 2 * n_s + 2 * n_p + 1), np.int32)
    meta[:, -1] = max(sels[0].t_diff_max, 1)  # PyTorch divides by 0 (NaN) for 1-frame videos
    mem_lists, ptr_lists = [], []
    for row, sel in enumerate(sels):
      mems = [out.maskmem_features for _, out in sel.spatial]
      meta[row, :len(mems)] = [t for t, _ in sel.spatial]
      meta[row, n_s:n_s + len(mems)] = 1
      ptrs = [out.obj_ptr for _, out in sel.pointers]
      meta[row, 2 * n_s:2 * n_s + len(ptrs)] = [p for p, _ in sel.pointers]
      meta[row, 2 * n_s + n_p:2 * n_s + n_p + len(ptrs)] = 1
      mem_lists.append(mems + [zero_mem] * (n_s - len(mems)))
      ptr_lists.append(ptrs + [zero_ptr] * (n_p - len(ptrs)))
    return mem_lists, ptr_lists, meta

  def _obj_id_to_idx(self, st: InferenceState, obj_id: Any) -> int:
    idx = st.obj_id_to_idx.get(obj_id)
    if idx is not None:
      return idx
    idx = len(st.obj_id_to_idx)
    st.obj_id_to_idx[obj_id] = idx
    st.obj_idx_to_id[idx] = obj_id
    st.obj_ids = list(st.obj_id_to_idx)
    st.point_inputs_per_obj[idx] = {}
    st.mask_inputs_per_obj[idx] = {}
    st.output_dict_per_obj[idx] = _new_output_dict()
    st.temp_output_dict_per_obj[idx] = _new_output_dict()
    st.frames_tracked_per_obj[idx] = {}
    return idx

  def _check_frame(self, st: InferenceState, frame_idx: int) -> int:
    if not isinstance(frame_idx, (int, np.integer)) or not 0 <= frame_idx < st.num_frames:
      raise VideoPromptError(f"frame_idx must be an integer in [0, {st.num_frames}), got "
                             f"{frame_idx!r}")
    return int(frame_idx)

  def _store(self, result: Dict[str, List[jax.Array]], i: int) -> FrameOutput:
    pred = result["pred_masks"][i]
    if self.fill_hole_area > 0:
      pred = jnp.asarray(tracking.fill_holes_in_mask_scores(np.asarray(pred),
                                                            self.fill_hole_area))
    mem = result.get("maskmem_features")
    return FrameOutput(pred, result["obj_ptr"][i], result["object_score_logits"][i],
                       None if mem is None else mem[i])

  def _prompt_frame(self, st: InferenceState, obj_idx: int, frame_idx: int, *, points=None,
                    mask_inputs=None, prev_logits=None) -> str:
    """Runs one object on a prompted frame and keeps the result in the temporary dict."""
    tracked = st.frames_tracked_per_obj[obj_idx]
    is_init_cond_frame = frame_idx not in tracked
    reverse = False if is_init_cond_frame else tracked[frame_idx]["reverse"]
    is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
    key = COND if is_cond else NON_COND
    bank_in = None
    if mask_inputs is None and not is_init_cond_frame:
      bank_in = self._bank_inputs(st, [obj_idx], frame_idx, reverse)
    feats = self._get_features(st, frame_idx)
    result = self._step(self._state, feats, bank_in, points, mask_inputs, prev_logits, None,
                        kind="prompt", run_mem_encoder=False, video_hw=None, non_overlap=False)
    st.temp_output_dict_per_obj[obj_idx][key][frame_idx] = self._store(result, 0)
    return key

  def _consolidated_video_res(self, st: InferenceState, frame_idx: int, key: str) -> np.ndarray:
    """Every object's latest logits on a frame at the video size (missing objects −1024)."""
    s = self.cfg.low_res_mask_size
    masks, present = [], []
    for obj_idx in range(len(st.obj_idx_to_id)):
      out = st.temp_output_dict_per_obj[obj_idx][key].get(frame_idx)
      if out is None:
        out = st.output_dict_per_obj[obj_idx][COND].get(frame_idx)
      if out is None:
        out = st.output_dict_per_obj[obj_idx][NON_COND].get(frame_idx)
      masks.append(self._zero("low_res", (s, s), jnp.float32) if out is None else out.pred_masks)
      present.append(out is not None)
    res = self._video_res(masks, np.asarray(present), video_hw=(st.video_height, st.video_width),
                          non_overlap=self.non_overlap_masks)
    return np.asarray(res)

  # ---------------------------------------------------------------------------- public API

  def init_state(self, video: Any) -> InferenceState:
    """Loads a video (JPEG folder or HxWx3 uint8 frames) and encodes its first frame."""
    frames, height, width = load_video_frames(video, self.image_size)
    st = InferenceState(images=frames, num_frames=len(frames), video_height=height,
                        video_width=width)
    self._get_features(st, 0)  # warm up, like PyTorch
    return st

  def add_new_points_or_box(self, inference_state: InferenceState, frame_idx: int, obj_id: Any,
                            points: Optional[Any] = None, labels: Optional[Any] = None,
                            clear_old_points: bool = True, normalize_coords: bool = True,
                            box: Optional[Any] = None) -> Tuple[int, List[Any], np.ndarray]:
    """Adds clicks and/or a box for one object on one frame.

    Args:
      points: (N, 2) (x, y) clicks in video pixels, or already in [0, 1] with
        `normalize_coords=False` (then only scaled by the image size, as in sam2).
      labels: (N,) 1 = positive, 0 = negative.
      box: (4,) x0, y0, x1, y1; becomes two corner points (labels 2, 3) before the clicks.
      clear_old_points: replace this frame's earlier clicks instead of appending.

    Returns:
      (frame_idx, obj_ids, logits (N_obj, 1, H, W) float32 numpy) for every object.
    """
    st = inference_state
    frame_idx = self._check_frame(st, frame_idx)
    if (points is not None) != (labels is not None):
      raise VideoPromptError("points and labels must be provided together")
    if points is None and box is None:
      raise VideoPromptError("at least one of points or box must be provided as input")
    pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32)
    lab = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32)
    if pts.ndim == 2:
      pts = pts[None]
    if lab.ndim == 1:
      lab = lab[None]
    if pts.ndim != 3 or pts.shape[0] != 1 or pts.shape[2] != 2 or lab.shape != pts.shape[:2]:
      raise VideoPromptError(f"points must be (N, 2) with labels (N,); got {np.shape(points)} "
                             f"and {np.shape(labels)}")
    if np.any((lab < 0) | (lab > 1)):
      raise VideoPromptError("labels must be 1 (positive click) or 0 (negative click)")
    check_finite(pts, "points", VideoPromptError)
    if box is not None:
      if not clear_old_points:
        raise VideoPromptError("cannot add a box without clearing old points (a box must come "
                               "before any click); use clear_old_points=True")
      b = check_boxes(box, VideoPromptError)
      if len(b) != 1:
        raise VideoPromptError(f"box must be one (x0, y0, x1, y1) box per object, got shape "
                               f"{np.shape(box)}")
      pts = np.concatenate([b.reshape(1, 2, 2), pts], axis=1)
      lab = np.concatenate([np.array([[2, 3]], np.int32), lab], axis=1)
    if normalize_coords:
      pts = pts / np.array([st.video_width, st.video_height], np.float32)
    pts = (pts * np.float32(self.image_size)).astype(np.float32)

    obj_idx = self._obj_id_to_idx(st, obj_id)
    old = None if clear_old_points else st.point_inputs_per_obj[obj_idx].get(frame_idx)
    if old is not None:
      pts = np.concatenate([old[0], pts], axis=1)
      lab = np.concatenate([old[1], lab], axis=1)
    st.point_inputs_per_obj[obj_idx][frame_idx] = (pts, lab)
    st.mask_inputs_per_obj[obj_idx].pop(frame_idx, None)

    # Earlier logits of this object on this frame are fed with the clicks.
    tracked = st.frames_tracked_per_obj[obj_idx]
    is_cond = frame_idx not in tracked or self.add_all_frames_to_correct_as_cond
    key = COND if is_cond else NON_COND
    prev = st.temp_output_dict_per_obj[obj_idx][key].get(frame_idx)
    if prev is None:
      prev = st.output_dict_per_obj[obj_idx][COND].get(frame_idx)
    if prev is None:
      prev = st.output_dict_per_obj[obj_idx][NON_COND].get(frame_idx)
    prev_logits = None if prev is None else prev.pred_masks
    key = self._prompt_frame(st, obj_idx, frame_idx, points=(pts, lab), prev_logits=prev_logits)
    return frame_idx, list(st.obj_ids), self._consolidated_video_res(st, frame_idx, key)

  def add_new_mask(self, inference_state: InferenceState, frame_idx: int, obj_id: Any,
                   mask: Any) -> Tuple[int, List[Any], np.ndarray]:
    """Gives one object's mask on one frame (2-D, any size; nonzero = object).

    Returns:
      (frame_idx, obj_ids, logits (N_obj, 1, H, W) float32 numpy) for every object.
    """
    st = inference_state
    frame_idx = self._check_frame(st, frame_idx)
    m = np.asarray(mask)
    if m.ndim != 2:
      raise VideoPromptError(f"mask must be a 2-D (H, W) array, got shape {m.shape}")
    mask_inputs = self._prep_mask(jnp.asarray(m.astype(bool)), size=self.image_size)
    obj_idx = self._obj_id_to_idx(st, obj_id)
    st.mask_inputs_per_obj[obj_idx][frame_idx] = mask_inputs
    st.point_inputs_per_obj[obj_idx].pop(frame_idx, None)
    key = self._prompt_frame(st, obj_idx, frame_idx, mask_inputs=mask_inputs)
    return frame_idx, list(st.obj_ids), self._consolidated_video_res(st, frame_idx, key)

  def propagate_in_video_preflight(self, inference_state: InferenceState) -> None:
    """Encodes the memories of prompted frames and moves them into the output dicts."""
    st = inference_state
    n = len(st.obj_idx_to_id)
    if n == 0:
      raise VideoPromptError("No input points or masks are provided for any object; please add "
                             "inputs first.")
    for obj_idx in range(n):
      outputs = st.output_dict_per_obj[obj_idx]
      temp = st.temp_output_dict_per_obj[obj_idx]
      for key in (NON_COND, COND):
        for frame_idx, out in temp[key].items():
          if out.maskmem_features is None:
            feats = self._get_features(st, frame_idx)
            out.maskmem_features = self._memory(self._state, feats, out.pred_masks,
                                                out.object_score_logits)
          outputs[key][frame_idx] = out
        temp[key].clear()
      if not outputs[COND]:
        raise VideoPromptError(f"No input points or masks are provided for object id "
                               f"{st.obj_idx_to_id[obj_idx]}; please add inputs first.")
      for frame_idx in outputs[COND]:
        outputs[NON_COND].pop(frame_idx, None)

  def propagate_in_video(self, inference_state: InferenceState,
                         start_frame_idx: Optional[int] = None,
                         max_frame_num_to_track: Optional[int] = None,
                         reverse: bool = False) -> Iterator[Tuple[int, List[Any], np.ndarray]]:
    """Tracks every object through the video.

    Yields:
      (frame_idx, obj_ids, logits (N_obj, 1, H, W) float32 numpy); the mask is `logits > 0`.
    """
    st = inference_state
    self.propagate_in_video_preflight(st)
    obj_ids = list(st.obj_ids)
    n = len(obj_ids)
    num_frames = st.num_frames
    if start_frame_idx is None:
      start_frame_idx = min(t for d in st.output_dict_per_obj.values() for t in d[COND])
    start_frame_idx = self._check_frame(st, start_frame_idx)
    if max_frame_num_to_track is None:
      max_frame_num_to_track = num_frames
    if reverse:
      end = max(start_frame_idx - max_frame_num_to_track, 0)
      order = list(range(start_frame_idx, end - 1, -1)) if start_frame_idx > 0 else []
    else:
      end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
      order = list(range(start_frame_idx, end + 1))

    video_hw = (st.video_height, st.video_width)
    fused = self.fill_hole_area <= 0
    progress = order
    if self.show_progress:
      from tqdm import tqdm
      progress = tqdm(order, desc="propagate in video")
    for pos, frame_idx in enumerate(progress):
      conds = [st.output_dict_per_obj[i][COND].get(frame_idx) for i in range(n)]
      if any(c is None for c in conds):
        bank_in = self._bank_inputs(st, range(n), frame_idx, reverse)
        s = self.cfg.low_res_mask_size
        stored = ([self._zero("low_res", (s, s), jnp.float32) if c is None else c.pred_masks
                   for c in conds], np.asarray([c is not None for c in conds]))
        result = self._step(self._state, self._get_features(st, frame_idx), bank_in, None, None,
                            None, stored, kind="propagate", run_mem_encoder=True,
                            video_hw=video_hw if fused else None,
                            non_overlap=self.non_overlap_masks)
        for i, c in enumerate(conds):
          if c is None:
            st.output_dict_per_obj[i][NON_COND][frame_idx] = self._store(result, i)
        video_res = result.get("video_res_masks")
      else:
        video_res = None
      for i in range(n):
        st.frames_tracked_per_obj[i][frame_idx] = {"reverse": reverse}
      if video_res is None:
        masks = [(conds[i] if conds[i] is not None
                  else st.output_dict_per_obj[i][NON_COND][frame_idx]).pred_masks
                 for i in range(n)]
        video_res = self._video_res(masks, None, video_hw=video_hw,
                                    non_overlap=self.non_overlap_masks)
      if pos + 1 < len(order):  # keep the device busy while the host yields
        nxt = order[pos + 1]
        if any(nxt not in st.output_dict_per_obj[i][COND] for i in range(n)):
          self._get_features(st, nxt)
      yield frame_idx, obj_ids, np.asarray(video_res)

  def reset_state(self, inference_state: InferenceState) -> None:
    """Removes every object, prompt and result (the frames and feature cache stay)."""
    st = inference_state
    st.obj_id_to_idx.clear()
    st.obj_idx_to_id.clear()
    st.obj_ids.clear()
    st.point_inputs_per_obj.clear()
    st.mask_inputs_per_obj.clear()
    st.output_dict_per_obj.clear()
    st.temp_output_dict_per_obj.clear()
    st.frames_tracked_per_obj.clear()

"""SAM2's training losses (`training.loss_fns.MultiStepMultiMasksAndIous`) in JAX, float32.

One prediction step of the image path: per object, `M` mask logits (1 or 3), `M` predicted IoUs
and one object-score logit, against one ground-truth mask. As in SAM2:

- focal (α 0.25, γ 2) and dice per mask, mean over pixels; with several masks only the mask with
  the lowest `w_focal·focal + w_dice·dice` is back-propagated for both (the selection itself is
  an argmin, so unselected masks get no gradient);
- IoU prediction: L1 between the predicted IoU and the actual IoU of `logit > 0` against the GT
  (union clamped at 1); averaged over all masks with `supervise_all_iou` (SAM2.1's training
  config), else only the selected mask's;
- object score: BCE against "the GT mask is non-empty";
- mask, dice and IoU terms are multiplied by that object-present flag; every term is summed over
  objects and divided by `num_objects`.

Resolution is the caller's choice: SAM2 upsamples the low-res logits to the input size before the
loss; pass whichever logits and GT share a shape. Padded objects (`valid` False) contribute
nothing, and `num_objects` defaults to the number of valid objects in the (global) batch, which is
what SAM2's per-rank normalisation amounts to after DDP's gradient averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from qsam2_jax.model.resize import resize_2d

LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


@dataclass(frozen=True)
class LossConfig:
  """Weights and options; the defaults are SAM2.1's training config."""
  weight_mask: float = 20.0  # focal
  weight_dice: float = 1.0
  weight_iou: float = 1.0
  weight_class: float = 1.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  supervise_all_iou: bool = True
  iou_use_l1_loss: bool = True
  pred_obj_scores: bool = True
  weight_distill: float = 0.0  # MSE on mask logits against a teacher's (`--distill`)


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Element-wise RetinaNet focal loss; `alpha < 0` disables the class weighting (plain BCE when
  `gamma == 0` too)."""
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  # Stable BCE with logits: max(x, 0) - x·t + log(1 + exp(-|x|)), as torch computes it.
  ce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
  if gamma == int(gamma):  # integer powers (lax.integer_pow) keep the gradient exact at p_t = 1
    loss = ce * (1.0 - p_t) ** int(gamma)
  else:
    loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`1 - (2Σpt + 1) / (Σp + Σt + 1)` over the last two (spatial) axes, p = sigmoid(logits)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  num = 2.0 * jnp.sum(p * t, axis=(-2, -1))
  den = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
  return 1.0 - (num + 1.0) / (den + 1.0)


def actual_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """IoU of `logits > 0` against `targets > 0` over the last two axes (union clamped at 1); no
  gradient flows through it (it is a comparison)."""
  pred = logits > 0
  gt = targets > 0
  inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
  return inter / jnp.maximum(union, 1.0)


def sam2_loss(
    pred_masks: jax.Array,
    pred_ious: jax.Array,
    obj_score_logits: jax.Array,
    gt_masks: jax.Array,
    valid: Optional[jax.Array] = None,
    num_objects: Optional[jax.Array | float] = None,
    *,
    teacher_masks: Optional[jax.Array] = None,
    config: LossConfig = LossConfig(),
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SAM2's loss for one prediction step (jit-friendly, float32).

  Args:
    pred_masks: (B, M, H, W) mask logits, M = 1 or 3 (any dtype; cast to float32).
    pred_ious: (B, M) predicted IoUs.
    obj_score_logits: (B, 1) object-score logits.
    gt_masks: (B, H, W) bool (or 0/1) ground truth at the logits' resolution.
    valid: (B,) bool, False for padding objects (default: all valid).
    num_objects: normaliser (default: max(1, number of valid objects)).
    teacher_masks: (B, M, H, W) mask logits of a teacher (the FP model) for distillation; used
      when `config.weight_distill > 0`. Gradients are stopped through it.
    config: weights and options.

  Returns:
    (total, terms): the weighted sum and a dict of the unweighted terms `loss_mask` (focal),
    `loss_dice`, `loss_iou`, `loss_class` (and `loss_distill` when distilling), each already
    divided by `num_objects`, plus `num_objects`.
  """
  b, m = pred_masks.shape[:2]
  if gt_masks.shape != (b,) + pred_masks.shape[2:]:
    raise ValueError(f"gt_masks {gt_masks.shape} does not match pred_masks {pred_masks.shape}")
  logits = pred_masks.astype(jnp.float32)
  target = gt_masks.astype(jnp.float32)[:, None]  # (B, 1, H, W), broadcast over M
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  valid_f = valid.astype(jnp.float32)
  if num_objects is None:
    num_objects = jnp.maximum(jnp.sum(valid_f), 1.0)
  num_objects = jnp.asarray(num_objects, jnp.float32)

  focal = jnp.mean(sigmoid_focal_loss(logits, target, config.focal_alpha, config.focal_gamma),
                   axis=(-2, -1))  # (B, M)
  dice = dice_loss(logits, target)  # (B, M)
  iou_err = pred_ious.astype(jnp.float32) - actual_iou(logits, target)
  iou = jnp.abs(iou_err) if config.iou_use_l1_loss else iou_err**2  # (B, M)

  if m > 1:
    # Only the best mask (lowest weighted focal + dice) is supervised, as in SAM.
    combo = config.weight_mask * focal + config.weight_dice * dice
    best = jax.lax.stop_gradient(jnp.argmin(combo, axis=-1))[:, None]  # (B, 1)
    focal_b = jnp.take_along_axis(focal, best, axis=-1)[:, 0]
    dice_b = jnp.take_along_axis(dice, best, axis=-1)[:, 0]
    iou_b = (jnp.mean(iou, axis=-1) if config.supervise_all_iou
             else jnp.take_along_axis(iou, best, axis=-1)[:, 0])
  else:
    focal_b, dice_b, iou_b = focal[:, 0], dice[:, 0], iou[:, 0]

  if config.pred_obj_scores:
    present = jnp.any(gt_masks.reshape(b, -1) > 0, axis=-1).astype(jnp.float32)  # (B,)
    bce = sigmoid_focal_loss(obj_score_logits.reshape(b, -1)[:, 0], present, alpha=-1.0,
                             gamma=0.0)
    loss_class = jnp.sum(bce * valid_f) / num_objects
  else:
    present = jnp.ones((b,), jnp.float32)
    loss_class = jnp.zeros((), jnp.float32)

  weight = present * valid_f / num_objects
  terms = {
      "loss_mask": jnp.sum(focal_b * weight),
      "loss_dice": jnp.sum(dice_b * weight),
      "loss_iou": jnp.sum(iou_b * weight),
      "loss_class": loss_class,
  }
  total = (config.weight_mask * terms["loss_mask"] + config.weight_dice * terms["loss_dice"]
           + config.weight_iou * terms["loss_iou"] + config.weight_class * terms["loss_class"])
  if config.weight_distill > 0:
    if teacher_masks is None:
      raise ValueError("weight_distill > 0 needs teacher_masks")
    terms["loss_distill"] = distill_loss(logits, teacher_masks, valid, num_objects)
    total = total + config.weight_distill * terms["loss_distill"]
  terms["num_objects"] = num_objects
  return total, terms


def distill_loss(student_masks: jax.Array, teacher_masks: jax.Array,
                 valid: Optional[jax.Array] = None,
                 num_objects: Optional[jax.Array | float] = None) -> jax.Array:
  """MSE between student and teacher mask logits, mean over (M, H, W), summed over valid objects
  and divided by `num_objects` (the teacher gets no gradient)."""
  b = student_masks.shape[0]
  valid_f = (jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32))
  if num_objects is None:
    num_objects = jnp.maximum(jnp.sum(valid_f), 1.0)
  teacher = jax.lax.stop_gradient(teacher_masks.astype(jnp.float32))
  err = (student_masks.astype(jnp.float32) - teacher) ** 2
  per_object = jnp.mean(err.reshape(b, -1), axis=-1)
  return jnp.sum(per_object * valid_f) / num_objects


def upsample_masks(logits: jax.Array, size: int) -> jax.Array:
  """(B, M, h, w) low-res mask logits -> (B, M, size, size) float32, as SAM2's training path
  (`F.interpolate(bilinear, align_corners=False)`) before the loss."""
  return resize_2d(logits.astype(jnp.float32), (size, size), axes=(-2, -1), mode="bilinear")

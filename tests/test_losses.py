"""SAM2 training losses: parity with `training.loss_fns` (values and gradients)."""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from torch_reference import rel_err
from train.losses import LossConfig, distill_loss, sam2_loss, upsample_masks

TOL = 1e-5
WEIGHTS = {"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1}


@pytest.fixture(scope="module")
def loss_fns():
  """`training.loss_fns` with `training.trainer` stubbed (it would pull tensordict & co)."""
  if "training.trainer" not in sys.modules:
    stub = types.ModuleType("training.trainer")
    stub.CORE_LOSS_KEY = "core_loss"
    sys.modules["training.trainer"] = stub
  from training import loss_fns
  return loss_fns


def _inputs(seed: int, b: int, m: int, hw: int = 24, absent: tuple[int, ...] = ()):
  rng = np.random.default_rng(seed)
  masks = (rng.normal(size=(b, m, hw, hw)) * 3).astype(np.float32)
  ious = rng.uniform(0, 1, (b, m)).astype(np.float32)
  obj = rng.normal(size=(b, 1)).astype(np.float32) * 2
  gt = np.zeros((b, hw, hw), bool)
  for i in range(b):
    y0, x0 = rng.integers(0, hw // 2, 2)
    gt[i, y0:y0 + rng.integers(3, hw // 2), x0:x0 + rng.integers(3, hw // 2)] = True
    masks[i] += 2.0 * gt[i][None]  # correlate predictions with the GT a little
  gt[list(absent)] = False
  return masks, ious, obj, gt


def _torch_loss(loss_fns, masks, ious, obj, gt, supervise_all_iou, grad=False):
  crit = loss_fns.MultiStepMultiMasksAndIous(
      dict(WEIGHTS), supervise_all_iou=supervise_all_iou, iou_use_l1_loss=True,
      pred_obj_scores=True, focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0)
  tm = torch.tensor(masks, requires_grad=grad)
  ti = torch.tensor(ious, requires_grad=grad)
  to = torch.tensor(obj, requires_grad=grad)
  outs = [{"multistep_pred_multimasks_high_res": [tm], "multistep_pred_ious": [ti],
           "multistep_object_score_logits": [to]}]
  losses = crit(outs, torch.tensor(gt)[None])  # one frame, num_objects = B
  return losses, (tm, ti, to)


@pytest.mark.parametrize("m,absent,all_iou", [(1, (), True), (3, (), True), (3, (1, 4), True),
                                              (3, (2,), False), (1, (0,), False)])
def test_matches_reference(loss_fns, m, absent, all_iou):
  masks, ious, obj, gt = _inputs(m * 10 + len(absent), 5, m, absent=absent)
  ref, _ = _torch_loss(loss_fns, masks, ious, obj, gt, all_iou)
  cfg = LossConfig(supervise_all_iou=all_iou)
  total, terms = jax.jit(lambda *a: sam2_loss(*a, config=cfg))(masks, ious, obj, gt)
  for k in ("loss_mask", "loss_dice", "loss_iou", "loss_class"):
    assert rel_err(np.asarray(terms[k]), ref[k].numpy()) <= TOL, k
  assert rel_err(np.asarray(total), ref["core_loss"].numpy()) <= TOL
  if absent:  # the absent objects' mask terms are really dropped
    assert float(terms["loss_mask"]) > 0


@pytest.mark.parametrize("all_iou", [True, False])
def test_gradients_match_reference_and_flow_through_best_mask_only(loss_fns, all_iou):
  masks, ious, obj, gt = _inputs(7, 4, 3, absent=(3,))
  ref, (tm, ti, to) = _torch_loss(loss_fns, masks, ious, obj, gt, all_iou, grad=True)
  ref["core_loss"].backward()
  cfg = LossConfig(supervise_all_iou=all_iou)
  grads = jax.jit(jax.grad(lambda a, b, c: sam2_loss(a, b, c, gt, config=cfg)[0],
                           argnums=(0, 1, 2)))(masks, ious, obj)
  for g, t in zip(grads, (tm, ti, to)):
    assert rel_err(np.asarray(g), t.grad.numpy()) <= TOL
  # Mask gradients: exactly one mask per present object, none for the absent one.
  nonzero = np.abs(np.asarray(grads[0])).reshape(4, 3, -1).max(-1) > 0
  np.testing.assert_array_equal(nonzero.sum(1), [1, 1, 1, 0])
  iou_nonzero = np.asarray(grads[1]) != 0
  np.testing.assert_array_equal(iou_nonzero.sum(1), [3, 3, 3, 0] if all_iou else [1, 1, 1, 0])


def test_valid_padding_equals_dropping_objects(loss_fns):
  masks, ious, obj, gt = _inputs(3, 6, 3)
  valid = np.array([1, 0, 1, 1, 0, 1], bool)
  ref, _ = _torch_loss(loss_fns, masks[valid], ious[valid], obj[valid], gt[valid], True)
  loss = jax.jit(sam2_loss)
  total, terms = loss(masks, ious, obj, gt, valid)
  assert float(terms["num_objects"]) == 4
  assert rel_err(np.asarray(total), ref["core_loss"].numpy()) <= TOL
  # Garbage in padded rows changes nothing.
  masks2 = masks.copy()
  masks2[~valid] = 100.0
  total2, _ = loss(masks2, ious, obj, gt, valid)
  assert float(total2) == float(total)


def test_distillation_term():
  masks, ious, obj, gt = _inputs(5, 3, 3)
  teacher = masks + np.random.default_rng(0).normal(size=masks.shape).astype(np.float32)
  valid = np.array([1, 1, 0], bool)
  cfg = LossConfig(weight_distill=2.0)
  total, terms = jax.jit(lambda *a: sam2_loss(*a[:5], teacher_masks=a[5], config=cfg))(
      masks, ious, obj, gt, valid, teacher)
  base, _ = jax.jit(sam2_loss)(masks, ious, obj, gt, valid)
  want = np.mean((masks[:2] - teacher[:2]) ** 2, axis=(1, 2, 3)).sum() / 2
  assert rel_err(np.asarray(terms["loss_distill"]), want) <= TOL
  assert rel_err(np.asarray(total), np.asarray(base) + 2.0 * want) <= TOL
  g_teacher = jax.grad(lambda t: distill_loss(jnp.asarray(masks), t))(jnp.asarray(teacher))
  assert not np.any(np.asarray(g_teacher))  # the teacher is a constant
  with pytest.raises(ValueError, match="teacher"):
    sam2_loss(masks, ious, obj, gt, config=cfg)


def test_upsample_masks_matches_interpolate():
  x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(x), size=(32, 32), mode="bilinear",
                                         align_corners=False).numpy()
  assert rel_err(np.asarray(upsample_masks(x, 32)), want) <= TOL

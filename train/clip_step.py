"""The clip train step: SAM2Train's forward (`train.clip_forward`), SAM2's loss on every frame,
object and prediction step, and the jitted, sharded train / eval steps.

Loss (`MultiStepMultiMasksAndIous`): for each frame, each valid object and each prediction step
(the first pass and every correction click), `train.losses.sam2_loss` on the low-res logits
bilinearly upsampled to the input size (SAM2 supervises at the input resolution), summed over
steps and frames and divided by the number of valid objects in the global batch. The loss of one
frame at a time is rematerialized in the backward pass, so the full-resolution logits of all
steps are never held at once.

Randomness: every step draws its prompts and clicks from `fold_in(key(seed), optimizer step)`,
so a run is reproducible, resumes where it stopped, and gives the same numbers on any mesh
(JAX's partitionable threefry).

Batch (B clips of T frames, N objects, S = image size): `images` (B, T, S, S, 3) uint8 (or
float32 already normalized), `masks` (B, T, N, S, S) bool, `valid` (B, N) bool
(see `qsam2_jax.data.clips`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qsam2_jax import parallel
from qsam2_jax.parallel import place, state_shardings
from qsam2_jax.quant.penalty import pact_l2_penalty
from qsam2_jax.quant.quantizers import ClipFactor
from train import clip_forward as cf
from train import losses
from train.host_memory import CompiledOnce

Batch = Dict[str, jax.Array]


def _object_rows(x: jax.Array) -> jax.Array:
  """(B, N, ...) -> (B·N, ...), clip-major like the forward's rows."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def clip_loss(out: cf.ClipOutputs, gt_masks: jax.Array, valid: jax.Array,
              loss_cfg: losses.LossConfig = losses.LossConfig()
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SAM2's loss over frames, objects and prediction steps (module docstring).

  Args:
    out: `clip_forward`'s outputs.
    gt_masks: (B, T, N, S, S) bool. valid: (B, N) bool.

  Returns:
    (total, terms) with the unweighted terms of `losses.sam2_loss` summed over frames and steps,
    plus `num_objects`.
  """
  b, t, n = gt_masks.shape[:3]
  size = gt_masks.shape[-1]
  rows_valid = _object_rows(valid)
  num = jnp.maximum(jnp.sum(rows_valid.astype(jnp.float32)), 1.0)
  gt_t = jnp.moveaxis(gt_masks, 1, 0).reshape((t, b * n, size, size))

  @jax.checkpoint
  def frame_loss(args):
    masks, ious, obj, step_valid, gt = args  # (BN, 1+K, 3, h, w), ..., (BN, S, S)
    r, k = step_valid.shape
    logits = losses.upsample_masks(masks.reshape((r * k,) + masks.shape[2:]), size)
    gt_rep = jnp.repeat(gt, k, axis=0)
    ok = step_valid.reshape(r * k) & jnp.repeat(rows_valid, k)
    total, terms = losses.sam2_loss(logits, ious.reshape(r * k, 3), obj.reshape(r * k, 1),
                                    gt_rep, ok, num, config=loss_cfg)
    return total, {key: v for key, v in terms.items() if key != "num_objects"}

  totals, terms = jax.lax.map(frame_loss, (out.step_masks, out.step_ious, out.step_obj,
                                           out.step_valid, gt_t))
  terms = {key: jnp.sum(v) for key, v in terms.items()}
  terms["num_objects"] = num
  return jnp.sum(totals), terms


def frames(batch: Batch) -> jax.Array:
  """The batch's clips as model input: uint8 frames are normalized on the device (exactly as
  the predictors do), float frames are taken as already normalized."""
  images = jnp.asarray(batch["images"])
  if images.dtype == jnp.uint8:
    from qsam2_jax.video_io import normalize_frame
    return normalize_frame(images)
  return images


def clip_loss_fn(model: nnx.Module, batch: Batch, key: jax.Array, clip_cfg: cf.ClipConfig,
                 loss_cfg: losses.LossConfig = losses.LossConfig()
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Prompts sampled from `key` (`sample_plan`), the clip forward, SAM2's loss."""
  b, t = batch["images"].shape[:2]
  k_plan, k_fwd = jax.random.split(key)
  plan = cf.sample_plan(k_plan, b, t, clip_cfg)
  out = cf.clip_forward(model, frames(batch), batch["masks"], plan, k_fwd, clip_cfg)
  total, terms = clip_loss(out, batch["masks"], batch["valid"], loss_cfg)
  # PACT's L2 penalty on its clips, a term of the loss as in the image step (zero without PACT).
  terms["pact_l2"] = pact_l2_penalty(model)
  return total + terms["pact_l2"], terms


def calibration_plan(batch: int, num_frames: int, correction_clicks: int, offset: int = 0
                     ) -> cf.ClipPlan:
  """Deterministic prompts for range calibration over clips, covering every quantized layer.

  Clip j (counting from `offset` over all calibration batches) alternates between SAM2Train's
  two kinds: even j a GT mask on frame 0 (the mask goes through `mask_downsample` and the
  prompt encoder's `mask_downscaling`), odd j points on frame 0 (a box for j = 1 mod 4, else a
  click) with `correction_clicks` error clicks whose previous logits are fed back as the mask
  input. Only frame 0 conditions, so frames 1.. run memory attention and object pointers.
  """
  j = jnp.arange(batch) + offset
  t = num_frames
  first = jnp.broadcast_to(jnp.arange(t)[None] == 0, (batch, t))
  points = j % 2 == 1
  box = first & ((j % 4) == 1)[:, None]
  correct = first & points[:, None]
  return cf.ClipPlan(points, first, box, correct,
                     jnp.zeros((batch, t, correction_clicks), bool))


@nnx.jit(static_argnames=("clip_cfg",))
def _calibrate_clip(model, images, masks, plan, key, clip_cfg):
  cf.clip_forward(model, images, masks, plan, key, clip_cfg, carry_params=True)


def calibrate_clips(model: nnx.Module, clips: Sequence[Batch], clip_cfg: cf.ClipConfig,
                    seed: int = 0) -> nnx.Module:
  """Range calibration of every quantizer over clips (`calibration_plan` prompts), in place.

  Continues the running means of a preceding image calibration (`quant.calibration`
  `calibrate_ranges`): quantizers used by both paths average over image batches and clips.
  Leaves the model in evaluation mode, like `calibrate_ranges`.
  """
  from qsam2_jax.quant import set_mode
  from qsam2_jax.quant.calibration import commit_state
  set_mode(model, "calibrate")
  commit_state(model)
  seen = 0
  for i, batch in enumerate(clips):
    b, t = batch["images"].shape[:2]
    plan = calibration_plan(b, t, clip_cfg.correction_clicks, seen)
    key = jax.random.fold_in(jax.random.key(seed), i)
    jax.block_until_ready(_calibrate_clip(model, frames(batch), jnp.asarray(batch["masks"]),
                                          plan, key, clip_cfg))
    seen += b
  return set_mode(model, "eval")


def clip_ious(model: nnx.Module, batch: Batch) -> Tuple[jax.Array, jax.Array]:
  """J of the semi-supervised protocol: GT mask on frame 0, tracked through the clip.

  Returns (iou (T-1, B·N), valid (T-1, B·N)) over frames 1..T-1 (frame 0 is the prompt).
  """
  b, t, n, s = batch["masks"].shape[:4]
  cfg = cf.ClipConfig(correction_clicks=0, only_past_pointers=True)
  out = cf.clip_forward(model, frames(batch), batch["masks"], cf.mask_prompt_plan(b, t),
                        jax.random.key(0), cfg)
  pred = losses.upsample_masks(out.pred_masks[1:, :, 0], s)  # (T-1, BN, S, S)
  gt = jnp.moveaxis(batch["masks"], 1, 0)[1:].reshape((t - 1, b * n, s, s))
  iou = losses.actual_iou(pred, gt)
  valid = jnp.broadcast_to(_object_rows(batch["valid"])[None], iou.shape)
  return iou, valid


def _factor_leaves(state: Any) -> List[Tuple[Any, Any]]:
  """(path, variable) of the `ClipFactor`s of a state (or of its gradient), in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
  return [(p, v) for p, v in leaves if isinstance(v, ClipFactor)]


class ClipSteps:
  """Jitted clip train and eval steps of one model structure on one mesh (like `step.Steps`).

  Args:
    model: the (quantized) model in training mode (`prepare_for_training` applied).
    optimizer: its `nnx.Optimizer` (e.g. `step.make_optimizer`).
    mesh: the device mesh; clips are split over (`data`, `fsdp`).
    clip_cfg: prompt simulation (`ClipConfig`); loss_cfg: loss weights.
    seed: base of the per-step randomness.
    schedule: optional learning-rate schedule, reported as `lr`.
  """

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh,
               clip_cfg: cf.ClipConfig = cf.ClipConfig(),
               loss_cfg: losses.LossConfig = losses.LossConfig(), seed: int = 0,
               schedule: Optional[Callable] = None):
    from qsam2_jax.quant import set_mode
    self.mesh = mesh
    self.model_gd, model_state = nnx.split(model)
    set_mode(model, "eval")  # evaluation: frozen statistics, a second static graph
    self.eval_gd = nnx.graphdef(model)
    set_mode(model, "train")
    self.opt_gd, opt_state = nnx.split(optimizer)
    self.model_sh = state_shardings(model_state, mesh)
    self.opt_sh = state_shardings(opt_state, mesh)
    self.batch_sh = parallel.batch_sharding(mesh)
    repl = parallel.replicated(mesh)
    self.clip_cfg, self.loss_cfg, self.seed, self.schedule = clip_cfg, loss_cfg, seed, schedule
    self.factor_names = [parallel.path_str(p) for p, _ in _factor_leaves(
        nnx.state(model, nnx.Param))]

    def train_step(model_state, opt_state, batch):
      model = nnx.merge(self.model_gd, model_state)
      opt = nnx.merge(self.opt_gd, opt_state)
      key = jax.random.fold_in(jax.random.key(self.seed), opt.step[...])
      grad_fn = nnx.value_and_grad(
          lambda m: clip_loss_fn(m, batch, key, self.clip_cfg, self.loss_cfg), has_aux=True)
      (loss, terms), grads = grad_fn(model)
      metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
      zero = [jnp.all(g[...] == 0) for _, g in _factor_leaves(grads)]
      metrics["zero_grad_factors"] = jnp.stack(zero) if zero else jnp.zeros((0,), bool)
      if self.schedule is not None:
        metrics["lr"] = self.schedule(opt.step[...])
      opt.update(model, grads)
      return nnx.state(model), nnx.state(opt), metrics

    def eval_step(model_state, batch):
      model = nnx.merge(self.eval_gd, model_state)
      iou, valid = clip_ious(model, batch)
      v = valid.astype(jnp.float32)
      return {"iou_sum": jnp.sum(iou * v), "count": jnp.sum(v)}

    self._train = jax.jit(train_step, in_shardings=(self.model_sh, self.opt_sh, self.batch_sh),
                          out_shardings=(self.model_sh, self.opt_sh, repl),
                          donate_argnums=(0, 1))
    self._train_once = CompiledOnce(self._train)
    self._eval = jax.jit(eval_step, in_shardings=(self.model_sh, self.batch_sh),
                         out_shardings=repl)

  def place_state(self, model: nnx.Module, optimizer: nnx.Optimizer) -> Tuple[Any, Any]:
    """The model and optimizer state as global arrays on the mesh."""
    return (place(nnx.state(model), self.model_sh), place(nnx.state(optimizer), self.opt_sh))

  def batch(self, local: Dict[str, Any]) -> Batch:
    """This process's clips -> the global batch (`parallel.global_batch`)."""
    return parallel.global_batch(local, self.mesh)

  def train(self, model_state, opt_state, batch: Batch):
    """One step: (new model state, new optimizer state, metrics). Donates both states.

    `metrics["zero_grad_factors"]` is a bool vector over `factor_names`: the clip factors
    (step sizes) whose gradient was exactly zero in this step (layers the clip did not reach).
    """
    with jax.set_mesh(self.mesh):
      return self._train_once(model_state, opt_state, batch)

  def evaluate(self, model_state, batch: Batch) -> Dict[str, jax.Array]:
    with jax.set_mesh(self.mesh):
      return self._eval(model_state, batch)

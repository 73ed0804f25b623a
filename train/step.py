"""The QAT step: forward, SAM2 loss, optimizer, and the jitted train / eval steps.

Functional style (jax-practice.md §1.4): the model and optimizer are split once into static
graph definitions and state pytrees; each step merges them inside one `jax.jit`, and returns the
new state (weights, clip factors, EMA statistics `QuantStat`, Adam moments, step counter), so
nothing is lost to plain `jax.jit` not writing mutations back. The state is donated.

Training semantics (SAM2's image path):
- every image carries K masks (padded, `valid`); each is prompted by its jittered box or by
  clicks (`data.prompts`), merged into corner / click points by `prompts.to_point_prompts`;
  unused slots are masked out of the decoder's attention, so a box is decoded exactly as
  SAM2 (and `ImagePredictor`) decode [TL, BR, pad], and clicks as [c1, ..., pad];
- the decoder runs once for all K prompts of an image (the image features repeated K times) and
  yields all four mask tokens; as in SAM2, a prompt of exactly one click is supervised on the
  three multimask outputs (only the lowest-loss one back-propagated), any other prompt (a box,
  several clicks) on the single-mask output. Both kinds share one normaliser, the number of
  valid masks in the global batch. The decoder's `dynamic_multimask_via_stability` is an
  inference rule and is switched off (`prepare_for_training`);
- the loss (`train.losses.sam2_loss`: focal x20, dice, IoU L1, object BCE) is computed on the
  low-res logits bilinearly upsampled to the ground truth's side (SAM2 supervises at the input
  resolution; `--mask-size` style reductions only change the data config's `mask_size`);
- with `distill > 0` the FP teacher runs in the same step and adds an MSE on the selected mask
  logits.

Optimizer: AdamW in three groups — `decay` (kernels and other >= 2-D weights), `no_decay`
(biases, norm scales, 1-D tensors) at `lr`, and `clip` (every `ClipFactor`) at `clip_lr`, both
without weight decay; with `vision_lr` the image encoder's weights form two more groups at that
rate (SAM2 trains its backbone slower; from scratch, a fast backbone inflates the image
embedding until the prompt no longer reaches the mask) — after global-norm clipping, with
linear warmup and cosine decay. Moments are float32 like the parameters; the model's `dtype`
only sets the compute precision.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qsam2_jax import parallel
from qsam2_jax.data import prompts
from qsam2_jax.model.hiera import set_remat
from qsam2_jax.parallel import place, state_shardings
from qsam2_jax.quant.penalty import pact_l2_penalty
from qsam2_jax.quant.qlayers import optimizer_labels
from train import losses
from train.host_memory import CompiledOnce

Batch = Dict[str, jax.Array]
GROUPS = ("decay", "no_decay", "clip")


# ------------------------------------------------------------------------------ forward


def prepare_for_training(model: nnx.Module, remat: bool = False) -> nnx.Module:
  """Training-time switches: the stability-based mask fallback is an inference rule; `remat`
  recomputes each image-encoder block in the backward pass (`hiera.set_remat`), which bounds
  the memory of many-frame clip steps at the cost of one more encoder forward."""
  model.sam_mask_decoder.dynamic_multimask_via_stability = False
  set_remat(model, remat)
  return model


def predict(model: nnx.Module, batch: Batch) -> Dict[str, jax.Array]:
  """All four mask tokens for each of the K prompts of each image.

  Returns masks (B*K, 4, h, w) low-res logits (token 0: single-mask output, 1..3: multimask),
  iou (B*K, 4), obj (B*K, 1) and `multi` (B*K,) bool: the prompt is one click, so SAM2 would
  ask for three masks.
  """
  b, k = batch["valid"].shape
  embed, high_res = model.image_features(batch["image"])
  coords, labels = prompts.to_point_prompts(batch["point_coords"], batch["point_labels"],
                                            batch["boxes"], batch["use_box"])
  coords = coords.reshape((b * k,) + coords.shape[2:])
  labels = labels.reshape(b * k, -1)

  def rep(x):  # (B, ...) -> (B*K, ...), image-major like the prompts
    return jnp.repeat(x, k, axis=0)

  pe = model.sam_prompt_encoder
  sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
  # Unused slots are masked out of the decoder; the prompt encoder's own pad token stays, so
  # a box is decoded as SAM2 decodes [TL, BR, pad] and clicks as [c1, ..., pad].
  used = labels != prompts.PAD_LABEL
  valid = jnp.concatenate([used, jnp.ones((b * k, sparse.shape[1] - used.shape[1]), bool)], 1)
  masks, iou, _, obj = model.sam_mask_decoder.predict_masks(
      rep(embed), pe.get_dense_pe(), sparse, dense, repeat_image=False,
      high_res_features=[rep(h) for h in high_res], prompt_valid=valid)
  multi = jnp.sum(labels != prompts.PAD_LABEL, axis=-1) == 1
  return {"masks": masks, "iou": iou, "obj": obj, "multi": multi}


def _to_gt(masks: jax.Array, size: int) -> jax.Array:
  return masks.astype(jnp.float32) if masks.shape[-1] == size else losses.upsample_masks(
      masks, size)


def loss_fn(model: nnx.Module, batch: Batch, loss_cfg: losses.LossConfig,
            teacher: Optional[nnx.Module] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SAM2's loss over every valid mask of the (global) batch; see the module docstring."""
  pred = predict(model, batch)
  n = pred["masks"].shape[0]
  gt = batch["gt_masks"].reshape((n,) + batch["gt_masks"].shape[2:])
  size = gt.shape[-1]
  masks = _to_gt(pred["masks"], size)
  valid = batch["valid"].reshape(n)
  num = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  t_masks = None
  if teacher is not None and loss_cfg.weight_distill > 0:
    t_masks = jax.lax.stop_gradient(_to_gt(predict(teacher, batch)["masks"], size))
  total, terms = 0.0, {}
  for sel, group in ((slice(1, 4), valid & pred["multi"]), (slice(0, 1), valid & ~pred["multi"])):
    part, t = losses.sam2_loss(masks[:, sel], pred["iou"][:, sel], pred["obj"], gt, group, num,
                               teacher_masks=None if t_masks is None else t_masks[:, sel],
                               config=loss_cfg)
    total = total + part
    for key, v in t.items():
      if key != "num_objects":
        terms[key] = terms.get(key, 0.0) + v
  terms["num_objects"] = num
  # PACT's L2 penalty on its clips, a term of the loss (zero without PACT quantizers).
  terms["pact_l2"] = pact_l2_penalty(model)
  return total + terms["pact_l2"], terms


def mask_ious(model: nnx.Module, batch: Batch) -> Tuple[jax.Array, jax.Array]:
  """IoU of the predicted mask against the GT per prompt, and `valid` (both (B*K,)).

  The predicted mask is the single-mask output, or for one-click prompts the multimask output
  with the highest predicted IoU (SAM's choice for ambiguous prompts), upsampled to the GT side.
  """
  pred = predict(model, batch)
  n = pred["masks"].shape[0]
  gt = batch["gt_masks"].reshape((n,) + batch["gt_masks"].shape[2:])
  best = 1 + jnp.argmax(pred["iou"][:, 1:], axis=-1)
  pick = jnp.where(pred["multi"], best, 0)
  chosen = jnp.take_along_axis(pred["masks"], pick[:, None, None, None], axis=1)
  iou = losses.actual_iou(_to_gt(chosen, gt.shape[-1])[:, 0], gt)
  return iou, batch["valid"].reshape(n)


# ------------------------------------------------------------------------------ optimizer


def param_labels(model: nnx.Module, vision: bool = False) -> nnx.State:
  """`decay` / `no_decay` / `clip` for every Param of `model` (the `optax.partition` labels):
  the library's `optimizer_labels` marks the clip factors, the rest split by shape. With
  `vision`, the image encoder's weights get `vision_decay` / `vision_no_decay` (SAM2's separate
  `vision_lr`)."""
  def label(path, v, base):
    if base == "clip":
      return base
    key = parallel.path_str(path)
    kind = ("no_decay" if key.rsplit("/", 1)[-1] in ("bias", "scale") or len(v.shape) <= 1
            else "decay")
    return f"vision_{kind}" if vision and key.startswith("image_encoder/") else kind
  return jax.tree_util.tree_map_with_path(label, nnx.state(model, nnx.Param),
                                          optimizer_labels(model, default="decay"),
                                          is_leaf=lambda v: isinstance(v, nnx.Variable))


def lr_schedule(peak: float, steps: int, warmup: int, final: float = 0.0) -> optax.Schedule:
  """Linear warmup to `peak` over `warmup` steps (the first step already gets
  peak / (warmup + 1), never zero), then cosine decay towards `final` at step `steps`."""
  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = peak * (t + 1.0) / (warmup + 1.0)
    frac = jnp.clip((t - warmup) / max(1, steps - warmup), 0.0, 1.0)
    cos = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(t < warmup, warm, cos)
  return schedule


def make_tx(model: nnx.Module, *, lr: float, clip_lr: float, weight_decay: float, steps: int,
            warmup: int, grad_clip: float, vision_lr: Optional[float] = None
            ) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per group (module docstring); `vision_lr` (None: `lr`)
  is the image encoder's peak rate, as SAM2's recipe sets one for the vision backbone."""
  def adamw(peak, wd):
    return optax.adamw(lr_schedule(peak, steps, warmup), b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=wd)
  groups = {"decay": adamw(lr, weight_decay), "no_decay": adamw(lr, 0.0),
            "clip": adamw(clip_lr, 0.0)}
  vision = vision_lr is not None
  if vision:
    groups.update(vision_decay=adamw(vision_lr, weight_decay),
                  vision_no_decay=adamw(vision_lr, 0.0))
  parts = [optax.partition(groups, param_labels(model, vision))]
  if grad_clip > 0:
    parts.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*parts)


def make_optimizer(model: nnx.Module, **tx_kwargs: Any) -> nnx.Optimizer:
  return nnx.Optimizer(model, make_tx(model, **tx_kwargs), wrt=nnx.Param)


# ------------------------------------------------------------------------------ jitted steps


class Steps:
  """The jitted train and eval steps of one model structure on one mesh.

  Args:
    model: the (quantized) model in training mode; its structure and static attributes are
      captured, not its values.
    optimizer: its `nnx.Optimizer`.
    mesh: the device mesh; the batch is split over (`data`, `fsdp`).
    loss_cfg: loss weights (`weight_distill` > 0 needs `teacher`).
    teacher: the FP model for distillation (its state is an input of the train step).
  """

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh,
               loss_cfg: losses.LossConfig, teacher: Optional[nnx.Module] = None,
               schedule: Optional[Callable] = None):
    from qsam2_jax.quant import set_mode
    self.mesh = mesh
    self.model_gd, model_state = nnx.split(model)
    self.opt_gd, opt_state = nnx.split(optimizer)
    set_mode(model, "eval")  # evaluation: frozen statistics, a second static graph
    self.eval_gd = nnx.graphdef(model)
    set_mode(model, "train")
    self.model_sh = state_shardings(model_state, mesh)
    self.opt_sh = state_shardings(opt_state, mesh)
    self.batch_sh = parallel.batch_sharding(mesh)
    repl = parallel.replicated(mesh)
    self.teacher_gd = self.teacher_sh = None
    use_teacher = teacher is not None and loss_cfg.weight_distill > 0
    if use_teacher:
      self.teacher_gd, t_state = nnx.split(teacher)
      self.teacher_sh = state_shardings(t_state, mesh)
    self.schedule = schedule

    def train_step(model_state, opt_state, batch, teacher_state=None):
      model = nnx.merge(self.model_gd, model_state)
      opt = nnx.merge(self.opt_gd, opt_state)
      teacher = nnx.merge(self.teacher_gd, teacher_state) if use_teacher else None
      grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch, loss_cfg, teacher), has_aux=True)
      (loss, terms), grads = grad_fn(model)
      metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
      if self.schedule is not None:
        metrics["lr"] = self.schedule(opt.step[...])
      opt.update(model, grads)
      return nnx.state(model), nnx.state(opt), metrics

    def eval_step(model_state, batch):
      model = nnx.merge(self.eval_gd, model_state)
      iou, valid = mask_ious(model, batch)
      v = valid.astype(jnp.float32)
      return {"iou_sum": jnp.sum(iou * v), "count": jnp.sum(v)}

    in_sh = (self.model_sh, self.opt_sh, self.batch_sh)
    if use_teacher:
      in_sh = in_sh + (self.teacher_sh,)
    self._train = jax.jit(train_step, in_shardings=in_sh,
                          out_shardings=(self.model_sh, self.opt_sh, repl),
                          donate_argnums=(0, 1))
    self._train_once = CompiledOnce(self._train)
    self._eval = jax.jit(eval_step, in_shardings=(self.model_sh, self.batch_sh),
                         out_shardings=repl)

  def place_state(self, model: nnx.Module, optimizer: nnx.Optimizer) -> Tuple[Any, Any]:
    """The model and optimizer state as global arrays on the mesh."""
    return (place(nnx.state(model), self.model_sh), place(nnx.state(optimizer), self.opt_sh))

  def place_teacher(self, teacher: nnx.Module) -> Any:
    return place(nnx.state(teacher), self.teacher_sh)

  def batch(self, local: Dict[str, Any]) -> Batch:
    """This process's rows -> the global batch (`parallel.global_batch`)."""
    return parallel.global_batch(local, self.mesh)

  def train(self, model_state, opt_state, batch: Batch, teacher_state=None):
    """One step: (new model state, new optimizer state, metrics). Donates both states."""
    args = (model_state, opt_state, batch)
    if self.teacher_gd is not None:
      args = args + (teacher_state,)
    with jax.set_mesh(self.mesh):
      return self._train_once(*args)

  def compile_train(self, model_state, opt_state, batch: Batch):
    """The train step compiled ahead of time for these shapes (benchmarks: compile time and
    `cost_analysis()` apart from the step). Called like `train` without a teacher."""
    with jax.set_mesh(self.mesh):
      return self._train.lower(model_state, opt_state, batch).compile()

  def evaluate(self, model_state, batch: Batch) -> Dict[str, jax.Array]:
    with jax.set_mesh(self.mesh):
      return self._eval(model_state, batch)

  def merge(self, model_state) -> nnx.Module:
    """A model object over `model_state` (training mode)."""
    return nnx.merge(self.model_gd, model_state)

"""SAM2's mask decoder (`sam2.modeling.sam.mask_decoder.MaskDecoder`), channels last.

Configured as `SAM2Base` builds it for SAM 2 / 2.1 (high-res skips, object-score MLP head,
sigmoid IoU head, multimask token for the object pointer) and, like
`build_sam2(apply_postprocessing=True)`, with the single-mask stability fallback on.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.transformer import TwoWayTransformer


def stability_scores(mask_logits: jax.Array, delta: float) -> jax.Array:
  """IoU of the masks thresholded at +delta and -delta; 1 where the looser mask is empty.

  Args:
    mask_logits: (..., H, W).

  Returns:
    (...) float32.
  """
  x = mask_logits.astype(jnp.float32)
  area_i = jnp.sum(x > delta, axis=(-2, -1)).astype(jnp.float32)
  area_u = jnp.sum(x > -delta, axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)


class MaskDecoder(nnx.Module):
  """Predicts mask logits, IoU scores, SAM output tokens and object-score logits."""

  def __init__(self, cfg: SAM2Config, *, num_multimask_outputs: int = 3,
               use_high_res_features: bool = True, pred_obj_scores: bool = True,
               pred_obj_scores_mlp: bool = True, iou_prediction_use_sigmoid: bool = True,
               use_multimask_token_for_obj_ptr: bool = True,
               dynamic_multimask_via_stability: Optional[bool] = None,
               dynamic_multimask_stability_delta: Optional[float] = None,
               dynamic_multimask_stability_thresh: Optional[float] = None,
               dtype: layers.Dtype = None, rngs: nnx.Rngs):
    """Builds the decoder.

    The stability options default to the config's values (those of
    `build_sam2(apply_postprocessing=True)`). The fallback is an eval-time rule: training code
    should set `dynamic_multimask_via_stability = False`, which is what torch's `training` mode does.
    """
    d = cfg.d_model
    self.transformer_dim = d
    self.num_multimask_outputs = num_multimask_outputs
    self.num_mask_tokens = num_multimask_outputs + 1
    self.use_high_res_features = use_high_res_features
    self.pred_obj_scores = pred_obj_scores
    self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
    self.dynamic_multimask_via_stability = (
        cfg.dynamic_multimask_via_stability if dynamic_multimask_via_stability is None
        else dynamic_multimask_via_stability)
    self.dynamic_multimask_stability_delta = (
        cfg.dynamic_multimask_stability_delta if dynamic_multimask_stability_delta is None
        else dynamic_multimask_stability_delta)
    self.dynamic_multimask_stability_thresh = (
        cfg.dynamic_multimask_stability_thresh if dynamic_multimask_stability_thresh is None
        else dynamic_multimask_stability_thresh)
    self.dtype = dtype
    self.hyper_in_quant = layers.QuantSlot()
    self.upscaled_quant = layers.QuantSlot()

    self.transformer = TwoWayTransformer(2, d, 8, 2048, dtype=dtype, rngs=rngs)
    self.iou_token = layers.Embedding(1, d, rngs=rngs)
    self.mask_tokens = layers.Embedding(self.num_mask_tokens, d, rngs=rngs)
    if pred_obj_scores:
      self.obj_score_token = layers.Embedding(1, d, rngs=rngs)
    self.output_upscaling = layers.Sequential([
        layers.ConvTranspose2x2(d, d // 4, dtype=dtype, rngs=rngs),
        layers.LayerNorm(d // 4, eps=1e-6),
        layers.Activation(layers.gelu),
        layers.ConvTranspose2x2(d // 4, d // 8, dtype=dtype, rngs=rngs),
        layers.Activation(layers.gelu),
    ])
    if use_high_res_features:
      self.conv_s0 = layers.Conv(d, d // 8, 1, dtype=dtype, rngs=rngs)
      self.conv_s1 = layers.Conv(d, d // 4, 1, dtype=dtype, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List([
        layers.MLP(d, d, d // 8, 3, dtype=dtype, rngs=rngs) for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = layers.MLP(
        d, 256, self.num_mask_tokens, 3, sigmoid_output=iou_prediction_use_sigmoid, dtype=dtype,
        rngs=rngs)
    if pred_obj_scores:
      if pred_obj_scores_mlp:
        self.pred_obj_score_head = layers.MLP(d, d, 1, 3, dtype=dtype, rngs=rngs)
      else:
        self.pred_obj_score_head = layers.Linear(d, 1, dtype=dtype, rngs=rngs)

  def predict_masks(self, image_embeddings: jax.Array, image_pe: jax.Array,
                    sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
                    repeat_image: bool,
                    high_res_features: Optional[Sequence[jax.Array]] = None,
                    prompt_valid: Optional[jax.Array] = None,
                    ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """All mask-token outputs: (masks (B,4,4h,4w), iou (B,4), tokens (B,4,C), obj (B,1)).

    `prompt_valid` (B, N) bool marks padding prompt slots (False) that the transformer must
    ignore, so the outputs equal those of the unpadded prompts.
    """
    token_list = [self.iou_token(), self.mask_tokens()]
    s = 0
    if self.pred_obj_scores:
      token_list.insert(0, self.obj_score_token())
      s = 1
    output_tokens = jnp.concatenate(token_list, axis=0)
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)
    tokens = jnp.concatenate(
        [output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)

    if repeat_image:
      src = jnp.repeat(image_embeddings, b, axis=0)
    else:
      if image_embeddings.shape[0] != b:
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompt sets; "
                         "pass repeat_image=True to share one image")
      src = image_embeddings
    src = src + dense_prompt_embeddings
    if image_pe.shape[0] != 1:
      raise ValueError(f"image_pe must have batch 1 (get_dense_pe()), got {image_pe.shape}")
    _, h, w, c = src.shape

    token_valid = None
    if prompt_valid is not None:
      token_valid = jnp.concatenate(
          [jnp.ones((b, output_tokens.shape[1]), bool), prompt_valid.astype(bool)], axis=1)
    hs, src = self.transformer(src, image_pe, tokens, token_valid)
    iou_token_out = hs[:, s]
    mask_tokens_out = hs[:, s + 1:s + 1 + self.num_mask_tokens]

    src = src.reshape(src.shape[0], h, w, c)
    if not self.use_high_res_features:
      upscaled = self.output_upscaling(src)
    else:
      dc1, ln1, act1, dc2, act2 = self.output_upscaling
      feat_s0, feat_s1 = high_res_features
      upscaled = act1(ln1(dc1(src) + feat_s1))
      upscaled = act2(dc2(upscaled) + feat_s0)

    hyper_in = jnp.stack(
        [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
        axis=1)
    dtype = self.dtype or upscaled.dtype
    # Identity slots on the operands of the hypernetwork x upscaled-embedding product.
    masks = jnp.einsum("bmc,bhwc->bmhw", self.hyper_in_quant(hyper_in.astype(dtype)),
                       self.upscaled_quant(upscaled.astype(dtype)))

    iou_pred = self.iou_prediction_head(iou_token_out)
    if self.pred_obj_scores:
      object_score_logits = self.pred_obj_score_head(hs[:, 0])
    else:
      object_score_logits = jnp.full((iou_pred.shape[0], 1), 10.0, iou_pred.dtype)
    return masks, iou_pred, mask_tokens_out, object_score_logits

  def _dynamic_multimask_via_stability(self, all_mask_logits: jax.Array,
                                       all_iou_scores: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Replaces an unstable single mask (token 0) by the best multimask output by IoU."""
    multi_logits = all_mask_logits[:, 1:]
    multi_iou = all_iou_scores[:, 1:]
    best = jnp.argmax(multi_iou, axis=-1)
    best_logits = jnp.take_along_axis(multi_logits, best[:, None, None, None], axis=1)
    best_iou = jnp.take_along_axis(multi_iou, best[:, None], axis=1)
    single_logits = all_mask_logits[:, 0:1]
    single_iou = all_iou_scores[:, 0:1]
    scores = stability_scores(single_logits, self.dynamic_multimask_stability_delta)
    is_stable = scores >= self.dynamic_multimask_stability_thresh  # (B, 1)
    mask_out = jnp.where(is_stable[..., None, None], single_logits, best_logits)
    iou_out = jnp.where(is_stable, single_iou, best_iou)
    return mask_out, iou_out

  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
               sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
               multimask_output: bool, repeat_image: bool,
               high_res_features: Optional[Sequence[jax.Array]] = None,
               ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Predicts masks for B prompt sets.

    Args:
      image_embeddings: (B_img, h, w, C); B_img = 1 with `repeat_image`, else B.
      image_pe: (1, h, w, C) from `PromptEncoder.get_dense_pe()`.
      sparse_prompt_embeddings: (B, N, C).
      dense_prompt_embeddings: (B, h, w, C).
      multimask_output: static; 3 masks (tokens 1..3) instead of 1.
      repeat_image: static; share one image embedding across the B prompt sets.
      high_res_features: [(B_img, 4h, 4w, C/8), (B_img, 2h, 2w, C/4)], already through
        `conv_s0` / `conv_s1`.

    Returns:
      masks (B, M, 4h, 4w) logits, iou_pred (B, M), sam_tokens_out (B, M', C) and
      object_score_logits (B, 1), with M = 3 or 1 and M' = 3 (multimask) or 1.
    """
    masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
        image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
        repeat_image, high_res_features)
    if multimask_output:
      masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
    elif self.dynamic_multimask_via_stability:
      masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
    else:
      masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
    if multimask_output and self.use_multimask_token_for_obj_ptr:
      sam_tokens_out = mask_tokens_out[:, 1:]
    else:
      sam_tokens_out = mask_tokens_out[:, 0:1]
    return masks, iou_pred, sam_tokens_out, object_score_logits

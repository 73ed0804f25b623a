"""`SAM2Base` in Flax NNX: the whole model and what it does for a single image.

Attribute names equal PyTorch's so that every state-dict key maps 1:1 (see `qsam2_jax.keymap`).
All activations are channels last. The video path (memory conditioning, `track_step`) builds on
the same submodules.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.model.configs import SAM2Config
from qsam2_jax.model.image_encoder import ImageEncoder
from qsam2_jax.model.mask_decoder import MaskDecoder
from qsam2_jax.model.memory_attention import MemoryAttention
from qsam2_jax.model.memory_encoder import MemoryEncoder
from qsam2_jax.model.prompt_encoder import PromptEncoder

# Logit given to every pixel of an object judged absent (`NO_OBJ_SCORE` in sam2).
NO_OBJ_SCORE = -1024.0


class SAM2Base(nnx.Module):
  """SAM2 / SAM2.1 with the submodules and free tensors of `sam2.modeling.sam2_base.SAM2Base`."""

  def __init__(self, cfg: SAM2Config, *, dtype: layers.Dtype = None, rngs: nnx.Rngs):
    self.cfg = cfg
    d, m = cfg.d_model, cfg.mem_dim
    self.image_encoder = ImageEncoder(cfg, dtype=dtype, rngs=rngs)
    self.memory_attention = MemoryAttention(cfg, dtype=dtype, rngs=rngs)
    self.memory_encoder = MemoryEncoder(cfg, dtype=dtype, rngs=rngs)
    self.sam_prompt_encoder = PromptEncoder(cfg, dtype=dtype, rngs=rngs)
    self.sam_mask_decoder = MaskDecoder(cfg, dtype=dtype, rngs=rngs)
    self.obj_ptr_proj = layers.MLP(d, d, d, 3, dtype=dtype, rngs=rngs)
    self.obj_ptr_tpos_proj = (layers.Linear(d, m, dtype=dtype, rngs=rngs)
                              if cfg.proj_tpos_enc_in_obj_ptrs else None)
    self.mask_downsample = layers.Conv(1, 1, 4, stride=4, dtype=dtype, rngs=rngs)
    self.maskmem_tpos_enc = layers.free_param(rngs, (cfg.num_maskmem, 1, 1, m))
    self.no_mem_embed = layers.free_param(rngs, (1, 1, d))
    self.no_mem_pos_enc = layers.free_param(rngs, (1, 1, d))
    self.no_obj_ptr = layers.free_param(rngs, (1, d))
    self.no_obj_embed_spatial = (layers.free_param(rngs, (1, m))
                                 if cfg.no_obj_embed_spatial else None)

  def forward_image(self, images: jax.Array) -> Dict[str, object]:
    """Image encoder plus the decoder's high-res projections (`SAM2Base.forward_image`).

    Args:
      images: (B, S, S, 3) normalized images, S = cfg.image_size.
    """
    out = dict(self.image_encoder(images))
    fpn = list(out["backbone_fpn"])
    fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
    fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
    out["backbone_fpn"] = fpn
    return out

  def image_features(self, images: jax.Array) -> Tuple[jax.Array, List[jax.Array]]:
    """What `SAM2ImagePredictor.set_image` stores: (image_embed, [high_res_s0, high_res_s1]).

    image_embed is the lowest FPN level plus `no_mem_embed` (the image path has no memory).
    """
    out = self.forward_image(images)
    fpn = out["backbone_fpn"]
    embed = fpn[-1] + self.no_mem_embed[...].reshape(1, 1, 1, -1).astype(fpn[-1].dtype)
    return embed, list(fpn[:-1])

  def decode_prompts(
      self,
      image_embed: jax.Array,
      high_res_feats: List[jax.Array],
      point_coords: Optional[jax.Array],
      point_labels: Optional[jax.Array],
      mask_input: Optional[jax.Array] = None,
      *,
      multimask_output: bool,
      repeat_image: bool,
  ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prompt encoder + mask decoder, as `SAM2ImagePredictor._predict` calls them.

    Args:
      image_embed: (B_img, h, w, 256) from `image_features`.
      high_res_feats: [(B_img, 4h, 4w, 32), (B_img, 2h, 2w, 64)].
      point_coords: (B, N, 2) pixel coordinates in the model-input frame (boxes already turned
        into corner points labelled 2 and 3), or None.
      point_labels: (B, N) int labels, or None.
      mask_input: (B, 4h, 4w) low-res mask logits, or None.
      multimask_output: 3 masks instead of 1.
      repeat_image: one image, B prompt sets.

    Returns:
      (low_res_masks (B, M, 4h, 4w), iou_predictions (B, M), sam_tokens (B, M', 256),
       object_score_logits (B, 1)).
    """
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
    return self.sam_mask_decoder(
        image_embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
        multimask_output=multimask_output, repeat_image=repeat_image,
        high_res_features=high_res_feats)


def build_sam2(cfg: SAM2Config, *, dtype: layers.Dtype = None, seed: int = 0) -> SAM2Base:
  """A randomly initialised model (use `qsam2_jax.checkpoint.load_sam2` for trained weights).

  Values are drawn on the host with numpy (kernels ~ N(0, 1/fan_in), biases 0, norm scales 1,
  other tensors ~ N(0, 0.02²)): compiling JAX's random initialisers for the whole model costs
  tens of seconds on a CPU, and every real use starts from a checkpoint anyway.
  """
  model = abstract_sam2(cfg, dtype=dtype)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable) or not isinstance(var.get_value(), jax.ShapeDtypeStruct):
      continue
    shape, leaf = var.get_value().shape, path[-1]
    if leaf == "bias":
      value = np.zeros(shape, np.float32)
    elif leaf == "scale":
      value = np.ones(shape, np.float32)
    elif leaf == "kernel":
      fan_in = int(np.prod(shape[:-1])) if len(shape) != 4 or shape[-1] != 2 else shape[0]
      value = rng.normal(0.0, fan_in ** -0.5, shape).astype(np.float32)
    else:
      value = (0.02 * rng.normal(size=shape)).astype(np.float32)
    var.set_value(jnp.asarray(value))
  return model


class _ShapeOnlyRngs:
  """Stands in for `nnx.Rngs` when only shapes are wanted.

  Under `nnx.eval_shape`, every draw from a real `Rngs` updates its counter with a tracer, and
  flax 0.12 then asks the tracer for its sharding, which builds an error message by walking
  the whole trace: 90 % of an abstract build. A fixed key has no state to update.
  """

  def __getattr__(self, name: str):
    return self

  def __call__(self) -> jax.Array:
    return jax.random.key(0)


def abstract_sam2(cfg: SAM2Config, *, dtype: layers.Dtype = None,
                  transform: Optional[Callable[[SAM2Base], nnx.Module]] = None) -> SAM2Base:
  """The model with shapes only (no memory, no compute): the target to load weights into.

  `transform` (e.g. quantization) is applied to the model inside the same abstract trace.
  """
  transform = transform or (lambda m: m)
  return nnx.eval_shape(lambda: transform(SAM2Base(cfg, dtype=dtype, rngs=_ShapeOnlyRngs())))

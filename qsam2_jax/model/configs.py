"""SAM2 / SAM2.1 architecture configurations: the one source of truth for sizes and flags.

The values mirror the official YAMLs of the `sam2` package (``configs/sam2/*.yaml`` and
``configs/sam2.1/*.yaml``) plus the code defaults those YAMLs rely on. Only the image size is
meant to be changed by users (smaller sizes for CPU tests and demos).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from qsam2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class HieraConfig:
  embed_dim: int
  num_heads: int
  stages: Tuple[int, ...]
  global_att_blocks: Tuple[int, ...]
  window_spec: Tuple[int, ...] = (8, 4, 14, 7)
  window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14)
  q_pool: int = 3
  q_stride: Tuple[int, int] = (2, 2)
  mlp_ratio: float = 4.0

  @property
  def depth(self) -> int:
    return sum(self.stages)

  @property
  def stage_ends(self) -> Tuple[int, ...]:
    ends, total = [], 0
    for n in self.stages:
      total += n
      ends.append(total - 1)
    return tuple(ends)

  @property
  def q_pool_blocks(self) -> Tuple[int, ...]:
    return tuple(e + 1 for e in self.stage_ends[:-1])[: self.q_pool]

  @property
  def stage_dims(self) -> Tuple[int, ...]:
    return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))

  @property
  def backbone_channel_list(self) -> Tuple[int, ...]:
    return tuple(reversed(self.stage_dims))


@dataclasses.dataclass(frozen=True)
class SAM2Config:
  """A SAM2 model. `name` follows the official checkpoint / YAML stem."""

  name: str
  version: str  # "2.0" or "2.1"
  size: str  # "t", "s", "b+", "l"
  hiera: HieraConfig
  image_size: int = 1024
  d_model: int = 256  # neck / SAM hidden size
  mem_dim: int = 64
  num_maskmem: int = 7
  max_obj_ptrs_in_encoder: int = 16
  # FPN neck.
  fpn_top_down_levels: Tuple[int, ...] = (2, 3)
  scalp: int = 1
  # SAM heads.
  sigmoid_scale_for_mem_enc: float = 20.0
  sigmoid_bias_for_mem_enc: float = -10.0
  multimask_min_pt_num: int = 0
  multimask_max_pt_num: int = 1
  dynamic_multimask_via_stability: bool = True  # set by build_sam2(apply_postprocessing=True)
  dynamic_multimask_stability_delta: float = 0.05
  dynamic_multimask_stability_thresh: float = 0.98
  # Memory-attention RoPE.
  rope_theta: float = 10000.0
  # Version differences (SAM2.1 = True for all three).
  no_obj_embed_spatial: bool = True
  proj_tpos_enc_in_obj_ptrs: bool = True
  use_signed_tpos_enc_to_obj_ptrs: bool = True
  add_tpos_enc_to_obj_ptrs: bool = True

  @property
  def backbone_stride(self) -> int:
    return 16

  @property
  def image_embedding_size(self) -> int:
    """Side of the lowest kept FPN level (64 at 1024²)."""
    return self.image_size // self.backbone_stride

  @property
  def low_res_mask_size(self) -> int:
    """Side of the decoder's mask logits (256 at 1024²)."""
    return self.image_embedding_size * 4

  @property
  def torch_yaml(self) -> str:
    """The `sam2` package's config name, for `sam2.build_sam.build_sam2`."""
    folder = "sam2.1" if self.version == "2.1" else "sam2"
    return f"configs/{folder}/{self.name}.yaml"

  def replace(self, **changes) -> "SAM2Config":
    return dataclasses.replace(self, **changes)


_HIERA = {
    "t": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)),
    "s": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)),
    "b+": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "l": HieraConfig(
        144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8),
        window_pos_embed_bkg_spatial_size=(7, 7)),
}
_LONG = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
SIZES = tuple(_HIERA)
VERSIONS = ("2.0", "2.1")


def _make(version: str, size: str) -> SAM2Config:
  if version == "2.1":
    return SAM2Config(name=f"sam2.1_hiera_{size}", version=version, size=size, hiera=_HIERA[size])
  return SAM2Config(
      name=f"sam2_hiera_{size}", version=version, size=size, hiera=_HIERA[size],
      no_obj_embed_spatial=False, proj_tpos_enc_in_obj_ptrs=False,
      use_signed_tpos_enc_to_obj_ptrs=False, add_tpos_enc_to_obj_ptrs=False)


CONFIGS = {c.name: c for c in (_make(v, s) for v in VERSIONS for s in SIZES)}

# Aliases users type: official checkpoint stems ("sam2.1_hiera_base_plus") and short forms.
_ALIASES = {}
for _c in CONFIGS.values():
  _long = _c.name.replace(f"hiera_{_c.size}", f"hiera_{_LONG[_c.size]}")
  _ALIASES[_long] = _c.name
  _ALIASES[f"{_c.version}-{_c.size}"] = _c.name


def get_config(name: str, image_size: int | None = None) -> SAM2Config:
  """Looks up a config by name ("sam2.1_hiera_t", "sam2.1_hiera_tiny", "2.1-t", ...)."""
  key = name.removesuffix(".yaml").removesuffix(".pt").split("/")[-1]
  key = _ALIASES.get(key, key)
  if key not in CONFIGS:
    known = ", ".join(sorted(CONFIGS))
    raise UserError(f"unknown SAM2 config {name!r}; expected one of: {known}")
  cfg = CONFIGS[key]
  if image_size is not None:
    if image_size % 32 or image_size < 64:
      raise UserError(f"image_size must be a multiple of 32 and >= 64, got {image_size}")
    cfg = cfg.replace(image_size=image_size)
  return cfg

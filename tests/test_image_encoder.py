"""Image encoder (Hiera trunk + FPN neck) parity with the PyTorch `sam2` package.

Inputs are random normalised images; torch runs NCHW, JAX NHWC, converted at this boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.model.configs import HieraConfig, get_config
from qsam2_jax.model.hiera import Hiera, block_specs
from qsam2_jax.model.image_encoder import ImageEncoder
from torch_reference import build_torch_sam2, rel_err, to_numpy

PREFIX = "image_encoder."
BOUND = 1e-4


@jax.jit
def _forward(enc: ImageEncoder, x: jax.Array):
  return enc.trunk(x), enc(x)


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return to_numpy(t).transpose(0, 2, 3, 1)


def _state_dict(model: torch.nn.Module) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _encoder(cfg, sd: dict, dtype=None) -> ImageEncoder:
  # Abstract construction: eager random init would compile one small program per parameter
  # shape, only for the values to be overwritten by the load.
  enc = nnx.eval_shape(lambda: ImageEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  keymap.load_state_dict(enc, sd, "torch reference", prefix=PREFIX)
  return enc


@torch.no_grad()
def _torch_forward(torch_model, x: np.ndarray):
  """(trunk stages, encoder output dict), all NHWC numpy, from one `image_encoder(x)` call."""
  captured = {}
  enc = torch_model.image_encoder
  hook = enc.trunk.register_forward_hook(lambda m, i, o: captured.setdefault("stages", o))
  try:
    out = enc(torch.from_numpy(x))
  finally:
    hook.remove()
  out = {"vision_features": _nhwc(out["vision_features"]),
         "backbone_fpn": [_nhwc(t) for t in out["backbone_fpn"]],
         "vision_pos_enc": [_nhwc(t) for t in out["vision_pos_enc"]]}
  return [_nhwc(t) for t in captured["stages"]], out


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _check_parity(got, want, bound: float = BOUND) -> None:
  (stages, out), (want_stages, want_out) = got, want
  pairs = [(f"stage{i}", a, b) for i, (a, b) in enumerate(zip(stages, want_stages))]
  for key in ("backbone_fpn", "vision_pos_enc"):
    assert len(out[key]) == len(want_out[key]) == 3
    pairs += [(f"{key}[{i}]", a, b) for i, (a, b) in enumerate(zip(out[key], want_out[key]))]
  pairs.append(("vision_features", out["vision_features"], want_out["vision_features"]))
  assert len(stages) == len(want_stages) == 4
  for name, a, b in pairs:
    assert a.shape == b.shape, (name, a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= bound, f"{name}: rel err {err:.2e} > {bound:.0e}"


@pytest.fixture(scope="module")
def t256(torch_t256):
  cfg, torch_model = torch_t256
  sd = _state_dict(torch_model)
  x = _images(2, cfg.image_size)
  enc = _encoder(cfg, sd)
  got = _forward(enc, jnp.asarray(x.transpose(0, 2, 3, 1)))
  return dict(cfg=cfg, torch_model=torch_model, sd=sd, x=x, enc=enc, got=got,
              want=_torch_forward(torch_model, x))


def test_keys_bijection_and_param_count(t256):
  want = {k[len(PREFIX):]: v.shape for k, v in t256["sd"].items() if k.startswith(PREFIX)}
  assert keymap.torch_keys(t256["enc"]) == want
  assert len(want) == 12 * t256["cfg"].hiera.depth + 18
  n_ours = sum(p.size for p in jax.tree.leaves(nnx.state(t256["enc"], nnx.Param)))
  n_torch = sum(p.numel() for p in t256["torch_model"].image_encoder.parameters())
  assert n_ours == n_torch == 27_219_136


def test_block_specs_match_torch(t256):
  blocks = t256["torch_model"].image_encoder.trunk.blocks
  specs = block_specs(t256["cfg"].hiera)
  assert len(specs) == len(blocks)
  for spec, blk in zip(specs, blocks):
    assert (spec["dim"], spec["dim_out"], spec["num_heads"], spec["window_size"]) == (
        blk.dim, blk.dim_out, blk.attn.num_heads, blk.window_size)
    assert spec["q_stride"] == (tuple(blk.q_stride) if blk.q_stride else None)


def test_parity_t256(t256):
  _check_parity(t256["got"], t256["want"])
  stages, out = t256["got"]
  s = t256["cfg"].image_size
  assert [a.shape[1:] for a in stages] == [(s // 4, s // 4, 96), (s // 8, s // 8, 192),
                                           (s // 16, s // 16, 384), (s // 32, s // 32, 768)]
  assert [a.shape[1:] for a in out["backbone_fpn"]] == [
      (s // 4, s // 4, 256), (s // 8, s // 8, 256), (s // 16, s // 16, 256)]


def test_bf16_close_to_fp32(t256):
  enc = _encoder(t256["cfg"], t256["sd"], dtype=jnp.bfloat16)
  stages, out = _forward(enc, jnp.asarray(t256["x"].transpose(0, 2, 3, 1)))
  ref_stages, ref_out = t256["got"]
  assert all(a.dtype == jnp.bfloat16 for a in stages)
  # Like torch autocast: lateral-only levels in the compute dtype, the top-down level in fp32.
  assert [a.dtype for a in out["backbone_fpn"]] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
  for a, b in zip(list(stages) + out["backbone_fpn"], list(ref_stages) + ref_out["backbone_fpn"]):
    assert rel_err(np.asarray(a, np.float32), b) <= 3e-2


def test_rejects_bad_image_size():
  with pytest.raises(ValueError, match="multiple of the first window"):
    Hiera(get_config("sam2.1_hiera_t").hiera, 200, rngs=nnx.Rngs(0))


# Small trunks exercising what the released sizes do not at 256²: a non-square 9×5 background
# table, a stage-change block without q-pooling (q_pool=2), zero padding on pooling blocks, a
# global block, and padded windows in the last stage.
MINI = [
    (HieraConfig(16, 1, (1, 2, 3, 2), (4,), window_spec=(8, 4, 6, 3),
                 window_pos_embed_bkg_spatial_size=(14, 14)), 160),
    (HieraConfig(16, 2, (2, 1, 2, 2), (4,), window_spec=(8, 4, 6, 4), q_pool=2,
                 window_pos_embed_bkg_spatial_size=(9, 5)), 128),
]


@torch.no_grad()
def _torch_hiera(cfg: HieraConfig, seed: int = 0):
  from sam2.modeling.backbones.hieradet import Hiera as TorchHiera
  torch.manual_seed(seed)
  model = TorchHiera(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, stages=cfg.stages,
                     global_att_blocks=cfg.global_att_blocks, window_spec=cfg.window_spec,
                     window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size,
                     q_pool=cfg.q_pool, q_stride=cfg.q_stride)
  for name, p in model.named_parameters():  # zeros / ones at init would hide bugs
    base = 1.0 if name.endswith("weight") and "norm" in name else 0.0
    if bool((p == p.flatten()[0]).all()):
      p.copy_(base + 0.2 * torch.randn(p.shape))
  return model.eval()


@pytest.mark.parametrize("cfg,size", MINI, ids=["pad_global", "no_qpool_nonsquare_pos"])
def test_mini_hiera_parity(cfg, size):
  torch_model = _torch_hiera(cfg)
  ours = nnx.eval_shape(lambda: Hiera(cfg, size, rngs=nnx.Rngs(0)))
  keymap.load_state_dict(ours, _state_dict(torch_model), "torch Hiera")
  x = _images(2, size, seed=1)
  with torch.no_grad():
    want = [_nhwc(t) for t in torch_model(torch.from_numpy(x))]
  got = jax.jit(lambda m, v: m(v))(ours, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(got) == len(want) == 4
  for a, b in zip(got, want):
    assert a.shape == b.shape
    assert rel_err(a, b) <= BOUND


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [
    ("sam2.1_hiera_s", 256), ("sam2.1_hiera_b+", 256), ("sam2.1_hiera_l", 256),
    ("sam2.1_hiera_t", 512), ("sam2.1_hiera_t", 1024)])
def test_parity_slow(name, size):
  cfg = get_config(name, image_size=size)
  torch_model = build_torch_sam2(cfg, seed=0)
  sd = _state_dict(torch_model)
  enc = _encoder(cfg, sd)
  want_keys = {k[len(PREFIX):]: v.shape for k, v in sd.items() if k.startswith(PREFIX)}
  assert keymap.torch_keys(enc) == want_keys
  x = _images(1, size, seed=2)
  _check_parity(_forward(enc, jnp.asarray(x.transpose(0, 2, 3, 1))),
                _torch_forward(torch_model, x))

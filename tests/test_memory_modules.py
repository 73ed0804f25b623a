"""Parity of the video memory modules (RoPE, memory attention, memory encoder) with `sam2`.

Reference: the randomized SAM2.1-t PyTorch model at 256² (HW = 16×16 = 256 tokens per frame).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.model.memory_attention import MemoryAttention
from qsam2_jax.model.memory_encoder import MemoryEncoder
from qsam2_jax.model.rope import apply_rope, axial_rope_tables, grid_rope_tables
from torch_reference import rel_err, to_numpy

TOL = 1e-4
MA_PREFIX = "memory_attention."
ME_PREFIX = "memory_encoder."


def _state_dict(torch_model):
  return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def _torch_keys(torch_model, prefix):
  return {k[len(prefix):]: tuple(v.shape) for k, v in torch_model.state_dict().items()
          if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ref(torch_t256):
  cfg, model = torch_t256
  return cfg, model, _state_dict(model)


def _build(cls, cfg, sd, prefix, dtype=None):
  module = cls(cfg, dtype=dtype, rngs=nnx.Rngs(0))
  keymap.load_state_dict(module, sd, prefix=prefix)
  return module


@functools.partial(jax.jit, static_argnames=("num_obj_ptr_tokens",))
def _run_attention(module, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, valid=None):
  return module(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, valid)


@functools.partial(jax.jit, static_argnames=("skip_mask_sigmoid",))
def _run_encoder(module, pix_feat, masks, skip_mask_sigmoid):
  return module(pix_feat, masks, skip_mask_sigmoid)


# --------------------------------------------------------------------------------------------
# RoPE.


@pytest.mark.parametrize("side", [16, 32, 64])
def test_rope_tables_match_compute_axial_cis(side):
  from sam2.modeling.position_encoding import compute_axial_cis
  cis = compute_axial_cis(dim=256, end_x=side, end_y=side, theta=10000.0)
  cos, sin = axial_rope_tables(side, side, 256, 10000.0)
  assert cos.shape == sin.shape == (side * side, 128)
  np.testing.assert_allclose(cos, cis.real.numpy(), rtol=0, atol=2e-6)
  np.testing.assert_allclose(sin, cis.imag.numpy(), rtol=0, atol=2e-6)
  assert grid_rope_tables(side * side, 256)[0] is cos  # cached, same table


@pytest.mark.parametrize("num_exclude", [0, 5])
def test_apply_rope_matches_apply_rotary_enc(num_exclude):
  """Queries on a 16×16 grid; keys = 3 frames tiled (repeat_freqs_k) + unrotated pointers."""
  from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis
  side, heads, dim, frames = 16, 2, 64, 3
  n = side * side
  gen = torch.Generator().manual_seed(0)
  q = torch.randn(2, heads, n, dim, generator=gen)  # torch layout (B, heads, N, hd)
  k = torch.randn(2, heads, frames * n + num_exclude, dim, generator=gen)
  n_rot = frames * n
  q_t, k_rot = apply_rotary_enc(q, k[:, :, :n_rot],
                                freqs_cis=compute_axial_cis(dim, side, side), repeat_freqs_k=True)
  k_t = torch.cat([k_rot, k[:, :, n_rot:]], dim=2)

  cos, sin = grid_rope_tables(n, dim)
  to_ours = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 1, 3))  # (B, N, heads, hd)
  q_j = apply_rope(to_ours(q), cos, sin)
  k_j = apply_rope(to_ours(k), cos, sin, num_exclude=num_exclude)
  assert rel_err(np.asarray(q_j).transpose(0, 2, 1, 3), q_t.numpy()) < 1e-6
  assert rel_err(np.asarray(k_j).transpose(0, 2, 1, 3), k_t.numpy()) < 1e-6
  if num_exclude:  # pointer tokens pass through bit for bit
    np.testing.assert_array_equal(np.asarray(k_j)[:, n_rot:],
                                  np.asarray(to_ours(k))[:, n_rot:])


def test_apply_rope_rejects_partial_frames():
  cos, sin = grid_rope_tables(16, 8)
  with pytest.raises(ValueError, match="whole number"):
    apply_rope(jnp.zeros((1, 40, 1, 8)), cos, sin, num_exclude=4)  # 36 is not 16·k
  with pytest.raises(ValueError, match="square"):
    grid_rope_tables(20, 8)


# --------------------------------------------------------------------------------------------
# Key bijection.


@pytest.mark.parametrize("cls,prefix,count", [(MemoryAttention, MA_PREFIX, 106),
                                              (MemoryEncoder, ME_PREFIX, 40)])
def test_key_bijection(ref, cls, prefix, count):
  cfg, model, _ = ref
  ours = keymap.torch_keys(cls(cfg, rngs=nnx.Rngs(0)))
  theirs = _torch_keys(model, prefix)
  assert len(theirs) == count
  assert ours == theirs


def test_state_dict_round_trip(ref):
  cfg, _, sd = ref
  for cls, prefix in [(MemoryAttention, MA_PREFIX), (MemoryEncoder, ME_PREFIX)]:
    module = _build(cls, cfg, sd, prefix)
    back = keymap.state_dict(module, prefix=prefix)
    for k, v in back.items():
      np.testing.assert_array_equal(v, sd[k], err_msg=k)


# --------------------------------------------------------------------------------------------
# Memory encoder.


def _encoder_inputs(cfg, seed=0, batch=2):
  gen = torch.Generator().manual_seed(seed)
  h = cfg.image_embedding_size
  pix = torch.randn(batch, cfg.d_model, h, h, generator=gen)
  logits = 4.0 * torch.randn(batch, 1, cfg.image_size, cfg.image_size, generator=gen)
  return pix, logits


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_matches_torch(ref, skip_mask_sigmoid):
  cfg, model, sd = ref
  pix, logits = _encoder_inputs(cfg)
  # SAM2Base maps the mask itself (sigmoid·20 − 10) and skips the encoder's sigmoid.
  masks = torch.sigmoid(logits) * 20.0 - 10.0 if skip_mask_sigmoid else logits
  with torch.no_grad():
    out_t = model.memory_encoder(pix, masks, skip_mask_sigmoid=skip_mask_sigmoid)

  enc = _build(MemoryEncoder, cfg, sd, ME_PREFIX)
  out = _run_encoder(enc, jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                     jnp.asarray(masks.numpy()[:, 0]), skip_mask_sigmoid)
  feat = np.asarray(out["vision_features"]).transpose(0, 3, 1, 2)
  pos = np.asarray(out["vision_pos_enc"][0]).transpose(0, 3, 1, 2)
  assert feat.shape == (2, cfg.mem_dim, cfg.image_embedding_size, cfg.image_embedding_size)
  assert rel_err(feat, to_numpy(out_t["vision_features"])) < TOL
  assert rel_err(pos, to_numpy(out_t["vision_pos_enc"][0])) < 1e-6


# --------------------------------------------------------------------------------------------
# Memory attention.


def _attention_inputs(cfg, num_frames, num_ptr, seed=0, batch=2):
  """Sequence-first torch inputs: curr/curr_pos (HW, B, 256), memory/pos (L, B, 64)."""
  gen = torch.Generator().manual_seed(seed)
  hw = cfg.image_embedding_size**2
  length = num_frames * hw + num_ptr
  curr = torch.randn(hw, batch, cfg.d_model, generator=gen)
  curr_pos = torch.randn(hw, batch, cfg.d_model, generator=gen)
  memory = torch.randn(length, batch, cfg.mem_dim, generator=gen)
  memory_pos = torch.randn(length, batch, cfg.mem_dim, generator=gen)
  return curr, curr_pos, memory, memory_pos


def _torch_attention(model, curr, curr_pos, memory, memory_pos, num_ptr):
  with torch.no_grad():
    out = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory,
                                 memory_pos=memory_pos, num_obj_ptr_tokens=num_ptr)
  return to_numpy(out).transpose(1, 0, 2)  # -> (B, HW, 256)


def _bf(t):
  """Sequence-first torch tensor -> batch-first jax array."""
  return jnp.asarray(t.numpy().transpose(1, 0, 2))


@pytest.fixture(scope="module")
def attention_fp32(ref):
  cfg, _, sd = ref
  return _build(MemoryAttention, cfg, sd, MA_PREFIX)


@pytest.mark.parametrize("num_ptr", [0, 4, 8])
def test_memory_attention_matches_torch(ref, attention_fp32, num_ptr):
  """1 conditioning frame + 2 previous frames (3·256 spatial keys) + num_ptr pointer tokens."""
  cfg, model, _ = ref
  inputs = _attention_inputs(cfg, 3, num_ptr)
  want = _torch_attention(model, *inputs, num_ptr)
  got = _run_attention(attention_fp32, *map(_bf, inputs), num_obj_ptr_tokens=num_ptr)
  assert got.shape == want.shape == (2, cfg.image_embedding_size**2, cfg.d_model)
  assert rel_err(got, want) < TOL


class _PlainIdentity(nnx.Module):
  """An identity that is not a `QuantSlot`: a filled slot, as quantization would leave it."""

  def __call__(self, x):
    return x


def test_cross_attention_folds_v_proj_only_where_exact(ref, attention_fp32):
  """The float cross-attention applies v_proj after the softmax (64-d P·V); self-attention
  (256-d inputs) and a cross-attention whose v slot is filled project first. Both paths match
  PyTorch, which always projects first."""
  cfg, model, sd = ref
  layer = attention_fp32.layers[0]
  assert layer.cross_attn_image._can_fold_v() and not layer.self_attn._can_fold_v()
  unfolded = _build(MemoryAttention, cfg, sd, MA_PREFIX)
  for lyr in unfolded.layers:
    lyr.cross_attn_image.v_quant = _PlainIdentity()
    assert not lyr.cross_attn_image._can_fold_v()
  inputs = _attention_inputs(cfg, 2, 8, seed=3)
  want = _torch_attention(model, *inputs, 8)
  for module in (attention_fp32, unfolded):
    got = _run_attention(module, *map(_bf, inputs), num_obj_ptr_tokens=8)
    assert rel_err(got, want) < TOL


def test_shared_frame_start_equals_per_object_frames(ref, attention_fp32):
  """Two objects on one frame: the current frame given once (batch 1) or its precomputed
  `frame_start` (the first self-attention) gives each object PyTorch's result on that frame
  with its own memory."""
  cfg, model, _ = ref
  curr, curr_pos, memory, memory_pos = _attention_inputs(cfg, 2, 8, seed=5)
  curr, curr_pos = curr[:, :1].expand(-1, 2, -1), curr_pos[:, :1].expand(-1, 2, -1)
  want = _torch_attention(model, curr, curr_pos, memory, memory_pos, 8)
  assert rel_err(want[0], want[1]) > 1e-2  # the objects' memories differ
  one, one_pos = _bf(curr)[:1], _bf(curr_pos)[:1]
  start = jax.jit(lambda m, c, p: m.frame_start(c, p))(attention_fp32, one, one_pos)
  assert start.shape == (1, cfg.image_embedding_size**2, cfg.d_model)

  @jax.jit
  def with_start(module, start, memory, memory_pos):
    return module(None, None, memory, memory_pos, 8, start=start)

  broadcast = _run_attention(attention_fp32, one, one_pos, _bf(memory), _bf(memory_pos),
                             num_obj_ptr_tokens=8)
  shared = with_start(attention_fp32, start, _bf(memory), _bf(memory_pos))
  for got in (broadcast, shared):
    assert got.shape == want.shape
    assert rel_err(got, want) < TOL


def test_memory_attention_padded_and_masked_equals_unpadded(ref, attention_fp32):
  """A fixed-size bank (7 frame slots, 16 pointer slots × 4 tokens) with different real
  contents per batch row gives the unpadded PyTorch result; padding holds NaN to prove it is
  never read, and changing the mask does not recompile."""
  cfg, model, _ = ref
  hw = cfg.image_embedding_size**2
  n_slots, ptr_slots = 7, 64
  rows = [  # (frame slots holding the real frames in order, pointer token positions)
      ([6, 0, 3], [0, 1, 2, 3, 40, 41, 42, 43]),
      ([2, 5], [60, 61, 62, 63]),
  ]
  length = n_slots * hw + ptr_slots
  memory = np.full((2, length, cfg.mem_dim), np.nan, np.float32)
  memory_pos = np.full((2, length, cfg.mem_dim), np.nan, np.float32)
  valid = np.zeros((2, length), bool)
  currs, poss, wants = [], [], []
  for b, (slots, ptrs) in enumerate(rows):
    curr, curr_pos, mem, mem_pos = _attention_inputs(cfg, len(slots), len(ptrs), seed=10 + b,
                                                     batch=1)
    wants.append(_torch_attention(model, curr, curr_pos, mem, mem_pos, len(ptrs)))
    currs.append(curr.numpy()[:, 0])
    poss.append(curr_pos.numpy()[:, 0])
    mem, mem_pos = mem.numpy()[:, 0], mem_pos.numpy()[:, 0]
    dst = np.concatenate([np.arange(s * hw, (s + 1) * hw) for s in slots]
                         + [n_slots * hw + np.asarray(ptrs)])
    memory[b, dst], memory_pos[b, dst], valid[b, dst] = mem, mem_pos, True

  traces = []

  @functools.partial(jax.jit, static_argnames=("num_obj_ptr_tokens",))
  def step(module, curr, curr_pos, memory, memory_pos, valid, num_obj_ptr_tokens):
    traces.append(1)
    return module(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, valid)

  args = (jnp.asarray(np.stack(currs)), jnp.asarray(np.stack(poss)), jnp.asarray(memory),
          jnp.asarray(memory_pos))
  got = np.asarray(step(attention_fp32, *args, jnp.asarray(valid), num_obj_ptr_tokens=ptr_slots))
  assert np.isfinite(got).all()
  for b in range(2):
    assert rel_err(got[b], wants[b][0]) < TOL, f"row {b}"
  # Another mask (one frame dropped from row 0) reuses the compiled step and changes row 0.
  valid2 = valid.copy()
  valid2[0, 3 * hw:4 * hw] = False
  got2 = np.asarray(step(attention_fp32, *args, jnp.asarray(valid2),
                         num_obj_ptr_tokens=ptr_slots))
  assert len(traces) == 1
  assert rel_err(got2[0], got[0]) > 1e-3
  np.testing.assert_array_equal(got2[1], got[1])


def test_bfloat16_compute_runs_close(ref, attention_fp32):
  """bf16 compute (f32 params, norms, softmax, RoPE) stays close to the fp32 modules."""
  cfg, _, sd = ref
  inputs = [_bf(t) for t in _attention_inputs(cfg, 3, 8)]
  want = _run_attention(attention_fp32, *inputs, num_obj_ptr_tokens=8)
  att16 = _build(MemoryAttention, cfg, sd, MA_PREFIX, dtype=jnp.bfloat16)
  got = _run_attention(att16, *inputs, num_obj_ptr_tokens=8)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(np.asarray(got, np.float32), want) < 5e-2

  pix, logits = _encoder_inputs(cfg)
  pix = jnp.asarray(pix.numpy().transpose(0, 2, 3, 1))
  masks = jnp.asarray(logits.numpy()[:, 0])
  want = _run_encoder(_build(MemoryEncoder, cfg, sd, ME_PREFIX), pix, masks, False)
  got = _run_encoder(_build(MemoryEncoder, cfg, sd, ME_PREFIX, dtype=jnp.bfloat16), pix, masks,
                     False)
  assert rel_err(np.asarray(got["vision_features"], np.float32),
                 want["vision_features"]) < 5e-2

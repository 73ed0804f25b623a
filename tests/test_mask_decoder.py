"""MaskDecoder (and its TwoWayTransformer) parity with `sam2`'s PyTorch module.

Inputs are real image features of the randomized SAM2.1-t reference (`forward_image` on a
random image, so `conv_s0/s1` are applied) and prompt embeddings from the torch prompt encoder.
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
from qsam2_jax.model.mask_decoder import MaskDecoder
from torch_reference import rel_err, to_numpy

PREFIX = "sam_mask_decoder."
TOL = 1e-4


def _nhwc(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(to_numpy(t).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def setup(torch_t256):
  cfg, tm = torch_t256
  sd = {k: to_numpy(v) for k, v in tm.state_dict().items() if k.startswith(PREFIX)}
  ours = nnx.eval_shape(lambda: MaskDecoder(cfg, rngs=nnx.Rngs(0)))  # eager init is slow
  keymap.load_state_dict(ours, sd, prefix=PREFIX)
  gen = torch.Generator().manual_seed(0)
  img = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
  with torch.no_grad():
    raw = tm.image_encoder(img)["backbone_fpn"]
    # What SAM2Base.forward_image and the image predictor do to the FPN levels.
    feats = {"raw": raw, "emb": raw[2] + tm.no_mem_embed.view(1, -1, 1, 1),
             "s0": tm.sam_mask_decoder.conv_s0(raw[0]), "s1": tm.sam_mask_decoder.conv_s1(raw[1])}
  return cfg, tm, ours, feats


@functools.partial(jax.jit, static_argnames=("multimask_output", "repeat_image"))
def _decode(module, emb, pe, sparse, dense, hires, *, multimask_output, repeat_image):
  return module(emb, pe, sparse, dense, multimask_output, repeat_image, hires)


def _run_both(tm, ours, emb, sparse, dense, hires, multimask, repeat):
  """Runs both decoders on the same (torch NCHW) inputs; returns (ours, torch) numpy 4-tuples."""
  dec, pe = tm.sam_mask_decoder, tm.sam_prompt_encoder.get_dense_pe()
  with torch.no_grad():
    want = dec(emb, pe, sparse, dense, multimask, repeat, hires)
  got = _decode(ours, _nhwc(emb), _nhwc(pe), jnp.asarray(to_numpy(sparse)), _nhwc(dense),
                [_nhwc(h) for h in hires], multimask_output=multimask, repeat_image=repeat)
  return [np.asarray(g) for g in got], [to_numpy(w) for w in want]


def _assert_close(got, want):
  for name, g, w in zip(("masks", "iou", "tokens", "obj_score"), got, want):
    assert g.shape == w.shape, name
    assert rel_err(g, w) <= TOL, (name, rel_err(g, w))


def test_keys_bijective(torch_t256):
  cfg, tm = torch_t256
  ours = keymap.torch_keys(nnx.eval_shape(lambda: MaskDecoder(cfg, rngs=nnx.Rngs(0))))
  theirs = {k[len(PREFIX):]: tuple(v.shape) for k, v in tm.state_dict().items()
            if k.startswith(PREFIX)}
  assert len(theirs) == 131
  assert ours == theirs


def test_high_res_convs_match_torch(setup):
  _, tm, ours, feats = setup
  for conv, t_conv, x in ((ours.conv_s0, tm.sam_mask_decoder.conv_s0, feats["raw"][0]),
                          (ours.conv_s1, tm.sam_mask_decoder.conv_s1, feats["raw"][1])):
    with torch.no_grad():
      want = to_numpy(t_conv(x)).transpose(0, 2, 3, 1)
    assert rel_err(conv(_nhwc(x)), want) <= TOL


CASES = ["click1", "clicks3", "box", "box_clicks", "mask_clicks", "batch_padded"]


def _prompt_inputs(case, size, gen):
  """(points, boxes, masks) torch inputs for the prompt encoder; batch 1 except `batch_padded`."""
  b = 4 if case == "batch_padded" else 1
  n = 1 if case == "click1" else 3
  coords = torch.rand(b, n, 2, generator=gen) * size
  labels = torch.randint(0, 2, (b, n), generator=gen, dtype=torch.int32)
  labels[:, 0] = 1
  if case == "batch_padded":  # ragged prompt sets padded with -1 to one static length
    labels = torch.tensor([[1, -1, -1], [1, 0, -1], [1, 1, 0], [2, 3, 1]], dtype=torch.int32)
  x0, y0 = torch.rand(2, b, generator=gen) * size / 2
  boxes = torch.stack([x0, y0, x0 + size / 3, y0 + size / 4], -1)
  masks = 3.0 * torch.randn(b, 1, size // 4, size // 4, generator=gen)
  return {
      "click1": ((coords, labels), None, None),
      "clicks3": ((coords, labels), None, None),
      "box": (None, boxes, None),
      "box_clicks": ((coords, labels), boxes, None),
      "mask_clicks": ((coords, labels), None, masks),
      "batch_padded": ((coords, labels), None, None),
  }[case]


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_mask_decoder_matches_torch(setup, case, multimask):
  cfg, tm, ours, feats = setup
  gen = torch.Generator().manual_seed(CASES.index(case))
  points, boxes, masks = _prompt_inputs(case, cfg.image_size, gen)
  with torch.no_grad():
    sparse, dense = tm.sam_prompt_encoder(points, boxes, masks)
  # One image shared by all prompt sets, as the image predictor does.
  hires = [feats["s0"][:1], feats["s1"][:1]]
  got, want = _run_both(tm, ours, feats["emb"][:1], sparse, dense, hires, multimask, True)
  m = 3 if multimask else 1
  assert got[0].shape == (sparse.shape[0], m, cfg.low_res_mask_size, cfg.low_res_mask_size)
  _assert_close(got, want)


def test_stability_fallback_mixed_batch(setup):
  """Single-mask output where one prompt set's mask is stable and the other's is not."""
  cfg, tm, ours, feats = setup
  dec = tm.sam_mask_decoder
  gen = torch.Generator().manual_seed(7)
  coords = torch.rand(2, 2, 2, generator=gen) * cfg.image_size
  labels = torch.ones(2, 2, dtype=torch.int32)
  # Large skip features on image 1 make its logits large, so few pixels sit within ±delta of 0.
  s0 = feats["s0"] * torch.tensor([1.0, 50.0]).view(2, 1, 1, 1)
  hires = [s0, feats["s1"]]
  with torch.no_grad():
    sparse, dense = tm.sam_prompt_encoder((coords, labels), None, None)
    all_masks, all_iou, _, _ = dec.predict_masks(
        feats["emb"], tm.sam_prompt_encoder.get_dense_pe(), sparse, dense, False, hires)
    stable = (dec._get_stability_scores(all_masks[:, 0:1])
              >= dec.dynamic_multimask_stability_thresh).ravel().tolist()
  assert stable == [False, True], "test inputs no longer exercise both branches"

  got, want = _run_both(tm, ours, feats["emb"], sparse, dense, hires, False, False)
  _assert_close(got, want)
  # Same choice as torch: best multimask output by IoU where unstable, token 0 where stable.
  all_masks, all_iou = to_numpy(all_masks), to_numpy(all_iou)
  chosen = [1 + int(np.argmax(all_iou[0, 1:])), 0]
  for i, c in enumerate(chosen):
    errs = [rel_err(got[0][i, 0], all_masks[i, j]) for j in range(all_masks.shape[1])]
    assert int(np.argmin(errs)) == c and errs[c] <= TOL, (i, errs)
    assert abs(got[1][i, 0] - all_iou[i, c]) <= TOL * abs(all_iou[i, c])


def test_bfloat16_compute_close(setup):
  """bf16 compute (float32 params) through prompt encoder and decoder stays near fp32 torch."""
  from qsam2_jax.model.prompt_encoder import PromptEncoder
  cfg, tm, _, feats = setup
  sd = {k: to_numpy(v) for k, v in tm.state_dict().items()}
  bf16 = jnp.bfloat16
  dec = nnx.eval_shape(lambda: MaskDecoder(cfg, dtype=bf16, rngs=nnx.Rngs(0)))
  keymap.load_state_dict(dec, sd, prefix=PREFIX)
  enc = nnx.eval_shape(lambda: PromptEncoder(cfg, dtype=bf16, rngs=nnx.Rngs(0)))
  keymap.load_state_dict(enc, sd, prefix="sam_prompt_encoder.")
  gen = torch.Generator().manual_seed(11)
  coords = torch.rand(3, 2, 2, generator=gen) * cfg.image_size
  labels = torch.ones(3, 2, dtype=torch.int32)
  masks = torch.randn(3, 1, cfg.low_res_mask_size, cfg.low_res_mask_size, generator=gen)
  hires = [feats["s0"][:1], feats["s1"][:1]]
  with torch.no_grad():
    sparse, dense = tm.sam_prompt_encoder((coords, labels), None, masks)
    want = tm.sam_mask_decoder(feats["emb"][:1], tm.sam_prompt_encoder.get_dense_pe(), sparse,
                               dense, True, True, hires)

  @jax.jit
  def run(enc, dec, coords, labels, masks, emb, s0, s1):
    sparse, dense = enc((coords, labels), None, masks)
    return dec(emb.astype(bf16), enc.get_dense_pe(), sparse, dense, True, True,
               [s0.astype(bf16), s1.astype(bf16)])

  got = run(enc, dec, jnp.asarray(coords.numpy()), jnp.asarray(labels.numpy()),
            jnp.asarray(masks[:, 0].numpy()), _nhwc(feats["emb"][:1]), _nhwc(hires[0]),
            _nhwc(hires[1]))
  for g, w in zip(got, want):
    assert rel_err(np.asarray(g, np.float32), to_numpy(w)) <= 3e-2

"""Activation x activation products (method.md §3): q, k, v, softmax probabilities and the mask
decoder's hypernetwork product quantized through the model's identity `QuantSlot`s.

References: numpy float64 attention for the materialised path; the linear-only model (same
recipe without slot quantizers) for the 16-bit and 8-bit cases; the saved model for restores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qat_testlib import SIZE, tiny_config
from qsam2_jax import checkpoint
from qsam2_jax.model import layers
from qsam2_jax.model.rope import apply_rope, grid_rope_tables
from qsam2_jax.model.sam2 import build_sam2
from qsam2_jax.quant import packed_file
from qsam2_jax.quant.calibration import batches, calibrate_ranges, model_outputs
from qsam2_jax.quant.qlayers import set_mode
from qsam2_jax.quant.quantizers import Quantizer, QuantSpec, UnitQuantizer, make_quantizer
from qsam2_jax.quant.recipe import QuantRecipe
from qsam2_jax.quant.rules import module_path, quantize_model

# One jitted program for every model below: same graph (slots identity or not) -> one compile.
_outputs = nnx.jit(model_outputs)


def _np_attention(q, k, v, valid=None, probs=lambda p: p):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if valid is not None:
    s = np.where(valid[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = probs(p / p.sum(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(seed, b=2, lq=6, lk=9, h=2, d=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
          jax.random.normal(ks[2], (b, lk, h, d)))


def test_materialised_path_matches_float64_and_the_fast_path():
  q, k, v = _qkv(0)
  valid = np.ones((2, 9), bool)
  valid[1, 5:] = False
  for kv in (None, jnp.asarray(valid)):
    ref = _np_attention(q, k, v, None if kv is None else valid)
    explicit = layers.attention(q, k, v, kv, probs=lambda p: p)
    np.testing.assert_allclose(np.asarray(explicit), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers.attention(q, k, v, kv)), ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_softmax_codes_on_the_unit_grid(bits):
  n = 2 ** bits - 1
  quant = UnitQuantizer(QuantSpec(bits=bits, method="unit", signed=False))
  p = jax.nn.softmax(3 * jax.random.normal(jax.random.key(1), (4, 2, 6, 9)), axis=-1)
  codes, lo, step = quant.encode(p)
  codes = np.asarray(codes)
  assert codes.min() >= 0 and codes.max() <= n
  assert float(lo) == 0.0 and float(step) == pytest.approx(1 / n)
  np.testing.assert_array_equal(codes, np.round(np.asarray(p, np.float64) * n))
  y = np.asarray(quant(p))
  np.testing.assert_allclose(y, codes / n, rtol=0, atol=1e-7)
  assert y.min() >= 0 and y.max() <= 1 and int(quant.count[...]) == 1
  # Attention with quantized probabilities: each weight moves by at most 1 / (2n), so the
  # output moves by at most S / (2n) * max|v| from the float attention (S keys).
  q, k, v = _qkv(2)
  got = np.asarray(layers.attention(q, k, v, probs=quant))
  ref = _np_attention(q, k, v, probs=lambda p: np.round(p * n) / n)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  bound = k.shape[1] / (2 * n) * float(jnp.max(jnp.abs(v)))
  assert np.abs(got - _np_attention(q, k, v)).max() <= bound


def test_rope_attention_slots_see_the_rotated_matmul_inputs():
  """Memory attention: the q / k slots get q and k after RoPE (the matmul's inputs)."""
  model = build_sam2(tiny_config(), seed=0)
  attn = model.memory_attention.layers[0].cross_attn_image
  seen = {}

  class Spy(nnx.Module):
    def __init__(self, name):
      self.name = name

    def __call__(self, x):
      seen[self.name] = x
      return x

  attn.q_quant, attn.k_quant = Spy("q"), Spy("k")
  dq, dk = attn.embedding_dim, attn.k_proj.in_features
  n = 16
  x = jax.random.normal(jax.random.key(0), (1, n, dq))
  mem = jax.random.normal(jax.random.key(1), (1, 2 * n + 4, dk))
  attn(x, mem, mem, num_k_exclude_rope=4)
  heads = lambda t: t.reshape(*t.shape[:-1], attn.num_heads, -1)  # noqa: E731
  qh, kh = heads(attn.q_proj(x)), heads(attn.k_proj(mem))
  cos, sin = grid_rope_tables(n, qh.shape[-1], attn.rope_theta)
  np.testing.assert_allclose(np.asarray(seen["q"]), np.asarray(apply_rope(qh, cos, sin)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(seen["k"]),
                             np.asarray(apply_rope(kh, cos, sin, num_exclude=4)),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(seen["q"]), np.asarray(qh))   # rotation did happen


def _slots(model):
  return {module_path(p): s for p, s in nnx.iter_graph(model)
          if isinstance(s, (layers.QuantSlot, Quantizer))
          and module_path(p).endswith(("q_quant", "k_quant", "v_quant", "probs_quant",
                                       "hyper_in_quant", "upscaled_quant"))}


@pytest.fixture(scope="module")
def images():
  return np.asarray(jax.random.uniform(jax.random.key(3), (4, SIZE, SIZE, 3)) * 2 - 1,
                    np.float32)


def _calibrated(recipe, images):
  model = build_sam2(tiny_config(), seed=0)
  recipe.apply(model)
  calibrate_ranges(model, images, batch_size=2, progress=False)
  return model


def test_sixteen_bits_is_the_linear_only_model_bitwise(images):
  """`--attn-bits 16 --softmax-bits 16` builds the linear-only model: same graph, same
  outputs bit for bit through one jitted program (training mode: quantizers on batch
  statistics, so no calibration compile is needed)."""
  model = build_sam2(tiny_config(), seed=0)
  _, report = QuantRecipe(bits=4, attn_bits=16, softmax_bits=16).apply(model)
  slots = _slots(model)
  assert slots and not report.slots
  assert all(type(s) is layers.QuantSlot for s in slots.values())
  # The linear-only model as before slots existed: the same layer rules, no slot rules.
  ref = build_sam2(tiny_config(), seed=0)
  _, ref_report = quantize_model(ref, [x for x in QuantRecipe(bits=4).rules()
                                       if "_quant" not in x.pattern])
  assert ref_report.layers == report.layers and not ref_report.slots
  assert nnx.graphdef(ref) == nnx.graphdef(model)
  batch = batches(images, 4)[0]
  a, b = _outputs(model, *batch), _outputs(ref, *batch)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.fixture(scope="module")
def linear_only(images):
  """W8A8 paper preset with float attention products (slots identity), calibrated."""
  return _calibrated(QuantRecipe(bits=8, attn_bits=16, softmax_bits=16), images)


@pytest.fixture(scope="module")
def attn8(images):
  return _calibrated(QuantRecipe(bits=8), images)


@pytest.mark.slow
def test_eight_bit_attention_products_small_error(linear_only, attn8, images):
  slots = _slots(attn8)
  image_path = {k: s for k, s in slots.items() if not k.startswith("memory_attention")}
  kinds = {type(s).__name__ for s in slots.values()}
  assert kinds == {"LSCQuantizer", "UnitQuantizer"}, kinds
  assert len(slots) == len(_slots(linear_only))
  # Range calibration ran every image-path slot (memory attention needs clips).
  assert all(int(s.count[...]) > 0 for s in image_path.values()), [
      k for k, s in image_path.items() if int(s.count[...]) == 0]
  batch = batches(images, 4)[0]
  fp = build_sam2(tiny_config(), seed=0)
  ref = {k: np.asarray(v) for k, v in _outputs(fp, *batch).items()}
  lin = {k: np.asarray(v) for k, v in _outputs(linear_only, *batch).items()}
  got = {k: np.asarray(v) for k, v in _outputs(attn8, *batch).items()}

  for key in ("image_embed", "mask_logits"):
    e_lin, e_all = _rel(lin[key], ref[key]), _rel(got[key], ref[key])
    print(f"{key}: W8A8 linear-only {e_lin:.4f}, + 8-bit attention products {e_all:.4f}")
    # The slots add one 8-bit per-tensor quantizer per q, k, v, probability matrix, as many
    # as the linear inputs of the attentions already have: with independent noise of the same
    # size the error grows by about sqrt(2); 2x bounds it. (Mask logits of a random-weight
    # model are ill-conditioned, 0.86 relative already for linear-only W8A8, so only the
    # ratio is asserted for them; the encoder embedding must stay within 5 %.)
    assert 0 < e_all <= 2 * e_lin
  assert _rel(got["image_embed"], ref["image_embed"]) < 0.05


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.slow
def test_checkpoint_and_packed_file_restore_the_slots(linear_only, attn8, images, tmp_path):
  cfg = tiny_config()
  recipe = QuantRecipe(bits=8)
  set_mode(attn8, "eval")
  meta = checkpoint.model_meta(cfg, "qat", "x", quant=recipe, run={"steps": 1})
  assert meta["quant"]["attn_bits"] is None and QuantRecipe.from_dict(meta["quant"]) == recipe
  out = tmp_path / "run"
  with checkpoint.RunCheckpointer(out) as ck:
    ck.save(1, model=nnx.state(attn8), meta=meta)
  loaded, _ = checkpoint.load_sam2(str(out))
  set_mode(loaded, "eval")
  want, got = _slots(attn8), _slots(loaded)
  assert {k: (type(s), s.spec) for k, s in want.items()} == {
      k: (type(s), s.spec) for k, s in got.items()}
  assert nnx.graphdef(loaded) == nnx.graphdef(attn8)
  batch = batches(images, 4)[0]
  a = _outputs(attn8, *batch)
  b = _outputs(loaded, *batch)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)

  errs = {}
  for name, m, rec in (("linear-only", linear_only, QuantRecipe(bits=8, attn_bits=16,
                                                                  softmax_bits=16)),
                       ("attn8", attn8, recipe)):
    packed = tmp_path / f"{name}.qsam"
    packed_file.save(packed, m, checkpoint.model_meta(cfg, "qat", "x", quant=rec),
                     float_dtype="float32")
    states = packed_file.read_manifest(packed)["quantizer_state"]
    model, _ = packed_file.load(packed)
    assert {k: (type(s), getattr(s, "spec", None)) for k, s in _slots(model).items()} == {
        k: (type(s), getattr(s, "spec", None)) for k, s in _slots(m).items()}
    if name == "attn8":
      assert any(k.endswith("probs_quant.count") for k in states)
      assert not any("probs_quant" in k and not k.endswith(".count") for k in states)
      for k, s in _slots(model).items():   # restored activation ranges, exactly
        for v, w in zip(jax.tree.leaves(nnx.state(s)), jax.tree.leaves(nnx.state(want[k]))):
          np.testing.assert_array_equal(np.asarray(v), np.asarray(w), err_msg=k)
    ref = _outputs(m, *batch)
    c = _outputs(model, *batch)
    errs[name] = max(_rel(c[key], ref[key]) for key in ("image_embed", "mask_logits"))
  print("packed vs fake-quant, max relative L2:", errs)
  # Measured: packed W8A8 files do not reproduce the fake-quant forward even without slots
  # (image_embed ~1 %, random-weight mask logits ~100 % relative), cause not yet found; the
  # slots' state restores exactly (above) and adds nothing beyond that pre-existing gap.
  assert errs["attn8"] <= max(2 * errs["linear-only"], 1e-5)


def test_encoder_preset_and_old_recipes_keep_attention_float():
  model = build_sam2(tiny_config(), seed=0)
  _, report = QuantRecipe(bits=4, preset="encoder").apply(model)
  assert not report.slots
  assert all(type(s) is layers.QuantSlot for s in _slots(model).values())
  old = QuantRecipe.from_dict({"bits": 4, "method": "lsc", "preset": "paper"})
  assert (old.effective_attn_bits, old.effective_softmax_bits) == (16, 16)
  assert (QuantRecipe(bits=4).effective_attn_bits, QuantRecipe(bits=4).effective_softmax_bits,
          QuantRecipe(bits=4, act_bits=16).effective_softmax_bits) == (4, 8, 16)
  assert make_quantizer(QuantSpec(bits=16, method="unit", signed=False)) is None


def test_flags_reach_the_recipe():
  from train.qat import parse_config
  cfg, _ = parse_config(["--bits", "4", "--attn-bits", "8", "--softmax-bits", "4"])
  r = cfg.recipe()
  assert (r.attn_bits, r.softmax_bits) == (8, 4)
  probs = [x for x in r.rules() if x.pattern.endswith("probs_quant")][0]
  assert probs.act.bits == 4 and probs.act.method == "unit" and probs.act.kind == "unsigned"

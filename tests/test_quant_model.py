"""Rules, quantized layers and model swaps on a toy model with SAM2's module paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.model import layers
from qsam2_jax.quant import (
    ClipFactor, QConv, QConvTranspose2x2, QLinear, QuantSpec, QuantStat, calibrate, dequantize,
    make_rule, optimizer_labels, pack, preset_rules, quantize_model, set_mode, unpack)


class _Attn(nnx.Module):
  def __init__(self, d, rngs):
    self.qkv = layers.Linear(d, 3 * d, rngs=rngs)
    self.proj = layers.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    b, h, w, c = x.shape
    o = layers.attention(*(t.reshape(b, h * w, 1, c) for t in (q, k, v)))
    return self.proj(o.reshape(b, h, w, c))


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.norm1 = layers.LayerNorm(d, eps=1e-6)
    self.attn = _Attn(d, rngs)
    self.norm2 = layers.LayerNorm(d, eps=1e-6)
    self.mlp = layers.MLP(d, 4 * d, d, 2, activation=layers.gelu, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _PatchEmbed(nnx.Module):
  def __init__(self, d, rngs):
    self.proj = layers.Conv(3, d, 4, stride=4, rngs=rngs)


class _Trunk(nnx.Module):
  def __init__(self, d, rngs):
    self.patch_embed = _PatchEmbed(d, rngs)
    self.blocks = nnx.List([_Block(d, rngs) for _ in range(2)])


class _Encoder(nnx.Module):
  def __init__(self, d, rngs):
    self.trunk = _Trunk(d, rngs)


class _Decoder(nnx.Module):
  def __init__(self, d, rngs):
    self.conv_s0 = layers.Conv(d, d, 1, rngs=rngs)
    self.output_upscaling = layers.Sequential([
        layers.ConvTranspose2x2(d, 8, rngs=rngs), layers.LayerNorm(8, eps=1e-6),
        layers.Activation(layers.gelu), layers.ConvTranspose2x2(8, 4, rngs=rngs)])
    self.iou_prediction_head = layers.MLP(d, d, 4, 2, rngs=rngs)


class Toy(nnx.Module):
  """image_encoder.trunk.{patch_embed.proj, blocks.i.{attn.qkv, attn.proj, mlp.layers.j}},
  sam_mask_decoder.{conv_s0, output_upscaling.{0,3}, iou_prediction_head.layers.j}."""

  def __init__(self, d=16, seed=0):
    rngs = nnx.Rngs(seed)
    self.image_encoder = _Encoder(d, rngs)
    self.sam_mask_decoder = _Decoder(d, rngs)

  def __call__(self, img):
    t = self.image_encoder.trunk
    x = t.patch_embed.proj(img)
    for blk in t.blocks:
      x = blk(x)
    dec = self.sam_mask_decoder
    masks = dec.output_upscaling(dec.conv_s0(x))
    iou = dec.iou_prediction_head(jnp.mean(x, axis=(1, 2)))
    return masks, iou


@pytest.fixture(scope="module")
def toy():
  """Built once (eager init is slow on a busy CPU); tests take `nnx.clone`s."""
  return Toy()


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(2, 16, 16, 3)).astype(np.float32)) for _ in range(3)]


def _rel(a, b):
  a = np.concatenate([np.ravel(v) for v in a])
  b = np.concatenate([np.ravel(v) for v in b])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_forward = nnx.jit(lambda m, v: m(v))   # one compile per model structure and mode


def test_sixteen_bits_reproduce_float(toy, data):
  fp = nnx.clone(toy)
  ref = _forward(fp, data[0])
  q, report = quantize_model(nnx.clone(fp), preset_rules("paper", 16, high_bits=16))
  assert len(report.layers) == 14 and not report.float_layers
  assert isinstance(q.image_encoder.trunk.blocks[0].attn.qkv, QLinear)
  assert isinstance(q.image_encoder.trunk.patch_embed.proj, QConv)
  assert isinstance(q.sam_mask_decoder.output_upscaling[3], QConvTranspose2x2)
  for mode in ("train", "eval"):
    set_mode(q, mode)
    out = _forward(q, data[0])
    for a, b in zip(out, ref):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_eight_bits_small_error(toy, data):
  fp = nnx.clone(toy)
  ref = [_forward(fp, x) for x in data]
  w8, _ = quantize_model(nnx.clone(fp), [make_rule(".*", 8, None)])
  set_mode(w8, "eval")
  # 0.4 % per kernel, amplified by the random toy's attention.
  assert max(_rel(_forward(w8, x), r) for x, r in zip(data, ref)) < 0.02
  q8, _ = quantize_model(nnx.clone(fp), preset_rules("paper", 8))
  calibrate(q8, lambda m, x: m(x), data[:2])
  set_mode(q8, "eval")
  errs = [_rel(_forward(q8, x), r) for x, r in zip(data, ref)]
  # A Gaussian at 8 bits per tensor keeps ~0.9 % error; 14 layers in series add up.
  assert max(errs) < 0.06, errs
  w4, _ = quantize_model(nnx.clone(fp), [make_rule(".*", 4, None)])
  set_mode(w4, "eval")
  assert _rel(_forward(w4, data[2]), ref[2]) > 4 * _rel(_forward(w8, data[2]), ref[2])


def test_rules_first_match_unused_and_float(toy, data):
  rules = [make_rule(r".*\.attn\.qkv", 4, 8, method="lsq"),
           make_rule(r"image_encoder\..*", 2, 2),
           make_rule(r"sam_mask_decoder\.iou_prediction_head\..*", None, None),   # exclusion
           make_rule(r"memory_attention\..*", 2, 2)]
  q, report = quantize_model(nnx.clone(toy), rules)
  qkv = report.layers["image_encoder.trunk.blocks.1.attn.qkv"]
  assert qkv[1:5] == (4, 8, "lsq", "lsq")
  assert report.layers["image_encoder.trunk.blocks.1.attn.proj"][1:3] == (2, 2)
  assert report.layers["image_encoder.trunk.patch_embed.proj"][0] == "QConv"
  assert report.unused_rules == [r"memory_attention\..*"]
  assert sorted(report.float_layers) == [
      "sam_mask_decoder.conv_s0", "sam_mask_decoder.iou_prediction_head.layers.0",
      "sam_mask_decoder.iou_prediction_head.layers.1", "sam_mask_decoder.output_upscaling.0",
      "sam_mask_decoder.output_upscaling.3"]
  assert type(q.sam_mask_decoder.conv_s0) is layers.Conv
  assert "unused rules" in report.summary()
  _forward(q, data[0])
  # Quantizing again touches nothing.
  _, again = quantize_model(q, rules)
  assert not again.layers


def test_presets(toy):
  _, paper = quantize_model(nnx.clone(toy), preset_rules("paper", 2, act_bits=4))
  assert paper.layers["image_encoder.trunk.patch_embed.proj"][1:3] == (8, 8)
  assert paper.layers["sam_mask_decoder.output_upscaling.3"][1:3] == (8, 8)
  assert paper.layers["image_encoder.trunk.blocks.0.mlp.layers.1"][1:3] == (2, 4)
  assert paper.layers["sam_mask_decoder.conv_s0"][1:3] == (2, 4)
  assert r"memory_encoder\.fuser\.layers\.\d+\.dwconv" in paper.unused_rules
  assert r".*" not in paper.unused_rules
  _, enc = quantize_model(nnx.clone(toy), preset_rules("encoder", 3))
  assert sorted(enc.layers) == sorted(
      f"image_encoder.trunk.blocks.{i}.{n}" for i in range(2)
      for n in ("attn.qkv", "attn.proj", "mlp.layers.0", "mlp.layers.1"))
  assert "image_encoder.trunk.patch_embed.proj" in enc.float_layers


def test_keymap_still_maps_quantized_kernels(toy):
  fp = nnx.clone(toy)
  ref = keymap.state_dict(fp)
  q, _ = quantize_model(nnx.clone(fp), preset_rules("paper", 2))
  sd = keymap.state_dict(q)
  assert sd.keys() == ref.keys()                        # no clip factor or statistic leaks in
  for k in ref:
    np.testing.assert_array_equal(sd[k], ref[k])
  assert sd["image_encoder.trunk.blocks.0.attn.qkv.weight"].shape == (48, 16)   # (out, in)
  assert sd["image_encoder.trunk.patch_embed.proj.weight"].shape == (16, 3, 4, 4)
  assert sd["sam_mask_decoder.output_upscaling.0.weight"].shape == (16, 8, 2, 2)
  # Loading writes through to the shared Params.
  new = {k: v + 1.0 for k, v in sd.items()}
  keymap.load_state_dict(q, new)
  np.testing.assert_array_equal(
      q.image_encoder.trunk.blocks[0].attn.qkv.kernel[...],
      new["image_encoder.trunk.blocks.0.attn.qkv.weight"].T)


@nnx.jit
def _forward_and_export(layer):
  enc = layer.encode_weight()
  return layer.quantized_kernel(), enc.codes, enc.lo, enc.step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_codes_dequantize_to_the_forward_bitwise(toy, bits):
  q, _ = quantize_model(nnx.clone(toy), preset_rules("encoder", bits))
  set_mode(q, "eval")
  for layer in (q.image_encoder.trunk.blocks[0].attn.qkv, q.image_encoder.trunk.blocks[1].mlp
                .layers[1]):
    enc = layer.encode_weight()
    codes = np.asarray(enc.codes)
    assert codes.max() < 2 ** bits
    packed = pack(codes, bits)
    assert packed.size == -(-codes.size * bits // 8)
    back = unpack(packed, bits, codes.size).reshape(codes.shape)
    eager = np.asarray(layer.quantized_kernel())
    assert np.array_equal(np.asarray(dequantize(back, enc.lo, enc.step)), eager)
    # Compiled on both sides too. (Compiled and eager results may differ by an ulp: XLA fuses
    # lo + step * u into an FMA, and may order the std reduction differently.)
    fwd, codes_j, lo_j, step_j = _forward_and_export(layer)
    back_j = unpack(pack(np.asarray(codes_j), bits), bits, codes.size).reshape(codes.shape)
    assert np.array_equal(np.asarray(jax.jit(dequantize)(back_j, lo_j, step_j)), np.asarray(fwd))
    for c in range(codes.shape[-1]):
      assert len(np.unique(eager[:, c])) <= 2 ** bits


def test_training_step_updates_weights_factors_and_statistics(toy, data):
  model, _ = quantize_model(nnx.clone(toy), preset_rules("encoder", 4))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  target = [jnp.zeros_like(t) for t in _forward(model, data[0])]
  qkv = model.image_encoder.trunk.blocks[0].attn.qkv
  before = (np.asarray(qkv.kernel[...]), np.asarray(qkv.weight_quantizer.alpha[...]),
            np.asarray(qkv.input_quantizer.alpha[...]), float(qkv.input_quantizer.mean[...]),
            int(qkv.input_quantizer.count[...]))

  @nnx.jit
  def step(m, o, x):
    def loss_fn(m):
      return sum(jnp.mean((a - b) ** 2) for a, b in zip(m(x), target))
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    o.update(m, grads)
    return loss

  step(model, opt, data[1])
  step(model, opt, data[2])
  assert not np.array_equal(qkv.kernel[...], before[0])
  assert not np.array_equal(qkv.weight_quantizer.alpha[...], before[1])
  assert not np.array_equal(qkv.input_quantizer.alpha[...], before[2])
  assert float(qkv.input_quantizer.mean[...]) != before[3]
  assert int(qkv.input_quantizer.count[...]) == before[4] + 2
  n_clip = len(jax.tree.leaves(nnx.state(model, ClipFactor)))
  n_stat = len(jax.tree.leaves(nnx.state(model, QuantStat)))
  assert n_clip > 0 and n_stat > 0
  assert int(opt.step[...]) == 2


def test_bf16_compute_runs(toy, data):
  fp = nnx.clone(toy)
  for blk in fp.image_encoder.trunk.blocks:
    blk.attn.qkv.dtype = jnp.bfloat16
  q, _ = quantize_model(fp, preset_rules("paper", 4))
  set_mode(q, "eval")
  out = _forward(q, data[0])
  assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in out)
  assert q.image_encoder.trunk.blocks[0].attn.qkv.weight_quantizer.alpha[...].dtype == jnp.float32


def test_optimizer_labels_give_clip_factors_their_own_group():
  q = QLinear(layers.Linear(8, 4, rngs=nnx.Rngs(0)), QuantSpec(bits=4, granularity="per_channel"),
              QuantSpec(bits=4, symmetric=False))
  labels = optimizer_labels(q)
  assert labels["kernel"] == "params" and labels["weight_quantizer"]["alpha"] == "clip"
  tx = optax.partition({"clip": optax.sgd(1.0), "params": optax.sgd(0.0)}, labels)
  opt = nnx.Optimizer(q, tx, wrt=nnx.Param)
  kernel, alpha = np.asarray(q.kernel[...]), np.asarray(q.weight_quantizer.alpha[...])

  @nnx.jit
  def step(m, o):
    _, grads = nnx.value_and_grad(lambda m: jnp.sum(m(jnp.ones((3, 8))) ** 2))(m)
    o.update(m, grads)

  step(q, opt)
  np.testing.assert_array_equal(q.kernel[...], kernel)            # lr 0 group
  assert not np.array_equal(q.weight_quantizer.alpha[...], alpha)  # lr 1 group

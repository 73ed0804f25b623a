"""Packed files kept packed in memory (`quant.packed_model`): device unpacking against the numpy
packer, resident bytes of a W2 `paper` model, and its outputs against the fake-quant model."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qsam2_jax.quant import encode
from qsam2_jax.predictor import ImagePredictor
from qsam2_jax.quant import packed_file
from qsam2_jax.quant.packed_model import (load_packed, packed_kernels, resident_bytes,
                                          to_layer_layout, unpack_codes)
from qsam2_jax.quant.packing import pack, unpack
from qsam2_jax.quant.recipe import QuantRecipe
from test_export import BOXES, _image, _meta, quantized_model, weights  # noqa: F401


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_device_unpack_matches_numpy(bits):
  rng = np.random.default_rng(bits)
  n = 1001                                   # not a multiple of any group
  codes = rng.integers(0, 1 << bits, n).astype(np.uint8)
  packed = pack(codes, bits)
  per = 8 // np.gcd(8, bits)
  padded = np.zeros(-(-n // per) * (per * bits // 8), np.uint8)
  padded[:packed.size] = packed
  got = np.asarray(jax.jit(lambda p: unpack_codes(p, bits, n))(jnp.asarray(padded)))
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_array_equal(got, unpack(packed, bits, n))


@pytest.fixture(scope="module")
def w2_files(weights, tmp_path_factory):  # noqa: F811
  """W2 `paper` (2-bit weights, 8-bit high-precision layers with 8-bit inputs), written with
  the default 16-bit float rest and with a float32 rest (the fake-quant model's exact values)."""
  cfg, sd = weights
  recipe = QuantRecipe(bits=2, act_bits=16, high_act_bits=8, preset="paper")
  model = quantized_model(sd, cfg, recipe, 2)
  root = tmp_path_factory.mktemp("packed_model")
  packed_file.save(root / "w2.qsam", model, _meta(cfg, recipe))
  packed_file.save(root / "w2_f32.qsam", model, _meta(cfg, recipe), float_dtype="float32")
  return cfg, sd, model, root


def test_w2_resident_bytes_six_times_smaller(w2_files):
  _, sd, _, root = w2_files
  float32_bytes = sum(4 * np.asarray(v).size for v in sd.values())  # the float model's state
  model, _ = load_packed(root / "w2.qsam")
  kept = resident_bytes(model)
  print(f"resident: float32 {float32_bytes} B, packed W2 {kept} B "
        f"({float32_bytes / kept:.1f}x smaller)")
  assert float32_bytes / kept >= 6.0
  # Every quantized kernel is held as its codes.
  kernels = packed_kernels(model)
  assert kernels.keys() == encode.encode_weights(w2_files[2]).keys()
  for k in kernels.values():
    assert k.get_raw_value()["codes"].dtype == jnp.uint8


@pytest.mark.slow   # two 256² predictor compiles (~1 min idle, 3 min on a loaded 2-core box)
def test_w2_kept_packed_matches_fake_quant_model(w2_files):
  cfg, _, fq_model, root = w2_files
  packed, _ = load_packed(root / "w2_f32.qsam")
  # Kernels: dequantized on the device = the fake-quant kernels, up to the last bit (XLA may
  # or may not contract lo + step * code into one FMA in either program).
  want = encode.quantized_kernels(fq_model)
  kernels = packed_kernels(packed)
  assert kernels.keys() == want.keys()
  raws = {name: var.get_raw_value() for name, var in kernels.items()}
  dequantized = jax.jit(lambda r: {n: kernels[n].replace(v)[...] for n, v in r.items()})(raws)
  for name, var in kernels.items():
    got = np.asarray(dequantized[name])
    w = to_layer_layout(var, want[name])
    np.testing.assert_allclose(got, w, rtol=0, atol=4e-7 * np.abs(w).max(), err_msg=name)
  # Outputs: a last-bit difference in a layer's input may flip one of its 8-bit activation
  # codes, so the bound is on the share of equal mask pixels and the mean logit error, which
  # hold on any CPU; a wrong code or range would move both far beyond them.
  image = _image()
  outs = []
  for predictor in (ImagePredictor(fq_model),
                    ImagePredictor.from_checkpoint(root / "w2_f32.qsam", keep_packed=True)):
    predictor.set_image(image)
    outs.append(predictor.predict(box=BOXES, multimask_output=False, return_logits=True))
  (m, iou, low), (pm, piou, plow) = outs
  assert np.mean((m > 0) == (pm > 0)) >= 0.99
  assert np.mean(np.abs(low - plow)) <= 1e-2 * np.mean(np.abs(low))
  np.testing.assert_allclose(piou, iou, atol=1e-2)


def test_keep_packed_needs_a_packed_file(tmp_path):
  from qsam2_jax.errors import UserError
  path = tmp_path / "model.pt"
  path.write_bytes(b"not packed")
  with pytest.raises(UserError, match="keep_packed=True needs a packed"):
    ImagePredictor.from_checkpoint(path, keep_packed=True)

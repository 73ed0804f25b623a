"""Export of quantized runs: PyTorch parity of the fake-quantized weights, the packed file
(sizes, exact reproduction, activation-quantizer state), restores across meshes, clear errors.

Quantized models are built from the randomized official-format weights with their quantizer
state filled directly (clip factors near the Gaussian optimum, random frozen activation
statistics): the structure is exactly `QuantRecipe.apply`'s, without compiling its per-layer
MSE initialisation, which the export neither needs nor can tell apart.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import rel_err, to_numpy
from convert import to_torch
from eval import size as size_cli
from qsam2_jax import checkpoint, keymap, parallel
from qsam2_jax.errors import UserError
from qsam2_jax.predictor import ImagePredictor
from qsam2_jax.quant import GAUSSIAN_CLIP, ClipFactor, QuantStat, packed_file, set_mode
from qsam2_jax.quant import encode as export
from qsam2_jax.quant.recipe import QuantRecipe

H, W = 180, 240
BOXES = np.array([[20.0, 30.0, 200.0, 170.0], [100.0, 10.0, 230.0, 90.0]], np.float32)


def _image():
  yy, xx = np.mgrid[0:H, 0:W]
  img = np.stack([128 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 11.0 - c) for c in range(3)],
                 -1)
  return np.clip(img, 0, 255).astype(np.uint8)


def quantized_model(sd, cfg, recipe: QuantRecipe, seed: int):
  """A `recipe`-quantized model with the given weights and plausible quantizer state."""
  model = checkpoint.abstract_model(cfg, quant=recipe.to_dict())
  keymap.load_state_dict(model, sd)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, (ClipFactor, QuantStat)):
      continue
    shape, name = var.get_value().shape, path[-1]
    if name == "count":      # a batch was seen: evaluation uses the frozen statistics
      v = np.ones(shape, np.int32)
    elif name == "alpha":
      v = GAUSSIAN_CLIP[recipe.bits] * rng.uniform(0.8, 1.2, shape)
    elif name == "mean":
      v = rng.normal(0.0, 0.2, shape)
    elif name == "std":
      v = rng.uniform(0.5, 2.0, shape)
    else:
      raise AssertionError(f"unexpected quantizer state {path}")
    var.set_value(jnp.asarray(v, var.get_value().dtype))
  return set_mode(model, "eval")


def _meta(cfg, recipe):
  return {"config": cfg.name, "image_size": cfg.image_size, "kind": "ptq",
          "quant": recipe.to_dict()}


@pytest.fixture(scope="module")
def weights(torch_t256):
  cfg, tmodel = torch_t256
  return cfg, {k: to_numpy(v) for k, v in tmodel.state_dict().items()}


def _predict(predictor, image):
  predictor.set_image(image)
  return predictor.predict(box=BOXES, multimask_output=False, return_logits=True)


# ---------------------------------------------------------------------------- W4 -> PyTorch


def test_w4_weight_only_export_matches_pytorch(weights, torch_t256, tmp_path):
  import torchvision_stub
  torchvision_stub.install()
  from sam2.build_sam import build_sam2
  from sam2.sam2_image_predictor import SAM2ImagePredictor

  cfg, sd = weights
  # Weight-only W4 with the paper preset: 4-bit weights, 8-bit for the high-precision layers,
  # every activation float (act_bits=16), which PyTorch on dequantized weights reproduces.
  recipe = QuantRecipe(bits=4, act_bits=16, preset="paper")
  model = quantized_model(sd, cfg, recipe, 1)
  ckpt = checkpoint.save_model(tmp_path / "w4", model, _meta(cfg, recipe))
  pt = tmp_path / "w4.pt"
  assert to_torch.main(["--ckpt", ckpt, "--out", str(pt)]) == 0
  tq = build_sam2(cfg.torch_yaml, ckpt_path=str(pt), device="cpu",   # strict load
                  hydra_overrides_extra=[f"++model.image_size={cfg.image_size}"])
  exported = {k: to_numpy(v) for k, v in tq.state_dict().items()}
  qkv = "image_encoder.trunk.blocks.5.attn.qkv.weight"
  assert len(np.unique(exported[qkv][7])) <= 16 < len(np.unique(sd[qkv][7]))    # 4-bit rows
  np.testing.assert_array_equal(exported["image_encoder.trunk.blocks.5.norm1.weight"],
                                sd["image_encoder.trunk.blocks.5.norm1.weight"])

  ours = ImagePredictor(model)   # (restoring quantized runs: see the W2 tests below)
  side = cfg.image_embedding_size
  refs = []
  for tm in (tq, torch_t256[1]):
    ref = SAM2ImagePredictor(tm)
    ref._bb_feat_sizes = [(side * 4, side * 4), (side * 2, side * 2), (side, side)]
    refs.append(_predict(ref, _image()))
  out = _predict(ours, _image())
  (m, iou, low), (tm_, tiou, tlow), (_, _, fp_low) = out, *refs
  assert rel_err(low, tlow) <= 1e-4
  assert rel_err(iou, tiou) <= 1e-4
  assert rel_err(m, tm_) <= 1e-4
  assert rel_err(tlow, fp_low) > 1e-2      # the quantization is visible at this tolerance


# ---------------------------------------------------------------------------- W2 packed


@pytest.fixture(scope="module")
def w2(weights, tmp_path_factory):
  """W2 with the paper preset, saved *sharded over the 8 fake devices* (fsdp=8).

  2-bit weights, 8-bit for the preset's high-precision layers, whose inputs stay 8-bit
  quantized (`high_act_bits=8`) (activation-quantizer state to carry). Activations elsewhere are
  float: two compiled graphs may differ in the last bit, and low-bit activation codes turn such
  differences into code flips that a random-weight model amplifies (see the report).
  """
  cfg, sd = weights
  recipe = QuantRecipe(bits=2, act_bits=16, high_act_bits=8, preset="paper")
  model = quantized_model(sd, cfg, recipe, 2)
  mesh = parallel.make_mesh("data=1,fsdp=8")
  nnx.update(model, parallel.shard_state(nnx.state(model), mesh))
  qkv = model.image_encoder.trunk.blocks[0].attn.qkv.kernel.get_value()
  assert len(qkv.sharding.device_set) == 8
  root = tmp_path_factory.mktemp("w2")
  ckpt = checkpoint.save_model(root / "ckpt", model, _meta(cfg, recipe))
  source = {k: np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(model))}
  return cfg, recipe, ckpt, root, source


@pytest.fixture(scope="module")
def w2_restored(w2):
  return checkpoint.load_sam2(w2[2])[0]


@pytest.fixture(scope="module")
def w2_packed(w2):
  """The run's packed file, written by the command line (float rest: auto, 16 bits)."""
  _, _, ckpt, root, _ = w2
  packed = root / "w2.qsam2"
  assert to_torch.main(["--ckpt", ckpt, "--packed", str(packed)]) == 0
  return packed


def test_run_saved_on_another_mesh_restores_on_one_device(w2, w2_restored):
  restored = dict(jax.tree.leaves_with_path(nnx.state(w2_restored)))
  source = w2[4]
  assert restored.keys() == source.keys()
  for k, v in restored.items():
    assert len(v.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(v), source[k])


def test_packed_w2_sizes(w2_packed, tmp_path, capsys):
  packed = w2_packed
  js = tmp_path / "size.json"
  assert size_cli.main(["--ckpt", str(packed), "--json", str(js)]) == 0
  out = capsys.readouterr().out
  print(out)
  rep = size_cli.size_report(packed_file.read_manifest(packed), os.path.getsize(packed))
  assert f"image encoder: {rep['encoder_ratio']:.2f}x" in out
  assert rep["encoder_ratio"] >= 7.5
  assert rep["model_ratio"] >= 6.0
  assert rep["file_size"] == os.path.getsize(packed)
  enc = rep["components"]["image encoder"]
  # Codes: 2 bits for all but the 8-bit patch embedding (paper preset), densely packed.
  assert enc["params_by_bits"]["2"] + enc["params_by_bits"]["8"] == enc["quantized_params"]
  assert enc["code_bytes"] == pytest.approx((2 * enc["params_by_bits"]["2"]
                                             + 8 * enc["params_by_bits"]["8"]) / 8, abs=200)
  assert json.loads(js.read_text())["model_ratio"] == pytest.approx(rep["model_ratio"])


def test_packed_w2_reproduces_the_fake_quant_model(w2, w2_restored, w2_packed):
  cfg, recipe, _, root, _ = w2
  fq = w2_restored
  qk = export.quantized_kernels(fq)
  # The 16-bit file: codes dequantize to exactly the fake-quant kernels, the float rest is the
  # model's rounded as documented, and the activation quantizers' state is carried.
  manifest, data = packed_file.read(w2_packed)
  stored = packed_file.tensors_from(manifest, data)
  for k, v in keymap.state_dict(fq).items():
    want = qk[k] if k in qk else packed_file.round_float(v)
    np.testing.assert_array_equal(stored[k], want, err_msg=k)
  state = packed_file.quantizer_state(fq)
  n_act = sum(layer.input_quantizer is not None for _, layer in export.quantized_layers(fq))
  assert n_act >= 10 and len(state) == 4 * n_act     # alpha, count, mean, std of each A8 input
  assert state.keys() == manifest["quantizer_state"].keys()

  # End to end, with the float rest stored losslessly: same outputs as the fake-quant model.
  f32 = root / "w2_f32.qsam2"
  packed_file.save(f32, fq, _meta(cfg, recipe), float_dtype="float32")
  loaded = ImagePredictor.from_checkpoint(str(f32))
  got = packed_file.quantizer_state(loaded.model)
  assert got.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(got[k], state[k])
  sd32 = keymap.state_dict(loaded.model)
  for k, v in keymap.state_dict(fq).items():
    np.testing.assert_array_equal(sd32[k], qk.get(k, v), err_msg=k)
  ref = _predict(ImagePredictor(fq), _image())
  out = _predict(loaded, _image())
  errs = [rel_err(a, b) for a, b in zip(out, ref)]
  print(f"packed vs fake-quant W2, relative errors (masks, IoU, low-res logits): {errs}")
  # Weights and quantizer state are bit-identical (asserted above), but these are two compiled
  # programs (the fake-quant one dequantizes its kernels inside the graph), which the CPU's
  # kernels (AVX2 / AVX-512) may round an ulp apart; the 8-bit activation quantizers turn such
  # an ulp into a whole code step on the few inputs that sit on a rounding boundary (measured:
  # 0 on Intel, 2.4e-4 on AMD EPYC). So the bound is what a few code steps can move, checked to
  # lie far below a real, small difference: the same model with its float rest rounded to
  # 16 bits (the default packed file; same compiled program as `loaded`).
  rounded = _predict(ImagePredictor.from_checkpoint(str(w2_packed)), _image())
  errs16 = [rel_err(a, b) for a, b in zip(rounded, ref)]
  print(f"16-bit float rest vs fake-quant W2: {errs16}")
  same_mask = float(np.mean((out[0] > 0) == (ref[0] > 0)))
  assert same_mask >= 0.999, same_mask
  assert max(errs) <= 1e-3
  assert max(errs) <= 0.1 * max(errs16)
  assert np.std(ref[2]) > 0.1                 # not a degenerate output


def test_range_forms():
  """Per-channel ranges are stored once where the other half derives bitwise."""
  rng = np.random.default_rng(0)
  step = rng.uniform(0.01, 0.1, 6).astype(np.float32)

  def enc(lo, step, n=3):
    return export.EncodedWeight("w", np.zeros((6, 4), np.uint8), lo, step, 2, n, 0)

  # LSC / min-max / MSE: [-a, a]; the step as XLA computes it (times the reciprocal of n).
  a = rng.uniform(0.1, 1.0, 6).astype(np.float32)
  xla_step = (a + a) * (np.float32(1) / np.float32(3))
  assert packed_file._range_form(enc(-a, xla_step)) == ("symmetric", {"step_rule": "mul_recip"})
  assert packed_file._range_form(enc(-a, (a + a) / np.float32(3)))[0] == "symmetric"
  assert packed_file._range_form(enc(-2 * step, step)) == ("neg_k_step", {"k": 2})   # LSQ
  assert packed_file._range_form(enc(-a, step)) == ("affine", {})


def test_packed_float_rest_storage():
  x = np.array([1e-3, -2.5, 300.0], np.float32)
  assert packed_file.float_storage_dtype(x) == "float16"
  assert packed_file.float_storage_dtype(np.array([1e-6, 1.0], np.float32)) == "bfloat16"
  assert packed_file.float_storage_dtype(np.array([1e5], np.float32)) == "bfloat16"
  assert packed_file.float_storage_dtype(np.zeros(3, np.float32)) == "float16"
  assert np.abs(packed_file.round_float(x) - x).max() <= 300 * 2.0 ** -11


# ---------------------------------------------------------------------------- errors


def test_corrupt_or_missing_checkpoints_give_clear_errors(w2_packed, tmp_path, capsys):
  assert to_torch.main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")]) == 2
  assert "not found" in capsys.readouterr().err
  assert to_torch.main(["--ckpt", str(tmp_path)]) == 2
  assert "nothing to write" in capsys.readouterr().err
  # Packed file: a flipped data byte, a truncated file, garbage.
  data = bytearray(w2_packed.read_bytes())
  data[-100] ^= 0xFF
  (tmp_path / "flip.qsam2").write_bytes(bytes(data))
  (tmp_path / "cut.qsam2").write_bytes(bytes(data[:len(data) // 2]))
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
  for name, msg in (("flip.qsam2", "CRC-32 mismatch"), ("cut.qsam2", "truncated"),
                    ("junk.pt", "junk.pt")):
    with pytest.raises(UserError, match=msg):
      checkpoint.load_sam2(tmp_path / name)
    assert size_cli.main(["--ckpt", str(tmp_path / name)]) == 2
    assert msg in capsys.readouterr().err
  # Orbax: a damaged step (no model data), a directory without steps.
  from convert.random_checkpoint import default_checkpoint
  broken = tmp_path / "broken"
  shutil.copytree(default_checkpoint(), broken)
  shutil.rmtree(broken / "0" / "model")
  assert to_torch.main(["--ckpt", str(broken), "--out", str(tmp_path / "b.pt")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "cannot restore the model state" in err
  assert not (tmp_path / "b.pt").exists()
  (tmp_path / "empty").mkdir()
  assert to_torch.main(["--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "b.pt")]) == 2
  assert "no Orbax checkpoint steps" in capsys.readouterr().err

"""`train.ptq` and `train.calibrate` on the embedded random SAM2.1-t at 256² (CPU).

VRC + MSE against MSE, W4A4, the image encoder's linears quantized (`--preset encoder`: the
layers VRC re-fits; per-layer errors are measured on the float model's inputs, so they do not
depend on the other layers, and the compile stays small). Calibrated on 4 images and measured
on the same 4 (`--eval-images 0`): the PTQ setting, where VRC's criterion is defined. On
images held out from calibration VRC does *not* win on this random-weight model at 256² (it
overfits: near-uniform attention makes the `attn.proj` inputs nearly constant per window, and
late stages have few tokens per input dimension); see the issue report. Both runs are
in-process, so the second reuses the first's compiled forwards.
"""

import json
import os
import re

import numpy as np
import pytest

from qsam2_jax import checkpoint
from qsam2_jax.quant import QLinear
from qsam2_jax.quant.measure import model_fingerprint
from train import calibrate as calibrate_cli
from train import ptq as ptq_cli

COMMON = ["--bits", "4", "--preset", "encoder", "--images", "4", "--eval-images", "0",
          "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def ptq_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ptq")
  runs = {}
  for method in ("mse", "vrc+mse"):
    args = ptq_cli.parse_args(COMMON + ["--method", method, "--out", str(root / method)])
    runs[method] = ptq_cli.run(args)
  return runs


def test_vrc_mse_has_lower_output_error_than_mse(ptq_runs):
  mse, vrc = ptq_runs["mse"].errors, ptq_runs["vrc+mse"].errors
  for name, e in (("mse", mse), ("vrc+mse", vrc)):
    s = e.summary()
    print(f"\n{name}: encoder linears W4A4 {100 * s['encoder_linear_err']:.3f}% "
          f"(weight-only {100 * s['encoder_linear_weight_err']:.3f}%), mask logits "
          f"{100 * s['outputs']['mask_logits']:.3f}%, image embedding "
          f"{100 * s['outputs']['image_embed']:.3f}%, mask IoU {s['mask_iou']:.4f}")
  # The claim: the quantized encoder linears' output error against the float layers (on the
  # float model's inputs) is lower after VRC, with quantized inputs (W4A4) and with float
  # inputs (W4, VRC's own criterion) ...
  assert vrc.encoder_linear_error() < mse.encoder_linear_error()
  assert vrc.encoder_linear_error(weight_only=True) < mse.encoder_linear_error(weight_only=True)
  # ... and so is the end-to-end error of the mask logits.
  assert vrc.outputs["mask_logits"] < mse.outputs["mask_logits"]
  assert set(vrc.layers) == set(mse.layers) and len(vrc.layers) == 51
  assert all(e.weight_err is not None and e.weight_err > 0 for e in vrc.layers.values())


def test_ptq_checkpoint_restores_the_same_model(ptq_runs):
  run = ptq_runs["vrc+mse"]
  meta = checkpoint.read_meta(run.out)
  assert meta["kind"] == "ptq" and meta["quant"] == run.recipe.to_dict()
  assert meta["ptq"]["method"] == "vrc+mse"
  # 4 images at 256² leave the late layers with fewer input rows than input dims: skipped.
  assert meta["vrc"]["num_layers"] + len(meta["vrc"]["skipped"]) == 51
  assert "image_encoder.trunk.blocks.11.mlp.layers.1" in meta["vrc"]["skipped"]
  for name in ("ptq_errors.json", "vrc_report.json", "vrc_layers.csv", "vrc_std.png"):
    assert os.path.getsize(os.path.join(run.out, name)) > 0, name
  restored, _ = checkpoint.load_sam2(run.out)
  assert isinstance(restored.image_encoder.trunk.blocks[0].attn.qkv, QLinear)
  # Same batch shapes as the error pass: the compiled forward is reused.
  ref = model_fingerprint(run.model, run.eval_images)
  got = model_fingerprint(restored, run.eval_images)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
  with open(os.path.join(run.out, "ptq_errors.json")) as f:
    saved = json.load(f)
  assert saved["encoder_linear_err"] == pytest.approx(run.errors.encoder_linear_error())


def test_calibrate_command(tmp_path, capsys):
  out = tmp_path / "vrc"
  code = calibrate_cli.main(["--images", "4", "--eval-images", "0", "--batch-size", "4",
                             "--sweep-layer", "image_encoder.trunk.blocks.1.mlp.layers.1",
                             "--quiet", "--out", str(out)])
  text = capsys.readouterr().out
  assert code == 0, text
  assert re.search(r"VRC on \d+ layers", text) and "end to end" in text
  meta = checkpoint.read_meta(out)
  assert meta["kind"] == "calibrated"
  assert meta["vrc"]["num_layers"] + len(meta["vrc"]["skipped"]) == 51
  assert 0 < meta["vrc"]["std_reduction_mean"] < 1
  for name in ("vrc_report.json", "vrc_layers.csv", "vrc_std.png", "vrc_lambda.png",
               "errors.json"):
    assert os.path.getsize(out / name) > 0, name
  model, _ = checkpoint.load_sam2(out)
  init, _ = checkpoint.load_sam2(meta["source"])
  blk, blk0 = model.image_encoder.trunk.blocks[3], init.image_encoder.trunk.blocks[3]
  k, k0 = np.asarray(blk.mlp.layers[0].kernel[...]), np.asarray(blk0.mlp.layers[0].kernel[...])
  assert np.std(k) < np.std(k0)                                    # re-fitted, less variance
  np.testing.assert_array_equal(np.asarray(blk.mlp.layers[0].bias[...]),
                                np.asarray(blk0.mlp.layers[0].bias[...]))
  np.testing.assert_array_equal(                                   # not an encoder linear
      np.asarray(model.sam_mask_decoder.conv_s0.kernel[...]),
      np.asarray(init.sam_mask_decoder.conv_s0.kernel[...]))


@pytest.mark.parametrize("command, argv, message", [
    (ptq_cli, ["--bits", "1"], "weight bits must be one of"),
    (ptq_cli, ["--act-bits", "5"], "activation bits must be one of"),
    (ptq_cli, ["--method", "gptq"], "invalid choice: 'gptq'"),
    (ptq_cli, ["--method", "mse", "--lambda", "0.1"], "--lambda applies to the vrc+ methods"),
    (ptq_cli, ["--data", "/nonexistent/coco"], "--data /nonexistent/coco does not exist"),
    (ptq_cli, ["--init", "/nonexistent/ckpt"], "checkpoint not found"),
    (calibrate_cli, ["--bits", "1"], "--bits must be one of"),
    (calibrate_cli, ["--lambda", "-1"], "non-negative number or 'auto'"),
    (calibrate_cli, ["--images", "0"], "must be at least 1"),
    (calibrate_cli, ["--data", "/nonexistent/coco"], "does not exist"),
])
def test_command_errors_are_one_line(command, argv, message, tmp_path, capsys):
  assert command.main(argv + ["--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "out").exists()


def test_existing_out_and_help(tmp_path, capsys):
  (tmp_path / "out").mkdir()
  assert ptq_cli.main(["--out", str(tmp_path / "out")]) == 2
  assert "already exists" in capsys.readouterr().err
  for command in (ptq_cli, calibrate_cli):
    with pytest.raises(SystemExit) as e:
      command.parse_args(["--help"])
    assert e.value.code == 0
    assert "--lambda" in capsys.readouterr().out

"""Whole-model QAT (issue 11): the trainer's clip steps, range calibration over clips, and the
check that every quantizer saw data.

Fast: the step schedule, the clip batch, the video flags' errors, the calibration prompts'
coverage, and `require_calibrated` on a toy model. Slow: the bare command's pipeline on the real
SAM2.1-t tree at 64² for each of qsam2, lsq, pact and minmax (~5 min each on 2 loaded cores).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsam2_jax.errors import UserError
from qsam2_jax.model import layers
from qsam2_jax.quant import QLinear, make_rule, quantize_model, set_mode
from qsam2_jax.quant.calibration import require_calibrated, unseen_quantizers
from train import clip_step, qat
from train.config import TrainConfig

# ------------------------------------------------------------------------------ fast checks


def test_clip_step_schedule_and_batch():
  half = TrainConfig.smoke()
  assert half.clip_ratio == 0.5
  assert [half.is_clip_step(s) for s in range(6)] == [True, False] * 3  # first step is a clip
  quarter = TrainConfig(video_ratio=0.25)
  assert [s for s in range(12) if quarter.is_clip_step(s)] == [0, 4, 8]
  assert not any(TrainConfig(video_ratio=0.0).is_clip_step(s) for s in range(5))
  assert all(TrainConfig(video_ratio=1.0).is_clip_step(s) for s in range(5))
  # --data alone: image steps only unless asked; --video-data turns clips on.
  assert TrainConfig(data="x").clip_ratio == 0.0
  assert TrainConfig(data="x", video_data="v").clip_ratio == 0.5
  # About as many frames as an image batch, rounded up to the devices.
  assert TrainConfig(batch_size=16, video_frames=8).video_batch(1) == 2
  assert TrainConfig(batch_size=8, video_frames=3).video_batch(8) == 8
  assert TrainConfig(batch_size=8, video_frames=3).video_batch(2, 3) == 6


@pytest.mark.parametrize("argv,match", [
    (["--video-ratio", "1.5"], "--video-ratio must be in"),
    (["--video-frames", "1"], "--video-frames 1: a clip step needs at least 2 frames"),
    (["--video-data", "/no/such/videos"], "--video-data /no/such/videos does not exist"),
    (["--correction-clicks", "-1"], "--correction-clicks")])
def test_video_flag_errors(argv, match, capsys):
  assert qat.main(argv) == 2
  assert match in capsys.readouterr().err


def test_clip_batch_that_does_not_fit_names_one_that_would():
  with pytest.raises(UserError, match=r"--video-batch-size 3 does not fit 8 device\(s\) in 1 "
                     r"process\(es\): it must be a multiple of 8; use --video-batch-size 8"):
    TrainConfig(video_batch_size=3).video_batch(8)
  assert TrainConfig(video_batch_size=6).video_batch(2, 3) == 6


def test_calibration_plan_covers_every_prompt_kind():
  """Masks, boxes, clicks and corrections over 4 clips; only frame 0 conditions."""
  plan = clip_step.calibration_plan(2, 4, 3, offset=0)
  plan2 = clip_step.calibration_plan(2, 4, 3, offset=2)
  use_points = np.concatenate([plan.use_points, plan2.use_points])
  use_box = np.concatenate([plan.use_box, plan2.use_box])
  correct = np.concatenate([plan.correct, plan2.correct])
  assert use_points.tolist() == [False, True, False, True]
  assert use_box[:, 0].tolist() == [False, True, False, False]  # clip 1 a box, clip 3 a click
  assert correct[:, 0].tolist() == use_points.tolist() and not correct[:, 1:].any()
  assert np.asarray(plan.init_cond).tolist() == [[True, False, False, False]] * 2
  assert plan.from_gt.shape == (2, 4, 3) and not np.asarray(plan.from_gt).any()


class _Two(nnx.Module):
  def __init__(self):
    self.used = layers.Linear(4, 4, rngs=nnx.Rngs(0))
    self.unused = layers.Linear(4, 4, rngs=nnx.Rngs(1))


def test_a_quantizer_without_data_is_an_error_naming_it():
  model = _Two()
  quantize_model(model, [make_rule(r".*", 4, 4)])
  assert isinstance(model.used, QLinear)
  set_mode(model, "calibrate")
  model.used(jnp.ones((2, 4)))
  set_mode(model, "eval")
  unseen = unseen_quantizers(model)
  assert unseen and all(p.startswith("unused/") for p in unseen)
  with pytest.raises(UserError, match=r"quantizer\(s\) saw no data in range calibration: unused/"):
    require_calibrated(model)
  set_mode(model, "calibrate")
  model.unused(jnp.ones((2, 4)))
  require_calibrated(model)  # everything has seen data now


# ------------------------------------------------------------------------------ the pipeline

MEMORY_PATH = ("memory_attention", "memory_encoder", "obj_ptr")


@pytest.mark.slow  # ~10 min per method on 2 loaded CPU cores (compiles VRC, calibration, 2 steps)
@pytest.mark.parametrize("method", ["qsam2", "lsq", "pact", "minmax"])
def test_bare_pipeline_calibrates_and_trains_every_quantizer(method, tmp_path, tmp_path_factory):
  """The bare command (embedded SAM2.1-t at 64², synthetic images and videos, one device) for
  2 steps, a clip step then an image step: every quantizer of the saved model has count > 0,
  and in the first (clip) step every clip factor / step size of memory attention, memory
  encoder and object-pointer layers gets a non-zero gradient (min-max QAT learns no clip factor:
  its ranges are statistics, covered by the count check)."""
  import subprocess
  import sys

  from qat_testlib import REPO
  from qsam2_jax import checkpoint
  from train.logging_utils import read_metrics
  out = tmp_path / "run"
  cache = os.environ.get("QSAM2_TEST_JAX_CACHE") or str(tmp_path_factory.getbasetemp() / "jaxcc")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_NUM_CPU_DEVICES="1", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  res = subprocess.run([sys.executable, "-m", "train.qat", "--bits", "2", "--method", method,
                        "--steps", "2", "--image-size", "64", "--eval-images", "0",
                        "--no-progress", "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=3600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "range calibration on 2 clips of 3 frames" in res.stdout
  model, _ = checkpoint.load_sam2(str(out))
  unseen = unseen_quantizers(model)
  assert not unseen, f"{len(unseen)} quantizers never saw data: {unseen}"
  with open(out / "logs" / "zero_grad_factors.json") as f:
    report = json.load(f)
  assert report["step"] == 0
  memory_factors = sum(any(k in n for k in MEMORY_PATH) for n in report["factors"])
  if method == "minmax":  # ranges are EMA statistics: nothing to learn, no factor to check
    assert memory_factors == 0
  else:
    assert memory_factors > 40
  memory = [n for n in report["zero_gradient"] if any(k in n for k in MEMORY_PATH)]
  assert not memory, f"memory-path clip factors without gradient: {memory}"
  rows = read_metrics(str(out / "logs"))
  assert "clip/loss" in rows[0] and "image/loss" in rows[1]
  assert all(np.isfinite(r["loss"]) for r in rows)
  pact = rows[0]["clip/pact_l2"]
  assert (pact > 0) if method == "pact" else (pact == 0)

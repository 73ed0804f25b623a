"""`train.ptq`'s range calibration over video clips (the memory path), on the reduced SAM2.1-t
at 64² (`qat_testlib`) with the embedded default images and synthetic videos.

Memory attention, the memory encoder and the object-pointer layers run only on clips, so after
an image-only calibration their quantizers have seen nothing (`count` == 0); with clips every
quantizer of the saved checkpoint has data, and `--calib-clips 0` is the one-line error that
names them.
"""

from __future__ import annotations

import re

import pytest
from flax import nnx

from qat_testlib import tiny_init  # noqa: F401 - fixture
from qsam2_jax import checkpoint
from qsam2_jax.quant.calibration import unseen_quantizers
from qsam2_jax.quant.quantizers import Quantizer
from train import ptq as ptq_cli

MEMORY_PATH = ("memory_attention", "memory_encoder", "obj_ptr")
ARGS = ["--bits", "4", "--method", "minmax", "--images", "2", "--eval-images", "0",
        "--batch-size", "2", "--video-frames", "2", "--quiet"]


def _memory_quantizers(model) -> list[str]:
  return ["/".join(map(str, p)) for p, node in nnx.iter_graph(model)
          if isinstance(node, Quantizer) and any(k in "/".join(map(str, p)) for k in MEMORY_PATH)]


# Slow: compiling the quantized clip forward alone takes 2.5-3.5 min on the loaded 2-core CPU
# (measured: image calibration 51 s, clips 158 s, output errors 33 s; the whole test ~6 min).
@pytest.mark.slow
def test_ptq_calibrates_the_memory_path_over_clips(tiny_init, tmp_path, capsys):  # noqa: F811
  out = tmp_path / "ptq"
  res = ptq_cli.run(ptq_cli.parse_args(["--init", tiny_init, *ARGS, "--calib-clips", "2",
                                        "--out", str(out)]))
  assert "range calibration on 2 clips of 2 frames of synthetic videos" in capsys.readouterr().out
  memory = _memory_quantizers(res.model)
  assert len(memory) > 20    # the paper preset quantizes the memory path
  assert unseen_quantizers(res.model) == []
  model, _ = checkpoint.load_sam2(str(out))
  assert unseen_quantizers(model) == [] and checkpoint.check(str(out))["ptq"]["clips"] == 2

  # Without clips: at least every memory-path quantizer (and the clip-only mask-prompt
  # layers mask_downsample and mask_downscaling: measured 154 = 146 + 8) saw no data -> a
  # one-line error naming them.
  assert ptq_cli.main(["--init", tiny_init, *ARGS, "--calib-clips", "0",
                       "--out", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "--calib-clips 0" in err
  unseen = int(re.match(r"error: (\d+) quantizer\(s\) saw no data", err).group(1))
  assert unseen >= len(memory) and "memory_attention/layers/0/" in err
  assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("argv, message", [
    (["--calib-clips", "-1"], "--calib-clips"),
    (["--video-frames", "1"], "--video-frames 1: a clip needs at least 2 frames"),
    (["--video-frames", "0"], "--video-frames"),
    (["--correction-clicks", "-2"], "--correction-clicks"),
    (["--video-data", "/nonexistent/davis"], "--video-data /nonexistent/davis does not exist"),
])
def test_clip_flag_errors(argv, message, tmp_path, capsys):
  assert ptq_cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "out").exists()

"""Whole-predictor latency: JAX `ImagePredictor` vs PyTorch `SAM2ImagePredictor`, same run.

  python -m benchmarks.image_predictor --device cpu --repeats 7

One call = `set_image` on an `--image-hw` uint8 RGB image (pre-processing, image encoder,
feature projections) + one box `predict` (single mask), results copied to the host as numpy,
which is what a user of either API gets. Same random SAM2.1 weights on both sides. The two
implementations alternate round by round (benchmarks/timing.py) after two warm-up rounds (JAX
compiles there); the ratio is the median of per-round ratios. torchvision (which
`SAM2ImagePredictor` imports) is replaced by benchmarks/torchvision_stub.py when absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks.report import emit
from benchmarks.timing import alternate, median_ratio, setup_device, torch_device


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth image with noise (structure for the antialiasing filter to act on)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([128 + 100 * np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)],
                 -1)
  return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def timer(predictor, image: np.ndarray, box: np.ndarray, sync: Callable[[], None]
          ) -> Callable[[], float]:
  def run() -> float:
    t = time.perf_counter()
    predictor.set_image(image)
    masks, scores, low = predictor.predict(box=box, multimask_output=False)
    np.asarray(masks), np.asarray(low)
    sync()
    return time.perf_counter() - t
  return run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.image_predictor", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="t", help="t, s, b+ or l")
  p.add_argument("--image-size", type=int, default=1024, help="model input side")
  p.add_argument("--image-hw", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
  p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                 help="JAX compute dtype (PyTorch stays fp32 eager)")
  p.add_argument("--repeats", type=int, default=5, help="alternating timed rounds")
  p.add_argument("--device", default="auto", help="cpu: both sides on the CPU; auto: default")
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  setup = setup_device(args.device, args.threads)
  import jax.numpy as jnp
  import torch

  from benchmarks import torchvision_stub
  from benchmarks.image_encoder import environment
  from convert.random_checkpoint import build_torch_sam2
  from qsam2_jax.checkpoint import model_from_state_dict
  from qsam2_jax.model.configs import get_config
  from qsam2_jax.predictor import ImagePredictor
  torchvision_stub.install()
  from sam2.sam2_image_predictor import SAM2ImagePredictor

  cfg = get_config(f"sam2.1_hiera_{args.size}", image_size=args.image_size)
  tdev = torch_device(args.device)
  tmodel = build_torch_sam2(cfg, seed=args.seed)
  state_dict = {k: v.detach().cpu().numpy() for k, v in tmodel.state_dict().items()}
  ours = ImagePredictor(model_from_state_dict(
      state_dict, cfg, dtype=jnp.bfloat16 if args.dtype == "bf16" else None))
  ref = SAM2ImagePredictor(tmodel.to(tdev).eval())
  side = cfg.image_embedding_size  # the reference hard-codes the 1024² feature sizes
  ref._bb_feat_sizes = [(side * 4, side * 4), (side * 2, side * 2), (side, side)]
  h, w = args.image_hw
  image = test_image(h, w, args.seed)
  box = np.array([w * 0.2, h * 0.15, w * 0.8, h * 0.85], np.float32)
  sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)

  def torch_run() -> float:
    with torch.inference_mode():
      return timer(ref, image, box, sync)()

  t0 = time.perf_counter()
  times = alternate(args.repeats, {"jax": timer(ours, image, box, lambda: None),
                                   "torch": torch_run}, warmup=2)
  ratio = median_ratio(times, "torch", "jax")
  row = dict(size=args.size, dtype=args.dtype, image_hw=[h, w],
             jax_s=round(statistics.median(times["jax"]), 3),
             torch_s=round(statistics.median(times["torch"]), 3), jax_vs_torch=round(ratio, 3),
             rounds={k: [round(t, 3) for t in v] for k, v in times.items()},
             total_s=round(time.perf_counter() - t0, 1))
  print(json.dumps(row), flush=True)
  env = environment(setup)
  cmd = "python -m benchmarks.image_predictor " + " ".join(
      argv if argv is not None else sys.argv[1:])
  table = "\n".join([
      f"set_image + one box predict, {h}x{w} image, model input {args.image_size}², seconds "
      f"per call (median of {args.repeats} alternating rounds). {env}", f"Command: `{cmd}`", "",
      "| model | JAX dtype | JAX ImagePredictor | SAM2ImagePredictor (fp32 eager) | speed-up |",
      "|---|---|---|---|---|",
      f"| {args.size} | {args.dtype} | {row['jax_s']} | {row['torch_s']} | {ratio:.2f}× |"])
  emit(table, {"env": env, "command": cmd, "rows": [row]}, args.out, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

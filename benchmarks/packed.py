"""Packed low-bit weights kept packed in memory vs the same file dequantized at load.

  python -m benchmarks.packed --device cpu --size t --bits 2 --repeats 5

Random SAM2.1 weights, quantized weight-only with `QuantRecipe(bits, act_bits=16, preset)`
(the preset's high-precision layers at 8 bits), written as a packed file (16-bit float rest).
The file is then loaded twice: `packed_file.load` (every kernel dequantized to float32 at load,
what `from_checkpoint` does by default) and `packed_model.load_packed` (`keep_packed=True`:
codes and per-channel ranges stay on the device, kernels are dequantized inside the jitted
forward). Reports the resident parameter bytes (the model's live device buffers) of both and
of the float32 model, and the latency of `set_image` + one box `predict` on a 480x640 image,
the two loads alternating round by round (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from benchmarks.report import emit
from benchmarks.timing import alternate, median_ratio, setup_device


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.packed", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="t")
  p.add_argument("--bits", type=int, default=2)
  p.add_argument("--preset", default="paper")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--device", default="auto")
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  setup = setup_device(args.device, args.threads)
  from benchmarks.image_encoder import environment
  from benchmarks.image_predictor import test_image, timer
  from convert.random_checkpoint import build_torch_sam2
  from qsam2_jax.checkpoint import model_from_state_dict
  from qsam2_jax.model.configs import get_config
  from qsam2_jax.predictor import ImagePredictor
  from qsam2_jax.quant import packed_file, set_mode
  from qsam2_jax.quant.packed_model import load_packed, resident_bytes
  from qsam2_jax.quant.recipe import QuantRecipe

  cfg = get_config(f"sam2.1_hiera_{args.size}", image_size=args.image_size)
  sd = {k: v.detach().numpy() for k, v in build_torch_sam2(cfg, seed=args.seed).state_dict().items()}
  float32_bytes = sum(4 * v.size for v in sd.values())
  recipe = QuantRecipe(bits=args.bits, act_bits=16, preset=args.preset)
  model = model_from_state_dict(sd, cfg)
  recipe.apply(model)
  set_mode(model, "eval")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.qsam")
    packed_file.save(path, model, {"config": cfg.name, "image_size": cfg.image_size,
                                   "quant": recipe.to_dict(), "kind": "benchmark"})
    file_bytes = os.path.getsize(path)
    del model
    dequantized, _ = packed_file.load(path)
    kept, _ = load_packed(path)
  sizes = {"float32_model": float32_bytes, "dequantized_at_load": resident_bytes(dequantized),
           "kept_packed": resident_bytes(kept), "file": file_bytes}
  h, w = 480, 640
  image = test_image(h, w, args.seed)
  box = np.array([w * 0.2, h * 0.15, w * 0.8, h * 0.85], np.float32)
  timers = {"dequantized": timer(ImagePredictor(dequantized), image, box, lambda: None),
            "packed": timer(ImagePredictor(kept), image, box, lambda: None)}
  t0 = time.perf_counter()
  times = alternate(args.repeats, timers, warmup=2)
  row = dict(size=args.size, recipe=recipe.tag, bytes=sizes,
             seconds={k: round(statistics.median(v), 3) for k, v in times.items()},
             packed_vs_dequantized_speed=round(median_ratio(times, "dequantized", "packed"), 3),
             rounds={k: [round(t, 3) for t in v] for k, v in times.items()},
             total_s=round(time.perf_counter() - t0, 1))
  print(json.dumps(row), flush=True)
  env = environment(setup)
  cmd = "python -m benchmarks.packed " + " ".join(argv if argv is not None else sys.argv[1:])
  mb = lambda b: f"{b / 2**20:.1f} MiB"
  table = "\n".join([
      f"Packed {recipe.tag} SAM2.1-{args.size}: resident parameter bytes and set_image + box "
      f"predict ({h}x{w}, model input {args.image_size}², median of {args.repeats} alternating "
      f"rounds). {env}", f"Command: `{cmd}`", "",
      "| load | resident parameters | vs float32 | seconds per call |", "|---|---|---|---|",
      f"| float32 model | {mb(float32_bytes)} | 1.00× | - |",
      f"| packed file, dequantized at load | {mb(sizes['dequantized_at_load'])} | "
      f"{float32_bytes / sizes['dequantized_at_load']:.2f}× | {row['seconds']['dequantized']} |",
      f"| packed file, keep_packed=True | {mb(sizes['kept_packed'])} | "
      f"{float32_bytes / sizes['kept_packed']:.2f}× | {row['seconds']['packed']} |", "",
      f"File: {mb(file_bytes)}. Speed of keep_packed relative to the dequantized load: "
      f"{row['packed_vs_dequantized_speed']:.2f}× (median per-round ratio)."])
  emit(table, {"env": env, "command": cmd, "rows": [row]}, args.out, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Quantization benchmarks: VRC wall time, and the fake-quant forward's cost over the FP forward.

  python -m benchmarks.quant                                   # GPU: b+, 16 images at 1024², batch 8
  python -m benchmarks.quant --config sam2.1_hiera_t --image-size 256 --images 2 --batch 1 \\
      --iters 1 --repeats 1                                    # a CPU smoke run

1. VRC of every image-encoder linear of the model (`qsam2_jax.quant.calibration.run_vrc`), from
   `--images` random images, end to end: Gram collection (compile included) and the solves, for
   a fixed lambda_0 and for auto-lambda at `--bits`; the second of two runs is also reported
   (compiled). Target on b+ at 1024² with 16 images: < 60 s.
2. Forward of the whole image path (`calibration.model_outputs`: image encoder, neck, prompt
   encoder and mask decoder with one box + point prompt per image) at batch `--batch` in bf16
   compute: the float model against the W`--qbits`A`--qbits` fake-quantized one (`--method`,
   `paper` preset, calibrated, evaluation mode). Target: quantized ≤ 1.2x the float time.

Random weights (speed does not depend on them). Prints a markdown table with the device, the
versions, the date and the command (and writes it with --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

from benchmarks.report import emit
from benchmarks.timing import median_seconds
from qsam2_jax.cli import ArgumentParser, short_dtype_name


def environment() -> Dict[str, str]:
  import flax
  import jax
  return {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__,
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def bench_vrc(cfg, args) -> List[Dict[str, object]]:
  import numpy as np

  from qsam2_jax.model.sam2 import build_sam2
  from qsam2_jax.quant.calibration import run_vrc

  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.images, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  rows = []
  for lam0 in (3e-3, "auto"):
    for attempt in ("first (compile)", "second"):
      model = build_sam2(cfg, seed=0)
      t = time.perf_counter()
      result = run_vrc(model, images, lam0=lam0, bits=args.bits, batch_size=args.vrc_batch,
                       progress=False)
      total = time.perf_counter() - t
      s = result.summary()
      row = dict(part="vrc", lam0=str(lam0), run=attempt, layers=s["num_layers"],
                 total_s=round(total, 2), grams_s=round(result.seconds["grams"], 2),
                 solve_s=round(result.seconds["solve"], 2),
                 sweep_s=round(result.seconds["sweep"], 2),
                 std_reduction=round(100 * s["std_reduction_mean"], 2))
      print(json.dumps(row), flush=True)
      rows.append(row)
      del model, result
  return rows


def bench_forward(cfg, args) -> List[Dict[str, object]]:
  import jax.numpy as jnp
  import numpy as np

  from qsam2_jax.model.sam2 import build_sam2
  from qsam2_jax.quant.calibration import _outputs_jit, batches, calibrate_ranges, commit_state
  from qsam2_jax.quant.recipe import QuantRecipe

  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  rng = np.random.default_rng(1)
  images = rng.normal(size=(args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  batch = batches(images, args.batch)[0]
  batch = (batch[0].astype(dtype), batch[1])
  rows = []
  fp = commit_state(build_sam2(cfg, dtype=dtype, seed=0))
  t_fp = median_seconds(lambda: _outputs_jit(fp, batch), args.iters, args.repeats)
  rows.append(dict(part="forward", model="float", dtype=args.dtype, batch=args.batch,
                   ms=round(1e3 * t_fp, 2), ratio=1.0))
  print(json.dumps(rows[-1]), flush=True)
  recipe = QuantRecipe(bits=args.qbits, method=args.method, preset="paper")
  q = build_sam2(cfg, dtype=dtype, seed=0)
  recipe.apply(q)
  calibrate_ranges(q, images[:args.batch], batch_size=args.batch, progress=False)
  commit_state(q)
  t_q = median_seconds(lambda: _outputs_jit(q, batch), args.iters, args.repeats)
  rows.append(dict(part="forward", model=recipe.tag, dtype=args.dtype, batch=args.batch,
                   ms=round(1e3 * t_q, 2), ratio=round(t_q / t_fp, 3)))
  print(json.dumps(rows[-1]), flush=True)
  return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m benchmarks.quant", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="sam2.1_hiera_b+")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--images", type=int, default=16, help="VRC calibration images")
  p.add_argument("--vrc-batch", type=int, default=4, help="images per VRC Gram forward")
  p.add_argument("--bits", type=int, default=2, help="target weight bits of auto-lambda")
  p.add_argument("--batch", type=int, default=8, help="forward batch")
  p.add_argument("--dtype", type=short_dtype_name, default="bf16")
  p.add_argument("--qbits", type=int, default=2, help="W/A bits of the fake-quant model")
  p.add_argument("--method", default="lsc", help="quantizer method of the fake-quant model")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--parts", default="vrc,forward", help="comma list of vrc, forward")
  p.add_argument("--out", default=None, help="also write the markdown table here")
  p.add_argument("--json", default=None, help="also write raw results as JSON here")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  from qsam2_jax.model.configs import get_config
  cfg = get_config(args.config, image_size=args.image_size)
  vargs = argparse.Namespace(**{**vars(args), "vrc_batch": min(args.vrc_batch, args.images)})
  parts = args.parts.split(",")
  rows = []
  if "vrc" in parts:
    rows += bench_vrc(cfg, vargs)
  if "forward" in parts:
    rows += bench_forward(cfg, args)
  env = environment()
  cmd = "python -m benchmarks.quant " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [f"Quantization benchmarks, {cfg.name} at {args.image_size}². "
           + ", ".join(f"{k} {v}" for k, v in env.items()), f"Command: `{cmd}`", ""]
  vrc = [r for r in rows if r["part"] == "vrc"]
  if vrc:
    lines += [f"VRC of {vrc[0]['layers']} image-encoder linears from {args.images} images "
              f"(auto-lambda at W{args.bits}; target < 60 s end to end):", "",
              "| lambda_0 | run | total s | Gram pass s | solves s | Fig. 5 sweep s | "
              "weight std reduction |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['lam0']} | {r['run']} | {r['total_s']} | {r['grams_s']} | {r['solve_s']} "
              f"| {r['sweep_s']} | {r['std_reduction']} % |" for r in vrc]
    lines.append("")
  fwd = [r for r in rows if r["part"] == "forward"]
  if fwd:
    lines += [f"Image-path forward (encoder + decoder, one box+point prompt per image), batch "
              f"{args.batch}, {args.dtype} compute (target: quantized ≤ 1.2x float):", "",
              "| model | ms / batch | vs float |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['ms']} | {r['ratio']}x |" for r in fwd]
  table = "\n".join(lines)
  emit(table, {"env": env, "rows": rows}, args.out, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

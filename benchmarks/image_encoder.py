"""Image-encoder throughput: JAX (ours) vs the PyTorch `sam2` package, in the same run.

  python -m benchmarks.image_encoder                       # GPU: t, b+, l; batch 1, 8; fp32, bf16
  python -m benchmarks.image_encoder --device cpu --sizes t --batches 1 --dtypes fp32 \
      --impls jax,torch-eager --iters 1 --repeats 7     # CPU: JAX vs PyTorch eager, alternating

Random weights (speed does not depend on them). The implementations of one cell alternate
round by round (benchmarks/timing.py): after two warm-up rounds, each of `--repeats` rounds
times one loop of `--iters` forwards per implementation. A cell is the median over rounds;
"jax / torch-eager" is the median of the per-round speed ratios. img/s = batch / (time per
forward). `--device cpu` runs both sides on the CPU with `--threads` cores each. TFLOP/s uses SAM2's
FLOPs per image at 1024² (2 per multiply-add, window padding included), scaled by
(image_size/1024)² for other sizes. Prints a markdown table (and writes it with --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks.report import emit
from benchmarks.timing import alternate, loop_seconds, median_ratio, setup_device, torch_device
from qsam2_jax.cli import ArgumentParser, short_dtype_list

# FLOPs per image at 1024² from the issue (2 per multiply-add, window padding included).
GFLOPS_1024 = {"t": 290.8, "b+": 645.1, "l": 1821.2}


def jax_runner(size: str, batch: int, dtype: str, image_size: int) -> Callable[[], object]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from qsam2_jax.model.configs import get_config
  from qsam2_jax.model.image_encoder import ImageEncoder

  cfg = get_config(f"sam2.1_hiera_{size}", image_size=image_size)
  compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  enc = ImageEncoder(cfg, dtype=compute, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(enc)

  @jax.jit
  def fwd(state, x):
    out = nnx.merge(graphdef, state)(x)
    return out["vision_features"], out["backbone_fpn"]

  x = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3), compute)
  return lambda: fwd(state, x)


def torch_runner(size: str, batch: int, dtype: str, image_size: int, compiled: bool,
                 device: str = "cpu") -> Callable[[], object]:
  import torch

  from convert.random_checkpoint import build_torch_sam2
  from qsam2_jax.model.configs import get_config

  cfg = get_config(f"sam2.1_hiera_{size}", image_size=image_size)
  enc = build_torch_sam2(cfg, randomize=False).image_encoder.to(device).eval()
  fwd = torch.compile(enc) if compiled else enc
  x = torch.randn(batch, 3, image_size, image_size, device=device)
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=(dtype == "bf16"))

  def run():
    with torch.inference_mode(), amp:
      return fwd(x)["vision_features"]

  return run


def _sync_jax(out) -> None:
  import jax
  jax.block_until_ready(out)


def _sync_torch(out) -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def environment(extra: Optional[Dict[str, object]] = None) -> Dict[str, object]:
  import jax
  info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
          "jax": jax.__version__, "device": str(jax.devices()[0].device_kind), **(extra or {})}
  try:
    import flax
    import torch
    info.update(flax=flax.__version__, torch=torch.__version__)
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  except ImportError:
    pass
  return info


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m benchmarks.image_encoder", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="t,b+,l")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--dtypes", type=short_dtype_list, default="fp32,bf16")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds")
  p.add_argument("--impls", default="jax,torch-eager,torch-compile",
                 help="comma list of jax, torch-eager, torch-compile")
  p.add_argument("--device", default="auto", help="cpu: both sides on the CPU; auto: default")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU cores for both sides (default: all the process may use)")
  p.add_argument("--out", default=None, help="also write the markdown table here")
  p.add_argument("--json", default=None, help="also write raw results as JSON here")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  setup = setup_device(args.device, args.threads)
  sizes, dtypes = args.sizes.split(","), args.dtypes
  batches = [int(b) for b in args.batches.split(",")]
  impls = args.impls.split(",")
  refs = [i for i in impls if i != "jax"] if "jax" in impls else []
  tdev = torch_device(args.device) if refs else "cpu"
  rows: List[Dict[str, object]] = []
  for size in sizes:
    gflop = GFLOPS_1024.get(size, float("nan")) * (args.image_size / 1024) ** 2
    for batch in batches:
      for dtype in dtypes:
        timers = {}
        for impl in impls:
          if impl == "jax":
            fn, sync = jax_runner(size, batch, dtype, args.image_size), _sync_jax
          else:
            fn = torch_runner(size, batch, dtype, args.image_size, impl == "torch-compile", tdev)
            sync = _sync_torch
          timers[impl] = (lambda fn=fn, sync=sync: loop_seconds(fn, args.iters, sync))
        t0 = time.perf_counter()
        times = alternate(args.repeats, timers, warmup=2)
        for impl in impls:
          ips = batch / statistics.median(times[impl])
          row = dict(size=size, batch=batch, dtype=dtype, impl=impl, img_s=round(ips, 3),
                     tflops=round(ips * gflop / 1e3, 3),
                     rounds_s=[round(t, 3) for t in times[impl]],
                     total_s=round(time.perf_counter() - t0, 1))
          if impl == "jax":
            row.update({f"jax_vs_{r}": round(median_ratio(times, r, "jax"), 3) for r in refs})
          rows.append(row)
          print(json.dumps(row), flush=True)
  env = environment(setup)
  cmd = "python -m benchmarks.image_encoder " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [f"Image encoder, {args.image_size}², img/s (TFLOP/s), median of {args.repeats} "
           f"alternating rounds; jax / X = median per-round speed ratio. {env}",
           f"Command: `{cmd}`", "",
           "| model | batch | dtype | " + " | ".join(impls)
           + "".join(f" | jax / {r}" for r in refs) + " |",
           "|---|---|---|" + "---|" * (len(impls) + len(refs))]
  for size in sizes:
    for batch in batches:
      for dtype in dtypes:
        cell = {r["impl"]: r for r in rows if (r["size"], r["batch"], r["dtype"])
                == (size, batch, dtype)}
        cells = [f"{cell[i]['img_s']} ({cell[i]['tflops']})" for i in impls]
        cells += [f"{cell['jax'][f'jax_vs_{r}']:.2f}×" for r in refs]
        lines.append(f"| {size} | {batch} | {dtype} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  emit(table, {"env": env, "command": cmd, "rows": rows}, args.out, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

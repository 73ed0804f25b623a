"""Memory of one whole-model clip train step: XLA's buffer assignment and the resident set.

  python -m benchmarks.clip_memory                       # 1 device, W2 paper, 256², 1 clip x 3 frames
  python -m benchmarks.clip_memory --remat               # frames, clicks and Hiera blocks recomputed
  python -m benchmarks.clip_memory --devices 8 --mesh data=4,fsdp=2 --clips 8 --run

Figures in docs/status.md (#11, session 6) came from this measurement (then a scratch script):
temporaries 8.2 GB -> 3.1 GB for one clip with frame/click remat; 1.9 GB per device on
data=4,fsdp=2 with Hiera remat too; resident 9.2 -> 5.3 GB after `malloc_trim`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Optional, Sequence


def _vmrss_mib() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS"):
        return int(line.split()[1]) // 1024
  return -1


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (default 1)")
  p.add_argument("--mesh", default=None, help="e.g. data=4,fsdp=2 (default: one device)")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--clips", type=int, default=1)
  p.add_argument("--frames", type=int, default=3)
  p.add_argument("--objects", type=int, default=3)
  p.add_argument("--correction-clicks", type=int, default=7)
  p.add_argument("--bits", type=int, default=2, help="W/A bits of the paper preset; 0 = float")
  p.add_argument("--remat", action="store_true", help="recompute frames, clicks, Hiera blocks")
  p.add_argument("--run", action="store_true", help="also execute the step; report peak VmRSS")
  a = p.parse_args(argv)
  if "jax" in sys.modules:
    raise SystemExit("error: run as `python -m benchmarks.clip_memory` (jax already imported)")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={a.devices}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qsam2_jax import parallel
  from qsam2_jax.data import synthetic
  from qsam2_jax.model.configs import get_config
  from qsam2_jax.model.sam2 import build_sam2
  from qsam2_jax.video_io import normalize_frame
  from train import clip_forward as cf
  from train import clip_step
  from train import step as steplib
  from train.host_memory import release_freed_memory

  model = build_sam2(get_config("sam2.1_hiera_t", image_size=a.image_size), seed=1)
  if a.bits:
    from qsam2_jax.quant.recipe import QuantRecipe
    QuantRecipe(bits=a.bits, preset="paper").apply(model)
  steplib.prepare_for_training(model, remat=a.remat)
  opt = steplib.make_optimizer(model, lr=1e-5, clip_lr=1e-2, weight_decay=0.01, steps=10,
                               warmup=0, grad_clip=1.0)
  mesh = parallel.make_mesh(a.mesh, devices=None if a.mesh else jax.devices()[:1])
  steps = clip_step.ClipSteps(model, opt, mesh, cf.ClipConfig(
      correction_clicks=a.correction_clicks, remat=a.remat), seed=3)
  images, masks = [], []
  for i in range(a.clips):
    v = synthetic.synth_video(0, i, a.frames, (a.image_size, a.image_size))
    images.append(np.asarray(normalize_frame(jnp.asarray(v.frames))))
    masks.append(np.stack([v.labels == j + 1 for j in range(a.objects)], axis=1))
  batch = steps.batch({"images": np.stack(images).astype(np.float32), "masks": np.stack(masks),
                       "valid": np.ones((a.clips, a.objects), bool)})
  ms, os_ = steps.place_state(model, opt)
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = steps._train.lower(ms, os_, batch).compile()
  ma = compiled.memory_analysis()
  print(f"jax {jax.__version__}, {a.devices} device(s), mesh {a.mesh or 'one'}, "
        f"{a.clips} clip(s) x {a.frames} frames x {a.objects} objects, "
        f"{a.correction_clicks} clicks, {a.image_size}², W{a.bits or 32}, remat {a.remat}")
  print(f"compile {time.time() - t0:.0f} s; per device: temporaries "
        f"{ma.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
        f"{ma.argument_size_in_bytes / 2**20:.0f} MiB")
  print(f"resident after compile {_vmrss_mib()} MiB", end="")
  release_freed_memory()
  print(f", after malloc_trim {_vmrss_mib()} MiB")
  if a.run:
    peak = [0]

    def watch():
      while True:
        peak[0] = max(peak[0], _vmrss_mib())
        time.sleep(0.2)
    threading.Thread(target=watch, daemon=True).start()
    t0 = time.time()
    with jax.set_mesh(mesh):
      _, _, metrics = compiled(ms, os_, batch)
    loss = float(jax.device_get(metrics["loss"]))
    print(f"step {time.time() - t0:.0f} s, loss {loss:.3f}, peak resident {peak[0]} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())

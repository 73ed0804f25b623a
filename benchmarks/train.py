"""Trainer benchmark: QAT step time, img/s and MFU, float vs W2A2 Q-SAM2 (issue 5 item 7).

  python -m benchmarks.train                                 # GPU: t and b+ at 1024², bf16, fp
                                                             # and qsam2, the largest batch
  python -m benchmarks.train --configs sam2.1_hiera_b+ --out docs/benchmarks.md  # one at a time
  python -m benchmarks.train --configs sam2.1_hiera_t --image-size 256 --batches 1 --iters 1 \\
      --dtype fp32 --tiny                                    # a CPU smoke run

One train step is `train.step.Steps`' jitted step (forward, SAM2 loss, backward, AdamW update;
states donated) on the whole mesh, fed a synthetic batch with the pipeline's keys, shapes and
dtypes (`data.pipeline.batch_shapes`: K masks per image, GT at the input side). Random weights,
uncalibrated quantizers (speed depends on neither). The step is compiled ahead of time (compile
s), then timed: the median of --iters single steps after warm-up.

--batches auto doubles the global batch (from the device count) until XLA runs out of memory,
per method; each method is then timed at its largest batch and at the largest batch every
method fits, so the W2A2 / FP ratio compares equal batches. Set XLA_PYTHON_CLIENT_MEM_FRACTION
(e.g. .95) to let XLA use more than its default share of the GPU.

FLOPs: "analytic" = 3 x the image encoder's forward FLOPs per image (the usual fwd + 2x bwd rule;
t 290.8, b+ 645.1 GFLOP at 1024², scaled by (S/1024)²; the decoder is left out); "XLA" = the
compiled step's `cost_analysis()`, per device times the device count. MFU uses the analytic
figure (comparable with the literature) over the peak of every device. Targets: W2A2 step
<= 1.2x the FP step; MFU >= 40 % for b+.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.image_encoder import GFLOPS_1024
from benchmarks.quant import environment
from benchmarks.report import emit
from benchmarks.timing import median_seconds
from qsam2_jax.cli import ArgumentParser, short_dtype_name

# (device_kind substring, bf16 peak, fp32 peak) in FLOP/s, dense, per device; first match wins.
PEAKS = (("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12), ("H200", 989e12, 67e12),
         ("A100", 312e12, 19.5e12))


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak FLOP/s of one device, None when unknown (CPUs)."""
  for key, bf16, fp32 in PEAKS:
    if key.lower() in device_kind.lower():
      return bf16 if dtype == "bf16" else fp32
  return None


def xla_flops(compiled: Any) -> Optional[float]:
  """`cost_analysis()` FLOPs of a compiled executable (a dict, a list of dicts, or None)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = cost.get("flops") if cost else None
  return float(flops) if flops is not None and flops >= 0 else None


def is_oom(e: BaseException) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def synthetic_batch(batch: int, image_size: int, masks: int, seed: int = 0
                    ) -> Dict[str, np.ndarray]:
  """Random inputs shaped exactly as the pipeline's batches: box GT masks prompted half by
  their box, half by one or two clicks (so both the single- and the multimask loss run)."""
  from qsam2_jax.data import pipeline, prompts
  cfg = pipeline.DataConfig(image_size=image_size, prompts=prompts.PromptConfig(max_masks=masks))
  shapes = pipeline.batch_shapes(batch, cfg)
  rng = np.random.default_rng(seed)
  s, g, (b, k, p) = image_size, cfg.gt_size, shapes["point_labels"][0]
  lo = rng.uniform(0, 0.5, (b, k, 2))
  hi = lo + rng.uniform(0.1, 0.5, (b, k, 2))
  boxes = np.concatenate([lo, hi], -1) * s
  ys = (np.arange(g) + 0.5) / g
  inside = lambda a: (ys >= lo[..., a, None]) & (ys < hi[..., a, None])  # noqa: E731
  labels = np.full((b, k, p), prompts.PAD_LABEL, np.int32)
  labels[..., 0] = prompts.POS_LABEL
  labels[..., 1] = np.where(rng.random((b, k)) < 0.5, prompts.NEG_LABEL, prompts.PAD_LABEL)
  out = {
      "image": rng.normal(size=(b, s, s, 3)),
      "point_coords": (lo[..., None, :] + rng.uniform(0, 0.1, (b, k, p, 2))) * s,
      "point_labels": labels, "boxes": boxes, "use_box": rng.random((b, k)) < 0.5,
      "gt_masks": inside(1)[..., :, None] & inside(0)[..., None, :],
      "valid": np.ones((b, k), bool), "index": np.arange(b)}
  return {key: np.asarray(out[key], dtype).reshape(shape)
          for key, (shape, dtype) in shapes.items()}


class Bench:
  """One (config, method): the jitted steps, the initial states on the host, compiled steps."""

  def __init__(self, cfg, method: str, args: argparse.Namespace, mesh):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qsam2_jax.model.sam2 import build_sam2
    from qsam2_jax.quant import set_mode
    from train import step as steplib
    from train.config import TrainConfig
    from train.losses import LossConfig
    tc = TrainConfig(bits=args.bits, method=method, masks_per_image=args.masks_per_image)
    model = build_sam2(cfg, seed=0, dtype=jnp.bfloat16 if args.dtype == "bf16" else None)
    recipe = tc.recipe()
    if recipe is not None:
      recipe.apply(model)
      set_mode(model, "train")
    self.label = "fp" if recipe is None else f"W{recipe.bits}A{recipe.effective_act_bits} {method}"
    steplib.prepare_for_training(model)
    opt = steplib.make_optimizer(model, lr=tc.lr, clip_lr=tc.clip_lr, weight_decay=tc.weight_decay,
                                 steps=tc.steps, warmup=tc.warmup, grad_clip=tc.grad_clip)
    self.steps = steplib.Steps(model, opt, mesh, LossConfig())
    self.host = jax.device_get((nnx.state(model), nnx.state(opt)))  # no device memory held
    self.cfg, self.method, self.args, self.compiled = cfg, method, args, {}

  def measure(self, batch: int, timed: bool) -> Dict[str, Any]:
    """Compile (cached per batch) and run the step; `timed`: median of --iters steps.
    Raises XLA's out-of-memory error when the batch does not fit."""
    import jax

    from qsam2_jax.parallel import place
    st = self.steps
    data = st.batch(synthetic_batch(batch, self.cfg.image_size, self.args.masks_per_image))
    state = [place(self.host[0], st.model_sh), place(self.host[1], st.opt_sh)]
    row = dict(config=self.cfg.name, method=self.method, label=self.label, batch=batch)
    try:
      if batch not in self.compiled:
        t = time.perf_counter()
        exe = st.compile_train(state[0], state[1], data)
        self.compiled[batch] = (exe, time.perf_counter() - t)
      exe, row["compile_s"] = self.compiled[batch]

      def step():
        state[0], state[1], metrics = exe(state[0], state[1], data)
        return state, metrics

      if timed:
        row["step_s"] = median_seconds(step, 1, self.args.iters)
        row["loss"] = float(step()[1]["loss"])
      else:
        jax.block_until_ready(step())
      row["xla_flops"] = xla_flops(exe)
    finally:
      del state, data
      gc.collect()
    return row


def largest_fit(bench: Bench, start: int, max_batch: int) -> int:
  """The largest of start, 2 start, 4 start, ... (<= max_batch) whose step runs; 0 if none."""
  best, b = 0, start
  while b <= max_batch:
    try:
      bench.measure(b, timed=False)
    except Exception as e:  # noqa: BLE001
      if not is_oom(e):
        raise
      print(json.dumps(dict(config=bench.cfg.name, method=bench.method, batch=b, fits=False)),
            flush=True)
      bench.compiled.pop(b, None)
      break
    print(json.dumps(dict(config=bench.cfg.name, method=bench.method, batch=b, fits=True)),
          flush=True)
    best, b = b, 2 * b
  return best


def finish(row: Dict[str, Any], gflop_img: Optional[float], peak: Optional[float],
           ndev: int) -> Dict[str, Any]:
  """Adds img/s, FLOPs per step, TFLOP/s and MFU to a measured row."""
  b, sec = row["batch"], row["step_s"]
  row["img_s"] = b / sec
  row["analytic_flops"] = None if gflop_img is None else 3 * gflop_img * 1e9 * b
  if row.get("xla_flops") is not None:
    row["xla_flops"] *= ndev
  row["tflops"] = None if gflop_img is None else row["analytic_flops"] / sec / 1e12
  row["mfu"] = None if peak is None or gflop_img is None else row["tflops"] * 1e12 / (peak * ndev)
  return row


def _fmt(x: Optional[float], spec: str, scale: float = 1.0) -> str:
  return "n/a" if x is None else format(x * scale, spec)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="sam2.1_hiera_t,sam2.1_hiera_b+")
  p.add_argument("--methods", default="fp,qsam2", help="comma list of train.config METHODS")
  p.add_argument("--bits", type=int, default=2, help="W/A bits of the quantized methods")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--dtype", type=short_dtype_name, default="bf16", help="compute dtype")
  p.add_argument("--batches", default="auto",
                 help="'auto' (double until out of memory) or a comma list of global batches")
  p.add_argument("--max-batch", type=int, default=1024, help="auto: stop doubling here")
  p.add_argument("--masks-per-image", type=int, default=8)
  p.add_argument("--iters", type=int, default=10, help="timed steps (median)")
  p.add_argument("--mesh", default=None, help="'data=N,fsdp=M' (default: all devices on data)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="peak TFLOP/s per device for MFU (default: by device kind)")
  p.add_argument("--tiny", action="store_true",
                 help="one Hiera block per stage (smoke runs; no analytic FLOPs)")
  p.add_argument("--out", default=None, help="append the markdown table to this file")
  p.add_argument("--json", default=None, help="write the raw rows as JSON here")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  import dataclasses

  import jax

  from qsam2_jax.model.configs import get_config
  from qsam2_jax.parallel import make_mesh
  mesh = make_mesh(args.mesh)
  ndev = mesh.size
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind, args.dtype)
  methods = args.methods.split(",")
  rows: List[Dict[str, Any]] = []
  for name in args.configs.split(","):
    cfg = get_config(name, image_size=args.image_size)
    if args.tiny:
      cfg = cfg.replace(hiera=dataclasses.replace(cfg.hiera, stages=(1, 1, 1, 1),
                                                  global_att_blocks=(2,)))
    g1024 = None if args.tiny else GFLOPS_1024.get(cfg.size)
    gflop_img = None if g1024 is None else g1024 * (args.image_size / 1024) ** 2
    benches = {m: Bench(cfg, m, args, mesh) for m in methods}
    if args.batches == "auto":
      fit = {m: largest_fit(b, ndev, args.max_batch) for m, b in benches.items()}
      common = min(fit.values())
      plan = {m: sorted({common, fit[m]} - {0}) for m in methods}
    else:
      plan = {m: [int(b) for b in args.batches.split(",")] for m in methods}
      if any(b % ndev for b in plan[methods[0]]):
        raise SystemExit(f"error: --batches must be multiples of the device count ({ndev})")
    for m in methods:
      for b in plan[m]:
        try:
          row = finish(benches[m].measure(b, timed=True), gflop_img, peak, ndev)
        except Exception as e:  # noqa: BLE001
          if not is_oom(e):
            raise
          row = dict(config=cfg.name, method=m, label=benches[m].label, batch=b, oom=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
      benches[m].compiled.clear()
    del benches
    gc.collect()

  env = environment()
  cmd = "python -m benchmarks.train " + " ".join(argv if argv is not None else sys.argv[1:])
  peak_txt = (f"{peak / 1e12:g} TFLOP/s {args.dtype} per device" if peak else "n/a")
  lines = [f"QAT train step, {args.image_size}², {args.dtype} compute, {args.masks_per_image} "
           f"masks per image, mesh {dict(mesh.shape)}" + (" (tiny Hiera)" if args.tiny else "")
           + ". " + ", ".join(f"{k} {v}" for k, v in env.items()), f"Command: `{cmd}`", "",
           f"GFLOP/step: analytic = 3 x image-encoder forward x batch (used for TFLOP/s and MFU), "
           f"XLA = compiled step's cost_analysis (all devices). Peak for MFU: {peak_txt}. "
           "Targets: W2A2 step <= 1.2x FP; MFU >= 40 % for b+.", "",
           "| config | method | batch | step ms | img/s | GFLOP/step analytic | GFLOP/step XLA "
           "| TFLOP/s (analytic) | MFU | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("oom"):
      lines.append(f"| {r['config']} | {r['label']} | {r['batch']} | OOM | | | | | | |")
      continue
    lines.append(
        f"| {r['config']} | {r['label']} | {r['batch']} | {r['step_s'] * 1e3:.1f} "
        f"| {r['img_s']:.2f} | {_fmt(r['analytic_flops'], '.0f', 1e-9)} "
        f"| {_fmt(r['xla_flops'], '.0f', 1e-9)} | {_fmt(r['tflops'], '.1f')} "
        f"| {_fmt(r['mfu'], '.1%')} | {r['compile_s']:.1f} |")
  ratios = []
  for r in rows:
    ref = next((f for f in rows if f["method"] == "fp" and f["config"] == r["config"]
                and f["batch"] == r["batch"] and not f.get("oom")), None)
    if r["method"] != "fp" and ref is not None and not r.get("oom"):
      ratios.append(f"- {r['config']}, batch {r['batch']}: {r['label']} / fp step time = "
                    f"{r['step_s'] / ref['step_s']:.3f}x")
  if ratios:
    lines += ["", "Quantized / float step time (target <= 1.2x):", ""] + ratios
  table = "\n".join(lines)
  emit(table, {"env": env, "command": cmd, "peak_flops": peak, "rows": rows}, args.out,
       args.json, append=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Video propagation speed: JAX `VideoPredictor` vs PyTorch `SAM2VideoPredictor`, same run.

  python -m benchmarks.video                    # GPU: t and b+, 1 and 3 objects, fp32 and bf16
  python -m benchmarks.video --sizes t --image-size 256 --frames 4 --objects 1 --repeats 1
                                                # a CPU smoke run

Both sides get the same random weights (PyTorch's model with randomized constants, its state
dict loaded into ours), the same synthetic JPEG video (`--frames` frames of `--video-size`,
written once) and the same prompts: the first-frame masks of `--objects` objects via
`add_new_mask`, as in semi-supervised VOS. The timed region is one `propagate_in_video` over
the whole video, including the copy of every frame's video-resolution logits to the host (what
an evaluation loop needs); prompts are re-added before each run, outside the timing. The
implementations alternate run by run (benchmarks/timing.py): one warm-up round (compilation
for JAX, in brackets), then `--repeats` rounds; frames/s is the median over rounds and
"jax / X" the median of per-round speed ratios. `--device cpu` runs both sides on the CPU
with `--threads` cores each:

  python -m benchmarks.video --device cpu --sizes t --objects 1,3 --dtypes fp32 --frames 8 \
      --impls jax,torch --repeats 3

PyTorch runs as sam2's own scripts do: `build_sam2_video_predictor(..., device="cuda")`,
`torch.inference_mode`, TF32 matmuls allowed, and for bf16 `torch.autocast(bfloat16)` around
prompting and propagation. Its fp32 mode wraps `memory_attention` to upcast the bfloat16 memory
bank (without autocast it would fail on the dtype mismatch; docs/sam2-port.md, two traps).
Hole filling is off on both sides (sam2 needs its CUDA extension for it). `torch-vos` (opt-in)
is sam2's `vos_optimized=True` predictor (torch.compile, max-autotune; needs CUDA and minutes).
JAX: fp32 = default matmul precision, bf16 = bfloat16 compute with float32 parameters.

`--parts` times the parts of one propagation step instead (random inputs at the model size,
same weights, alternating, fp32): memory attention with `--filled` of the 7 memory-frame slots
filled, the SAM heads, the memory encoder and the resize to the video size (the image encoder
is `benchmarks.image_encoder`). As their predictors do, PyTorch runs the objects one by one and
JAX on CPU too, inside one jitted call (on accelerators as one batch); JAX's first memory
self-attention runs once per frame (`MemoryAttention.frame_start`):

  python -m benchmarks.video --device cpu --parts --objects 1 --filled 1,4,7 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.report import emit
from benchmarks.timing import alternate, median_ratio, setup_device, torch_device

# JAX and PyTorch share the GPU: JAX must not grab 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from qsam2_jax.cli import ArgumentParser, short_dtype_list

IMPLS = ("jax", "torch", "torch-vos")


# ------------------------------------------------------------------------------------ the video


def make_video(folder: str, num_frames: int, size: Tuple[int, int], max_objects: int,
               seed: int = 0) -> Dict[int, np.ndarray]:
  """Writes a synthetic JPEG video into `folder`; returns first-frame masks {obj id: (H, W)}.

  Takes the first generated video with at least `max_objects` objects.
  """
  from PIL import Image

  from qsam2_jax.data.synthetic import JPEG_QUALITY, synth_video
  for index in range(1000):
    video = synth_video(seed, index, num_frames, size)
    ids = [int(i) for i in np.unique(video.labels[0]) if i]
    if len(ids) >= max_objects:
      break
  else:
    raise RuntimeError(f"no synthetic video with {max_objects} objects")
  os.makedirs(folder, exist_ok=True)
  for t in range(num_frames):
    Image.fromarray(video.frames[t]).save(os.path.join(folder, f"{t:05d}.jpg"),
                                          quality=JPEG_QUALITY)
  return {i: video.labels[0] == i for i in ids}


# ------------------------------------------------------------------------------------ runners


class Runner:
  """One predictor on one video: `prompt(masks)` resets and adds the masks on frame 0,
  `propagate()` tracks them through the video and returns the number of frames."""

  def prompt(self, masks: Dict[int, np.ndarray]) -> None:
    raise NotImplementedError

  def propagate(self) -> int:
    raise NotImplementedError


class JaxRunner(Runner):

  def __init__(self, state_dict: Dict[str, np.ndarray], cfg: Any, dtype: str, video_dir: str):
    import jax.numpy as jnp

    from qsam2_jax.checkpoint import model_from_state_dict
    from qsam2_jax.video_predictor import VideoPredictor
    model = model_from_state_dict(state_dict, cfg,
                                  dtype=jnp.bfloat16 if dtype == "bf16" else None)
    self.predictor = VideoPredictor(model, fill_hole_area=0, show_progress=False)
    self.state = self.predictor.init_state(video_dir)

  def prompt(self, masks: Dict[int, np.ndarray]) -> None:
    self.predictor.reset_state(self.state)
    for obj, m in masks.items():
      self.predictor.add_new_mask(self.state, 0, obj, m)

  def propagate(self) -> int:
    n = 0
    for _ in self.predictor.propagate_in_video(self.state):  # logits arrive as host numpy
      n += 1
    return n


class TorchRunner(Runner):

  def __init__(self, model: Any, dtype: str, video_dir: str):
    import torch
    self.torch = torch
    self.model = model
    self.device = next(model.parameters()).device.type
    self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    self._forward = model.memory_attention.forward
    if dtype == "fp32":  # bf16 memories into fp32 linears (docs/sam2-port.md, two traps)
      forward = self._forward

      def upcast(*args, memory=None, **kwargs):
        return forward(*args, memory=memory.float(), **kwargs)

      model.memory_attention.forward = upcast
    with torch.inference_mode(), self.autocast, _quiet():
      self.state = model.init_state(video_dir)

  def close(self) -> None:
    self.model.memory_attention.forward = self._forward

  def _sync(self) -> None:
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def prompt(self, masks: Dict[int, np.ndarray]) -> None:
    with self.torch.inference_mode(), self.autocast:
      self.model.reset_state(self.state)
      for obj, m in masks.items():
        self.model.add_new_mask(self.state, 0, obj, m)
    self._sync()

  def propagate(self) -> int:
    n = 0
    with self.torch.inference_mode(), self.autocast, _quiet():
      for _, _, logits in self.model.propagate_in_video(self.state):
        logits.cpu()  # the host copy an evaluation makes (JAX's predictor yields numpy)
        n += 1
    self._sync()
    return n


def _quiet() -> contextlib.AbstractContextManager:
  """Hides sam2's progress bars (they cannot be turned off there), not its exceptions."""
  return contextlib.redirect_stderr(io.StringIO())


def propagation_timer(runner: Runner, masks: Dict[int, np.ndarray]) -> Any:
  """A timer for `timing.alternate`: prompts (untimed), then times one propagation."""
  def run() -> float:
    runner.prompt(masks)
    t = time.perf_counter()
    run.frames = runner.propagate()
    return time.perf_counter() - t
  run.frames = 0
  return run


def torch_models(cfg: Any, impls: Sequence[str], seed: int, device: str = "cpu"
                 ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """The PyTorch predictors to time and the numpy state dict they share with JAX."""
  import torch

  from convert.random_checkpoint import build_torch_sam2
  if device == "cuda":  # as sam2's benchmark.py
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  eager = build_torch_sam2(cfg, seed=seed, video=True)
  state_dict = {k: v.detach().cpu().numpy() for k, v in eager.state_dict().items()}
  models = {}
  if "torch" in impls:
    models["torch"] = eager.to(device)
  if "torch-vos" in impls:
    if device != "cuda":
      raise SystemExit("torch-vos needs CUDA (torch.compile with max-autotune)")
    from sam2.build_sam import build_sam2_video_predictor
    vos = build_sam2_video_predictor(cfg.torch_yaml, ckpt_path=None, device=device,
                                     vos_optimized=True,
                                     hydra_overrides_extra=[f"++model.image_size={cfg.image_size}"])
    vos.load_state_dict(eager.state_dict())
    vos.fill_hole_area = 0
    models["torch-vos"] = vos.eval()
  return models, state_dict


# ------------------------------------------------------------------------------------ parts


def part_timers(cfg: Any, torch_model: Any, state_dict: Dict[str, np.ndarray], objects: int,
                filled: int, video_hw: Tuple[int, int], seed: int = 0
                ) -> Dict[str, Dict[str, Any]]:
  """{part: {"jax": timer, "torch": timer}} for `timing.alternate`, on random inputs.

  The JAX bank has the predictor's fixed slots (7 frames, 16 pointers) with `filled` frames
  and `filled + 1` pointers valid; PyTorch gets exactly those, unpadded.
  """
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F
  from flax import nnx

  from qsam2_jax.checkpoint import model_from_state_dict
  from qsam2_jax.model import tracking
  from qsam2_jax.model.resize import resize_2d

  model = model_from_state_dict(state_dict, cfg)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  b, h, c, m, size = objects, cfg.image_embedding_size, cfg.d_model, cfg.mem_dim, cfg.image_size
  lo = cfg.low_res_mask_size
  n_s, n_p = tracking.bank_slots(cfg, 1)
  split = c // m
  rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  feat, pos = rand(b, h, h, c), rand(b, h, h, c)
  fpn0, fpn1 = rand(b, 4 * h, 4 * h, c // 8), rand(b, 2 * h, 2 * h, c // 4)
  mems, ptrs = rand(b, n_s, h, h, m), rand(b, n_p, c)
  high_res, low_res = rand(b, 1, size, size), rand(b, 1, lo, lo)
  valid = np.arange(n_s)[None].repeat(b, 0) < filled
  ptr_valid = np.arange(n_p)[None].repeat(b, 0) < filled + 1
  bank = tracking.MemoryBank(
      jnp.asarray(mems, jnp.bfloat16), jnp.asarray(np.arange(n_s)[None].repeat(b, 0) % 7),
      jnp.asarray(valid), jnp.asarray(ptrs), jnp.asarray(np.arange(n_p)[None].repeat(b, 0)),
      jnp.asarray(ptr_valid), jnp.full((b,), n_p, jnp.int32))

  def jitted(fn):
    """As the predictor runs it: on CPU one object after the other (`lax.map` inside the jit,
    `VideoPredictor.objects_one_by_one`), otherwise the objects as one batch."""
    def run(mdl, *a):
      if b == 1 or jax.default_backend() != "cpu":
        return fn(mdl, *a)
      return jax.lax.map(lambda row: jax.tree.map(lambda x: x[0], fn(
          mdl, *jax.tree.map(lambda x: x[None], row))), a)
    f = jax.jit(lambda st, *a: run(nnx.merge(graphdef, st), *a))
    return lambda *a: (lambda: jax.block_until_ready(f(state, *a)))

  def conditioned(mdl, f, p, bank_):  # the first self-attention once per frame, as the predictor
    start = mdl.memory_attention.frame_start(f[:1].reshape(1, h * h, c), p[:1].reshape(1, h * h, c))
    run = lambda row: tracking.memory_conditioned_features(
        mdl, f[:1], p[:1], jax.tree.map(lambda x: x[None], row), start)[0]
    if b == 1:
      return tracking.memory_conditioned_features(mdl, f, p, bank_, start)
    if jax.default_backend() == "cpu":
      return jax.lax.map(run, bank_)
    return tracking.memory_conditioned_features(mdl, f[:1], p[:1], bank_, start)

  jax_parts = {
      "memory attention": (lambda f, *a: lambda: jax.block_until_ready(f(state, *a)))(
          jax.jit(lambda st, *a: conditioned(nnx.merge(graphdef, st), *a)), feat, pos, bank),
      "SAM heads": jitted(lambda mdl, f, a, b_: tracking.forward_sam_heads(
          mdl, f, high_res_features=[a, b_], multimask_output=True))(feat, fpn0, fpn1),
      "memory encoder": jitted(lambda mdl, f, x: tracking.encode_new_memory(
          mdl, f, x, jnp.ones((b, 1)), False)[0])(feat, high_res),
      "resize to video": (lambda f, x: lambda: jax.block_until_ready(f(x)))(
          jax.jit(lambda x: resize_2d(x, video_hw)), low_res),
  }
  seq = lambda x, n=h * h: torch.from_numpy(x.reshape(b, n, -1)).transpose(0, 1).contiguous()
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  t_curr, t_pos = seq(feat), seq(pos)
  t_mem = seq(np.concatenate([mems[:, :filled].reshape(b, -1, m),
                              ptrs[:, :filled + 1].reshape(b, -1, m)], axis=1),
              filled * h * h + (filled + 1) * split)
  t_mem_pos = torch.randn_like(t_mem)
  t_feat, t_fpn0, t_fpn1 = nchw(feat), nchw(fpn0), nchw(fpn1)
  t_high, t_low = torch.from_numpy(high_res), torch.from_numpy(low_res)
  tm, i_ = torch_model, lambda x, i: x[i:i + 1]
  torch_parts = {
      "memory attention": lambda i: tm.memory_attention(
          curr=[t_curr[:, i:i + 1]], curr_pos=[t_pos[:, i:i + 1]], memory=t_mem[:, i:i + 1],
          memory_pos=t_mem_pos[:, i:i + 1], num_obj_ptr_tokens=(filled + 1) * split),
      "SAM heads": lambda i: tm._forward_sam_heads(
          i_(t_feat, i), high_res_features=[i_(t_fpn0, i), i_(t_fpn1, i)],
          multimask_output=True),
      "memory encoder": lambda i: tm._encode_new_memory(
          [t_curr[:, i:i + 1]], [(h, h)], i_(t_high, i), torch.ones(1, 1), False),
      "resize to video": lambda i: F.interpolate(i_(t_low, i), video_hw, mode="bilinear",
                                                 align_corners=False),
  }

  def seconds(fn):
    def run():
      t = time.perf_counter()
      fn()
      return time.perf_counter() - t
    return run

  def torch_run(fn):
    def run():
      with torch.inference_mode():
        for i in range(b):
          fn(i)
    return run

  return {part: {"jax": seconds(jax_parts[part]), "torch": seconds(torch_run(torch_parts[part]))}
          for part in jax_parts}


def run_parts(args: argparse.Namespace, setup: Dict[str, Any]) -> int:
  """`--parts`: ms per part, JAX vs PyTorch, alternating (fp32)."""
  from benchmarks.image_encoder import environment
  from qsam2_jax.model.configs import get_config

  rows = []
  lines = []
  for size in args.sizes.split(","):
    cfg = get_config(f"sam2.1_hiera_{size}", image_size=args.image_size)
    models, state_dict = torch_models(cfg, ["torch"], args.seed, "cpu")
    for k in [int(x) for x in args.objects.split(",")]:
      for filled in [int(x) for x in args.filled.split(",")]:
        if not 1 <= filled <= cfg.num_maskmem:
          raise SystemExit(f"--filled {filled}: expected 1..{cfg.num_maskmem}")
        for part, timers in part_timers(cfg, models["torch"], state_dict, k, filled,
                                        tuple(args.video_size), args.seed).items():
          times = alternate(args.repeats, timers, warmup=1)
          row = dict(size=size, objects=k, filled=filled, part=part,
                     jax_ms=round(1e3 * statistics.median(times["jax"]), 1),
                     torch_ms=round(1e3 * statistics.median(times["torch"]), 1),
                     jax_vs_torch=round(median_ratio(times, "torch", "jax"), 3))
          rows.append(row)
          print(json.dumps(row), flush=True)
          lines.append(f"| {size} | {k} | {filled} | {part} | {row['jax_ms']} | "
                       f"{row['torch_ms']} | {row['jax_vs_torch']:.2f}× |")
  env = environment(setup)
  cmd = "python -m benchmarks.video " + " ".join(sys.argv[1:])
  table = "\n".join([
      f"Parts of one propagation step, model input {args.image_size}², fp32, ms (median of "
      f"{args.repeats} alternating rounds; jax / torch: median per-round speed ratio). {env}",
      f"Command: `{cmd}`", "",
      "| model | objects | filled frames | part | jax | torch | jax / torch |",
      "|---|---|---|---|---|---|---|"] + lines)
  emit(table, {"env": env, "command": cmd, "rows": rows}, args.out, args.json)
  return 0


# ------------------------------------------------------------------------------------ command


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m benchmarks.video", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="t,b+", help="comma list of t, s, b+, l")
  p.add_argument("--objects", default="1,3", help="comma list of object counts")
  p.add_argument("--dtypes", type=short_dtype_list, default="fp32,bf16")
  p.add_argument("--impls", default="jax,torch", help=f"comma list of {', '.join(IMPLS)}")
  p.add_argument("--image-size", type=int, default=1024)
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--video-size", type=int, nargs=2, default=(480, 854), metavar=("H", "W"),
                 help="original frame size (default: DAVIS' 480x854)")
  p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds")
  p.add_argument("--device", default="auto", help="cpu: both sides on the CPU; auto: default")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU cores for both sides (default: all the process may use)")
  p.add_argument("--parts", action="store_true",
                 help="time the parts of one step (fp32, random inputs) instead of a video")
  p.add_argument("--filled", default="4",
                 help="with --parts: comma list of filled memory-frame slots (1..7)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also write the markdown table here")
  p.add_argument("--json", default=None, help="also write raw results as JSON here")
  return p.parse_args(argv)


def _table(rows: List[Dict[str, Any]], args: argparse.Namespace, sizes: Sequence[str],
           objects: Sequence[int], dtypes: Sequence[str], impls: Sequence[str],
           env: Dict[str, str], cmd: str) -> str:
  ratios = [i for i in impls if i.startswith("torch")] if "jax" in impls else []
  lines = [f"Video propagation, model input {args.image_size}², {args.frames} frames of "
           f"{args.video_size[0]}x{args.video_size[1]}, frames/s (median of {args.repeats} "
           f"alternating rounds; warm-up run in seconds in brackets; jax / X: median per-round "
           f"speed ratio). {env}", f"Command: `{cmd}`", "",
           "| model | objects | dtype | " + " | ".join(impls)
           + "".join(f" | jax / {r}" for r in ratios) + " |",
           "|---|---|---|" + "---|" * (len(impls) + len(ratios))]
  for size in sizes:
    for k in objects:
      for dtype in dtypes:
        cell = {r["impl"]: r for r in rows if (r["size"], r["objects"], r["dtype"])
                == (size, k, dtype)}
        cells = [f"{cell[i]['fps']} ({cell[i]['first_s']})" if i in cell else "-" for i in impls]
        cells += [f"{cell['jax'][f'jax_vs_{r}']:.2f}×" if "jax" in cell and r in cell
                  else "-" for r in ratios]
        lines.append(f"| {size} | {k} | {dtype} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  setup = setup_device(args.device, args.threads)
  if args.parts:
    return run_parts(args, setup)
  sizes, dtypes, impls = args.sizes.split(","), args.dtypes, args.impls.split(",")
  objects = [int(k) for k in args.objects.split(",")]
  unknown = sorted(set(impls) - set(IMPLS))
  if unknown:
    raise SystemExit(f"unknown --impls {unknown}; choose from {IMPLS}")
  from benchmarks.image_encoder import environment
  from qsam2_jax.model.configs import get_config

  tdev = torch_device(args.device)
  rows: List[Dict[str, Any]] = []
  with tempfile.TemporaryDirectory() as tmp:
    video_dir = os.path.join(tmp, "video")
    all_masks = make_video(video_dir, args.frames, tuple(args.video_size), max(objects),
                           args.seed)
    for size in sizes:
      cfg = get_config(f"sam2.1_hiera_{size}", image_size=args.image_size)
      models, state_dict = torch_models(cfg, impls, args.seed, tdev)
      for dtype in dtypes:
        runners: Dict[str, Runner] = {
            impl: (JaxRunner(state_dict, cfg, dtype, video_dir) if impl == "jax"
                   else TorchRunner(models[impl], dtype, video_dir)) for impl in impls}
        for k in objects:
          masks = dict(list(all_masks.items())[:k])
          timers = {impl: propagation_timer(r, masks) for impl, r in runners.items()}
          first = alternate(1, timers, warmup=0)
          times = alternate(args.repeats, timers, warmup=0)
          for impl in impls:
            frames = timers[impl].frames
            sec = statistics.median(times[impl])
            row = dict(size=size, objects=k, dtype=dtype, impl=impl,
                       fps=round(frames / sec, 3), ms_per_frame=round(1e3 * sec / frames, 1),
                       first_s=round(first[impl][0], 1),
                       rounds_s=[round(t, 2) for t in times[impl]])
            if impl == "jax":
              row.update({f"jax_vs_{r}": round(median_ratio(times, r, "jax"), 3)
                          for r in impls if r != "jax"})
            rows.append(row)
            print(json.dumps(row), flush=True)
        for runner in runners.values():
          if isinstance(runner, TorchRunner):
            runner.close()
        del runners
        _free_memory()
      del models
      _free_memory()
  env = environment(setup)
  cmd = "python -m benchmarks.video " + " ".join(argv if argv is not None else sys.argv[1:])
  table = _table(rows, args, sizes, objects, dtypes, impls, env, cmd)
  emit(table, {"env": env, "command": cmd, "rows": rows}, args.out, args.json)
  return 0


def _free_memory() -> None:
  import gc
  gc.collect()
  try:
    import torch
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  except ImportError:
    pass


if __name__ == "__main__":
  sys.exit(main())

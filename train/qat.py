"""Quantization-aware training of SAM2 (Q-SAM2): VRC, quantize, calibrate, train, evaluate, save.

  python -m train.qat --bits 2                           # embedded SAM2.1-t + synthetic data, CPU
  python -m train.qat --bits 2 --init ckpt/fp --data /data/sa1b --out runs/w2a2 \\
      --steps 5000 --batch-size 64 --mesh data=8,fsdp=2
  python -m train.qat --out runs/w2a2 --resume           # continue the latest checkpoint

Pipeline: load the float model (--init) -> [qsam2: VRC re-fit of the image encoder's linears on
--vrc-images images] -> quantize (--bits/--act-bits/--method/--preset) -> calibrate the ranges
of every quantizer on --calib-images images and --calib-clips video clips (memory attention,
memory encoder and object pointers only run on clips; a quantizer that saw no data is an error)
-> AdamW (weights at --lr, clip factors at --clip-lr) with SAM2's losses, alternating image steps
and clip steps (--video-ratio of the steps: SAM2's training forward over --video-frames frames
with mask / box / click prompts and --correction-clicks error clicks, train/clip_forward.py),
each one jitted step sharded over the mesh -> periodic mean-IoU evaluation on held-out masks ->
Orbax checkpoints in --out (model, optimizer, quantizer statistics, RNG, both data iterators).
--method fp fine-tunes the float model in the same loop.

The same command runs on every process of a multi-host job (SLURM, Open MPI and Cloud TPU pods
are detected; elsewhere pass --coordinator/--num-processes/--process-id). `checkpoint.load_sam2
(OUT)` restores the trained model; logs/metrics.jsonl holds the metrics (TensorBoard in logs/tb
when tensorboardX or torch's writer is installed). SIGTERM saves a checkpoint before exiting; a
NaN/inf loss stops the run, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from qsam2_jax.cli import (
  ArgumentParser,
  dtype_name,
  nonnegative_float,
  nonnegative_int,
  positive_int,
  vrc_lambda_or_off,
)
from qsam2_jax.errors import UserError, report_user_errors
from train.config import ACT_BITS, BITS, METHODS, PRESETS, TrainConfig
from train.quant_flags import add_quant_option_args

# Flags that may differ when resuming; the others must match the run being resumed.
RESUMABLE = ("steps", "remat", "save_every", "eval_every", "keep", "log_every", "mesh",
             "distributed", "coordinator", "num_processes", "process_id", "out", "resume",
             "progress", "data_threads", "eval_images", "eval_batch_size")


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the message says where to restart."""


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
  d, s = TrainConfig(), TrainConfig.smoke()

  def default(name):  # "(default X; Y on the embedded default)"
    a, b = getattr(d, name), getattr(s, name)
    return f"(default {a}" + (f"; {b} on the embedded default)" if a != b else ")")

  p = ArgumentParser(prog="python -m train.qat", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
  g = p.add_argument_group("quantization")
  g.add_argument("--bits", type=int, choices=BITS,
                 help=f"weight and activation bits {default('bits')}")
  g.add_argument("--act-bits", type=int, choices=ACT_BITS,
                 help="activation bits (default: --bits; 16 = weight-only)")
  g.add_argument("--method", choices=METHODS, help="qsam2 = VRC then LSC quantizers (alias "
                 "vrc+lsc); lsc = LSC alone; lsq, pact, minmax; fp = full-precision fine-tuning "
                 "(default qsam2)")
  g.add_argument("--preset", choices=PRESETS, help="paper: whole model (first/last layers at 8 "
                 "bits); encoder: only the image encoder's linears (default paper)")
  add_quant_option_args(g)  # --high-bits, --lsq-init, --pact-l2, ... (train/quant_flags.py)
  g.add_argument("--vrc-lambda", type=vrc_lambda_or_off,
                 help="VRC lambda_0: a number, 'auto' (per layer) "
                 "or 'off' (no VRC) (default 3e-3)")
  g.add_argument("--vrc-lambda-mode", choices=("relative", "absolute"),
                 help="lambda = lambda_0 * trace(S)/d_in (relative, default) or lambda_0")
  g.add_argument("--vrc-images", type=positive_int, help=f"VRC images {default('vrc_images')}")
  g.add_argument("--calib-images", type=positive_int,
                 help=f"range-calibration images {default('calib_images')}")
  g.add_argument("--calib-clips", type=nonnegative_int,
                 help="range-calibration clips of --video-frames frames, alternating a mask "
                 "prompt and points with correction clicks; the memory path's quantizers see "
                 f"data only there {default('calib_clips')}")
  g = p.add_argument_group("model and data")
  g.add_argument("--init", help="float checkpoint: Orbax directory or official .pt (default: the "
                 "embedded random-weight SAM2.1-t)")
  g.add_argument("--data", help="SA-1B folder, or COCO JSON / folder with annotations.json "
                 "(default: a synthetic dataset generated on first use)")
  g.add_argument("--val-data", help="evaluation set (default: the last --eval-images images of "
                 "--data; a second synthetic set for the default data)")
  g.add_argument("--video-data", help="DAVIS / SA-V folder (JPEGImages/ + Annotations/ with "
                 "palette PNGs, per-object PNGs or SA-V RLE JSON) (default: synthetic videos)")
  g.add_argument("--video-frames", type=positive_int,
                 help=f"frames per training clip (SAM2: 8) {default('video_frames')}")
  g.add_argument("--video-objects", type=positive_int,
                 help=f"objects per clip (SAM2: 3) {default('video_objects')}")
  g.add_argument("--video-ratio", type=nonnegative_float,
                 help="share of the steps that are clip steps, in [0, 1]; 0 = image steps only "
                 "(default 0.5 with --video-data or the embedded default, 0 with --data alone)")
  g.add_argument("--video-batch-size", type=positive_int,
                 help="global clips per clip step (default: --batch-size / --video-frames, at "
                 "least 1, rounded up to a multiple of the devices)")
  g.add_argument("--correction-clicks", type=nonnegative_int,
                 help="iterative correction clicks on corrected frames of a clip (SAM2: 7) "
                 f"{default('correction_clicks')}")
  g.add_argument("--image-size", type=positive_int, help="model input side (default: the "
                 "checkpoint's; 256 for the embedded one)")
  g.add_argument("--masks-per-image", type=positive_int,
                 help=f"masks sampled per image {default('masks_per_image')}")
  g.add_argument("--box-prob", type=nonnegative_float,
                 help="share of masks prompted by their jittered box, the others by clicks, in "
                      f"training and the held-out evaluation {default('box_prob')}")
  g.add_argument("--dtype", type=dtype_name,
                 help=f"compute dtype: bfloat16 (bf16) or float32 (fp32); weights stay float32 "
                 f"{default('dtype')}")
  g = p.add_argument_group("optimization")
  g.add_argument("--steps", type=positive_int, help=f"{default('steps')}")
  g.add_argument("--batch-size", type=positive_int,
                 help=f"global batch, images over all processes {default('batch_size')}")
  g.add_argument("--lr", type=nonnegative_float,
                 help=f"weights' peak learning rate {default('lr')}")
  g.add_argument("--vision-lr", type=nonnegative_float,
                 help="image encoder weights' peak learning rate (SAM2's vision_lr; default: --lr)")
  g.add_argument("--clip-lr", type=nonnegative_float,
                 help=f"clip factors' peak learning rate {default('clip_lr')}")
  g.add_argument("--weight-decay", type=nonnegative_float, help=f"{default('weight_decay')}")
  g.add_argument("--warmup-steps", type=nonnegative_int, help="(default: 5%% of --steps)")
  g.add_argument("--grad-clip", type=nonnegative_float,
                 help="global-norm clip, 0 = off (default 1)")
  g.add_argument("--remat", action=argparse.BooleanOptionalAction,
                 help="recompute image-encoder blocks, clip frames and correction clicks in "
                 "the backward pass instead of storing them: the same loss, a fraction of the "
                 "memory (a 3-frame clip at 256²: 8.2 -> 3.1 GB of XLA temporaries on one "
                 "device), some more compute; with the encoder blocks recomputed the "
                 "gradient moved by 6.7e-3 relative, not yet explained (default off)")
  g.add_argument("--distill", type=nonnegative_float,
                 help="weight of the MSE to the FP model's mask logits (default 0)")
  g.add_argument("--seed", type=int, help="data order, augmentation and prompts (default 0)")
  g = p.add_argument_group("parallelism")
  g.add_argument("--mesh", help="device mesh 'data=N,fsdp=M' (default: all devices on data)")
  g.add_argument("--distributed", choices=("auto", "on", "off"),
                 help="jax.distributed: auto-detect a multi-process launch (default), force, off")
  g.add_argument("--coordinator", help="host:port of process 0 (multi-process without a cluster)")
  g.add_argument("--num-processes", type=positive_int)
  g.add_argument("--process-id", type=nonnegative_int)
  g = p.add_argument_group("checkpoints, evaluation, logs")
  g.add_argument("--out", help="run directory (default: runs/<tag>-<time>)")
  g.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
  g.add_argument("--overwrite", action="store_true", help="start over in an existing --out")
  g.add_argument("--save-every", type=nonnegative_int,
                 help=f"checkpoint period in steps, 0 = only at the end {default('save_every')}")
  g.add_argument("--keep", type=positive_int, help="checkpoints kept (default 3)")
  g.add_argument("--eval-every", type=nonnegative_int,
                 help=f"evaluation period, 0 = only at the end {default('eval_every')}")
  g.add_argument("--eval-images", type=nonnegative_int,
                 help=f"held-out images, 0 = no evaluation {default('eval_images')}")
  g.add_argument("--eval-batch-size", type=positive_int,
                 help="evaluation batch, a multiple of the devices and processes (default: "
                 "--batch-size)")
  g.add_argument("--log-every", type=positive_int, help=f"{default('log_every')}")
  g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
  return p


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, Dict[str, Any]]:
  """(config, the flags given explicitly): smoke defaults without --init and --data."""
  given = vars(build_parser().parse_args(argv))
  given.pop("debug", None)
  base = TrainConfig.smoke if "init" not in given and "data" not in given else TrainConfig
  for key in ("data", "val_data", "init", "video_data"):
    if key in given and not os.path.exists(given[key]):
      raise UserError(f"--{key.replace('_', '-')} {given[key]} does not exist")
  if given.get("resume") and "out" not in given:
    raise UserError("--resume needs --out, the run directory to continue")
  return base(**given), given


# ------------------------------------------------------------------------------ model


def load_init(cfg: TrainConfig, dtype):
  """(float model, SAM2 config, source path) from --init or the embedded checkpoint.

  `checkpoint.load_sam2` applies the metadata's `config_overrides` (reduced architectures).
  """
  from convert.random_checkpoint import default_checkpoint
  from qsam2_jax import checkpoint
  from qsam2_jax.data.synthetic import DEFAULT_IMAGE_SIZE
  path = cfg.init or default_checkpoint(cfg.image_size or DEFAULT_IMAGE_SIZE)
  model, sam_cfg = checkpoint.load_sam2(path, image_size=cfg.image_size, dtype=dtype,
                                        float_only="train.qat --init")
  return model, sam_cfg, path


def sample_images(source, num: int, size: int, seed: int) -> np.ndarray:
  """`num` images of a seeded permutation of `source`, resized and normalized as in training."""
  from qsam2_jax.data.transforms import resize_image
  order = np.random.default_rng([seed, 7]).permutation(len(source))
  picks = [order[i % len(order)] for i in range(num)]
  return np.stack([resize_image(source[int(i)].image, size) for i in picks])


# ------------------------------------------------------------------------------ data


class Subset:
  """Items [start, stop) of a reader (held-out evaluation images)."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int):
    return self.source[self.start + int(i)]


def open_data(cfg: TrainConfig, image_size: Optional[int]):
  """(train source, val source or None, data path).

  Opening a COCO file parses it and checks every annotation (`data.coco`), so `run` calls this
  before loading the model when --data is given; `image_size` is needed only for the embedded
  synthetic data.
  """
  from qsam2_jax.data import coco
  from qsam2_jax.data.synthetic import default_image_data
  path = cfg.data or default_image_data(32, image_size, seed=0)
  train = coco.open_source(path)
  val = None
  if cfg.eval_images:
    if cfg.val_data:
      val = coco.open_source(cfg.val_data)
    elif cfg.data is None:
      val = coco.open_source(default_image_data(max(8, cfg.eval_images), image_size, seed=1))
    else:
      n = min(cfg.eval_images, len(train) // 5)
      if n == 0:
        raise UserError(f"--data {coco.describe(train)}: too few images to hold out an "
                        "evaluation set; pass --val-data or --eval-images 0")
      train, val = Subset(train, 0, len(train) - n), Subset(train, len(train) - n, len(train))
  return train, val, path


def data_config(cfg: TrainConfig, image_size: int, *, train: bool):
  from qsam2_jax.data import pipeline, prompts
  pc = prompts.PromptConfig(max_masks=cfg.masks_per_image, box_prob=cfg.box_prob)
  if train:
    return pipeline.DataConfig(image_size=image_size, prompts=pc, seed=cfg.seed,
                               num_threads=cfg.data_threads)
  return pipeline.DataConfig(image_size=image_size, prompts=pc, seed=cfg.seed + 1,
                             shuffle=False, num_epochs=1, hflip_prob=0.0,
                             num_threads=cfg.data_threads)


def open_video_data(cfg: TrainConfig, image_size: int):
  """The clip source: --video-data, or synthetic videos at the model's input size."""
  from qsam2_jax.data import clips
  return clips.open_videos(cfg.video_data, num_frames=cfg.video_frames,
                           synthetic_size=(image_size, image_size), seed=cfg.seed)


def clip_data_config(cfg: TrainConfig, image_size: int, *, seed_offset: int = 0):
  from qsam2_jax.data import clips
  return clips.ClipDataConfig(num_frames=cfg.video_frames, max_objects=cfg.video_objects,
                              image_size=image_size, seed=cfg.seed + seed_offset,
                              num_threads=cfg.data_threads)


def calibration_clips(cfg: TrainConfig, video_src, image_size: int) -> list:
  """--calib-clips clips, one per batch, identical on every process."""
  from qsam2_jax.data import clips
  it = clips.make_iterator(video_src, 1, clip_data_config(cfg, image_size, seed_offset=2),
                           shard_index=0, shard_count=1)
  return [next(it) for _ in range(cfg.calib_clips)]


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class RunResult:
  """What `run` did (for tests and scripts)."""
  out: str
  step: int
  losses: list
  metrics: Dict[str, float]
  eval: Optional[Dict[str, float]]
  interrupted: bool = False


def _prepare_out(cfg: TrainConfig) -> tuple[str, bool]:
  """(absolute run directory, whether it holds a run): checked, nothing created or deleted.

  Fresh run: absent, empty, or one of our runs with --overwrite (deleted later, once every
  input is validated). --resume: one of our runs with a checkpoint. A folder holding anything
  else is refused, with or without --overwrite. The folder is probed for writing.
  """
  from jax.experimental import multihost_utils
  out = cfg.out
  if out is None:  # one timestamp for every process
    stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
    out = os.path.join("runs", f"{cfg.tag}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}")
  out = os.path.abspath(out)
  from qsam2_jax import preflight
  holds_run = preflight.output_dir(out, "--out", overwrite=cfg.overwrite, resume=cfg.resume)
  if cfg.resume and not preflight.is_checkpoint_dir(out):
    raise UserError(f"--resume: {out} holds no checkpoint of a run to continue")
  return out, holds_run


def _resume_config(cfg: TrainConfig, given: Dict[str, Any], out: str) -> tuple[TrainConfig, dict]:
  """The saved run's config with the resumable flags given now."""
  from qsam2_jax import checkpoint
  meta = checkpoint.read_meta(out)
  saved = TrainConfig(**meta["run"])
  for key, value in given.items():
    if key not in RESUMABLE and value != getattr(saved, key):
      raise UserError(f"--{key.replace('_', '-')} {value} differs from the resumed run's "
                      f"{getattr(saved, key)}; only {', '.join(RESUMABLE)} may change")
  keep = {k: v for k, v in given.items() if k in RESUMABLE and k != "resume"}
  return saved.replace(**keep, resume=True), meta


def run(cfg: TrainConfig, given: Optional[Dict[str, Any]] = None) -> RunResult:
  """Runs (or resumes) QAT as configured; see the module docstring."""
  # -------- processes, devices, output directory
  from qsam2_jax import parallel
  parallel.initialize_distributed(cfg.distributed, coordinator_address=cfg.coordinator,
                                  num_processes=cfg.num_processes, process_id=cfg.process_id)
  import jax
  from jax.experimental import multihost_utils

  from qsam2_jax import checkpoint

  is_main = jax.process_index() == 0
  t_start = time.time()
  # -------- validate everything first: nothing is created, deleted or loaded before this
  out, holds_run = _prepare_out(cfg)
  meta_saved = None
  if cfg.resume:
    cfg, meta_saved = _resume_config(cfg, given or {}, out)
  mesh = parallel.make_mesh(cfg.mesh)
  ndev, nproc = mesh.size, jax.process_count()
  cfg.batch_sizes(ndev, nproc)  # a batch flag that does not fit the mesh names sizes that would
  if meta_saved is None and cfg.init:
    checkpoint.check(cfg.init, "--init", float_only="train.qat --init")
  sources = None
  if cfg.data:   # parses the annotations and checks every one before the model is loaded
    sources = open_data(cfg, None)
  elif cfg.val_data and cfg.eval_images:
    from qsam2_jax.data import coco
    coco.open_source(cfg.val_data)
  was_empty_dir = os.path.isdir(out) and not holds_run   # the user's own empty folder stays
  if holds_run and not cfg.resume and is_main:   # --overwrite, now that the inputs are good
    shutil.rmtree(out)
  if nproc > 1:
    multihost_utils.sync_global_devices("qat_out_ready")
  try:
    return _run(cfg, out, meta_saved, mesh, sources, t_start)
  except BaseException:
    # A fresh run that fails before its first checkpoint leaves nothing behind.
    from qsam2_jax import preflight
    if meta_saved is None and is_main and os.path.isdir(out) and (
        not preflight.is_checkpoint_dir(out)):
      if not was_empty_dir:
        shutil.rmtree(out, ignore_errors=True)
      else:
        for name in os.listdir(out):
          path = os.path.join(out, name)
          if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
          else:
            os.remove(path)
    raise


def _run(cfg: TrainConfig, out: str, meta_saved: Optional[Dict[str, Any]], mesh, sources,
         t_start: float) -> RunResult:
  """`run` once the inputs are validated."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental import multihost_utils

  from qsam2_jax import checkpoint
  from qsam2_jax.data import clips, pipeline
  from qsam2_jax.quant import calibration, set_mode
  from train import clip_forward, clip_step, losses
  from train import step as steplib
  from train.logging_utils import MetricLogger, Progress

  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  ndev, nproc = mesh.size, jax.process_count()
  _, eval_bs = cfg.batch_sizes(ndev, nproc)
  unit = math.lcm(ndev, nproc)
  use_clips = cfg.clip_ratio > 0
  clip_bs = cfg.video_batch(ndev, nproc) if use_clips else 0
  dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else None
  say(f"QAT {cfg.tag} on {ndev} {jax.default_backend()} device(s) in {nproc} process(es), "
      f"mesh {dict(mesh.shape)}; run directory {out}")

  # -------- model: load, VRC, quantize, calibrate (fresh) or abstract structure (resume)
  recipe = cfg.recipe()
  teacher, vrc_summary = None, None
  clip_cfg = clip_forward.ClipConfig(correction_clicks=cfg.correction_clicks, remat=cfg.remat)
  if meta_saved is None:
    model, sam_cfg, source = load_init(cfg, dtype)
    image_size = sam_cfg.image_size
    train_src, val_src, data_path = sources or open_data(cfg, image_size)
    video_src = open_video_data(cfg, image_size)
    if cfg.distill > 0:
      teacher = nnx.clone(model)
    if cfg.use_vrc:
      say(f"VRC (lambda_0 {cfg.vrc_lambda}, {cfg.vrc_lambda_mode}) on {cfg.vrc_images} images")
      images = sample_images(train_src, cfg.vrc_images, image_size, cfg.seed)
      result = calibration.run_vrc(model, images, lam0=cfg.vrc_lambda,
                                   lam_mode=cfg.vrc_lambda_mode, bits=cfg.bits,
                                   batch_size=min(4, cfg.vrc_images),
                                   progress=cfg.progress and is_main)
      vrc_summary = result.summary()
      say(result.table().splitlines()[-1])
      if is_main:
        calibration.write_vrc_report(result, os.path.join(out, "vrc"))
    if recipe is not None:
      _, report = recipe.apply(model)
      say(report.summary().splitlines()[0])
      images = sample_images(train_src, cfg.calib_images, image_size, cfg.seed + 1)
      calibration.calibrate_ranges(model, images, batch_size=min(4, cfg.calib_images),
                                   progress=cfg.progress and is_main, prompt_seed=cfg.seed)
      what = f"range calibration on {cfg.calib_images} images"
      if cfg.calib_clips:
        say(f"range calibration on {cfg.calib_clips} clips of {cfg.video_frames} frames")
        clip_step.calibrate_clips(model, calibration_clips(cfg, video_src, image_size),
                                  clip_cfg, seed=cfg.seed)
        what += f" and {cfg.calib_clips} clips"
      calibration.require_calibrated(model, what)
      set_mode(model, "train")
  else:
    source, data_path = meta_saved.get("source"), meta_saved.get("data")
    sam_cfg = checkpoint.sam_config(meta_saved)
    image_size = sam_cfg.image_size
    train_src, val_src, data_path = sources or open_data(cfg, image_size)
    video_src = open_video_data(cfg, image_size) if use_clips else None
    model = checkpoint.abstract_model(sam_cfg, quant=meta_saved.get("quant"), dtype=dtype)
    if cfg.distill > 0:
      teacher = load_init(cfg.replace(image_size=image_size), dtype)[0]
    vrc_summary = meta_saved.get("vrc")
  steplib.prepare_for_training(model, remat=cfg.remat)
  if teacher is not None:
    steplib.prepare_for_training(teacher, remat=False)
  say(f"model {sam_cfg.name} at {image_size}² from {source}; data {data_path}: "
      f"{len(train_src)} training images" + (f", {len(val_src)} held out" if val_src else ""))
  if use_clips:
    say(f"clip steps: {cfg.clip_ratio:g} of the steps, {clip_bs} clips of {cfg.video_frames} "
        f"frames x {cfg.video_objects} objects, {cfg.correction_clicks} correction clicks, from "
        f"{cfg.video_data or 'synthetic videos'} ({len(video_src)} videos)")

  # -------- optimizer, jitted steps, state on the mesh
  tx_args = dict(lr=cfg.lr, vision_lr=cfg.vision_lr, clip_lr=cfg.clip_lr,
                 weight_decay=cfg.weight_decay, steps=cfg.steps,
                 warmup=cfg.warmup, grad_clip=cfg.grad_clip)
  if meta_saved is None:
    optimizer = steplib.make_optimizer(model, **tx_args)
  else:
    optimizer = nnx.eval_shape(lambda m: steplib.make_optimizer(m, **tx_args), model)
  loss_cfg = losses.LossConfig(weight_distill=cfg.distill)
  steps = steplib.Steps(model, optimizer, mesh, loss_cfg, teacher=teacher,
                        schedule=steplib.lr_schedule(cfg.lr, cfg.steps, cfg.warmup))
  train_it = pipeline.make_iterator(train_src, cfg.batch_size, data_config(cfg, image_size,
                                                                           train=True))
  clip_steps = clip_it = None
  if use_clips:  # same structure and shardings as `steps`: the states are interchangeable
    clip_steps = clip_step.ClipSteps(model, optimizer, mesh, clip_cfg,
                                     dataclasses.replace(loss_cfg, weight_distill=0.0),
                                     seed=cfg.seed, schedule=steps.schedule)
    clip_it = clips.make_iterator(video_src, clip_bs, clip_data_config(cfg, image_size))
  rng = jax.random.key_data(jax.random.key(cfg.seed))
  ckpt = checkpoint.RunCheckpointer(out, keep=cfg.keep)
  start = 0
  if meta_saved is None:
    model_state, opt_state = steps.place_state(model, optimizer)
  else:
    abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    restored = ckpt.restore(model=abstract(nnx.state(model), steps.model_sh),
                            opt=abstract(nnx.state(optimizer), steps.opt_sh),
                            train={"rng": np.asarray(rng)},
                            data=pipeline.restore_args(train_it),
                            clip_data=pipeline.restore_args(clip_it) if clip_it else None)
    model_state, opt_state = restored["model"], restored["opt"]
    rng, start = np.asarray(restored["train"]["rng"]), int(restored["meta"]["step"])
    say(f"resumed {out} at step {start}")
  teacher_state = steps.place_teacher(teacher) if steps.teacher_gd is not None else None
  del model, optimizer, teacher  # the states live on the mesh now
  meta = checkpoint.model_meta(sam_cfg, "qat" if recipe else "fp", source, quant=recipe,
                              data=data_path, run=cfg.replace(resume=False).to_dict())
  if vrc_summary:
    meta["vrc"] = vrc_summary

  # -------- evaluation
  def evaluate() -> Optional[Dict[str, float]]:
    if val_src is None:
      return None
    bs = min(eval_bs, len(val_src) // unit * unit)
    if bs == 0:
      return None
    it = pipeline.make_iterator(val_src, bs, data_config(cfg, image_size, train=False))
    iou_sum = count = 0.0
    for local in it:
      r = jax.device_get(steps.evaluate(model_state, steps.batch(local)))
      iou_sum, count = iou_sum + float(r["iou_sum"]), count + float(r["count"])
    return {"miou": iou_sum / max(count, 1.0), "masks": count}

  # -------- the loop
  stop = {"signal": False}

  def on_sigterm(signum, frame):  # noqa: ARG001
    stop["signal"] = True

  old_handler = signal.signal(signal.SIGTERM, on_sigterm)
  logger = MetricLogger(os.path.join(out, "logs"), enabled=is_main)
  bar = Progress(cfg.steps, start, enabled=cfg.progress and is_main)
  log = bar.write if is_main else (lambda *a: None)

  def save(at: int) -> None:
    ckpt.save(at, model=model_state, opt=opt_state, train={"rng": np.asarray(rng)},
              data=pipeline.save_args(train_it), meta=meta,
              clip_data=pipeline.save_args(clip_it) if clip_it else None)

  losses_seen, last_metrics, last_eval, step, interrupted = [], {}, None, start, False
  last_kind: Dict[str, dict] = {}
  t_prev = None
  try:
    while step < cfg.steps:
      kind = "clip" if use_clips and cfg.is_clip_step(step) else "image"
      if kind == "clip":
        batch = clip_steps.batch(next(clip_it))
        model_state, opt_state, metrics = clip_steps.train(model_state, opt_state, batch)
        images_in_step = clip_bs * cfg.video_frames
      else:
        batch = steps.batch(next(train_it))
        model_state, opt_state, metrics = steps.train(model_state, opt_state, batch,
                                                      teacher_state)
        images_in_step = cfg.batch_size
      metrics = jax.device_get(metrics)
      zero = metrics.pop("zero_grad_factors", None)
      metrics = {k: float(v) for k, v in metrics.items()}
      if zero is not None and "clip" not in last_kind and is_main:
        _report_zero_grads(out, step, clip_steps.factor_names, np.asarray(zero), log)
      step += 1
      now = time.time()
      ips = images_in_step / (now - t_prev) if t_prev is not None else None
      t_prev = now
      if not np.isfinite(metrics["loss"]):
        good = ckpt.latest_step()
        where = (f"the last good checkpoint is {out} step {good} (resume with --resume)"
                 if good is not None else "no checkpoint was saved yet")
        raise TrainingError(f"non-finite loss ({metrics['loss']}) at step {step}; {where}")
      losses_seen.append(metrics["loss"])
      last_metrics = dict(metrics, images_per_s=ips) if ips else metrics
      last_kind[kind] = last_metrics
      if step % cfg.log_every == 0 or step == cfg.steps:
        # The loss, and the latest terms of each kind: with alternating kinds and an even
        # period, logging only this step's kind would never show the other one.
        logger.write(step, {"loss": metrics["loss"],
                            **{f"{k}/{name}": v for k, m in last_kind.items()
                               for name, v in m.items()}})
      bar.update(metrics["loss"], ips)
      if nproc > 1:  # every process must agree to stop at the same step
        stop["signal"] = bool(np.any(multihost_utils.process_allgather(
            np.array([stop["signal"]]))))
      if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop["signal"]:
        save(step)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        last_eval = evaluate()
        if last_eval:
          logger.write(step, last_eval, prefix="eval/")
          log(f"step {step}: eval mIoU {last_eval['miou']:.4f} on {int(last_eval['masks'])} "
              "masks")
      if stop["signal"]:
        interrupted = True
        log(f"SIGTERM: saved step {step} in {out}; continue with --resume")
        break
    if not interrupted:
      last_eval = evaluate()
      if last_eval:
        logger.write(step, last_eval, prefix="eval/")
      if ckpt.latest_step() != step and step > start:
        save(step)
    ckpt.wait()
  finally:
    bar.close()
    logger.close()
    ckpt.close()
    signal.signal(signal.SIGTERM, old_handler)

  # -------- summary
  if is_main:
    lines = [f"done: step {step}/{cfg.steps} in {time.time() - t_start:.0f} s"]
    for kind, m in last_kind.items():
      terms = ", ".join(f"{k[5:]} {m[k]:.4g}" for k in losses.LOSS_KEYS if k in m)
      lines.append(f"  {kind} step loss {m['loss']:.4f} ({terms}), grad norm "
                   f"{m['grad_norm']:.3g}"
                   + (f", {m['images_per_s']:.2f} frames/s" if m.get("images_per_s") else ""))
    if last_eval:
      lines.append(f"  eval mIoU {last_eval['miou']:.4f} on {int(last_eval['masks'])} held-out "
                   "masks")
    lines.append(f"  checkpoint {out} (qsam2_jax.checkpoint.load_sam2({out!r})), metrics "
                 f"{os.path.join(out, 'logs', 'metrics.jsonl')}")
    print("\n".join(lines), flush=True)
  return RunResult(out, step, losses_seen, last_metrics, last_eval, interrupted)


def _report_zero_grads(out: str, step: int, names, zero: np.ndarray, log) -> None:
  """The first clip step's clip factors without gradient -> logs/zero_grad_factors.json."""
  from qsam2_jax.files import write_json
  dead = [n for n, z in zip(names, zero) if z]
  write_json(os.path.join(out, "logs", "zero_grad_factors.json"),
             {"step": step, "factors": list(names), "zero_gradient": dead})
  if dead:
    log(f"first clip step: {len(dead)} of {len(names)} clip factors got no gradient (e.g. "
        f"{', '.join(dead[:5])}); see logs/zero_grad_factors.json")


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  cfg, given = parse_config(argv)
  try:
    result = run(cfg, given)
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 143 if result.interrupted else 0


if __name__ == "__main__":
  sys.exit(main())

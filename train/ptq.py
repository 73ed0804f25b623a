"""Post-training quantization (PTQ) of a SAM2 checkpoint: no gradient steps.

  python -m train.ptq --out runs/ptq-w4                         # embedded SAM2.1-t, W4A4 vrc+mse
  python -m train.ptq --init ckpt/fp --bits 4 --act-bits 8 --method mse --out runs/w4a8-mse
  python -m train.ptq --init ckpt/fp --bits 2 --method vrc+mse --vrc-lambda auto --data /data/coco
  python -m train.ptq --init ckpt/fp --bits 2 --video-data /data/DAVIS --calib-clips 16

Methods: `minmax` (ranges from the min / max) and `mse` (MSE-optimal clipping) for weights (per
output channel, symmetric) and input activations (per tensor, asymmetric); `vrc+minmax` /
`vrc+mse` first re-fit the image encoder's linears with VRC (see `train.calibrate`) on the same
calibration images. Activation ranges are calibrated on the images with one synthetic box and
one point prompt each, then (like `train.qat`) on --calib-clips video clips that alternate a
mask prompt and points with correction clicks: memory attention, the memory encoder, the
object-pointer layers and the mask-prompt downsampling run only on clips, so their quantizers
see data only there (154 quantizers of the reduced SAM2.1-t of the tests) (the clips run
only when the recipe quantizes such a layer; a quantizer that saw no data is an error).
`--preset paper` quantizes every Linear/Conv of the model (patch embedding, mask
up/down-sampling at --high-bits); `encoder` only the image encoder's linears.

Writes an Orbax checkpoint whose metadata holds the quantization recipe, so
`qsam2_jax.checkpoint.load_sam2(OUT)` (and every --init / --ckpt flag) restores the quantized
model; plus ptq_errors.json, and for vrc+ methods vrc_report.json, vrc_layers.csv and vrc_std.png
(the lambda-sweep plot comes from `train.calibrate`). Prints per-layer output
errors (each quantized layer against the float layer, on the float model's inputs; also with a
float input, the weight-only error VRC minimizes) and end-to-end errors (encoder features, mask
logits, box-mask IoU), measured on --eval-images images held out from calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Sequence

from qsam2_jax import preflight
from qsam2_jax.cli import ArgumentParser, nonnegative_int, positive_int
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import write_json
from train.calibrate import add_common_args, check_paths, load_float_model, load_images
from train.quant_flags import add_quant_option_args, given_options


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  from qsam2_jax.quant.calibration import PTQ_METHODS
  from qsam2_jax.quant.recipe import BITS, PRESETS, PTQ_OPTIONS

  p = ArgumentParser(prog="python -m train.ptq", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_args(p)
  p.add_argument("--bits", type=int, default=4,
                 help=f"weight bits, one of {BITS} (16: float) (default 4)")
  p.add_argument("--act-bits", type=int, default=None,
                 help="activation bits (default: --bits; 16: weight-only quantization)")
  p.add_argument("--method", choices=PTQ_METHODS, default="vrc+mse",
                 help="range method, optionally after VRC (default vrc+mse)")
  p.add_argument("--preset", choices=PRESETS, default="paper",
                 help="which layers: paper (whole model) or encoder (image encoder linears)")
  add_quant_option_args(p, PTQ_OPTIONS)   # --high-bits, --restricted, --act-range, ...
  g = p.add_argument_group("calibration over video clips (the memory path)")
  g.add_argument("--video-data", default=None,
                 help="calibration videos: DAVIS / SA-V folder (JPEGImages/ + Annotations/) "
                      "(default: synthetic videos at the model's input size)")
  g.add_argument("--calib-clips", type=nonnegative_int, default=8,
                 help="range-calibration clips of --video-frames frames, as in train.qat; run "
                      "only when the recipe quantizes a memory-path layer (0: none, which is "
                      "then an error naming the quantizers without data) (default 8)")
  g.add_argument("--video-frames", type=positive_int, default=8,
                 help="frames per calibration clip, at least 2 (frame 0 is prompted, the "
                      "others run memory attention) (default 8)")
  g.add_argument("--video-objects", type=positive_int, default=3,
                 help="objects per calibration clip (default 3)")
  g.add_argument("--correction-clicks", type=nonnegative_int, default=7,
                 help="correction clicks on the point-prompted frame of a calibration clip "
                      "(SAM2: 7) (default 7)")
  args = p.parse_args(argv)
  if args.video_frames < 2:
    raise UserError(f"--video-frames {args.video_frames}: a clip needs at least 2 frames (the "
                    "memory path runs from the second)")
  return args


def open_videos(args: argparse.Namespace, image_size: int):
  """The clip source of the calibration: --video-data, or synthetic videos of `image_size`."""
  from qsam2_jax.data import clips
  path = None if args.video_data is None else preflight.input_path(args.video_data,
                                                                   "--video-data")
  src = clips.open_videos(path, num_frames=args.video_frames,
                          synthetic_size=(image_size, image_size), seed=args.seed)
  if len(src) == 0:
    raise UserError(f"--video-data {args.video_data}: no videos")
  return src


def calibration_clips(args: argparse.Namespace, src, image_size: int) -> list:
  """--calib-clips clips of one video each (deterministic from --seed)."""
  from qsam2_jax.data import clips
  cfg = clips.ClipDataConfig(num_frames=args.video_frames, max_objects=args.video_objects,
                             image_size=image_size, seed=args.seed + 2, num_threads=2)
  it = clips.make_iterator(src, 1, cfg, shard_index=0, shard_count=1)
  return [next(it) for _ in range(args.calib_clips)]


@dataclasses.dataclass
class PTQResult:
  """What `run` produced (for tests and scripts)."""
  model: Any
  fp_model: Any
  recipe: Any
  vrc: Any
  errors: Any
  out: str
  files: Dict[str, str]
  eval_images: Any


def run(args: argparse.Namespace) -> PTQResult:
  from flax import nnx

  from qsam2_jax import checkpoint
  from qsam2_jax.quant import calibration
  from qsam2_jax.quant.calibration import ptq, run_vrc, split_method, write_vrc_report
  from qsam2_jax.quant.measure import output_errors
  from qsam2_jax.quant.recipe import QuantRecipe
  from qsam2_jax.quant.vrc import DEFAULT_LAM0

  use_vrc, base = split_method(args.method)
  recipe = QuantRecipe(bits=args.bits, act_bits=args.act_bits, method=base, preset=args.preset,
                       **given_options(vars(args)))
  if not use_vrc and args.lam is not None:
    raise UserError(f"--vrc-lambda / --lambda applies to the vrc+ methods, not {args.method}")
  if use_vrc and recipe.bits == 16:
    raise UserError("VRC needs quantized weights (--bits 2, 3, 4 or 8)")
  lam0 = DEFAULT_LAM0 if args.lam is None else args.lam
  src = check_paths(args)
  # A bad video folder fails before the model loads (synthetic videos: once the size is known).
  videos = open_videos(args, 0) if args.video_data is not None else None
  model, cfg, source = load_float_model(args.init, args.image_size)
  calib, held, data = load_images(args.data, args.images, args.eval_images, cfg.image_size,
                                  args.seed, source=src)
  progress = not args.quiet
  print(f"PTQ {recipe.tag} ({args.method}) of {cfg.name} at {cfg.image_size}² ({source}) with "
        f"{len(calib)} calibration images of {data}")
  fp = nnx.clone(model)
  vrc = None
  if use_vrc:
    vrc = run_vrc(model, calib, lam0=lam0, lam_mode=args.lambda_mode, bits=recipe.bits,
                  batch_size=args.batch_size, progress=progress, sweep_layer="",
                  min_tokens_per_dim=args.min_tokens_per_dim)
    print(vrc.table().splitlines()[-1])
  report = ptq(model, recipe, calib, batch_size=args.batch_size, progress=progress,
               prompt_seed=args.seed)
  print(report.summary().splitlines()[0]
        + (f"; unused rules: {report.unused_rules}" if report.unused_rules else ""))
  what, clips_used = f"range calibration on {len(calib)} images", 0
  memory_only = calibration.unseen_quantizers(model)   # quantized layers images do not reach
  if memory_only and args.calib_clips:
    from train import clip_step
    from train.clip_forward import ClipConfig
    videos = videos if videos is not None else open_videos(args, cfg.image_size)
    print(f"range calibration on {args.calib_clips} clips of {args.video_frames} frames of "
          f"{args.video_data or 'synthetic videos'} ({len(memory_only)} quantizers run only "
          "there)")
    clip_step.calibrate_clips(model, calibration_clips(args, videos, cfg.image_size),
                              ClipConfig(correction_clicks=args.correction_clicks),
                              seed=args.seed)
    what += f" and {args.calib_clips} clips"
    clips_used = args.calib_clips
  calibration.require_calibrated(
      model, what + ("" if clips_used or not memory_only else
                     " (--calib-clips 0: the memory path is not calibrated)"))
  eval_images = held if held is not None else calib
  where = (f"{len(held)} held-out images" if held is not None
           else f"the {len(calib)} calibration images (no held-out set: optimistic)")
  print(f"\nOutput errors against the float model, on {where}:")
  errors = output_errors(fp, model, eval_images, batch_size=args.batch_size, progress=progress,
                         prompt_seed=args.seed)
  lines = errors.table().splitlines()
  print("\n".join(lines if not args.quiet else lines[-2:]))
  meta = checkpoint.model_meta(
      cfg, "ptq", source, quant=recipe,
      ptq={"method": args.method, "images": len(calib), "data": data, "seed": args.seed,
           "clips": clips_used, "video_data": args.video_data if clips_used else None,
           "video_frames": args.video_frames if clips_used else None,
           "lambda": lam0 if use_vrc else None,
           "lambda_mode": args.lambda_mode if use_vrc else None},
      errors=errors.summary())
  if vrc is not None:
    meta["vrc"] = vrc.summary()
  with preflight.created_by_us(args.out):
    out = checkpoint.save_model(args.out, model, meta, overwrite=args.overwrite)
    files = write_vrc_report(vrc, out) if vrc is not None else {}
    files["ptq_errors.json"] = os.path.join(out, "ptq_errors.json")
    write_json(files["ptq_errors.json"], {
        "recipe": recipe.to_dict(), "method": args.method, "measured_on": where,
        **errors.summary(), "layers": [dataclasses.asdict(e) for e in errors.layers.values()],
        "not_run": errors.not_run})
  print(f"wrote {out} ({', '.join(sorted(files))}); load it with "
        f"qsam2_jax.checkpoint.load_sam2({out!r})")
  return PTQResult(model, fp, recipe, vrc, errors, out, files, eval_images)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  run(parse_args(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Variance-Reduced Calibration (VRC) of a SAM2 checkpoint: re-fit the image encoder's linears.

  python -m train.calibrate --out runs/vrc                       # embedded random SAM2.1-t, 256²
  python -m train.calibrate --init ckpt/fp --data /data/coco/val2017.json --images 16 \\
      --lambda auto --bits 2 --out runs/vrc

For every linear layer of the Hiera trunk, the second moment S = XᵀX/n of its inputs over the
calibration images is collected in one jitted pass per batch, and the kernel is replaced by the
ridge solution (S + λI)⁻¹ S W (bias unchanged), which keeps the outputs and lowers the weights'
variance (method.md §1). λ = λ0·trace(S)/d_in (relative, default λ0 = 3e-3) or λ0 (absolute);
`--lambda auto` picks λ0 per layer minimizing the W`--bits` quantized output error.

Writes into --out an Orbax checkpoint (meta kind "calibrated", with a "vrc" summary) that every
command loads with --init, and vrc_report.json, vrc_layers.csv, vrc_std.png (weight histograms and
per-block std reduction, paper Fig. 3), vrc_lambda.png (errors against λ for one layer, paper
Fig. 5) and errors.json. Prints per-layer and end-to-end output errors against the input model,
measured on --eval-images images held out from the calibration set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from qsam2_jax import preflight
from qsam2_jax.cli import ArgumentParser, image_size, nonnegative_int, positive_int, vrc_lambda
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import write_json

BITS = (2, 3, 4, 8)


def add_common_args(p: argparse.ArgumentParser) -> None:
  """Flags shared by `train.calibrate` and `train.ptq`."""
  p.add_argument("--init", default=None,
                 help="float checkpoint: Orbax directory or official .pt (default: the embedded "
                      "random-weight SAM2.1-t)")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--data", default=None,
                 help="calibration images: COCO JSON, folder with annotations.json, or SA-1B "
                      "folder (default: the embedded synthetic dataset)")
  p.add_argument("--images", type=positive_int, default=16,
                 help="number of calibration images (default 16)")
  p.add_argument("--eval-images", type=nonnegative_int, default=8,
                 help="images held out from calibration to measure the output errors on "
                      "(default 8; 0: measure on the calibration images)")
  p.add_argument("--image-size", type=image_size, default=None,
                 help="model input size (default: the checkpoint's; 256 for the embedded one)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the image selection and of the measurement prompts")
  p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward")
  p.add_argument("--vrc-lambda", "--lambda", dest="lam", type=vrc_lambda, default=None,
                 help="VRC lambda_0, or 'auto' (per layer, minimizing the quantized output "
                      "error at --bits) (default 3e-3)")
  p.add_argument("--vrc-lambda-mode", "--lambda-mode", dest="lambda_mode",
                 choices=("relative", "absolute"), default="relative",
                 help="relative: lambda = lambda_0 * trace(S) / d_in (default); absolute: "
                      "lambda = lambda_0")
  p.add_argument("--min-tokens-per-dim", type=float, default=1.0,
                 help="VRC leaves a layer unchanged when its inputs over the calibration "
                      "images have fewer rows than this times its input dimension (singular "
                      "Gram matrix) (default 1; 0: re-fit every layer)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--quiet", action="store_true", help="no progress bars or per-layer tables")


def check_paths(args: argparse.Namespace, float_only: str = "calibration / PTQ (--init)"):
  """Validates the paths before anything is loaded; returns the opened `--data` reader (None
  for the embedded default data).

  --out: absent (or an earlier checkpoint with --overwrite), creatable and writable. --init: a
  float checkpoint. --data: parses, every annotation usable, enough images for --images plus
  --eval-images.
  """
  from qsam2_jax import checkpoint
  from qsam2_jax.data.coco import describe, open_source
  preflight.output_dir(args.out, "--out", overwrite=args.overwrite, what="a checkpoint",
                       empty_ok=False)
  if args.init is not None:
    checkpoint.check(args.init, "--init", float_only=float_only)
  if args.data is None:
    return None
  src = open_source(preflight.input_path(args.data, "--data"))
  need = args.images + args.eval_images
  if need > len(src):
    raise UserError(f"--data {describe(src)}: --images {args.images} + --eval-images "
                    f"{args.eval_images} need {need}")
  return src


def load_float_model(init: Optional[str], image_size: Optional[int]):
  """(model, cfg, source path) of a float checkpoint; the embedded default without `init`."""
  from convert.random_checkpoint import default_checkpoint
  from qsam2_jax import checkpoint
  from qsam2_jax.data.synthetic import DEFAULT_IMAGE_SIZE

  path = init if init is not None else default_checkpoint(image_size or DEFAULT_IMAGE_SIZE)
  model, cfg = checkpoint.load_sam2(path, image_size=image_size,
                                    float_only="calibration / PTQ (--init)")
  return model, cfg, path


def known_config(init: Optional[str], image_size: Optional[int]):
  """The SAM2 config `load_float_model` will load, when known without reading weights (the
  embedded default, an Orbax directory or a packed file); None for an official `.pt`."""
  from convert.random_checkpoint import DEFAULT_CONFIG
  from qsam2_jax import checkpoint
  from qsam2_jax.data.synthetic import DEFAULT_IMAGE_SIZE
  from qsam2_jax.model.configs import get_config
  if init is None:
    return get_config(DEFAULT_CONFIG, image_size=image_size or DEFAULT_IMAGE_SIZE)
  meta = checkpoint.check(init)
  if "config" not in meta:
    return None
  return checkpoint.sam_config(meta, image_size=image_size)


def load_images(data: Optional[str], num: int, num_eval: int, image_size: int, seed: int,
                source: Any = None) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
  """(calibration images, held-out images or None, data path); `data` None: the embedded
  synthetic set; `source`: `data` already opened (`check_paths`)."""
  from qsam2_jax.data.synthetic import default_image_data
  from qsam2_jax.quant.calibration import calibration_images

  if data is None:
    data = default_image_data(max(32, num + num_eval))
  src = source if source is not None else data
  calib = calibration_images(src, num, image_size, seed)
  held = calibration_images(src, num_eval, image_size, seed, start=num) if num_eval else None
  return calib, held, data


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m train.calibrate", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_args(p)
  p.add_argument("--bits", type=int, default=4,
                 help=f"target weight bits for the quantized errors and --lambda auto, one of "
                      f"{BITS} (default 4)")
  p.add_argument("--sweep-layer", default=None,
                 help="layer of the lambda sweep plot vrc_lambda.png (default: mlp.layers.1 of "
                      "the first block of the last Hiera stage, the paper's Fig. 5 choice; '' for "
                      "none)")
  args = p.parse_args(argv)
  if args.bits not in BITS:
    raise UserError(f"--bits must be one of {BITS}, got {args.bits}")
  return args


@dataclasses.dataclass
class CalibrateResult:
  """What `run` produced (for tests and scripts)."""
  model: Any
  fp_model: Any
  vrc: Any
  errors: Any
  out: str
  files: Dict[str, str]


def run(args: argparse.Namespace) -> CalibrateResult:
  from flax import nnx

  from qsam2_jax import checkpoint
  from qsam2_jax.quant.calibration import check_sweep_layer, run_vrc, write_vrc_report
  from qsam2_jax.quant.measure import output_errors
  from qsam2_jax.quant.rules import ENCODER_LINEARS
  from qsam2_jax.quant.vrc import DEFAULT_LAM0

  lam0 = DEFAULT_LAM0 if args.lam is None else args.lam
  src = check_paths(args)
  cfg = known_config(args.init, args.image_size)
  if cfg is not None:
    check_sweep_layer(args.sweep_layer, cfg, "--sweep-layer")
  model, cfg, source = load_float_model(args.init, args.image_size)
  check_sweep_layer(args.sweep_layer, cfg, "--sweep-layer")  # a .pt's config, once read
  calib, held, data = load_images(args.data, args.images, args.eval_images, cfg.image_size,
                                  args.seed, source=src)
  print(f"VRC of {cfg.name} at {cfg.image_size}² ({source}) on {len(calib)} images of {data}; "
        f"lambda_0 {lam0} ({args.lambda_mode}), W{args.bits} errors")
  fp = nnx.clone(model)
  result = run_vrc(model, calib, lam0=lam0, lam_mode=args.lambda_mode, bits=args.bits,
                   batch_size=args.batch_size, progress=not args.quiet,
                   sweep_layer=args.sweep_layer, min_tokens_per_dim=args.min_tokens_per_dim)
  lines = result.table().splitlines()
  print("\n".join(lines if not args.quiet else lines[-1:]))
  where = (f"{len(held)} held-out images" if held is not None
           else f"the {len(calib)} calibration images")
  print(f"\nOutput errors of the re-fitted model against the input model, on {where}:")
  errors = output_errors(fp, model, held if held is not None else calib,
                         pattern=ENCODER_LINEARS, batch_size=args.batch_size,
                         progress=not args.quiet, prompt_seed=args.seed)
  lines = errors.table().splitlines()
  print("\n".join(lines if not args.quiet else lines[-2:]))
  meta = checkpoint.model_meta(cfg, "calibrated", source, data=data, seed=args.seed,
                              vrc=result.summary(), errors=errors.summary())
  with preflight.created_by_us(args.out):
    out = checkpoint.save_model(args.out, model, meta, overwrite=args.overwrite)
    files = write_vrc_report(result, out)
    files["errors.json"] = os.path.join(out, "errors.json")
    write_json(files["errors.json"], {"measured_on": where, **errors.summary(),
                                      "layers": [dataclasses.asdict(e)
                                                 for e in errors.layers.values()]})
  print(f"wrote {out} ({', '.join(sorted(files))})")
  return CalibrateResult(model, fp, result, errors, out, files)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  run(parse_args(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Post-training quantization (PTQ) of a SAM2 checkpoint: no gradient steps.

  python -m train.ptq --out runs/ptq-w4                         # embedded SAM2.1-t, W4A4 vrc+mse
  python -m train.ptq --init ckpt/fp --bits 4 --act-bits 8 --method mse --out runs/w4a8-mse
  python -m train.ptq --init ckpt/fp --bits 2 --method vrc+mse --vrc-lambda auto --data /data/coco

Methods: `minmax` (ranges from the min / max) and `mse` (MSE-optimal clipping) for weights (per
output channel, symmetric) and input activations (per tensor, asymmetric); `vrc+minmax` /
`vrc+mse` first re-fit the image encoder's linears with VRC (see `train.calibrate`) on the same
calibration images. Activation ranges are calibrated on the images with one synthetic box and
one point prompt each. `--preset paper` quantizes every Linear/Conv of the model (patch
embedding, mask up/down-sampling at --high-bits); `encoder` only the image encoder's linears.

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
from qsam2_jax.cli import ArgumentParser
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
  return p.parse_args(argv)


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

"""Orbax checkpoint -> official PyTorch checkpoint (and the packed low-bit file).

  python -m convert.to_torch --ckpt ckpt/fp --out sam2.1_hiera_t.pt
  python -m convert.to_torch --ckpt runs/w2a2 --out w2a2.pt --packed w2a2.qsam2

`--out` writes `{"model": state_dict}` that `sam2.build_sam.build_sam2` loads strictly. For a
quantized run every quantized weight is replaced by its fake-quantized value (what the model
multiplies with in evaluation mode), so the PyTorch model reproduces the weight-quantized
model; activation quantization has no PyTorch counterpart and is not exported there.

`--packed` writes the packed low-bit model: b-bit codes, float32 per-channel ranges, the
floating-point rest at 16 bits (`--float-dtype`), activation-quantizer state and a manifest
(config, recipe, rules, bits per layer). `ImagePredictor.from_checkpoint(FILE)` and every
`--ckpt` flag load it. Both files are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from qsam2_jax import preflight
from qsam2_jax.cli import ArgumentParser, nonnegative_int
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import atomic_path


def save_torch_state_dict(state_dict, path: str) -> str:
  """`torch.save({"model": ...})` through a temporary file, so no half-written file remains."""
  import torch
  tensors = {k: torch.from_numpy(v.copy()).contiguous() for k, v in state_dict.items()}
  with atomic_path(path) as tmp:
    torch.save({"model": tensors}, tmp)
  return os.path.abspath(path)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m convert.to_torch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True,
                 help="Orbax checkpoint or run directory (a packed file also works for --out)")
  p.add_argument("--out", default=None,
                 help="output .pt file (official format); required unless --packed is given")
  p.add_argument("--packed", default=None, help="also write the packed low-bit model here")
  p.add_argument("--step", type=nonnegative_int, default=None,
                 help="checkpoint step (default: latest)")
  p.add_argument("--float-dtype", default="auto",
                 choices=("auto", "bfloat16", "float16", "float32"),
                 help="storage of the packed file's floating-point rest (default: auto = "
                      "float16 where the tensor's range allows, else bfloat16; float32 is "
                      "lossless)")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.out is None and args.packed is None:
    raise UserError("nothing to write: give --out FILE.pt and/or --packed FILE")
  from qsam2_jax.checkpoint import check, load_with_meta
  from qsam2_jax.quant import packed_file
  from qsam2_jax.quant.encode import dequantized_state_dict
  from qsam2_jax.quant.recipe import QuantRecipe
  from qsam2_jax.quant.size import size_report
  if args.packed is not None and packed_file.is_packed_file(args.ckpt):
    raise UserError(f"{args.ckpt} is already a packed file (its weights are dequantized once "
                    "loaded, so packing it again would store them as floats)")
  check(args.ckpt, "--ckpt", step=args.step)
  for flag, path in (("--out", args.out), ("--packed", args.packed)):
    if path is not None:
      preflight.output_file(path, flag)
  if args.out is not None and args.packed is not None and (
      os.path.abspath(args.out) == os.path.abspath(args.packed)):
    raise UserError(f"--out and --packed name the same file {args.out}")
  model, meta = load_with_meta(args.ckpt, step=args.step)
  q = meta.get("quant")
  what = QuantRecipe.from_dict(q).label if q else "float"
  if args.out is not None:
    sd = dequantized_state_dict(model)
    out = save_torch_state_dict(sd, args.out)
    print(f"{args.ckpt}: {meta['config']} {what} ({len(sd)} tensors"
          f"{', weights fake-quantized' if q else ''}) -> {out} (load with "
          f"sam2.build_sam.build_sam2('{_yaml(meta['config'])}', '{args.out}', "
          f"hydra_overrides_extra=['++model.image_size={meta['image_size']}']))")
  if args.packed is not None:
    pm = packed_file.save(args.packed, model, meta, float_dtype=args.float_dtype)
    rep = size_report(pm.manifest, os.path.getsize(args.packed))
    print(f"{args.ckpt}: packed {what} model -> {os.path.abspath(args.packed)} "
          f"({rep['file_size']:,} bytes: {rep['model_ratio']:.2f}x smaller than BF16, image "
          f"encoder {rep['encoder_ratio']:.2f}x; details: python -m eval.size --ckpt "
          f"{args.packed})")
  return 0


def _yaml(config: str) -> str:
  from qsam2_jax.model.configs import get_config
  return get_config(config).torch_yaml


if __name__ == "__main__":
  sys.exit(main())

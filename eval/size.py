"""Model size: bits and bytes per component of the packed low-bit model, against BF16.

  python -m eval.size --ckpt runs/w2a2                 # packs the run in memory, measures it
  python -m eval.size --ckpt w2a2.qsam2                 # a packed file (from convert.to_torch)
  python -m eval.size --ckpt runs/w2a2 --packed w2a2.qsam2

Every number comes from the packed file's manifest, i.e. from the bytes actually stored:
quantized weights as b-bit codes plus their float32 per-channel ranges, the floating-point rest
at 16 bits, activation-quantizer state at 32 bits. The baseline stores every tensor of the
official state dict in BF16 (2 bytes per value). The encoder ratio compares the image encoder's
tensors; the whole-model ratio compares the BF16 model with the packed file's size on disk
(its compressed manifest included). Without --packed the run is packed into a temporary file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

from qsam2_jax.cli import ArgumentParser, nonnegative_int
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import write_json
from qsam2_jax.quant.recipe import QuantRecipe
from qsam2_jax.quant.size import size_report


def _mb(n: float) -> str:
  return f"{n / 2**20:8.3f}"


def format_report(rep: Dict[str, Any], title: str) -> str:
  lines = [title,
           f"{'component':<17}{'params':>12}{'quantized':>12}{'bits/param':>11}"
           f"{'BF16 MiB':>10}{'packed MiB':>11}{'ratio':>8}  params by storage"]
  rows = list(rep["components"].items()) + [("total (data)", rep["total"])]
  for name, c in rows:
    if not c["params"]:
      continue
    by = ", ".join(f"{k}{'-bit' if k.isdigit() else ''}: {v:,}"
                   for k, v in c["params_by_bits"].items())
    lines.append(f"{name:<17}{c['params']:>12,}{c['quantized_params']:>12,}"
                 f"{c['bits_per_param']:>11.3f}{_mb(c['bf16_bytes']):>10}"
                 f"{_mb(c['packed_bytes']):>11}{c['ratio']:>7.2f}x  {by}")
  t = rep["total"]
  lines += [
      f"image encoder: {rep['encoder_ratio']:.2f}x smaller than BF16",
      f"packed file on disk: {rep['file_size']:,} bytes ({rep['header_bytes']:,} manifest) "
      f"vs BF16 {t['bf16_bytes']:,} bytes: whole model {rep['model_ratio']:.2f}x smaller",
      f"(codes {t['code_bytes']:,} B, per-channel ranges {t['range_bytes']:,} B, float rest "
      f"{t['float_bytes']:,} B, activation-quantizer state {t['state_bytes']:,} B)"]
  return "\n".join(lines)


def measure(ckpt: Optional[str], *, step: Optional[int] = None, packed: Optional[str] = None,
            float_dtype: str = "auto") -> Dict[str, Any]:
  """The size report of a packed file, or of a checkpoint packed into a temporary file."""
  from qsam2_jax.quant import packed_file
  if packed is None and ckpt is not None and packed_file.is_packed_file(ckpt):
    packed = ckpt
  if packed is not None:
    manifest, _ = packed_file.read(packed)   # checks size and CRC: a corrupt file is refused
    rep = size_report(manifest, os.path.getsize(packed))
    rep.update(source=os.path.abspath(packed), config=manifest["config"],
               quant=manifest.get("quant"), float_dtype=manifest.get("float_dtype"))
    return rep
  from qsam2_jax.checkpoint import load_with_meta
  model, meta = load_with_meta(ckpt, step=step)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.qsam2")
    pm = packed_file.save(path, model, meta, float_dtype=float_dtype)
    rep = size_report(pm.manifest, os.path.getsize(path))
  rep.update(source=os.path.abspath(ckpt), config=meta["config"], quant=meta.get("quant"),
             float_dtype=float_dtype, step=meta.get("step"))
  return rep


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m eval.size", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None,
                 help="run / Orbax checkpoint directory, official .pt or packed file (default: "
                      "the embedded random SAM2.1-t)")
  p.add_argument("--step", type=nonnegative_int, default=None,
                 help="checkpoint step (default: latest)")
  p.add_argument("--packed", default=None,
                 help="an existing packed file to measure (instead of packing --ckpt)")
  p.add_argument("--float-dtype", default="auto",
                 choices=("auto", "bfloat16", "float16", "float32"),
                 help="storage of the floating-point rest when packing --ckpt (default: auto = "
                      "float16 where the range allows, else bfloat16)")
  p.add_argument("--json", default=None, help="also write the report as JSON here")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  ckpt = args.ckpt
  if ckpt is None and args.packed is None:
    from convert.random_checkpoint import default_checkpoint
    ckpt = default_checkpoint()
  if args.packed is not None and not os.path.isfile(args.packed):
    raise UserError(f"--packed {args.packed}: no such file (write one with "
                    "`python -m convert.to_torch --ckpt RUN --packed FILE`)")
  from qsam2_jax import checkpoint, preflight
  if args.packed is None and args.ckpt is not None:
    checkpoint.check(args.ckpt, "--ckpt", step=args.step)
  if args.json:
    preflight.output_file(args.json, "--json")
  rep = measure(ckpt, step=args.step, packed=args.packed, float_dtype=args.float_dtype)
  q = rep.get("quant")
  what = QuantRecipe.from_dict(q).label if q else "float"
  print(format_report(rep, f"{rep['source']}: {rep['config']} ({what})"))
  if args.json:
    write_json(args.json, {"kind": "eval.size", **rep})
  return 0


if __name__ == "__main__":
  sys.exit(main())

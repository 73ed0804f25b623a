"""Orbax checkpoint -> official PyTorch checkpoint that `sam2.build_sam.build_sam2` loads strictly.

  python -m convert.to_torch --ckpt ckpt/fp --out sam2.1_hiera_t.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Optional, Sequence

from qsam2_jax import checkpoint, keymap
from qsam2_jax.errors import report_user_errors


def save_torch_state_dict(state_dict, path: str) -> str:
  """`torch.save({"model": ...})` through a temporary file, so no half-written file remains."""
  import torch
  tensors = {k: torch.from_numpy(v.copy()).contiguous() for k, v in state_dict.items()}
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    torch.save({"model": tensors}, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="Orbax checkpoint directory (or a run directory)")
  p.add_argument("--out", required=True, help="output .pt file")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  model, cfg = checkpoint.load_sam2(args.ckpt, step=args.step)
  sd = keymap.state_dict(model)
  out = save_torch_state_dict(sd, args.out)
  print(f"{args.ckpt}: {cfg.name} ({len(sd)} tensors) -> {out} "
        f"(load with sam2.build_sam.build_sam2('{cfg.torch_yaml}', '{args.out}'))")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Official SAM2 / SAM2.1 PyTorch checkpoint -> Orbax checkpoint.

  python -m convert.from_torch --ckpt sam2.1_hiera_b+.pt --out ckpt/fp

The config (SAM2.0 or 2.1; t, s, b+, l) is detected from the keys and shapes unless --config is
given. Every missing, unexpected or mis-shaped key is listed. The output is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from qsam2_jax import checkpoint, preflight
from qsam2_jax.cli import ArgumentParser, image_size
from qsam2_jax.errors import report_user_errors
from qsam2_jax.model.configs import CONFIGS, get_config
from qsam2_jax.torch_format import NotACheckpointError, open_pt


def torch_load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads `{"model": state_dict}` with `torch.load(weights_only=True)` into numpy arrays."""
  import torch
  open_pt(path).close()   # a clear word for a folder, a text file, a truncated file
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise NotACheckpointError(f"{path} is not a readable PyTorch checkpoint ({first})") from e
  sd = checkpoint.official_state_dict(obj, path, torch.is_tensor)
  return {k: v.detach().cpu().contiguous().numpy() for k, v in sd.items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m convert.from_torch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="official .pt file ({'model': state_dict})")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                 help="model config (default: detected from the checkpoint)")
  p.add_argument("--image-size", type=image_size, default=None,
                 help="model input size stored with the checkpoint (default 1024)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  open_pt(args.ckpt, "--ckpt").close()
  preflight.output_dir(args.out, "--out", overwrite=args.overwrite, what="a checkpoint",
                       empty_ok=False)
  sd = torch_load_state_dict(args.ckpt)
  cfg = (get_config(args.config, image_size=args.image_size) if args.config
         else checkpoint.detect_config(sd, args.ckpt, args.image_size))
  model = checkpoint.model_from_state_dict(sd, cfg, source=args.ckpt)
  out = checkpoint.save_model(
      args.out, model, checkpoint.model_meta(cfg, "fp", args.ckpt), overwrite=args.overwrite)
  n = sum(int(np.prod(v.shape)) for v in sd.values())
  print(f"{args.ckpt}: {cfg.name} ({len(sd)} tensors, {n:,} values) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

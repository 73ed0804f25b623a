"""A random-weight SAM2 checkpoint in the official format, built by the `sam2` package.

  python -m convert.random_checkpoint --config sam2.1_hiera_t --out demo/sam2.1_hiera_t.pt

Official checkpoints cannot be downloaded here; demos and tests use these instead. Random init
leaves many tensors constant (position tables at zero, LayerNorms at 1/0, layer scales at 1e-6);
by default they get random values so that every path of the model is exercised, and the
object-score bias is shifted so random weights call objects present (`--no-randomize-constants`
keeps PyTorch's init exactly).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from qsam2_jax import checkpoint, preflight
from qsam2_jax.cli import ArgumentParser, nonnegative_int
from qsam2_jax.data.synthetic import DEFAULT_IMAGE_SIZE, cache_dir
from qsam2_jax.errors import report_user_errors
from qsam2_jax.model.configs import CONFIGS, SAM2Config, get_config

# The embedded default model: every command runs on it when given no checkpoint.
DEFAULT_CONFIG = "sam2.1_hiera_t"


def build_torch_sam2(cfg: SAM2Config, seed: int = 0, video: bool = False,
                     randomize: bool = True, obj_score_shift: float = 4.0) -> Any:
  """`build_sam2` (or the video predictor, hole filling off) on CPU with random weights."""
  import torch
  from sam2.build_sam import build_sam2, build_sam2_video_predictor

  torch.manual_seed(seed)
  overrides = [f"++model.image_size={cfg.image_size}"]
  if video:
    model = build_sam2_video_predictor(cfg.torch_yaml, ckpt_path=None, device="cpu",
                                       hydra_overrides_extra=overrides)
    model.fill_hole_area = 0
  else:
    model = build_sam2(cfg.torch_yaml, ckpt_path=None, device="cpu",
                       hydra_overrides_extra=overrides)
  if randomize:
    randomize_constant_tensors(model, seed + 1, obj_score_shift)
  return model.eval()


def randomize_constant_tensors(model: Any, seed: int, obj_score_shift: float = 4.0) -> None:
  """Gives every init-constant floating tensor random values (norm weights around 1)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if not p.is_floating_point() or p.numel() == 0:
        continue
      if p.numel() == 1 or bool((p == p.flatten()[0]).all()):
        base = 1.0 if name.endswith("weight") and ("norm" in name or ".1." in name) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("gamma"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    last.bias.add_(obj_score_shift)


def save_official(model: Any, path: str) -> str:
  """Writes `{"model": state_dict}` (the official format) through a temporary file."""
  from convert.to_torch import save_torch_state_dict
  sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  return save_torch_state_dict(sd, path)


def default_checkpoint(image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0) -> str:
  """Orbax directory of the embedded random SAM2.1-t at `image_size`, created on first use.

  The official-format `.pt` (built with the `sam2` package, since real weights cannot be
  downloaded here) and its conversion are cached in `qsam2_jax.data.synthetic.cache_dir()`.
  """
  out = os.path.join(cache_dir(), f"{DEFAULT_CONFIG}_random{seed}_{image_size}")
  if os.path.isdir(out):
    return out
  pt = os.path.join(cache_dir(), f"{DEFAULT_CONFIG}_random{seed}.pt")
  if not os.path.exists(pt):
    save_official(build_torch_sam2(get_config(DEFAULT_CONFIG), seed=seed), pt)
  sd = checkpoint.read_torch_state_dict(pt)
  cfg = get_config(DEFAULT_CONFIG, image_size=image_size)
  model = checkpoint.model_from_state_dict(sd, cfg, source=pt)
  try:
    checkpoint.save_model(out, model, checkpoint.model_meta(cfg, "fp", pt))
  except checkpoint.CheckpointError:
    pass  # another process created it meanwhile
  return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m convert.random_checkpoint", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default=DEFAULT_CONFIG)
  p.add_argument("--out", required=True, help="output .pt file")
  p.add_argument("--seed", type=nonnegative_int, default=0)
  p.add_argument("--no-randomize-constants", dest="randomize", action="store_false",
                 help="keep PyTorch's init exactly (many tensors constant)")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  preflight.output_file(args.out, "--out")
  cfg = get_config(args.config)
  model = build_torch_sam2(cfg, seed=args.seed, randomize=args.randomize)
  out = save_official(model, args.out)
  print(f"random {cfg.name} (seed {args.seed}) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The PyTorch `sam2` package as the test reference, on random weights.

Random init leaves several tensors constant (Hiera pos_embed zeros, LayerNorm 1/0, ConvNeXt
gamma 1e-6, ...). A parity test on such weights would not exercise those paths, so every
floating tensor that is constant after init gets random values before the checkpoint is saved.
The object-score head's last bias is shifted up so that random weights call objects present
(otherwise every video mask is the constant -1024).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from qsam2_jax.model.configs import SAM2Config


def build_torch_sam2(cfg: SAM2Config, seed: int = 0, video: bool = False,
                     randomize: bool = True, obj_score_shift: float = 4.0) -> Any:
  """Builds the reference model (`build_sam2`, or the video predictor) on CPU, eval mode."""
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


@torch.no_grad()
def randomize_constant_tensors(model: torch.nn.Module, seed: int,
                               obj_score_shift: float = 4.0) -> None:
  gen = torch.Generator().manual_seed(seed)
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


def save_official(model: torch.nn.Module, path: str | os.PathLike) -> str:
  """Writes `{"model": state_dict}`, the official checkpoint format."""
  torch.save({"model": model.state_dict()}, str(path))
  return str(path)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().float().numpy()


def rel_err(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

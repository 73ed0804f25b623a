"""The PyTorch `sam2` package as the test reference, on random weights.

Random init leaves several tensors constant (Hiera pos_embed zeros, LayerNorm 1/0, ConvNeXt
gamma 1e-6, ...). A parity test on such weights would not exercise those paths, so every
floating tensor that is constant after init gets random values before the checkpoint is saved
(`convert.random_checkpoint`). The object-score head's last bias is shifted up so that random
weights call objects present (otherwise every video mask is the constant -1024).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from convert.random_checkpoint import build_torch_sam2, randomize_constant_tensors  # noqa: F401


def save_official(model: torch.nn.Module, path: str | os.PathLike) -> str:
  """Writes `{"model": state_dict}` with plain `torch.save`, exactly as the official files."""
  torch.save({"model": model.state_dict()}, str(path))
  return str(path)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().float().numpy()


def rel_err(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

"""A minimal stand-in for the three `torchvision.transforms` that `SAM2ImagePredictor` uses
(tests and benchmarks).

torchvision cannot be installed beside the pinned CPU torch. On tensors, torchvision's
`Resize` is `F.interpolate(bilinear, antialias=True, align_corners=False)`, `ToTensor` is
HWC uint8 -> CHW float / 255 and `Normalize` is (x - mean) / std per channel; with these the
real `SAM2ImagePredictor` runs unchanged and serves as the end-to-end reference.
"""

from __future__ import annotations

import sys
import types
from typing import List

import numpy as np
import torch
import torch.nn.functional as F


class ToTensor:
  def __call__(self, pic) -> torch.Tensor:
    arr = np.asarray(pic)
    if arr.ndim == 2:
      arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return t.float().div(255) if t.dtype == torch.uint8 else t


class Resize(torch.nn.Module):
  def __init__(self, size: List[int]):
    super().__init__()
    self.size = [int(s) for s in size]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x[None], size=self.size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


class Normalize(torch.nn.Module):
  def __init__(self, mean: List[float], std: List[float]):
    super().__init__()
    self.mean = torch.tensor(mean)
    self.std = torch.tensor(std)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return (x - self.mean[:, None, None]) / self.std[:, None, None]


def install() -> None:
  """Registers the stub as `torchvision` unless a real one imports."""
  try:
    import torchvision  # noqa: F401
    return
  except Exception:  # noqa: BLE001 - absent, or broken against this torch
    pass
  tv = types.ModuleType("torchvision")
  tr = types.ModuleType("torchvision.transforms")
  tr.ToTensor, tr.Resize, tr.Normalize = ToTensor, Resize, Normalize
  tv.transforms = tr
  sys.modules["torchvision"] = tv
  sys.modules["torchvision.transforms"] = tr

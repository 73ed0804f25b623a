"""Run logs: JSON lines (always), TensorBoard (when a writer is installed), a tqdm bar.

Only process 0 writes (the callers pass `enabled=jax.process_index() == 0`): every process holds
the same replicated metrics, and host-local work is the one thing allowed under that condition.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Mapping, Optional


def _scalar(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else str(f)  # JSON has no NaN / inf


def _tensorboard_writer(logdir: str):
  """A SummaryWriter from tensorboardX or torch, or None (TensorBoard is optional)."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      mod = __import__(module, fromlist=["SummaryWriter"])
      return mod.SummaryWriter(logdir)
    except Exception:  # noqa: BLE001 - missing package, or torch without tensorboard
      continue
  return None


class MetricLogger:
  """Appends `{"step", "time", **metrics}` lines to `<logdir>/metrics.jsonl` (and TensorBoard
  scalars under `<logdir>/tb`); appending keeps a resumed run's history in one file."""

  def __init__(self, logdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(logdir, "metrics.jsonl")
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._file = open(self.path, "a", buffering=1)
    self._tb = _tensorboard_writer(os.path.join(logdir, "tb")) if tensorboard else None

  @property
  def tensorboard(self) -> bool:
    return self._tb is not None

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    row.update({prefix + k: _scalar(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, float):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(logdir: str) -> list[Dict[str, Any]]:
  """The rows of `<logdir>/metrics.jsonl` (for tests and reports)."""
  path = os.path.join(logdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar over steps showing the loss and images per second (no-op when disabled)."""

  def __init__(self, total: int, initial: int, *, enabled: bool, desc: str = "QAT"):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

  def update(self, loss: float, images_per_s: Optional[float]) -> None:
    if self._bar is None:
      return
    post = {"loss": f"{loss:.4g}"}
    if images_per_s is not None:
      post["img/s"] = f"{images_per_s:.2f}"
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(1)

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

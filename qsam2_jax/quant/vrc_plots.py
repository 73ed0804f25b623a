"""The two VRC figures (method.md Fig. 3 and Fig. 5) as PNG files, from plain arrays.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=120)
  FigureCanvasAgg(fig)
  return fig


def _flat(values: ArrayOrList) -> np.ndarray:
  if isinstance(values, np.ndarray):
    return values.reshape(-1)
  return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in values])


def plot_vrc_weights(before: ArrayOrList, after: ArrayOrList,
                     block_reduction: Mapping[int, float], path: Union[str, os.PathLike], *,
                     bins: int = 200, title: Optional[str] = None) -> str:
  """Weight histograms before/after VRC and the per-block std reduction (like Fig. 3).

  Args:
    before, after: the re-fitted kernels (one array, or a list of arrays to pool).
    block_reduction: block index -> fractional std reduction (`vrc.block_std_reduction`).
    path: the PNG to write.
  """
  b, a = _flat(before), _flat(after)
  fig = _figure(11, 4)
  ax1, ax2 = fig.subplots(1, 2)
  lim = float(np.max(np.abs(np.concatenate([b, a])))) if b.size else 1.0
  edges = np.linspace(-lim, lim, bins + 1)
  ax1.hist(b, bins=edges, histtype="step", log=True, label=f"before (std {np.std(b):.4g})")
  ax1.hist(a, bins=edges, histtype="step", log=True, label=f"after VRC (std {np.std(a):.4g})")
  ax1.set_xlabel("weight value")
  ax1.set_ylabel("count")
  ax1.legend()
  blocks = list(block_reduction)
  ax2.bar([str(k) for k in blocks], [100.0 * block_reduction[k] for k in blocks])
  ax2.set_xlabel("transformer block")
  ax2.set_ylabel("weight std reduction (%)")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.fspath(path))
  return os.fspath(path)


def plot_lambda_sweep(lam0: Sequence[float], out_err: Sequence[float], q_ratio: Sequence[float],
                      path: Union[str, os.PathLike], *, layer: str = "",
                      chosen_lam0: Optional[float] = None) -> str:
  """Output error and quantized-error ratio of one layer against lambda_0 (like Fig. 5).

  Args:
    lam0: the lambda_0 values (zero is left off the log axis).
    out_err: relative output error ||X (K_hat - K)|| / ||X K|| per lambda_0.
    q_ratio: ||X (Q(K_hat) - K)|| / ||X (Q(K) - K)|| per lambda_0 (1 = no gain).
    path: the PNG to write.
  """
  lam0, out_err, q_ratio = (np.asarray(v, np.float64) for v in (lam0, out_err, q_ratio))
  keep = lam0 > 0
  fig = _figure(6.5, 4)
  ax = fig.subplots()
  ax.semilogx(lam0[keep], 100.0 * out_err[keep], "o-", color="C0", label="output error (%)")
  ax.set_xlabel("lambda_0")
  ax.set_ylabel("output error (%)", color="C0")
  ax2 = ax.twinx()
  ax2.semilogx(lam0[keep], q_ratio[keep], "s-", color="C1", label="quantized error ratio")
  ax2.axhline(1.0, color="C1", lw=0.8, ls=":")
  ax2.set_ylabel("quantized error / without VRC", color="C1")
  if chosen_lam0:
    ax.axvline(chosen_lam0, color="gray", ls="--", lw=0.8)
  ax.set_title(layer or "VRC lambda sweep")
  fig.tight_layout()
  fig.savefig(os.fspath(path))
  return os.fspath(path)

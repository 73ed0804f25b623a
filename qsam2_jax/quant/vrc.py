"""Variance-Reduced Calibration (method.md §1): a ridge re-fit of linear kernels.

For a layer y = x K + b (Flax kernel K, (d_in, d_out)) with calibration inputs X (n, d_in) and
second moment S = X^T X / n, VRC replaces K by

    K_hat = argmin_V ||X V - X K||^2 / n + lam ||V||_F^2 = (S + lam I)^-1 S K      (b unchanged)
          = U diag(s / (s + lam)) U^T K         with S = U diag(s) U^T,

shrinking K along input directions with little calibration energy. One `eigh` per layer serves
every lam. lam = lam0 * trace(S) / d_in (`lam_mode="relative"`, default lam0 = 3e-3) or lam0
(`"absolute"`). `lam0="auto"` picks, per layer, the lam0 of `AUTO_GRID` (0 and 1e-5 .. 1) that
minimizes the quantized output error trace(D^T S D), D = Q(K_hat) - K, with Q the per-channel
MSE-clipped symmetric weight quantizer at the target bits; lam0 = 0 (K itself) is in the grid,
so auto is never worse than no calibration on that criterion. Every error is a quadratic form
in S, so the inputs themselves are never needed after the Gram pass.

Grams: `collect_grams` taps the selected layers of a model (graph swap, like
`quantize_model`), computes X^T X per batch on device (float32, highest precision, jitted) and
sums the batches on the host in float64 (`GramAccumulator`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.quant import core as fq
from qsam2_jax.quant.rules import find_layers, module_path, set_child

DEFAULT_LAM0 = 3e-3
AUTO_GRID = (0.0,) + tuple(float(v) for v in np.logspace(-5, 0, 11))
HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------ solves


def lambda_scale(gram: jax.Array, lam_mode: str = "relative") -> jax.Array:
  """lam / lam0: the mean eigenvalue trace(S) / d_in (relative) or 1 (absolute)."""
  if lam_mode == "relative":
    return jnp.trace(gram) / gram.shape[-1]
  if lam_mode == "absolute":
    return jnp.ones((), gram.dtype)
  raise ValueError(f"lam_mode must be 'relative' or 'absolute', got {lam_mode!r}")


def _eig(gram):
  s, u = jnp.linalg.eigh(gram.astype(jnp.float32))
  return jnp.maximum(s, 0.0), u     # f32 rounding can leave tiny negative eigenvalues


def _refit_eig(kernel, s, u, lam, gram):
  """U diag(s / (s + lam)) U^T K; exactly K at lam = 0 (also for rank-deficient S).

  One step of iterative refinement (residual S K - (S + lam I) K_hat, solved with the same
  eigenvectors) brings the float32 result to ~1e-6 of the float64 solve even when S is badly
  conditioned (f32 eigenvectors alone give ~1e-4 there).
  """
  lam = jnp.asarray(lam, jnp.float32)
  safe = jnp.where(lam > 0, lam, 1.0)

  def solve(b):   # (S + lam I)^-1 b
    return jnp.matmul(u, jnp.matmul(u.T, b, precision=HI) / (s + safe)[:, None], precision=HI)

  k_hat = jnp.matmul(u, (s / (s + safe))[:, None] * jnp.matmul(u.T, kernel, precision=HI),
                     precision=HI)
  resid = jnp.matmul(gram, kernel - k_hat, precision=HI) - safe * k_hat
  k_hat = k_hat + solve(resid)
  return jnp.where(lam > 0, k_hat, kernel)


@jax.jit
def ridge_refit(kernel: jax.Array, gram: jax.Array, lam) -> jax.Array:
  """(S + lam I)^-1 S K for a Flax kernel K (d_in, d_out) and S (d_in, d_in); float32."""
  s, u = _eig(gram)
  return _refit_eig(kernel.astype(jnp.float32), s, u, lam, gram.astype(jnp.float32))


def _quad(a, gram):
  """trace(A^T S A) = ||X A||^2 / n."""
  return jnp.sum(a * jnp.matmul(gram, a, precision=HI))


def _evaluate(kernel, gram, lam0s, scale, bits, search_points, eig=None):
  """Errors of K_hat(lam0 * scale) for every lam0 (one eigh, or `eig`). Relative to ||X K||."""
  kernel = kernel.astype(jnp.float32)
  gram = gram.astype(jnp.float32)
  s, u = _eig(gram) if eig is None else eig
  ref = jnp.maximum(_quad(kernel, gram), 1e-30)
  quant = functools.partial(fq.mse_quantize_symmetric, bits=bits, axis=-1,
                            num_points=search_points) if bits else None
  q_base = _quad(quant(kernel) - kernel, gram) if bits else jnp.nan

  def one(lam0):
    k_hat = _refit_eig(kernel, s, u, lam0 * scale, gram)
    q = _quad(quant(k_hat) - kernel, gram) if bits else jnp.nan
    return _quad(k_hat - kernel, gram), q, jnp.std(k_hat)

  out, q, std = jax.lax.map(one, lam0s)
  return dict(out_err=jnp.sqrt(out / ref), q_err=jnp.sqrt(q / ref),
              q_err_base=jnp.sqrt(q_base / ref) * jnp.ones_like(out), std_after=std,
              std_before=jnp.std(kernel) * jnp.ones_like(out))


@functools.partial(jax.jit, static_argnames=("bits", "search_points", "lam_mode", "auto"))
def _solve_group(kernels, grams, lam0s, *, bits, search_points, lam_mode, auto):
  """vmapped over layers of one shape: the chosen lam0 per layer, K_hat and its errors."""
  def layer(kernel, gram):
    scale = lambda_scale(gram.astype(jnp.float32), lam_mode)
    g32 = gram.astype(jnp.float32)
    eig = _eig(g32)   # one eigh per layer serves the sweep and the final solve
    ev = _evaluate(kernel, g32, lam0s, scale, bits, search_points, eig)
    i = jnp.argmin(ev["q_err"]) if auto else 0
    lam0 = lam0s[i]
    k_hat = _refit_eig(kernel.astype(jnp.float32), *eig, lam0 * scale, g32)
    chosen = {k: v[i] for k, v in ev.items()}
    return dict(chosen, lam0=lam0, lam=lam0 * scale, kernel=k_hat, sweep_q_err=ev["q_err"])
  return jax.vmap(layer)(kernels, grams)


@dataclasses.dataclass
class VRCLayerReport:
  """One re-fitted layer. Errors are relative to ||X K|| (norms over the calibration set).

  out_err: ||X (K_hat - K)||; q_err: ||X (Q(K_hat) - K)||; q_err_base: ||X (Q(K) - K)||
  (NaN without `bits`); std: std of all kernel entries.
  """
  name: str
  shape: Tuple[int, int]
  lam0: float
  lam: float
  std_before: float
  std_after: float
  out_err: float
  q_err: float
  q_err_base: float
  bits: Optional[int]

  @property
  def std_reduction(self) -> float:
    return 1.0 - self.std_after / self.std_before

  @property
  def q_ratio(self) -> float:
    """Quantized error after VRC over before (< 1: VRC helps)."""
    return self.q_err / self.q_err_base

  def as_dict(self) -> Dict[str, Any]:
    return dict(dataclasses.asdict(self), std_reduction=self.std_reduction,
                q_ratio=self.q_ratio)


def vrc_refit(kernels: Mapping[str, Any], grams: Mapping[str, Any], *,
              lam0: Union[float, str] = DEFAULT_LAM0, lam_mode: str = "relative",
              bits: Optional[int] = None, grid: Sequence[float] = AUTO_GRID,
              search_points: int = 64) -> Tuple[Dict[str, np.ndarray], List[VRCLayerReport]]:
  """Re-fits every named kernel (d_in, d_out) with its second moment S (d_in, d_in).

  Args:
    kernels, grams: name -> array; S = X^T X / n (any positive scale works in relative mode).
    lam0: a number, or "auto" (needs `bits`) to pick per layer from `grid`.
    lam_mode: "relative" (lam = lam0 trace(S) / d_in) or "absolute".
    bits: target weight bits for the quantized errors and auto-lambda (None: not reported).
  Returns:
    (name -> new kernel as float32 numpy, reports in the order of `kernels`).
  """
  auto = lam0 == "auto"
  if auto and not bits:
    raise ValueError("lam0='auto' needs the target weight bits")
  lam0s = jnp.asarray(grid if auto else [float(lam0)], jnp.float32)
  groups: Dict[Tuple, List[str]] = {}
  for name, k in kernels.items():
    if name not in grams:
      raise KeyError(f"no Gram matrix for layer {name}")
    groups.setdefault(tuple(np.shape(k)), []).append(name)
  new, rep = {}, {}
  for shape, names in groups.items():
    out = _solve_group(jnp.stack([jnp.asarray(kernels[n], jnp.float32) for n in names]),
                       jnp.stack([jnp.asarray(grams[n], jnp.float32) for n in names]),
                       lam0s, bits=bits, search_points=search_points, lam_mode=lam_mode,
                       auto=auto)
    out = jax.device_get(out)
    for i, name in enumerate(names):
      new[name] = np.asarray(out["kernel"][i])
      rep[name] = VRCLayerReport(
          name, shape, float(out["lam0"][i]), float(out["lam"][i]),
          float(out["std_before"][i]), float(out["std_after"][i]), float(out["out_err"][i]),
          float(out["q_err"][i]), float(out["q_err_base"][i]), bits)
  return {n: new[n] for n in kernels}, [rep[n] for n in kernels]


def lambda_sweep(kernel: Any, gram: Any, lam0s: Sequence[float], *, bits: Optional[int],
                 lam_mode: str = "relative", search_points: int = 64) -> Dict[str, np.ndarray]:
  """Errors of one layer against lambda (method.md Fig. 5): arrays over `lam0s`.

  Keys: lam0, lam, out_err, q_err, q_err_base, q_ratio, std_before, std_after.
  """
  gram = jnp.asarray(gram, jnp.float32)
  lam0s = jnp.asarray(lam0s, jnp.float32)
  scale = lambda_scale(gram, lam_mode)
  ev = jax.jit(_evaluate, static_argnums=(4, 5))(jnp.asarray(kernel), gram, lam0s, scale,
                                                  bits, search_points)
  out = {k: np.asarray(v, np.float64) for k, v in ev.items()}
  out["lam0"] = np.asarray(lam0s, np.float64)
  out["lam"] = out["lam0"] * float(scale)
  out["q_ratio"] = out["q_err"] / out["q_err_base"]
  return out


def block_std_reduction(reports: Iterable[VRCLayerReport]) -> Dict[int, float]:
  """Mean weight-std reduction (fraction) per `blocks.<i>` (method.md Fig. 3), sorted by i."""
  per: Dict[int, List[float]] = {}
  for r in reports:
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", r.name)
    if m:
      per.setdefault(int(m.group(1)), []).append(r.std_reduction)
  return {b: float(np.mean(v)) for b, v in sorted(per.items())}


# ------------------------------------------------------------------------------ Grams


@jax.jit
def gram_moments(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(X^T X, token count) of inputs x (..., d_in): float32, highest precision."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  xtx = jnp.einsum("nd,ne->de", x2, x2, precision=HI, preferred_element_type=jnp.float32)
  return xtx, jnp.asarray(x2.shape[0], jnp.int32)


class GramAccumulator:
  """Per-layer sums of X^T X and token counts, accumulated on the host in float64."""

  def __init__(self):
    self.xtx: Dict[str, np.ndarray] = {}
    self.count: Dict[str, int] = {}

  def add(self, name: str, xtx: Any, count: int) -> None:
    g = np.asarray(xtx, np.float64)
    self.xtx[name] = self.xtx[name] + g if name in self.xtx else g
    self.count[name] = self.count.get(name, 0) + int(count)

  def add_inputs(self, name: str, x: Any) -> None:
    self.add(name, *gram_moments(jnp.asarray(x)))

  def second_moment(self, name: str) -> np.ndarray:
    """S = X^T X / n (float64)."""
    return self.xtx[name] / max(self.count[name], 1)

  def second_moments(self) -> Dict[str, np.ndarray]:
    return {n: self.second_moment(n) for n in self.xtx}


class _TapStat(nnx.Variable):
  """A Gram tap's per-batch sums (temporary; removed with the tap)."""


class GramTap(nnx.Module):
  """Wraps a layer: adds X^T X of its inputs to `xtx` / `count`, then calls the layer."""

  def __init__(self, layer: nnx.Module, d_in: int):
    self.layer = layer
    self.xtx = _TapStat(jnp.zeros((d_in, d_in), jnp.float32))
    self.count = _TapStat(jnp.zeros((), jnp.int32))

  def reset(self) -> None:
    self.xtx[...] = jnp.zeros_like(self.xtx[...])
    self.count[...] = jnp.zeros_like(self.count[...])

  def __call__(self, x: jax.Array, *args, **kwargs):
    xtx, n = gram_moments(x)
    self.xtx[...] = self.xtx[...] + xtx
    self.count[...] = self.count[...] + n
    return self.layer(x, *args, **kwargs)


class InputTap(nnx.Module):
  """Wraps a layer and hands its inputs, as numpy arrays, to `sink`; eager use only."""

  def __init__(self, layer: nnx.Module, sink: Callable[[np.ndarray], None]):
    self.layer = layer
    self.sink = sink

  def __call__(self, x: jax.Array, *args, **kwargs):
    try:
      self.sink(np.asarray(x))
    except jax.errors.TracerArrayConversionError as e:
      raise RuntimeError("capture_inputs runs eagerly; use collect_grams under jit") from e
    return self.layer(x, *args, **kwargs)


def _in_features(layer) -> int:
  return int(layer.kernel.shape[0] if isinstance(layer, layers.ConvTranspose2x2)
             else layer.in_features)


def collect_grams(model: nnx.Module, pattern: str, forward: Callable[[nnx.Module, Any], Any],
                  batches: Iterable[Any], *, types: Tuple[type, ...] = (layers.Linear,),
                  acc: Optional[GramAccumulator] = None, jit: bool = True) -> GramAccumulator:
  """Second moments of the inputs of the `types` layers whose path fullmatches `pattern`.

  `forward(model, batch)` runs the model (its output is discarded); it is wrapped in
  `nnx.jit` unless `jit=False`. The model is restored even if `forward` raises. Layers called
  several times per forward accumulate every call.
  """
  acc = GramAccumulator() if acc is None else acc
  found = find_layers(model, types, pattern)
  if not found:
    raise ValueError(f"no {[t.__name__ for t in types]} layer matches {pattern!r}")
  for path, layer in found:
    set_child(model, path, GramTap(layer, _in_features(layer)))

  def step(m, batch):
    taps = [(p, t) for p, t in nnx.iter_graph(m) if isinstance(t, GramTap)]
    for _, t in taps:
      t.reset()
    forward(m, batch)
    return {module_path(p): (t.xtx[...], t.count[...]) for p, t in taps}

  step = nnx.jit(step) if jit else step
  try:
    for batch in batches:
      for name, (xtx, n) in step(model, batch).items():
        acc.add(name, xtx, n)
  finally:
    for path, layer in found:
      set_child(model, path, layer)
  return acc


def capture_inputs(model: nnx.Module, pattern: str, forward: Callable[..., Any], *args,
                   types: Tuple[type, ...] = (layers.Linear,), **kwargs
                   ) -> Tuple[Any, Dict[str, List[np.ndarray]]]:
  """Runs `forward(model, *args, **kwargs)` eagerly, recording the selected layers' inputs.

  Returns (forward's output, path -> list of inputs, one per call). For small models and
  tests; `collect_grams` is the scalable path.
  """
  found = find_layers(model, types, pattern)
  captured: Dict[str, List[np.ndarray]] = {}
  for path, layer in found:
    name = module_path(path)
    captured[name] = []
    set_child(model, path, InputTap(layer, captured[name].append))
  try:
    out = forward(model, *args, **kwargs)
  finally:
    for path, layer in found:
      set_child(model, path, layer)
  return out, captured


def apply_vrc(model: nnx.Module, grams: Union[GramAccumulator, Mapping[str, Any]], *,
              lam0: Union[float, str] = DEFAULT_LAM0, lam_mode: str = "relative",
              bits: Optional[int] = None, grid: Sequence[float] = AUTO_GRID,
              search_points: int = 64) -> List[VRCLayerReport]:
  """Re-fits the kernels of the model's layers named in `grams`, in place (biases unchanged).

  `grams`: a `GramAccumulator` from `collect_grams`, or path -> S. Returns the reports.
  """
  if isinstance(grams, GramAccumulator):
    grams = grams.second_moments()
  by_name = {module_path(p): l for p, l in find_layers(model, (layers.Linear, layers.Conv))}
  missing = [n for n in grams if n not in by_name]
  if missing:
    raise KeyError(f"layers not in the model: {missing}")
  kernels = {n: by_name[n].kernel[...] for n in grams}
  if any(np.ndim(k) != 2 for k in kernels.values()):
    raise ValueError("VRC re-fits linear kernels (d_in, d_out) only")
  new, reports = vrc_refit(kernels, grams, lam0=lam0, lam_mode=lam_mode, bits=bits, grid=grid,
                           search_points=search_points)
  for n, k in new.items():
    by_name[n].kernel[...] = jnp.asarray(k, by_name[n].kernel[...].dtype)
  return reports

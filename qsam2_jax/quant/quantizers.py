"""Quantizers: one interface, five range methods (LSC, LSQ, PACT, min-max, MSE).

A quantizer is an `nnx.Module` applied to one tensor (a layer's kernel or its input). It
computes a range [lo, hi] (or lo and a step) per group and calls `core.fake_quant`, the
one function that fixes the bound convention (see `core`'s docstring). Methods:

- `lsc` (Q-SAM2's Learnable Statistical Clipping): range = statistics x learnable factors.
  Weights: sigma of the current weights (no gradient) x alpha; activations: EMA of the batch
  mean / std (momentum `spec.momentum`, updated in training, frozen in evaluation) x alpha.
  Symmetric [-a sd, a sd]; asymmetric [mu - a_lo sd, mu + a_hi sd]; unsigned [0, mu + a sd].
  Factors get the LSQ gradient scale; optionally an EMA of the factors is used at evaluation.
- `lsq` (LSQ / LSQ+): a learned step s (and a learned offset for asymmetric ranges); the
  symmetric grid is LSQ's own, codes -Q_N .. Q_P times s. Initial step (`spec.lsq_init`):
  `paper` (default) LSQ's s0 = 2 mean|x| / sqrt(Q_P) (Esser et al. 2020) on the weights, and
  for activations on each calibration batch (averaged over the batches); the LSQ+ offset starts
  at max(min x, -(n/2) s0), the zero-centred range moved up to the data's minimum. `mse`: the
  MSE-optimal range of the tensor (LSQ+'s own init, an option).
- `pact`: a learned clip alpha, range [0, alpha] (unsigned) or [-alpha, alpha]; its gradient is
  PACT's 1[x >= alpha] (the step uses stop_gradient(alpha)). No gradient scale. PACT's L2
  penalty lambda alpha^2 (`spec.pact_l2`) is a loss term: `quant.penalty.pact_l2_penalty`,
  added to the training loss (the optimizer applies no weight decay to `ClipFactor`s).
- `unit`: the fixed unsigned grid on [0, 1] (softmax probabilities), nothing learned.
- `minmax` / `mse`: no learnable parameter. Range = min/max (zero included, as PyTorch's
  observers) or its MSE-optimal shrink; recomputed from the weights at every call, EMA'd for
  activations like LSC.

State: learnable factors are `ClipFactor` (an `nnx.Param`, so `wrt=nnx.Param` trains them and
`optax.partition` can give them their own group); statistics, counters and factor EMAs are
`QuantStat` (a plain `nnx.Variable`: checkpointed, never trained).

Modes (static attributes, one compile each): `use_running_average=False` (training: update
the EMAs; the default, as `nnx.BatchNorm`), `True` (evaluation: frozen; a quantizer that never
saw a batch falls back to the current batch's statistics), and `calibrating=True` (data-
dependent init before QAT: statistics become the mean over the calibration batches and every
factor the mean of its per-batch init, the MSE-optimal value or LSQ's formula).
`nnx.Module.train()/eval()` toggle `use_running_average`; `qsam2_jax.quant.set_mode` sets all
three modes.

Without calibration, LSC factors start at the Gaussian-optimal clip (`GAUSSIAN_CLIP`), LSQ
steps at 2/sqrt(Q_P) (LSQ's formula for mean|x| = 1) and PACT clips at 10 (PACT's init); weight
factors are initialized on the weights given at construction (MSE search; LSQ: `lsq_init`).

LSQ gradient scale: g = 1 / sqrt(N * Q_P) with N the number of elements sharing one factor
(weights), per example for activations (N = features / groups), and Q_P = 2^(b-1) - 1 for
symmetric signed grids (at least 1), 2^b - 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.quant import core as fq

METHODS = ("lsc", "lsq", "pact", "minmax", "mse", "unit")
LSQ_INITS = ("paper", "mse")   # LSQ's step init: 2 mean|x| / sqrt(Q_P), or the MSE range
GRANULARITIES = ("per_tensor", "per_channel", "per_token")
# Learnable factors are floored here so that a range can never flip or collapse.
MIN_FACTOR = 1e-4
MAX_FACTOR = 1e4


class ClipFactor(nnx.Param):
  """A learnable range parameter (LSC alpha, LSQ step / offset, PACT alpha)."""


class QuantStat(nnx.Variable):
  """Quantizer state that is never trained: EMA statistics, the batch counter, factor EMAs."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is quantized.

  Attributes:
    bits: 2..8, or 16 for an exact float passthrough.
    method: `lsc`, `lsq`, `pact`, `minmax` or `mse` (module docstring).
    granularity: `per_tensor`, `per_channel` (weights: the output channel; activations: the
      last axis) or `per_token` (activations: one range per token, from that token's
      statistics; `lsc`, `minmax`, `mse` only).
    signed: False for ranges [0, hi] (codes from zero).
    symmetric: signed ranges [-a, a]; False: [lo, hi].
    restricted: symmetric grid without the most negative level, so that zero is a level.
    momentum: EMA momentum of activation statistics (stat <- m stat + (1 - m) batch).
    factor_momentum: if set, an EMA of the learnable factors (this momentum) is kept and
      used in evaluation mode.
    grad_scale: LSQ gradient scale on LSC / LSQ factors.
    search_points: candidates of the MSE range search (`core.clip_grid`).
    lsq_init: `paper` or `mse`, the initial LSQ step (module docstring); LSQ only.
    pact_l2: lambda of PACT's L2 penalty lambda alpha^2 on the clip (a loss term, summed by
      `quant.penalty.pact_l2_penalty`); PACT only.
  """
  bits: int
  method: str = "lsc"
  granularity: str = "per_tensor"
  signed: bool = True
  symmetric: bool = True
  restricted: bool = False
  momentum: float = 0.9
  factor_momentum: Optional[float] = None
  grad_scale: bool = True
  search_points: int = 64
  lsq_init: str = "paper"
  pact_l2: float = 0.0

  def __post_init__(self):
    fq.check_bits(self.bits)
    if self.lsq_init not in LSQ_INITS:
      raise ValueError(f"lsq_init must be one of {LSQ_INITS}, got {self.lsq_init!r}")
    if not (math.isfinite(self.pact_l2) and self.pact_l2 >= 0):
      raise ValueError(f"pact_l2 must be a non-negative number, got {self.pact_l2}")
    if self.pact_l2 and self.method != "pact":
      raise ValueError(f"pact_l2 is PACT's penalty on its clip; method is {self.method!r}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
    if self.factor_momentum is not None and not 0 < self.factor_momentum < 1:
      raise ValueError(f"factor_momentum must be in (0, 1) or None, got {self.factor_momentum}")
    if self.search_points < 2:
      raise ValueError(f"search_points must be at least 2, got {self.search_points}")
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
    if self.granularity == "per_token" and self.method in ("lsq", "pact"):
      raise ValueError(f"{self.method} learns one fixed range: per_token is not supported")
    if self.restricted and self.kind != "symmetric":
      raise ValueError("the restricted grid needs a signed symmetric range")
    if self.method == "pact" and self.kind == "asymmetric":
      raise ValueError("pact clips to [0, alpha] or [-alpha, alpha]: use signed=False or "
                       "symmetric=True")

  @property
  def passthrough(self) -> bool:
    return self.bits >= fq.PASSTHROUGH_BITS

  @property
  def kind(self) -> str:
    """`symmetric`, `asymmetric` or `unsigned`."""
    if not self.signed:
      return "unsigned"
    return "symmetric" if self.symmetric else "asymmetric"

  @property
  def n(self) -> int:
    return fq.num_steps(self.bits, self.restricted)

  @property
  def qp(self) -> int:
    """LSQ's positive bound Q_P (module docstring)."""
    if self.kind == "symmetric":
      return max(self.n // 2, 1)
    return self.n


class Quantizer(nnx.Module):
  """Base class: `__call__(x)` returns the fake-quantized x (same shape and dtype).

  Subclasses implement `_range(x, update) -> (lo, step)` (keepdims groups, float32) and may
  override `_apply`. `update` is True in training and calibration.
  """
  FACTORS: Tuple[str, ...] = ()

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    if spec.passthrough:
      raise ValueError("16 bits is a passthrough: no quantizer is built (make_quantizer)")
    self.spec = spec
    self.is_weight = weight is not None
    self.channel_axis = channel_axis
    if self.is_weight and spec.granularity == "per_token":
      raise ValueError("per_token is an activation granularity")
    if spec.granularity == "per_channel":
      c = weight.shape[channel_axis] if self.is_weight else num_channels
      if c is None:
        raise ValueError("per_channel activations need num_channels")
      self.group_shape: Tuple[int, ...] = (int(c),)
    else:
      self.group_shape = ()
    self.count = QuantStat(jnp.zeros((), jnp.int32))
    self.use_running_average = False
    self.calibrating = False

  # -- public --------------------------------------------------------------------------------

  def __call__(self, x: jax.Array) -> jax.Array:
    training = not self.use_running_average or self.calibrating
    xf = x.astype(jnp.float32)
    y = self._apply(xf, training)
    if training:
      self._update_factor_emas()
      self.count[...] = self.count[...] + 1
    return y.astype(x.dtype)

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(codes uint8, lo, step) as the evaluation forward uses them; no state changes.

    `core.dequantize(codes, lo, step)` equals the evaluation-mode `__call__` bitwise.
    """
    xf = jnp.asarray(x, jnp.float32)
    lo, step = self._range(xf, False)
    codes = fq.quantize(xf, lo, step, self.spec.n)
    return codes.astype(jnp.uint8), lo, step

  # -- pieces for subclasses ---------------------------------------------------------------

  def _apply(self, x: jax.Array, update: bool) -> jax.Array:
    lo, step = self._range(x, update)
    return fq.fake_quant(x, lo, step, self.spec.n)

  def _range(self, x: jax.Array, update: bool) -> Tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def _axes(self, x: jax.Array) -> Tuple[int, ...]:
    return fq.reduce_axes(x.ndim, self.spec.granularity, self.channel_axis)

  def _expand(self, v: jax.Array, ndim: int) -> jax.Array:
    """A group-shaped (or (k, *group)) value reshaped to broadcast against an ndim tensor."""
    if not self.group_shape:
      return v.reshape(v.shape + (1,) * ndim) if v.ndim else v
    shape = [1] * ndim
    shape[self.channel_axis % ndim] = self.group_shape[0]
    lead = v.shape[:v.ndim - 1]
    return v.reshape(lead + tuple(shape))

  def _squeeze(self, v: jax.Array) -> jax.Array:
    """keepdims statistics -> group shape (what the state variables store)."""
    return v.reshape(self.group_shape)

  def _has_state(self) -> bool:
    return not self.is_weight and self.spec.granularity != "per_token"

  def _running(self, name: str, batch: jax.Array, update: bool) -> jax.Array:
    """EMA (training), running mean (calibration) or frozen (evaluation) statistic.

    The frozen value falls back to the batch statistic while no batch was seen.
    """
    var = getattr(self, name)
    c = self.count[...]
    new = self._squeeze(batch)
    if update:
      if self.calibrating:
        val = var[...] + (new - var[...]) / (c + 1).astype(jnp.float32)
      else:
        m = self.spec.momentum
        val = jnp.where(c == 0, new, m * var[...] + (1.0 - m) * new)
      var[...] = val
    else:
      val = jnp.where(c > 0, var[...], new)
    return self._expand(val, batch.ndim)

  def _grad_scale(self, x: jax.Array) -> float:
    if not self.spec.grad_scale or self.spec.method == "pact":
      return 1.0
    groups = self.group_shape[0] if self.group_shape else 1
    if self.is_weight:
      per = x.size / groups
    elif self.spec.granularity == "per_token":
      per = x.shape[-1]
    else:
      per = x.size / (x.shape[0] if x.ndim > 1 else 1) / groups
    return 1.0 / math.sqrt(per * self.spec.qp)

  def _factor(self, name: str, x: jax.Array, floor: Optional[float] = MIN_FACTOR) -> jax.Array:
    """A learnable factor as the forward uses it, broadcastable against x.

    Training: the parameter with the LSQ gradient scale. Evaluation with `factor_momentum`:
    the factor EMA.
    """
    if self.use_running_average and not self.calibrating and self.spec.factor_momentum:
      v = getattr(self, name + "_ema")[...]
    else:
      v = fq.scale_grad(getattr(self, name)[...], self._grad_scale(x))
    if floor is not None:
      v = jnp.maximum(v, floor)
    return self._expand(v, x.ndim)

  def _finish_init(self, weight: Optional[jax.Array]) -> None:
    """Last step of a subclass constructor: factor EMAs, then the weight MSE init (jitted)."""
    if self.spec.factor_momentum:
      for name in self.FACTORS:
        setattr(self, name + "_ema", QuantStat(getattr(self, name)[...]))
    if weight is not None:
      _jit_init_weight(self, jnp.asarray(weight, jnp.float32))

  def _init_weight(self, w: jax.Array) -> None:
    """Sets the learnable factors from the kernel w (the calibration init, on w)."""
    self._calibrate(w)

  def _update_factor_emas(self) -> None:
    m = self.spec.factor_momentum
    if not m:
      return
    for name in self.FACTORS:
      ema = getattr(self, name + "_ema")
      new = jax.lax.stop_gradient(getattr(self, name)[...])
      ema[...] = new if self.calibrating else m * ema[...] + (1.0 - m) * new

  def _set_factor(self, name: str, new: jax.Array) -> None:
    """Calibration: weights take the new value; activations average it over batches."""
    var = getattr(self, name)
    new = jax.lax.stop_gradient(new).astype(jnp.float32)
    if self.spec.granularity == "per_token":   # one factor for all tokens: their mean
      new = jnp.mean(new.reshape(var.shape + (-1,)), axis=-1)
    else:
      new = new.reshape(var.shape)
    if not self.is_weight:
      c = self.count[...].astype(jnp.float32)
      new = var[...] + (new - var[...]) / (c + 1.0)
    var[...] = new
    if hasattr(self, name + "_ema"):
      getattr(self, name + "_ema")[...] = new

  def _mse_bounds(self, x: jax.Array, center: Optional[jax.Array] = None
                  ) -> Tuple[jax.Array, jax.Array]:
    """MSE-optimal [lo, hi] of this batch for the spec's range kind (keepdims groups).

    Symmetric: shrink [-max|x|, max|x|]; unsigned: [0, max]; asymmetric: [min, max] shrunk
    towards `center` (default 0, with zero kept inside the range) and refined per side.
    """
    axes = self._axes(x)
    xmin, xmax = fq.min_max(x, axes)
    zero = jnp.zeros_like(xmax)
    n, k = self.spec.n, self.spec.search_points
    if self.spec.kind == "symmetric":
      a = jnp.maximum(-xmin, xmax)
      return fq.mse_range(x, -a, a, zero, n, axes, k)
    if self.spec.kind == "unsigned":
      return fq.mse_range(x, zero, jnp.maximum(xmax, 0.0), zero, n, axes, k)
    if center is None:
      return fq.mse_range(x, jnp.minimum(xmin, 0.0), jnp.maximum(xmax, 0.0), zero, n, axes, k,
                          refine=True)
    return fq.mse_range(x, xmin, xmax, center, n, axes, k, refine=True)


class LSCQuantizer(Quantizer):
  """Learnable Statistical Clipping: statistics x learnable factors (module docstring).

  `alpha` has shape (2, *group) = (lower, upper) factors for asymmetric ranges, (1, *group)
  otherwise. Activations keep `mean` and `std` (`QuantStat`, group-shaped).
  """
  FACTORS = ("alpha",)

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    super().__init__(spec, weight=weight, num_channels=num_channels, channel_axis=channel_axis)
    k = 2 if spec.kind == "asymmetric" else 1
    self.alpha = ClipFactor(jnp.full((k,) + self.group_shape, fq.GAUSSIAN_CLIP[spec.bits],
                                     jnp.float32))
    if self._has_state():
      self.mean = QuantStat(jnp.zeros(self.group_shape, jnp.float32))
      self.std = QuantStat(jnp.ones(self.group_shape, jnp.float32))
    self._finish_init(weight)

  def _init_weight(self, w):
    self._calibrate(w, *fq.moments(w, self._axes(w)))

  def _stats(self, x, update):
    mu, sd = fq.moments(x, self._axes(x))
    if self._has_state():
      mu = self._running("mean", mu, update)
      sd = self._running("std", sd, update)
    return mu, sd

  def _calibrate(self, x, mu, sd):
    lo, hi = self._mse_bounds(x, center=mu)
    sd = jnp.maximum(sd, fq.MIN_STEP)
    if self.spec.kind == "symmetric":
      alpha = hi / sd
    elif self.spec.kind == "unsigned":
      alpha = (hi - mu) / sd
    else:
      alpha = jnp.stack([(mu - lo) / sd, (hi - mu) / sd])
    alpha = jnp.clip(alpha, MIN_FACTOR, MAX_FACTOR)
    self._set_factor("alpha", alpha if self.spec.kind == "asymmetric" else alpha[None])

  def _range(self, x, update):
    mu, sd = self._stats(x, update)
    if update and self.calibrating:
      self._calibrate(x, mu, sd)
    a = self._factor("alpha", x)
    if self.spec.kind == "symmetric":
      lo, hi = -a[0] * sd, a[0] * sd
    elif self.spec.kind == "unsigned":
      lo, hi = jnp.zeros_like(mu), mu + a[0] * sd
    else:
      lo, hi = mu - a[0] * sd, mu + a[1] * sd
    return lo, fq.step_size(lo, hi, self.spec.n)


class LSQQuantizer(Quantizer):
  """LSQ (symmetric / unsigned) and LSQ+ (asymmetric: learned offset = lo)."""
  FACTORS = ("step",)

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    super().__init__(spec, weight=weight, num_channels=num_channels, channel_axis=channel_axis)
    self.step = ClipFactor(jnp.full(self.group_shape, 2.0 / math.sqrt(spec.qp), jnp.float32))
    if spec.kind == "asymmetric":
      self.offset = ClipFactor(jnp.full(self.group_shape, -spec.n / 2 * self.step[...]))
      self.FACTORS = ("step", "offset")
    self._finish_init(weight)

  def _qn(self) -> int:
    return self.spec.n - self.spec.qp   # symmetric: codes -Q_N .. Q_P

  def _calibrate(self, x):
    if self.spec.lsq_init == "paper":
      self._paper_init(x)
    else:
      self._mse_init(x)

  def _paper_init(self, x):
    """LSQ: s0 = 2 mean|x| / sqrt(Q_P) per group; LSQ+ offset max(min x, -(n/2) s0)."""
    axes = self._axes(x)
    mean_abs = jnp.mean(jnp.abs(jax.lax.stop_gradient(x)), axis=axes, keepdims=True)
    step = jnp.maximum(2.0 * mean_abs / math.sqrt(self.spec.qp), fq.MIN_STEP)
    self._set_factor("step", step)
    if self.spec.kind == "asymmetric":
      xmin, _ = fq.min_max(x, axes)
      self._set_factor("offset", jnp.maximum(xmin, -self.spec.n / 2 * step))

  def _mse_init(self, x):
    if self.spec.kind == "symmetric":
      # Search in LSQ's own grid: lo = -Q_N s, hi = Q_P s, s = t * max|x| / Q_P.
      axes = self._axes(x)
      xmin, xmax = fq.min_max(x, axes)
      smax = jnp.maximum(-xmin, xmax) / self.spec.qp
      grid = jnp.asarray(fq.clip_grid(self.spec.search_points))
      lo, hi = fq.search_range(
          x, lambda t: (-self._qn() * t * smax, self.spec.qp * t * smax), self.spec.n, axes, grid)
      self._set_factor("step", fq.step_size(lo, hi, self.spec.n))
      return
    lo, hi = self._mse_bounds(x)
    self._set_factor("step", fq.step_size(lo, hi, self.spec.n))
    if self.spec.kind == "asymmetric":
      self._set_factor("offset", lo)

  def _range(self, x, update):
    if update and self.calibrating:
      self._calibrate(x)
    step = self._factor("step", x, floor=fq.MIN_STEP)
    if self.spec.kind == "symmetric":
      lo = -self._qn() * step
    elif self.spec.kind == "unsigned":
      lo = jnp.zeros_like(step)
    else:
      lo = self._factor("offset", x, floor=None)
    return lo, step


class PACTQuantizer(Quantizer):
  """PACT: learned clip alpha; the step uses stop_gradient(alpha), so d/dalpha = 1[x >= alpha]."""
  FACTORS = ("alpha",)

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    super().__init__(spec, weight=weight, num_channels=num_channels, channel_axis=channel_axis)
    self.alpha = ClipFactor(jnp.full(self.group_shape, 10.0, jnp.float32))
    self._finish_init(weight)

  def _calibrate(self, x):
    _, hi = self._mse_bounds(x)
    self._set_factor("alpha", hi)

  def _bounds(self, x, update):
    if update and self.calibrating:
      self._calibrate(x)
    a = self._factor("alpha", x)
    lo = jnp.zeros_like(a) if self.spec.kind == "unsigned" else -a
    return lo, a

  def _range(self, x, update):
    lo, hi = self._bounds(x, update)
    return lo, fq.step_size(lo, hi, self.spec.n)

  def _apply(self, x, update):
    lo, hi = self._bounds(x, update)
    xc = jnp.clip(x, lo, hi)                 # the only path from alpha to the output
    lo_, hi_ = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    step = fq.step_size(lo_, hi_, self.spec.n)
    # No second clip: xc is already inside, and a clip at its bound would halve the gradient
    # (jnp.minimum splits it at ties). Same value as `core.fake_quant`.
    return fq.dequantize(fq.ste_round((xc - lo_) / step), lo_, step)


class RangeQuantizer(Quantizer):
  """`minmax` and `mse`: ranges from the tensor itself, no learnable parameter.

  Activations keep the range in `lo` / `hi` (`QuantStat`) like LSC keeps its statistics.
  """

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    super().__init__(spec, weight=weight, num_channels=num_channels, channel_axis=channel_axis)
    if self._has_state():
      self.lo = QuantStat(jnp.zeros(self.group_shape, jnp.float32))
      self.hi = QuantStat(jnp.zeros(self.group_shape, jnp.float32))
    self._finish_init(weight)

  def _init_weight(self, w):
    pass   # ranges are recomputed from the weights at every call

  def _batch_range(self, x):
    if self.spec.method == "mse":
      return self._mse_bounds(x)
    xmin, xmax = fq.min_max(x, self._axes(x))
    if self.spec.kind == "symmetric":
      a = jnp.maximum(-xmin, xmax)
      return -a, a
    if self.spec.kind == "unsigned":
      return jnp.zeros_like(xmax), jnp.maximum(xmax, 0.0)
    return jnp.minimum(xmin, 0.0), jnp.maximum(xmax, 0.0)

  def _range(self, x, update):
    if not self._has_state():
      lo, hi = self._batch_range(x)
    elif update:
      lo, hi = self._batch_range(x)
      lo, hi = self._running("lo", lo, update), self._running("hi", hi, update)
    else:
      # Frozen: skip the (possibly expensive) batch range unless no batch was ever seen.
      keep = [1] * x.ndim
      if self.group_shape:
        keep[self.channel_axis % x.ndim] = self.group_shape[0]
      lo, hi = jax.lax.cond(
          self.count[...] > 0,
          lambda: (self._expand(self.lo[...], x.ndim).reshape(keep),
                   self._expand(self.hi[...], x.ndim).reshape(keep)),
          lambda: tuple(v.reshape(keep) for v in self._batch_range(x)))
    return lo, fq.step_size(lo, hi, self.spec.n)


class UnitQuantizer(Quantizer):
  """`unit`: the fixed unsigned grid k / (2^b - 1) on [0, 1], for softmax probabilities.

  No learnable factor and no statistic: probabilities lie in [0, 1] by construction, and a
  data-fitted top below 1 would clip exactly the large weights that decide an attention's
  output (a learned range is not offered). Only `count` is kept, so calibration can tell
  that the quantizer saw data.
  """

  def __init__(self, spec: QuantSpec, *, weight: Optional[jax.Array] = None,
               num_channels: Optional[int] = None, channel_axis: int = -1):
    if weight is not None or spec.kind != "unsigned" or spec.granularity != "per_tensor":
      raise ValueError("the unit quantizer is an unsigned per-tensor activation quantizer")
    super().__init__(spec, num_channels=num_channels, channel_axis=channel_axis)

  def _range(self, x, update):
    return jnp.zeros((), jnp.float32), jnp.float32(1.0 / self.spec.n)


# One compile per (quantizer class, spec, kernel shape): models have few distinct shapes.
_jit_init_weight = nnx.jit(lambda q, w: q._init_weight(w))

_CLASSES = {"lsc": LSCQuantizer, "lsq": LSQQuantizer, "pact": PACTQuantizer,
            "minmax": RangeQuantizer, "mse": RangeQuantizer, "unit": UnitQuantizer}


def make_quantizer(spec: Optional[QuantSpec], *, weight: Optional[jax.Array] = None,
                   num_channels: Optional[int] = None, channel_axis: int = -1
                   ) -> Optional[Quantizer]:
  """The quantizer for `spec`, or None for float tensors (spec None or 16 bits).

  Pass `weight` (the current kernel) for a weight quantizer: its factors are initialized on
  it (an MSE search; LSQ: `spec.lsq_init`). Activation quantizers need `num_channels` when
  per-channel.
  """
  if spec is None or spec.passthrough:
    return None
  return _CLASSES[spec.method](spec, weight=weight, num_channels=num_channels,
                               channel_axis=channel_axis)

"""Fake quantizers: grids and clipping vs numpy, STE and factor gradients, EMA modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsam2_jax.quant import core as fq
from qsam2_jax.quant.quantizers import (
    ClipFactor, LSCQuantizer, LSQQuantizer, PACTQuantizer, QuantSpec, QuantStat, RangeQuantizer,
    make_quantizer)


def np_fake_quant(x, lo, hi, n):
  """The documented convention, written independently in float64."""
  s = (hi - lo) / n
  return lo + s * np.round(np.clip((x - lo) / s, 0, n))


def grad_of(f, *args, argnums=0):
  return np.asarray(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=argnums)(*args))


def factor_grad(q, x, name, c=1.0):
  """d sum(c * q(x)) / d factor, through nnx.grad (which handles the state updates)."""
  grads = nnx.grad(lambda m: jnp.sum(c * m(x)), argnums=nnx.DiffState(0, ClipFactor))(q)
  return np.asarray(grads[name][...])


# ------------------------------------------------------------------------------ grids


def test_two_bit_levels_by_hand():
  x = jnp.array([-9.0, -1.2, -0.9, -0.1, 0.2, 0.99, 1.4, 9.0])
  y = fq.fake_quant_range(x, jnp.float32(-1.5), jnp.float32(1.5), fq.num_steps(2))
  # s = 3 / 3 = 1: levels -1.5, -0.5, 0.5, 1.5 (no zero level on the full symmetric grid)
  np.testing.assert_array_equal(y, [-1.5, -1.5, -0.5, -0.5, 0.5, 0.5, 1.5, 1.5])
  r = fq.fake_quant_range(x, jnp.float32(-1.0), jnp.float32(1.0), fq.num_steps(2, True))
  np.testing.assert_array_equal(r, [-1, -1, -1, 0, 0, 1, 1, 1])   # restricted: -1, 0, 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("restricted", [False, True])
def test_grid_and_clipping_match_numpy(bits, restricted):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=4096).astype(np.float32) * 2
  lo, hi = np.float32(-1.7), np.float32(2.3)
  n = fq.num_steps(bits, restricted)
  assert n == 2 ** bits - (2 if restricted else 1)
  y = np.asarray(fq.fake_quant_range(jnp.asarray(x), lo, hi, n))
  np.testing.assert_allclose(y, np_fake_quant(x.astype(np.float64), lo, hi, n), atol=1e-6)
  assert len(np.unique(y)) <= n + 1
  assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6
  assert np.isclose(y.min(), lo) and np.isclose(y.max(), hi)   # bounds are levels


def test_ste_gradient_identity_inside_zero_outside():
  x = jnp.linspace(-3.0, 3.0, 601) + 1e-3            # avoid exact bounds
  lo, s, n = jnp.float32(-1.0), jnp.float32(0.5), 4   # range [-1, 1]
  g = grad_of(lambda v: fq.fake_quant(v, lo, s, n), x)
  inside = (np.asarray(x) > -1.0) & (np.asarray(x) < 1.0)
  np.testing.assert_array_equal(g[inside], 1.0)
  np.testing.assert_array_equal(g[~inside], 0.0)
  # Forward is exactly the rounded value (the STE adds exactly zero).
  np.testing.assert_array_equal(
      fq.fake_quant(x, lo, s, n), fq.dequantize(fq.quantize(x, lo, s, n), lo, s))


def test_scale_grad_is_exact_forward():
  x = jnp.array([0.1, 3.7, 1e-3], jnp.float32)
  np.testing.assert_array_equal(fq.scale_grad(x, 0.37), x)
  np.testing.assert_allclose(grad_of(lambda v: fq.scale_grad(v, 0.37), x), 0.37, rtol=1e-6)


# ------------------------------------------------------------------------------ LSC


def _weight(shape=(24, 8), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 0.05)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsc_weight_per_channel_matches_numpy(bits):
  w = _weight()
  q = LSCQuantizer(QuantSpec(bits=bits, granularity="per_channel"), weight=w)
  q.use_running_average = True
  alpha = np.asarray(q.alpha[...])[0]                # MSE init, one per output channel
  assert alpha.shape == (8,) and np.all(alpha > 0.5) and np.all(alpha < 6)
  sd = np.std(np.asarray(w, np.float64), axis=0)
  ref = np_fake_quant(np.asarray(w, np.float64), -alpha * sd, alpha * sd, 2 ** bits - 1)
  y = np.asarray(q(w))
  np.testing.assert_allclose(y, ref, atol=1e-6)
  for c in range(8):
    assert len(np.unique(y[:, c])) <= 2 ** bits


def test_lsc_mse_init_beats_gaussian_fallback():
  w = _weight((256, 4))
  spec = QuantSpec(bits=2, granularity="per_channel")
  q = LSCQuantizer(spec, weight=w)
  q.use_running_average = True
  err = float(jnp.sum((q(w) - w) ** 2))
  q.alpha[...] = jnp.full_like(q.alpha[...], fq.GAUSSIAN_CLIP[2])
  assert err <= float(jnp.sum((q(w) - w) ** 2)) + 1e-12


def test_lsc_factor_gradient_hand_derived():
  """d y / d alpha = (2 sd / n)(round(v) - v) inside, -sd / +sd below / above (times g)."""
  w = _weight((64, 1), seed=3)
  c = np.random.default_rng(4).normal(size=w.shape)
  for grad_scale in (False, True):
    spec = QuantSpec(bits=3, granularity="per_tensor", grad_scale=grad_scale)
    q = LSCQuantizer(spec, weight=w)
    q.alpha[...] = jnp.array([1.3], jnp.float32)
    got = float(factor_grad(q, w, "alpha", jnp.asarray(c, jnp.float32))[0])
    wd = np.asarray(w, np.float64)
    sd, n, a = wd.std(), 7, 1.3
    lo, step = -a * sd, 2 * a * sd / n
    v = (wd - lo) / step
    d = np.where(v <= 0, -sd, np.where(v >= n, sd, (2 * sd / n) * (np.round(v) - v)))
    g = 1 / math.sqrt(w.size * 3) if grad_scale else 1.0     # N = 64, Q_P = 2^(3-1) - 1
    np.testing.assert_allclose(got, g * np.sum(c * d), rtol=1e-4)


def test_lsq_gradient_and_scale_formula():
  """LSQ: d y / d s = round(v/s) - v/s inside, -Q_N / Q_P outside; scale 1/sqrt(N Q_P)."""
  w = _weight((50, 3), seed=5)
  grads = {}
  for grad_scale in (False, True):
    q = LSQQuantizer(QuantSpec(bits=4, method="lsq", grad_scale=grad_scale), weight=w)
    q.step[...] = jnp.float32(0.01)
    grads[grad_scale] = float(factor_grad(q, w, "step"))
  v = np.asarray(w, np.float64) / 0.01
  qn, qp = 8, 7
  ref = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v)).sum()
  np.testing.assert_allclose(grads[False], ref, rtol=1e-4)
  np.testing.assert_allclose(grads[True] / grads[False], 1 / math.sqrt(w.size * qp), rtol=1e-5)


def test_pact_gradients():
  x = jnp.linspace(-1.0, 3.0, 401) + 1e-3
  spec = QuantSpec(bits=2, method="pact", signed=False)
  q = PACTQuantizer(spec, num_channels=None)
  q.alpha[...] = jnp.float32(1.5)
  q.eval()
  ga = float(factor_grad(q, x, "alpha"))
  assert ga == float(np.sum(np.asarray(x) >= 1.5))           # d/dalpha = 1[x >= alpha]
  gx = grad_of(q, x)
  np.testing.assert_array_equal(gx, ((np.asarray(x) >= 0) & (np.asarray(x) < 1.5)).astype(float))


# ------------------------------------------------------------------------------ modes


def _batches(k=3, shape=(4, 10, 6)):
  rng = np.random.default_rng(7)
  return [jnp.asarray(rng.normal(loc=0.5 * i, scale=1 + i, size=shape).astype(np.float32))
          for i in range(k)]


def test_ema_updates_in_training_and_freezes_in_eval():
  b1, b2, b3 = _batches()
  q = LSCQuantizer(QuantSpec(bits=4, symmetric=False, momentum=0.9))
  assert not q.use_running_average                       # training by default
  q(b1)
  np.testing.assert_allclose(q.mean[...], np.mean(b1), rtol=1e-5)   # first batch initializes
  q(b2)
  np.testing.assert_allclose(q.mean[...], 0.9 * np.mean(b1) + 0.1 * np.mean(b2), rtol=1e-5)
  np.testing.assert_allclose(q.std[...], 0.9 * np.std(b1) + 0.1 * np.std(b2), rtol=1e-5)
  assert int(q.count[...]) == 2
  frozen = (float(q.mean[...]), float(q.std[...]))
  q.eval()                                                  # nnx's switch works too
  y = nnx.jit(lambda m, x: m(x))(q, b3)
  assert (float(q.mean[...]), float(q.std[...])) == frozen and int(q.count[...]) == 2
  a = np.asarray(q.alpha[...])
  mu, sd = frozen
  ref = np_fake_quant(np.asarray(b3, np.float64), mu - a[0] * sd, mu + a[1] * sd, 15)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  q.train()
  nnx.jit(lambda m, x: m(x))(q, b3)                        # jit writes the update back
  np.testing.assert_allclose(q.mean[...], 0.9 * frozen[0] + 0.1 * np.mean(b3), rtol=1e-5)


def test_eval_without_statistics_uses_the_batch():
  b1 = _batches(1)[0]
  q = RangeQuantizer(QuantSpec(bits=8, method="minmax", symmetric=False))
  q.eval()
  ref = np_fake_quant(np.asarray(b1, np.float64), min(np.min(b1), 0), np.max(b1), 255)
  np.testing.assert_allclose(q(b1), ref, atol=1e-5)
  assert int(q.count[...]) == 0


def test_calibration_averages_statistics_and_factors():
  batches = _batches()
  spec = QuantSpec(bits=3, symmetric=False, search_points=64)
  q = LSCQuantizer(spec)
  q.calibrating = True
  for b in batches:
    q(b)
  np.testing.assert_allclose(q.mean[...], np.mean([np.mean(b) for b in batches]), rtol=1e-5)
  np.testing.assert_allclose(q.std[...], np.mean([np.std(b) for b in batches]), rtol=1e-5)
  # Factors: the mean of the per-batch MSE optima; a repeated batch leaves them unchanged,
  # and they are the MSE-optimal (lower, upper) bounds in units of std.
  one = LSCQuantizer(spec)
  one.calibrating = True
  one(batches[0])
  alpha1 = np.asarray(one.alpha[...])
  one(batches[0])
  np.testing.assert_allclose(one.alpha[...], alpha1, rtol=1e-6)
  x = np.asarray(batches[0], np.float64)
  mu, sd = x.mean(), x.std()
  def err(a_lo, a_hi):
    return np.sum((np_fake_quant(x, mu - a_lo * sd, mu + a_hi * sd, 7) - x) ** 2)
  best = err(*alpha1)
  for f in (0.8, 1.25):   # beyond one grid step (7.6 %)
    assert best <= err(alpha1[0] * f, alpha1[1]) * (1 + 1e-6)
    assert best <= err(alpha1[0], alpha1[1] * f) * (1 + 1e-6)
  assert best < err(fq.GAUSSIAN_CLIP[3], fq.GAUSSIAN_CLIP[3])


def test_factor_ema_used_in_eval():
  b1 = _batches(1)[0]
  q = LSCQuantizer(QuantSpec(bits=4, factor_momentum=0.5))
  q(b1)
  q.alpha[...] = jnp.array([2.0])
  q(b1)
  np.testing.assert_allclose(q.alpha_ema[...], 0.5 * fq.GAUSSIAN_CLIP[4] + 0.5 * 2.0, rtol=1e-6)
  q.eval()
  y = q(b1)
  q2 = LSCQuantizer(QuantSpec(bits=4))
  for name in ("mean", "std", "count"):
    getattr(q2, name)[...] = getattr(q, name)[...]
  q2.alpha[...] = q.alpha_ema[...]
  q2.eval()
  np.testing.assert_array_equal(y, q2(b1))


@pytest.mark.parametrize("method", ["lsc", "minmax", "mse"])
def test_per_token_ranges(method):
  x = _batches(1)[0] * jnp.arange(1, 11, dtype=jnp.float32)[None, :, None]
  q = make_quantizer(QuantSpec(bits=4, method=method, granularity="per_token", symmetric=False))
  q.eval()
  y = np.asarray(q(x))
  assert not any(isinstance(v, QuantStat) and v.shape != () for _, v in nnx.iter_graph(q))
  err = np.abs(y - np.asarray(x)).max(axis=-1)
  assert np.all(err < np.abs(np.asarray(x)).max(axis=-1) / 4)   # each token has its own range
  for t in range(10):
    assert len(np.unique(y[0, t])) <= 16


def test_passthrough_and_validation():
  assert make_quantizer(QuantSpec(bits=16)) is None
  assert make_quantizer(None) is None
  with pytest.raises(ValueError):
    QuantSpec(bits=5, method="lsq", granularity="per_token")
  with pytest.raises(ValueError):
    QuantSpec(bits=9)
  with pytest.raises(ValueError):
    QuantSpec(bits=4, restricted=True, symmetric=False)
  assert issubclass(ClipFactor, nnx.Param) and not issubclass(QuantStat, nnx.Param)


def test_mse_weight_method_is_the_vrc_quantizer():
  """The `mse` weight method and VRC's `mse_quantize_symmetric` are the same quantizer."""
  w = _weight((40, 6), seed=9)
  q = RangeQuantizer(QuantSpec(bits=3, method="mse", granularity="per_channel"), weight=w)
  q.eval()
  np.testing.assert_array_equal(nnx.jit(lambda m, v: m(v))(q, w),   # both compiled (FMA)
                                fq.mse_quantize_symmetric(w, 3))
  amax = np.abs(np.asarray(w)).max(axis=0)
  lo, step = q._range(w, False)
  assert np.all(-np.asarray(lo)[0] <= amax + 1e-7) and np.all(np.asarray(step) > 0)

"""VRC: ridge re-fit vs numpy float64, auto-lambda, Gram collection on a toy model, plots."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.quant import core as fq
from qsam2_jax.quant import vrc
from qsam2_jax.quant.vrc_plots import plot_lambda_sweep, plot_vrc_weights


def _inputs(n=2048, d=32, seed=0, decay=0.15):
  """Tokens with a decaying spectrum, like real activations (a few strong directions)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
  scales = np.exp(-decay * np.arange(d))
  return (rng.normal(size=(n, d)) * scales) @ basis.T + 0.1 * rng.normal(size=d)


def _kernel(d_in=32, d_out=24, seed=1):
  return np.random.default_rng(seed).normal(size=(d_in, d_out)) / np.sqrt(d_in)


def _gram(x):
  return x.T @ x / x.shape[0]


def test_ridge_refit_matches_numpy_solve():
  x, k = _inputs(), _kernel()
  s = _gram(x)
  for lam0 in (1e-3, 3e-3, 0.1, 2.0):
    lam = lam0 * np.trace(s) / s.shape[0]
    ref = np.linalg.solve(s + lam * np.eye(s.shape[0]), s @ k)
    got = np.asarray(vrc.ridge_refit(jnp.asarray(k, jnp.float32), jnp.asarray(s, jnp.float32),
                                     lam), np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5, lam0


def test_ridge_refit_limits_and_shrinkage():
  x, k = _inputs(decay=0.05), _kernel()
  s = jnp.asarray(_gram(x), jnp.float32)
  kj = jnp.asarray(k, jnp.float32)
  np.testing.assert_array_equal(vrc.ridge_refit(kj, s, 0.0), kj)        # lam = 0: K exactly
  tiny = np.asarray(vrc.ridge_refit(kj, s, 1e-9 * float(jnp.trace(s))))
  assert np.linalg.norm(tiny - k) / np.linalg.norm(k) < 1e-5               # full rank: -> K
  prev_norm, prev_std = np.linalg.norm(k), np.std(k)
  for lam0 in (1e-3, 1e-2, 1e-1, 1.0):
    out = np.asarray(vrc.ridge_refit(kj, s, lam0 * float(jnp.trace(s)) / 32))
    assert np.linalg.norm(out) < prev_norm and np.std(out) < prev_std
    prev_norm, prev_std = np.linalg.norm(out), np.std(out)


def test_reported_errors_are_the_data_errors():
  """The S-only quadratic forms equal the errors measured on the inputs themselves."""
  x, k = _inputs(), _kernel()
  new, (rep,) = vrc.vrc_refit({"l": k}, {"l": _gram(x)}, lam0=0.05, bits=3)
  kh = new["l"].astype(np.float64)
  lam = 0.05 * np.trace(_gram(x)) / 32
  assert rep.lam == pytest.approx(lam, rel=1e-5) and rep.lam0 == pytest.approx(0.05)
  y = x @ k
  def rel(a):
    return np.linalg.norm(x @ a - y) / np.linalg.norm(y)
  qk = np.asarray(fq.mse_quantize_symmetric(jnp.asarray(kh, jnp.float32), 3), np.float64)
  q0 = np.asarray(fq.mse_quantize_symmetric(jnp.asarray(k, jnp.float32), 3), np.float64)
  assert rep.out_err == pytest.approx(rel(kh), rel=1e-3)
  assert rep.q_err == pytest.approx(rel(qk), rel=1e-3)
  assert rep.q_err_base == pytest.approx(rel(q0), rel=1e-3)
  assert rep.std_before == pytest.approx(np.std(k), rel=1e-5)
  assert rep.std_after == pytest.approx(np.std(kh), rel=1e-5)
  assert 0 < rep.std_reduction < 1


@pytest.mark.parametrize("bits", [2, 4])
def test_auto_lambda_never_worse_than_no_calibration(bits):
  reports = []
  for seed in range(3):
    x, k = _inputs(seed=seed), _kernel(seed=seed + 10)
    s = _gram(x)
    new, (rep,) = vrc.vrc_refit({"l": k}, {"l": s}, lam0="auto", bits=bits)
    # Independent check of the criterion in float64: trace(D S D^T) at the chosen lambda
    # against lambda = 0 (no re-fit).
    def crit(kh):
      d = np.asarray(fq.mse_quantize_symmetric(jnp.asarray(kh, jnp.float32), bits),
                     np.float64) - k
      return np.trace(d.T @ s @ d)
    assert crit(new["l"]) <= crit(k.astype(np.float32)) * (1 + 1e-5)
    assert rep.q_ratio <= 1.0 + 1e-6
    assert rep.lam0 in vrc.AUTO_GRID or rep.lam0 == pytest.approx(
        min(vrc.AUTO_GRID, key=lambda g: abs(g - rep.lam0)), rel=1e-5)
    reports.append(rep)
  assert min(r.q_ratio for r in reports) < 0.99     # it does pick a useful lambda somewhere


def test_grouped_solve_equals_single_layer_solves():
  ks = {"a": _kernel(seed=1), "b": _kernel(seed=2), "c": _kernel(32, 16, seed=3)}
  gs = {"a": _gram(_inputs(seed=4)), "b": _gram(_inputs(seed=5)), "c": _gram(_inputs(seed=6))}
  new, reps = vrc.vrc_refit(ks, gs, lam0=0.01)
  assert [r.name for r in reps] == ["a", "b", "c"] and np.isnan(reps[0].q_err)
  for n in ks:
    lam = 0.01 * np.trace(gs[n]) / 32
    one = vrc.ridge_refit(jnp.asarray(ks[n], jnp.float32), jnp.asarray(gs[n], jnp.float32), lam)
    assert np.linalg.norm(new[n] - one) / np.linalg.norm(one) < 1e-5
  _, (absolute,) = vrc.vrc_refit({"a": ks["a"]}, {"a": gs["a"]}, lam0=0.5,
                                 lam_mode="absolute")
  assert absolute.lam == pytest.approx(0.5)


def test_lambda_sweep_and_block_reduction():
  x, k = _inputs(), _kernel()
  sw = vrc.lambda_sweep(k, _gram(x), [0.0, 1e-3, 1e-2, 1e-1, 1.0], bits=2)
  assert sw["out_err"][0] == 0.0 and sw["q_ratio"][0] == pytest.approx(1.0)
  assert np.all(np.diff(sw["out_err"]) > 0) and np.all(np.diff(sw["std_after"]) < 0)
  reports = [vrc.VRCLayerReport(f"image_encoder.trunk.blocks.{b}.{n}", (4, 4), 0.1, 0.1, 1.0,
                                after, 0, 0, 1, 2)
             for b, n, after in [(0, "attn.qkv", 0.9), (0, "mlp.layers.0", 0.7),
                                 (3, "attn.proj", 0.8), (1, "mlp.layers.1", 0.95)]]
  reports.append(vrc.VRCLayerReport("image_encoder.neck.convs.0.conv", (4, 4), 0, 0, 1, 0.5, 0,
                                    0, 1, 2))
  red = vrc.block_std_reduction(reports)
  assert list(red) == [0, 1, 3]
  assert red[0] == pytest.approx(0.2) and red[1] == pytest.approx(0.05)


def test_plots_write_pngs(tmp_path):
  x, k = _inputs(), _kernel()
  new, reps = vrc.vrc_refit({"image_encoder.trunk.blocks.0.attn.qkv": k},
                            {"image_encoder.trunk.blocks.0.attn.qkv": _gram(x)}, lam0=0.1)
  p1 = plot_vrc_weights([k], list(new.values()), vrc.block_std_reduction(reps),
                        tmp_path / "hist.png", title="VRC")
  sw = vrc.lambda_sweep(k, _gram(x), [0.0] + list(np.logspace(-4, 0, 5)), bits=2)
  p2 = plot_lambda_sweep(sw["lam0"], sw["out_err"], sw["q_ratio"], tmp_path / "sweep.png",
                         layer="blocks.0.attn.qkv", chosen_lam0=1e-2)
  for p in (p1, p2):
    data = open(p, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ----------------------------------------------------------------- Grams on a toy model


class _Mlp(nnx.Module):
  def __init__(self, d, rngs):
    self.layers = nnx.List([layers.Linear(d, 2 * d, rngs=rngs), layers.Linear(2 * d, d,
                                                                              rngs=rngs)])


class _Attn(nnx.Module):
  def __init__(self, d, rngs):
    self.qkv = layers.Linear(d, 3 * d, rngs=rngs)
    self.proj = layers.Linear(d, d, rngs=rngs)


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.attn = _Attn(d, rngs)
    self.mlp = _Mlp(d, rngs)

  def __call__(self, x):
    x = x + self.attn.proj(jnp.split(self.attn.qkv(x), 3, axis=-1)[2])
    return x + self.mlp.layers[1](layers.gelu(self.mlp.layers[0](x)))


class _Trunk(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([_Block(8, rngs) for _ in range(2)])


class _Enc(nnx.Module):
  def __init__(self, rngs):
    self.trunk = _Trunk(rngs)


class Toy(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.image_encoder = _Enc(rngs)
    self.head = layers.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    for b in self.image_encoder.trunk.blocks:
      x = b(x)
    return self.head(x)


PATTERN = r"image_encoder\.trunk\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.layers\.[01])"


def test_gram_accumulator_float64_sum():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(3, 5, 6)).astype(np.float32) for _ in range(4)]
  acc = vrc.GramAccumulator()
  for x in xs:
    acc.add_inputs("l", x)
  flat = np.concatenate([x.reshape(-1, 6) for x in xs]).astype(np.float64)
  assert acc.count["l"] == 60 and acc.xtx["l"].dtype == np.float64
  np.testing.assert_allclose(acc.second_moment("l"), flat.T @ flat / 60, rtol=1e-6)


def test_collect_grams_and_capture_inputs_on_toy():
  model = Toy()
  rng = np.random.default_rng(1)
  batches = [jnp.asarray(rng.normal(size=(2, 5, 8)).astype(np.float32)) for _ in range(2)]
  ref = [np.asarray(model(b)) for b in batches]
  acc = vrc.collect_grams(model, PATTERN, lambda m, b: m(b), batches)
  assert sorted(acc.xtx) == sorted(f"image_encoder.trunk.blocks.{i}.{n}" for i in range(2)
                                   for n in ("attn.qkv", "attn.proj", "mlp.layers.0",
                                             "mlp.layers.1"))
  # The model is restored: same classes, same outputs.
  assert type(model.image_encoder.trunk.blocks[1].mlp.layers[0]) is layers.Linear
  np.testing.assert_array_equal(model(batches[0]), ref[0])
  # Same Grams from the raw captured inputs.
  raw = vrc.GramAccumulator()
  for b in batches:
    out, captured = vrc.capture_inputs(model, PATTERN, lambda m, v: m(v), b)
    np.testing.assert_array_equal(out, model(b))
    for name, xs in captured.items():
      assert len(xs) == 1 and xs[0].shape[-1] in (8, 16)
      raw.add_inputs(name, xs[0])
  assert type(model.image_encoder.trunk.blocks[0].attn.qkv) is layers.Linear
  for name in acc.xtx:
    assert acc.count[name] == raw.count[name] == 20
    np.testing.assert_allclose(acc.xtx[name], raw.xtx[name], rtol=1e-5, atol=1e-5)
  # mlp.layers.1 sees the GELU of mlp.layers.0's output.
  _, cap = vrc.capture_inputs(model, PATTERN, lambda m, v: m(v), batches[0])
  blk = model.image_encoder.trunk.blocks[0]
  np.testing.assert_allclose(
      cap["image_encoder.trunk.blocks.0.mlp.layers.1"][0],
      layers.gelu(blk.mlp.layers[0](jnp.asarray(
          cap["image_encoder.trunk.blocks.0.mlp.layers.0"][0]))), rtol=1e-6)

  # apply_vrc writes the re-fitted kernels in place and leaves the rest alone.
  head = np.asarray(model.head.kernel[...])
  qkv = np.asarray(blk.attn.qkv.kernel[...])
  reps = vrc.apply_vrc(model, acc, lam0=0.1, bits=4)
  assert len(reps) == 8 and all(r.std_reduction > 0 for r in reps)
  assert not np.array_equal(blk.attn.qkv.kernel[...], qkv)
  np.testing.assert_array_equal(model.head.kernel[...], head)
  with pytest.raises(ValueError):
    vrc.collect_grams(model, r"nothing\.here", lambda m, b: m(b), batches)

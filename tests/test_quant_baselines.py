"""The baselines as their papers define them, and quantizer options that survive a checkpoint.

LSQ (Esser et al. 2020): initial step 2 mean|x| / sqrt(Q_P), gradient scale 1 / sqrt(N Q_P).
PACT (Choi et al. 2018): the L2 penalty lambda alpha^2 is a term of the loss. Every
`QuantSpec` option is a `QuantRecipe` field, set from the command lines and restored from a
checkpoint's metadata into identical layers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qat_testlib import data_dir  # noqa: F401 - fixture

from qsam2_jax.errors import UserError
from qsam2_jax.quant.penalty import pact_l2_penalty
from qsam2_jax.quant.quantizers import (
  ClipFactor,
  LSQQuantizer,
  PACTQuantizer,
  Quantizer,
  QuantSpec,
  QuantStat,
)
from qsam2_jax.quant.recipe import OPTION_FLAGS, QuantRecipe


def _normal(shape, seed, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(np.float32)


def _qp(bits, kind):
  """LSQ's Q_P, written from the paper: 2^(b-1) - 1 for signed data, 2^b - 1 unsigned."""
  return 2 ** (bits - 1) - 1 if kind == "symmetric" else 2 ** bits - 1


# ------------------------------------------------------------------------------ LSQ


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_lsq_weight_step_starts_at_the_paper_formula(bits, granularity):
  w = _normal((48, 6), seed=bits, scale=0.05) * np.linspace(0.5, 3.0, 6, dtype=np.float32)
  q = LSQQuantizer(QuantSpec(bits=bits, method="lsq", granularity=granularity),
                   weight=jnp.asarray(w))
  w64 = np.abs(w.astype(np.float64))
  mean_abs = w64.mean(axis=0) if granularity == "per_channel" else w64.mean()
  ref = 2.0 * mean_abs / math.sqrt(_qp(bits, "symmetric"))
  np.testing.assert_allclose(np.asarray(q.step[...]), ref, rtol=2e-6)
  # The MSE init stays available and is what its name says: no larger quantization error.
  mse = LSQQuantizer(QuantSpec(bits=bits, method="lsq", granularity=granularity,
                               lsq_init="mse"), weight=jnp.asarray(w))
  assert not np.allclose(np.asarray(mse.step[...]), ref, rtol=1e-3)
  for m in (q, mse):
    m.eval()
  err = {k: float(jnp.sum((m(jnp.asarray(w)) - w) ** 2)) for k, m in (("paper", q), ("mse", mse))}
  assert err["mse"] <= err["paper"] * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["unsigned", "asymmetric", "symmetric"])
def test_lsq_activation_step_starts_at_the_paper_formula(kind):
  """Calibration: each batch's 2 mean|x| / sqrt(Q_P), averaged over the batches.

  Asymmetric (LSQ+): Q_P = n = 2^b - 1 (codes 0..n) and the offset starts at
  max(min x, -(n/2) s0) per batch, averaged likewise.
  """
  bits = 3
  signed, symmetric = {"unsigned": (False, True), "asymmetric": (True, False),
                       "symmetric": (True, True)}[kind]
  granularity = "per_channel" if kind == "symmetric" else "per_tensor"
  spec = QuantSpec(bits=bits, method="lsq", signed=signed, symmetric=symmetric,
                   granularity=granularity)
  q = LSQQuantizer(spec, num_channels=5)
  q.calibrating = True
  batches = [_normal((4, 7, 5), seed=i, loc=0.3 * i, scale=1 + i) for i in range(3)]
  if kind == "unsigned":
    batches = [np.maximum(b, 0.0) for b in batches]
  for b in batches:
    q(jnp.asarray(b))
  qp = _qp(bits, "symmetric" if kind == "symmetric" else "other")
  axes = (0, 1) if granularity == "per_channel" else None
  steps = [2.0 * np.abs(b.astype(np.float64)).mean(axis=axes) / math.sqrt(qp) for b in batches]
  np.testing.assert_allclose(np.asarray(q.step[...]), np.mean(steps, axis=0), rtol=1e-5)
  if kind == "asymmetric":
    n = 2 ** bits - 1
    offsets = [max(b.astype(np.float64).min(), -n / 2 * s) for b, s in zip(batches, steps)]
    np.testing.assert_allclose(float(q.offset[...]), np.mean(offsets), rtol=1e-5)


def test_lsq_activation_gradient_scale():
  """g = 1 / sqrt(N_F Q_P), N_F the features of one example (here 7 x 5 = 35)."""
  x = jnp.asarray(np.abs(_normal((4, 7, 5), seed=3)))
  grads = {}
  for scale in (False, True):
    q = LSQQuantizer(QuantSpec(bits=2, method="lsq", signed=False, grad_scale=scale))
    q.step[...] = jnp.float32(0.4)
    g = nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, ClipFactor))(q)
    grads[scale] = float(g["step"][...])
  assert grads[False] != 0.0
  np.testing.assert_allclose(grads[True] / grads[False], 1 / math.sqrt(35 * 3), rtol=1e-5)


# ------------------------------------------------------------------------------ PACT


def test_pact_alpha_gradient_includes_the_l2_term():
  """Finite differences of (sum c * q(x) + lambda alpha^2) wrt alpha match the gradient.

  Every weighted element lies outside [-alpha, alpha] by a margin, so the loss is exactly
  linear + quadratic in alpha near the point (no rounding decision changes): its derivative is
  PACT's sum c 1[x >= alpha] - sum c 1[x <= -alpha] plus 2 lambda alpha.
  """
  lam, alpha = 0.05, 1.5
  rng = np.random.default_rng(0)
  outside = np.concatenate([rng.uniform(1.8, 4.0, 40), -rng.uniform(1.8, 4.0, 30)])
  inside = rng.uniform(-1.2, 1.2, 50)
  x = jnp.asarray(np.concatenate([outside, inside]).astype(np.float32))
  c = np.concatenate([rng.uniform(0.5, 1.5, 70), np.zeros(50)]).astype(np.float32)
  q = PACTQuantizer(QuantSpec(bits=2, method="pact", pact_l2=lam))
  q.eval()

  def total(m):
    return jnp.sum(jnp.asarray(c) * m(x)) + pact_l2_penalty(m)

  def at(a):
    q.alpha[...] = jnp.float32(a)
    return float(np.float64(total(q)))

  h = 0.05
  fd = (at(alpha + h) - at(alpha - h)) / (2 * h)
  q.alpha[...] = jnp.float32(alpha)
  grad = float(nnx.grad(total, argnums=nnx.DiffState(0, ClipFactor))(q)["alpha"][...])
  c64 = c.astype(np.float64)
  task = c64[:40].sum() - c64[40:70].sum()
  np.testing.assert_allclose(grad, task + 2 * lam * alpha, rtol=1e-5)
  np.testing.assert_allclose(fd, grad, rtol=2e-4, atol=2e-4)
  assert abs(fd - task) > 100 * 2e-4   # the L2 term is there, far above the tolerance


def test_pact_penalty_sums_every_pact_clip_of_a_model():
  from qsam2_jax.model import layers
  from qsam2_jax.quant.rules import quantize_model

  class Toy(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.a = layers.Linear(6, 5, rngs=rngs)
      self.b = layers.Linear(5, 3, rngs=rngs)

  lam = 3e-3
  model, report = quantize_model(
      Toy(), QuantRecipe(bits=4, method="pact", act_granularity="per_channel",
                         pact_l2=lam).rules())
  assert len(report.layers) == 2
  rng = np.random.default_rng(1)
  alphas = []
  for layer in (model.a, model.b):
    assert layer.weight_spec.method == "minmax" and layer.act_spec.pact_l2 == lam
    a = rng.uniform(0.5, 5.0, layer.input_quantizer.alpha.shape).astype(np.float32)
    layer.input_quantizer.alpha[...] = jnp.asarray(a)
    alphas.append(a.astype(np.float64))
  np.testing.assert_allclose(float(pact_l2_penalty(model)),
                             lam * sum(np.sum(a ** 2) for a in alphas), rtol=1e-6)
  grads = nnx.grad(pact_l2_penalty, argnums=nnx.DiffState(0, ClipFactor))(model)
  for name, a in zip(("a", "b"), alphas):
    np.testing.assert_allclose(np.asarray(grads[name]["input_quantizer"]["alpha"][...]),
                               2 * lam * a, rtol=1e-6)
  lsc, _ = quantize_model(Toy(), QuantRecipe(bits=4, method="lsc").rules())
  assert float(pact_l2_penalty(lsc)) == 0.0   # only PACT clips are penalized


# ------------------------------------------------------------------------------ options


NON_DEFAULT = {
    "lsc": dict(high_bits=4, high_act_bits=3, weight_granularity="per_tensor",
                act_granularity="per_channel", act_range="symmetric", restricted=True,
                ema_momentum=0.8, factor_momentum=0.95, grad_scale=False, search_points=16),
    "pact": dict(act_range="unsigned", pact_l2=3e-3, high_act_bits=4, factor_momentum=0.5),
    "lsq": dict(lsq_init="mse", act_range="asymmetric", act_granularity="per_channel"),
}


def test_every_option_reaches_the_specs():
  r = QuantRecipe(bits=2, method="lsc", preset="paper", **NON_DEFAULT["lsc"])
  low, high = r.rules()[-1], r.rules()[0]
  w, a = low.weight, low.act
  assert (w.granularity, w.restricted, w.momentum, w.factor_momentum, w.grad_scale,
          w.search_points) == ("per_tensor", True, 0.8, 0.95, False, 16)
  assert (a.granularity, a.signed, a.symmetric, a.momentum, a.factor_momentum) == (
      "per_channel", True, True, 0.8, 0.95)
  assert (high.weight.bits, high.act.bits, low.weight.bits) == (4, 3, 2)
  p = QuantRecipe(bits=2, method="pact", **NON_DEFAULT["pact"]).rules()[-1]
  assert p.act.kind == "unsigned" and p.act.pact_l2 == 3e-3 and p.weight.pact_l2 == 0.0
  q = QuantRecipe(bits=2, method="lsq", **NON_DEFAULT["lsq"]).rules()[-1]
  assert q.weight.lsq_init == q.act.lsq_init == "mse"
  assert set(QuantRecipe().options()) == set(OPTION_FLAGS)


def test_options_from_the_command_lines():
  from train import ptq as ptq_cli
  from train.qat import parse_config
  cfg, _ = parse_config(["--bits", "2", "--method", "lsq", "--lsq-init", "mse",
                         "--factor-momentum", "0.95", "--ema-momentum", "0.8", "--restricted",
                         "--no-grad-scale", "--act-granularity", "per_channel",
                         "--weight-granularity", "per_tensor", "--act-range", "unsigned",
                         "--search-points", "16", "--high-bits", "4", "--high-act-bits", "8"])
  r = cfg.recipe()
  assert r == QuantRecipe(bits=2, method="lsq", lsq_init="mse", factor_momentum=0.95,
                          ema_momentum=0.8, restricted=True, grad_scale=False,
                          act_granularity="per_channel", weight_granularity="per_tensor",
                          act_range="unsigned", search_points=16, high_bits=4, high_act_bits=8)
  assert parse_config(["--method", "pact", "--pact-l2", "0.02"])[0].recipe().pact_l2 == 0.02
  assert parse_config(["--method", "pact"])[0].recipe().pact_l2 == QuantRecipe().pact_l2
  args = ptq_cli.parse_args(["--out", "x", "--restricted", "--act-range", "symmetric",
                             "--high-bits", "4"])
  from train.quant_flags import given_options
  assert given_options(vars(args)) == {"restricted": True, "act_range": "symmetric",
                                       "high_bits": 4}
  with pytest.raises(UserError, match="--pact-l2"):   # training-only: not a PTQ flag
    ptq_cli.parse_args(["--out", "x", "--pact-l2", "0.1"])


@pytest.mark.parametrize("argv, flag", [
    (["--method", "lsq", "--act-granularity", "per_token"], "per_token"),
    (["--ema-momentum", "1.5"], "--ema-momentum"),
    (["--lsq-init", "zeros"], "--lsq-init"),
    (["--method", "pact", "--act-range", "asymmetric"], "pact"),
])
def test_bad_options_are_one_clear_error(argv, flag):
  from train.qat import parse_config
  with pytest.raises(UserError, match=flag):
    parse_config(argv)


def _quantizer_vars(model):
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer):
      for name, v in vars(node).items():
        if isinstance(v, (ClipFactor, QuantStat)):
          out[tuple(path) + (name,)] = v
  return out


@pytest.mark.parametrize("method", ["lsc", "pact"])
def test_checkpoint_with_non_default_options_restores_identical_layers(method, tmp_path):
  from qat_testlib import tiny_config

  from qsam2_jax import checkpoint
  from qsam2_jax.model.sam2 import build_sam2
  from qsam2_jax.quant.rules import find_layers
  from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES

  cfg = tiny_config()
  recipe = QuantRecipe(bits=2, method=method, **NON_DEFAULT[method])
  model, _ = recipe.apply(build_sam2(cfg, seed=0))
  rng = np.random.default_rng(5)
  for v in _quantizer_vars(model).values():   # state no init would produce
    if v[...].dtype == jnp.int32:
      v[...] = jnp.full(v.shape, 3, jnp.int32)
    else:
      v[...] = jnp.asarray(rng.uniform(0.5, 2.0, v.shape).astype(np.float32))
  path = checkpoint.save_model(tmp_path / "q", model,
                               checkpoint.model_meta(cfg, "qat", quant=recipe))
  restored, _ = checkpoint.load_sam2(path)

  def layers_of(m):
    return {p: (type(l).__name__, l.weight_spec, l.act_spec,
                type(l.weight_quantizer).__name__, type(l.input_quantizer).__name__)
            for p, l in find_layers(m, QUANT_LAYER_TYPES)}

  want, got = layers_of(model), layers_of(restored)
  assert len(want) > 100 and got == want
  specs = {s for _, ws, as_, _, _ in want.values() for s in (ws, as_) if s is not None}
  assert any(s.factor_momentum for s in specs)
  if method == "pact":
    assert any(s.pact_l2 == NON_DEFAULT["pact"]["pact_l2"] for s in specs)
  else:
    assert any(s.granularity == "per_channel" and s.symmetric for s in specs if s.bits == 2)
  a, b = nnx.state(model), nnx.state(restored)
  fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
  assert [p for p, _ in fa[0]] == [p for p, _ in fb[0]]
  for (p, x), (_, y) in zip(fa[0], fb[0]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.mark.slow  # two compiles of the reduced model's loss gradient (~1 min on CPU)
def test_trainer_loss_includes_the_pact_penalty(data_dir):  # noqa: F811
  """train.step.loss_fn of two PACT models that differ only in lambda: the totals differ by
  lambda sum alpha^2 and every clip's gradient by 2 lambda alpha; the task terms are equal."""
  from qat_testlib import batches, tiny_config

  from qsam2_jax.model.sam2 import build_sam2
  from train import losses
  from train import step as steplib

  batch = {k: jnp.asarray(v) for k, v in batches(data_dir, 1, batch_size=2)[0].items()}
  lam = 0.02
  out = {}
  for value in (lam, 0.0):
    model, _ = QuantRecipe(bits=4, method="pact", preset="encoder", pact_l2=value).apply(
        build_sam2(tiny_config(), seed=0))
    steplib.prepare_for_training(model)

    @nnx.jit
    def value_and_grad(m):
      f = nnx.value_and_grad(lambda m: steplib.loss_fn(m, batch, losses.LossConfig()),
                             argnums=nnx.DiffState(0, ClipFactor), has_aux=True)
      return f(m)

    (total, terms), grads = value_and_grad(model)
    alphas = {p: np.asarray(v[...], np.float64) for p, v in _quantizer_vars(model).items()
              if p[-1] == "alpha"}
    out[value] = (float(total), jax.device_get(terms), jax.device_get(grads), alphas)
  (t1, terms1, g1, alphas), (t0, terms0, g0, _) = out[lam], out[0.0]
  assert len(alphas) > 10
  penalty = lam * sum(np.sum(a ** 2) for a in alphas.values())
  np.testing.assert_allclose(float(terms1["pact_l2"]), penalty, rtol=1e-5)
  assert float(terms0["pact_l2"]) == 0.0
  for k in terms0:
    if k != "pact_l2":
      np.testing.assert_array_equal(terms1[k], terms0[k])
  np.testing.assert_allclose(t1 - t0, penalty, rtol=1e-3)
  for p, a in alphas.items():
    d = np.asarray(_get(g1, p)[...], np.float64) - np.asarray(_get(g0, p)[...], np.float64)
    np.testing.assert_allclose(d, 2 * lam * a, rtol=1e-3, atol=1e-6, err_msg=str(p))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree

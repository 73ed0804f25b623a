"""The clip loss against PyTorch's `MultiStepMultiMasksAndIous`, and the sharded clip train step
against the one-device step (reduced SAM2.1-t, 64², float32)."""

from __future__ import annotations

import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qat_testlib import tiny_config
from qsam2_jax import parallel
from qsam2_jax.model.sam2 import build_sam2
from torch_reference import rel_err
from train import clip_forward as cf
from train import clip_step, losses
from train import step as steplib

T, N, K, SIZE = 3, 2, 2, 64


def _torch_loss_module():
  if "training.trainer" not in sys.modules:  # docs/sam2-port.md: stub the heavy import
    stub = types.ModuleType("training.trainer")
    stub.CORE_LOSS_KEY = "core_loss"
    sys.modules["training.trainer"] = stub
  from training.loss_fns import MultiStepMultiMasksAndIous
  return MultiStepMultiMasksAndIous(
      {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0},
      supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True)


def test_clip_loss_matches_sam2():
  """Random logits for 3 frames x 4 objects; frame 1 has 2 correction steps, some steps are
  single-mask (given to torch with M = 1, to us repeated x3), one object absent on frame 2."""
  b, n, t, k, h = 1, 4, 3, 2, 8
  size = 4 * h
  rng = np.random.default_rng(0)
  masks = rng.normal(0, 3, (t, n, 1 + k, 3, h, h)).astype(np.float32)
  single = np.zeros((t, 1 + k), bool)
  single[0, 0] = single[1, 2] = True
  ious = rng.uniform(0, 1, (t, n, 1 + k, 3)).astype(np.float32)
  for f, j in zip(*np.nonzero(single)):  # a single-mask step: one mask repeated x3
    masks[f, :, j] = masks[f, :, j, :1]
    ious[f, :, j] = ious[f, :, j, :1]
  obj = rng.normal(0, 2, (t, n, 1 + k, 1)).astype(np.float32)
  step_valid = np.zeros((t, n, 1 + k), bool)
  step_valid[:, :, 0] = True
  step_valid[1] = True
  gt = rng.uniform(size=(b, t, n, size, size)) < 0.3
  gt[0, 2, 3] = False
  out = cf.ClipOutputs(jnp.asarray(masks), jnp.asarray(ious), jnp.asarray(obj),
                       jnp.asarray(step_valid), None, None)
  total, terms = clip_step.clip_loss(out, jnp.asarray(gt), jnp.ones((b, n), bool))

  up = np.asarray(losses.upsample_masks(jnp.asarray(masks.reshape(-1, 3, h, h)), size)).reshape(
      t, n, 1 + k, 3, size, size)
  outs = []
  for f in range(t):
    steps = [j for j in range(1 + k) if step_valid[f, 0, j]]
    m_list, i_list, o_list = [], [], []
    for j in steps:
      m = 1 if single[f, j] else 3
      m_list.append(torch.from_numpy(up[f, :, j, :m].copy()))
      i_list.append(torch.from_numpy(ious[f, :, j, :m].copy()))
      o_list.append(torch.from_numpy(obj[f, :, j].copy()))
    outs.append({"multistep_pred_multimasks_high_res": m_list, "multistep_pred_ious": i_list,
                 "multistep_object_score_logits": o_list})
  targets = torch.from_numpy(gt[0].astype(np.float32))  # (T, N, S, S)
  want = _torch_loss_module()(outs, targets)
  for key in losses.LOSS_KEYS:
    assert float(terms[key]) == pytest.approx(float(want[key]), rel=1e-5), key
  assert float(total) == pytest.approx(float(want["core_loss"]), rel=1e-5)


# ------------------------------------------------------------------------------ sharded step


def _clip_batch(seed: int = 0):
  """8 synthetic clips of T frames with N objects (normalized like the pipeline)."""
  from qsam2_jax.data import synthetic
  from qsam2_jax.video_io import normalize_frame
  images, masks = [], []
  for i in range(8):
    v = synthetic.synth_video(seed, i, T, (SIZE, SIZE))
    images.append(np.asarray(normalize_frame(jnp.asarray(v.frames))))
    masks.append(np.stack([v.labels == j + 1 for j in range(N)], axis=1))
  valid = np.ones((8, N), bool)
  valid[3, 1] = False
  masks = np.stack(masks)
  masks[3, :, 1] = False
  return {"images": np.stack(images).astype(np.float32), "masks": masks, "valid": valid}


_RUNS: dict = {}


def _run(spec: str, bits: int = 0):
  """Two clip train steps and an evaluation on `spec`'s mesh; `bits` > 0: the whole model
  quantized (W`bits`A`bits` LSC, `paper` preset: memory path and attention products too)."""
  if (spec, bits) not in _RUNS:
    model = build_sam2(tiny_config(SIZE), seed=1)
    rng = np.random.default_rng(1)
    for path, var in nnx.iter_graph(model):  # non-zero biases, as in a trained checkpoint (so
      if isinstance(var, nnx.Param) and path[-1] == "bias":  # parameters are compared on their
        var[...] = jnp.asarray(rng.normal(0.0, 0.02, var.shape), jnp.float32)  # own scale)
    if bits:
      from qsam2_jax.quant.recipe import QuantRecipe
      QuantRecipe(bits=bits, preset="paper").apply(model)
    steplib.prepare_for_training(model)
    opt = steplib.make_optimizer(model, lr=1e-6, clip_lr=1e-2, weight_decay=0.01, steps=10,
                                 warmup=0, grad_clip=1.0)
    mesh = parallel.make_mesh(None if spec == "one" else spec,
                              devices=jax.devices()[:1] if spec == "one" else None)
    steps = clip_step.ClipSteps(model, opt, mesh, cf.ClipConfig(correction_clicks=K), seed=3)
    ms, os_ = steps.place_state(model, opt)
    out, opt1 = [], None
    for seed in range(2):
      ms, os_, metrics = steps.train(ms, os_, steps.batch(_clip_batch(seed)))
      out.append(jax.device_get(metrics))
      opt1 = jax.device_get(os_) if opt1 is None else opt1
    ev = jax.device_get(steps.evaluate(ms, steps.batch(_clip_batch(0))))
    _RUNS[spec, bits] = {"metrics": out, "model": jax.device_get(ms), "opt1": opt1, "eval": ev}
  return _RUNS[spec, bits]


@pytest.mark.slow  # two compiles of the clip train step, ~2 min on 2 CPU cores
def test_sharded_clip_step_matches_one_device():
  # The plans of the two steps cover masks, boxes, clicks and corrections.
  for i in range(2):
    key = jax.random.split(jax.random.fold_in(jax.random.key(3), i))[0]
    plan = cf.sample_plan(key, 8, T, cf.ClipConfig(correction_clicks=K))
    assert np.asarray(plan.use_points).any() and not np.asarray(plan.use_points).all()
    assert np.asarray(plan.correct).any()
  ref, run = _run("one"), _run("data=4,fsdp=2")
  for a, b in zip(run["metrics"], ref["metrics"]):
    assert np.isfinite(b["loss"]) and b["loss"] > 0
    assert rel_err(a["loss"], b["loss"]) <= 1e-5
    assert rel_err(a["grad_norm"], b["grad_norm"]) <= 1e-5
  assert ref["metrics"][0]["num_objects"] == 15
  assert rel_err(run["eval"]["iou_sum"], ref["eval"]["iou_sum"]) <= 1e-5
  assert run["eval"]["count"] == ref["eval"]["count"] == 15 * (T - 1)
  moved = 0
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(run["model"]),
                               jax.tree_util.tree_leaves_with_path(ref["model"])):
    name = parallel.path_str(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not re.search(r"(k_proj|attn/qkv)/bias$", name):
      assert rel_err(a, b) <= 1e-5, name
  # Adam's moments after the first step are the first gradients, element by element (after the
  # second they also carry the first update's float noise, amplified by Adam on the mathematically
  # zero key-bias gradients: measured 1e-4 on a few leaves).
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(run["opt1"]),
                               jax.tree_util.tree_leaves_with_path(ref["opt1"])):
    name = parallel.path_str(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if "/nu/" in name:
      a, b = np.sqrt(a), np.sqrt(b)
    if re.search(r"(k_proj|attn/qkv)/bias$", name):
      continue  # mathematically zero gradients: float noise (see test_qat)
    assert rel_err(a, b) <= 1e-5, name
    if "/mu/" in name and "memory_attention" in name and np.any(b != 0):
      moved += 1
  assert moved > 10  # the memory attention got gradients


# Measured on this step (2-core AMD EPYC, jax 0.10.2): median 3.1e-4 (2.7e-4 in a forward-only
# run); the worst, 0.34, is the memory encoder's mask input (the predicted mask, where flipped
# codes show most), so no bound holds for every statistic. A per-shard reduction would take
# statistics of 2 clips instead of 8: expected (not measured) to move them by a sizeable part of
# their std.
STAT_MEDIAN_BOUND = 2e-3


def _stat_gaps(a_state, b_state) -> dict:
  """|a − b| / b's std for every activation statistic (mean, std) of the quantizers."""
  a = {parallel.path_str(p): np.asarray(x, np.float64)
       for p, x in jax.tree_util.tree_leaves_with_path(a_state)}
  b = {parallel.path_str(p): np.asarray(x, np.float64)
       for p, x in jax.tree_util.tree_leaves_with_path(b_state)}
  gaps = {}
  for name, ref in b.items():
    if "quantizer" in name or "_quant/" in name:
      if name.endswith("/mean") or name.endswith("/std"):
        sd = np.maximum(np.abs(b[name.rsplit("/", 1)[0] + "/std"]), 1e-12)
        gaps[name] = float(np.max(np.abs(a[name] - ref) / sd))
  return gaps


@pytest.mark.slow  # two compiles of the quantized clip train step (~15 min on 2 quiet cores)
def test_quantized_sharded_clip_step_agrees_with_one_device():
  """W4A4 over the whole model (memory attention, memory encoder, pointers, attention products),
  one clip train step on data=4,fsdp=2 against one device.

  Not to 1e-5 as the float step: a fake-quantized network is piecewise constant, and a sum taken
  in another order (sharded statistics, other per-device matmul shapes) moves a few values
  across rounding boundaries; each such flip is a whole quantization step, which moves later
  values across their boundaries in turn, and a flipped code in a per-object bottleneck (the
  hypernetwork x upscaled-embedding product, the object score) moves a whole mask. On ONE
  device, merely permuting the clips of a batch (mathematically the same loss) moves this
  model's loss by 4-10 % (docs/status.md, #11); the sharded loss differs by as much. So the loss
  is not compared; what sharding would break if it were wrong is: the activation statistics,
  reduced over the whole global batch (their median gap is bounded), and the placement of every parameter after the update."""
  lr, clip_lr = 1e-6, 1e-2
  runs = {}
  for spec in ("one", "data=4,fsdp=2"):
    model = build_sam2(tiny_config(SIZE), seed=1)
    rng = np.random.default_rng(1)
    for path, var in nnx.iter_graph(model):  # non-zero biases, as in `_run`
      if isinstance(var, nnx.Param) and path[-1] == "bias":
        var[...] = jnp.asarray(rng.normal(0.0, 0.02, var.shape), jnp.float32)
    from qsam2_jax.quant.recipe import QuantRecipe
    QuantRecipe(bits=4, preset="paper").apply(model)
    steplib.prepare_for_training(model)
    before = jax.device_get(nnx.state(model))
    opt = steplib.make_optimizer(model, lr=lr, clip_lr=clip_lr, weight_decay=0.01, steps=10,
                                 warmup=0, grad_clip=1.0)
    mesh = parallel.make_mesh(None if spec == "one" else spec,
                              devices=jax.devices()[:1] if spec == "one" else None)
    steps = clip_step.ClipSteps(model, opt, mesh, cf.ClipConfig(correction_clicks=K), seed=3)
    ms, os_ = steps.place_state(model, opt)
    ms, os_, metrics = steps.train(ms, os_, steps.batch(_clip_batch(0)))
    runs[spec] = {"metrics": jax.device_get(metrics), "model": jax.device_get(ms)}
  ref, run = runs["one"], runs["data=4,fsdp=2"]
  for r in (ref, run):
    assert np.isfinite(r["metrics"]["loss"]) and np.isfinite(r["metrics"]["grad_norm"])
    assert r["metrics"]["num_objects"] == 15
  print("first-step loss: one device", ref["metrics"]["loss"], "data=4,fsdp=2",
        run["metrics"]["loss"])
  gaps = _stat_gaps(run["model"], ref["model"])
  assert sum("memory_attention" in n for n in gaps) > 20  # the memory path's statistics too
  worst = max(gaps, key=gaps.get)
  print(f"statistics |diff|/std: median {np.median(list(gaps.values())):.2e}, worst "
        f"{gaps[worst]:.2e} ({worst})")
  assert np.median(list(gaps.values())) <= STAT_MEDIAN_BOUND
  # Every trained value moved by at most one Adam step from the same start (|update| <= lr per
  # element in Adam's first step, whatever the gradient): a misplaced or mis-gathered shard
  # would not.
  for (path, a), (_, b), (_, s) in zip(jax.tree_util.tree_leaves_with_path(run["model"]),
                                       jax.tree_util.tree_leaves_with_path(ref["model"]),
                                       jax.tree_util.tree_leaves_with_path(before)):
    name = parallel.path_str(path)
    if name.endswith(("/mean", "/std", "/count")):
      continue
    a, b, s = (np.asarray(x, np.float64) for x in (a, b, s))
    step = clip_lr if "alpha" in name.rsplit("/", 1)[-1] else lr
    bound = 2 * step * (1 + 1e-3) + 1e-6 * np.abs(s) + 1e-9
    assert np.all(np.abs(a - s) <= bound) and np.all(np.abs(b - s) <= bound), name


@pytest.mark.slow  # a float and a quantized compile of the clip forward (~8 min on 2 cores)
def test_clip_loss_does_not_depend_on_the_order_of_clips():
  """The clip loss is a sum over clips, so permuting the clips of a batch (each with its own
  prompts; mask prompts, no corrections: no per-row randomness) leaves it unchanged — measured
  bitwise for the float model. The W4A4 model's loss moves by several % under the same
  permutation (the statistics are summed in another order, codes flip, the flips cascade): the
  reason the quantized sharded step is compared on statistics, not on its loss (printed)."""
  from qsam2_jax.quant.recipe import QuantRecipe
  cfg = cf.ClipConfig(correction_clicks=0, prob_point=0.0)
  batch = _clip_batch(0)
  perms = [np.arange(8), np.arange(8)[::-1].copy(), np.roll(np.arange(8), 3)]
  losses_by_bits = {}
  for bits in (0, 4):
    model = build_sam2(tiny_config(SIZE), seed=1)
    if bits:
      QuantRecipe(bits=bits, preset="paper").apply(model)
    steplib.prepare_for_training(model)
    gd, st = nnx.split(model)

    @jax.jit
    def loss(st, images, masks, valid, perm):
      m = nnx.merge(gd, st)
      k_plan, k_fwd = jax.random.split(jax.random.key(3))
      plan = cf.sample_plan(k_plan, images.shape[0], images.shape[1], cfg)
      plan = cf.ClipPlan(*(x[perm] for x in plan))  # row j is clip perm[j], with its prompts
      out = cf.clip_forward(m, images, masks, plan, k_fwd, cfg)
      return clip_step.clip_loss(out, masks, valid)[0]

    losses_by_bits[bits] = [float(loss(st, batch["images"][p], batch["masks"][p],
                                       batch["valid"][p], jnp.asarray(p))) for p in perms]
  fp, q = losses_by_bits[0], losses_by_bits[4]
  print("float losses", fp, "W4A4 losses", q)
  assert np.isfinite(fp).all() and fp[0] > 0
  assert max(abs(x - fp[0]) for x in fp) <= 1e-6 * abs(fp[0])
  assert np.isfinite(q).all()


# The whole gradient, float32: recomputing a frame in the backward pass sums in another order.
GRAD_GAP_BOUND = 1e-4


@pytest.mark.slow  # two compiles of the float clip loss and gradient (~3 min on 2 cores)
def test_clip_remat_keeps_values_and_cuts_memory():
  """`ClipConfig.remat` recomputes frames and correction clicks in the backward pass: the loss
  and the gradient stay those of the stored-residual step (float noise only), while XLA's
  buffer assignment for the step needs less temporary memory (measured 953 -> 481 MiB).
  With the Hiera blocks rematerialized in both runs (`prepare_for_training(remat=True)`) the
  gradients differed by 6.7e-3 instead: that is the open question (docs/status.md #11)."""
  model = build_sam2(tiny_config(SIZE), seed=1)
  steplib.prepare_for_training(model)  # Hiera blocks stored in both runs
  batch = {k: jnp.asarray(v) for k, v in _clip_batch(0).items()}
  graphdef, state = nnx.split(model)
  key = jax.random.key(5)
  results = {}
  for remat in (False, True):
    cfg = cf.ClipConfig(correction_clicks=K, remat=remat)

    def value_and_grad(state, cfg=cfg):  # as ClipSteps' train step takes it
      m = nnx.merge(graphdef, state)
      (value, _), grads = nnx.value_and_grad(
          lambda mm: clip_step.clip_loss_fn(mm, batch, key, cfg, losses.LossConfig()),
          has_aux=True)(m)
      return value, grads

    compiled = jax.jit(value_and_grad).lower(state).compile()
    value, grads = compiled(state)
    results[remat] = (float(value), jax.device_get(grads),
                      compiled.memory_analysis().temp_size_in_bytes)
  (v0, g0, m0), (v1, g1, m1) = results[False], results[True]
  assert np.isfinite(v0) and v0 > 0
  assert rel_err(v1, v0) <= 1e-6
  assert m1 < 0.8 * m0  # these two hold; the gradient below is the open question
  diff = ref = 0.0
  worst = (0.0, "")
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g1),
                               jax.tree_util.tree_leaves_with_path(g0)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff, ref = diff + np.sum((a - b) ** 2), ref + np.sum(b ** 2)
    worst = max(worst, (float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)),
                        parallel.path_str(path)))
  gap = float(np.sqrt(diff / ref))
  print(f"gradient |remat - stored| / |stored|: {gap:.2e} (worst leaf {worst[0]:.2e} {worst[1]}); "
        f"temp memory: {m0 / 2**20:.1f} MiB stored, {m1 / 2**20:.1f} MiB remat")
  assert gap <= GRAD_GAP_BOUND

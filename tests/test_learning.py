"""The training loop learns: it overfits a few synthetic images from PyTorch's default init.

The model is what the trainer starts from without `--init` (SAM2.1-t built by the `sam2`
package with `torch.manual_seed(0)`, constants randomised, `convert.random_checkpoint`), the data
two synthetic images (7 masks of at least 300 px), the step `train.step.Steps` (SAM2's losses,
AdamW, warmup + cosine, gradient clipping) fed by the Grain pipeline with box prompts. The check
is the trainer's own evaluation, `step.mask_ious`, with the ground-truth boxes of the training
masks: a loop that cannot fit 7 masks it sees 120 times each is broken (wrong supervision, prompts
that do not match the masks, a dead prompt path), whatever its loss curve says.

At lr 1e-4 this reaches box mIoU 0.92 in 120 steps (200 s on 2 loaded CPU cores). At
lr 1e-3 from scratch the decoder collapses instead: the image embedding outgrows the prompt
tokens, token->image attention makes every token equal, and the output stops depending on the
prompt (docs/learning-curve.md).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from convert.random_checkpoint import build_torch_sam2
from qsam2_jax import checkpoint, parallel
from qsam2_jax.data import coco, pipeline, prompts, synthetic
from qsam2_jax.model.configs import get_config
from train import losses
from train import step as steplib

SIZE = 128
MIN_AREA = 300  # px at 128²: the 4-px cells of the low-res logits bound the IoU of tiny shapes


def torch_init_model(image_size: int):
  """SAM2.1-t as the `sam2` package initialises it (seed 0, as the embedded default), in JAX."""
  cfg = get_config("sam2.1_hiera_t", image_size=image_size)
  sd = {k: v.detach().numpy() for k, v in build_torch_sam2(cfg, seed=0).state_dict().items()}
  return checkpoint.model_from_state_dict(sd, cfg, source="torch init")


def overfit(model, data_dir: str, *, steps: int, lr: float, batch_size: int, masks: int,
            seed: int = 0):
  """Trains on the images of `data_dir` on one device; returns (losses, box mIoU on them)."""
  steplib.prepare_for_training(model)
  opt = steplib.make_optimizer(model, lr=lr, clip_lr=lr, weight_decay=0.0, steps=steps,
                               warmup=max(1, steps // 10), grad_clip=1.0)
  mesh = parallel.make_mesh(None, devices=jax.devices()[:1])
  st = steplib.Steps(model, opt, mesh, losses.LossConfig())
  ms, os_ = st.place_state(model, opt)
  src = coco.open_source(data_dir)
  pc = prompts.PromptConfig(max_masks=masks, box_prob=1.0, box_noise=0.0, min_area=MIN_AREA)
  train = pipeline.make_iterator(
      src, batch_size, pipeline.DataConfig(image_size=SIZE, prompts=pc, seed=seed,
                                           hflip_prob=0.0, num_threads=1),
      shard_index=0, shard_count=1)
  seen = []
  for _ in range(steps):
    ms, os_, metrics = st.train(ms, os_, st.batch(next(train)))
    seen.append(float(metrics["loss"]))
  evaluation = pipeline.DataConfig(image_size=SIZE, prompts=pc, seed=seed + 1, shuffle=False,
                                   num_epochs=1, hflip_prob=0.0, num_threads=1)
  iou_sum = count = 0.0
  for b in pipeline.make_iterator(src, 1, evaluation, shard_index=0, shard_count=1):
    r = jax.device_get(st.evaluate(ms, st.batch(b)))
    iou_sum, count = iou_sum + float(r["iou_sum"]), count + float(r["count"])
  return seen, iou_sum / count, count


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
  return str(synthetic.make_image_dataset(tmp_path_factory.mktemp("learn") / "coco", 2,
                                          (SIZE, SIZE), seed=0))


@pytest.mark.slow
def test_overfits_a_few_images_from_torch_init(few_images):
  t0 = time.time()
  model = torch_init_model(SIZE)
  seen, miou, count = overfit(model, few_images, steps=120, lr=1e-4, batch_size=2, masks=4)
  print(f"SAM2.1-t {SIZE}²: {count:.0f} masks, loss {seen[0]:.3f} -> {np.mean(seen[-10:]):.3f}, "
        f"box mIoU {miou:.3f}, {time.time() - t0:.0f} s")
  assert count >= 6
  assert miou >= 0.9

"""Shared pieces of the trainer tests: a reduced SAM2.1-t (one Hiera block per stage, 64²
inputs) that keeps compile times low, its Orbax checkpoint and a small synthetic dataset."""

from __future__ import annotations

import dataclasses
import os

import pytest

from qsam2_jax import checkpoint
from qsam2_jax.model.configs import get_config
from qsam2_jax.model.sam2 import build_sam2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
TINY = {"hiera": {"stages": [1, 1, 1, 1], "global_att_blocks": [2]}}


def tiny_config(image_size: int = SIZE):
  cfg = get_config("sam2.1_hiera_t", image_size=image_size)
  return cfg.replace(hiera=dataclasses.replace(cfg.hiera, stages=(1, 1, 1, 1),
                                               global_att_blocks=(2,)))


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
  """An Orbax checkpoint of the reduced model (random weights), loadable by `--init`."""
  path = tmp_path_factory.mktemp("init") / "tiny"
  meta = {"config": "sam2.1_hiera_t", "image_size": SIZE, "kind": "fp", "config_overrides": TINY}
  return str(checkpoint.save_model(path, build_sam2(tiny_config(), seed=0), meta))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from qsam2_jax.data import synthetic
  return str(synthetic.make_image_dataset(tmp_path_factory.mktemp("data") / "coco", 12,
                                          (SIZE, SIZE), seed=4))


def batches(data_dir, n, batch_size=8, masks=2):
  from qsam2_jax.data import coco, pipeline, prompts
  cfg = pipeline.DataConfig(image_size=SIZE, prompts=prompts.PromptConfig(max_masks=masks),
                            seed=3, num_threads=1)
  it = pipeline.make_iterator(coco.open_source(data_dir), batch_size, cfg, shard_index=0,
                              shard_count=1)
  return [next(it) for _ in range(n)]

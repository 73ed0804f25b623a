"""checkpoint.load_sam2 as the one loader: config overrides restore, the float-only check, one
metadata builder; qsam2_jax.files' writers."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from qat_testlib import SIZE, TINY, tiny_config  # noqa: F401
from qsam2_jax import checkpoint, files
from qsam2_jax.model.sam2 import build_sam2
from qsam2_jax.quant import packed_file
from qsam2_jax.quant.recipe import QuantRecipe


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A quantized run of the reduced model saved the way the trainer saves one."""
  cfg = tiny_config()
  model = build_sam2(cfg, seed=1)
  recipe = QuantRecipe(bits=4, preset="encoder")
  recipe.apply(model)
  meta = checkpoint.model_meta(cfg, "qat", "somewhere/init", quant=recipe, run={"steps": 3})
  out = tmp_path_factory.mktemp("run") / "w4"
  with checkpoint.RunCheckpointer(out) as ck:
    ck.save(3, model=nnx.state(model), meta=meta)
  return str(out), model, cfg, meta


def test_model_meta_records_the_config_overrides():
  cfg = tiny_config()
  meta = checkpoint.model_meta(cfg, "fp", "x.pt")
  assert meta["config_overrides"] == TINY   # exactly what differs from sam2.1_hiera_t
  assert checkpoint.sam_config(meta) == cfg
  full = checkpoint.model_meta(checkpoint.sam_config({"config": "sam2.1_hiera_t"}), "fp")
  assert "config_overrides" not in full and full["image_size"] == 1024


def test_run_trained_with_config_overrides_restores(tiny_run):
  path, model, cfg, meta = tiny_run
  loaded, got = checkpoint.load_sam2(path)
  assert got == cfg and got.hiera.stages == (1, 1, 1, 1)
  for a, b in zip(_params(model), _params(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, meta2 = checkpoint.load_with_meta(path)
  assert meta2["step"] == 3 and meta2["kind"] == "qat" and meta2["quant"] == meta["quant"]
  assert meta2["origin"] == "somewhere/init" and meta2["source"] == os.path.abspath(path)


def test_float_only_refuses_quantized_checkpoints(tiny_run, tmp_path):
  path, model, cfg, meta = tiny_run
  with pytest.raises(checkpoint.CheckpointError, match="already quantized.*train.qat --init"):
    checkpoint.load_sam2(path, float_only="train.qat --init")
  packed = tmp_path / "w4.qsam2"
  packed_file.save(packed, model, meta)
  with pytest.raises(checkpoint.CheckpointError, match="already quantized"):
    checkpoint.load_sam2(packed, float_only="calibration")
  # The packed file keeps the overrides too, so the reduced model loads from it.
  loaded, got = checkpoint.load_sam2(packed)
  assert got == cfg
  float_dir = checkpoint.save_model(tmp_path / "fp", build_sam2(cfg, seed=2),
                                    checkpoint.model_meta(cfg, "fp"))
  assert checkpoint.load_sam2(float_dir, float_only="train.qat --init")[1] == cfg


def test_bad_config_overrides_name_the_field(tmp_path):
  meta = {"config": "sam2.1_hiera_t", "image_size": SIZE, "config_overrides": {"nope": 1}}
  with pytest.raises(checkpoint.CheckpointError, match="nope"):
    checkpoint.sam_config(meta)


def test_files_write_json_nan_as_null_and_atomic(tmp_path):
  p = files.write_json(tmp_path / "a" / "x.json",
                       {"a": float("nan"), "b": [np.float32(1.5), math.inf], "c": np.int64(3),
                        "d": (1, 2)})
  text = open(p).read()
  assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 3, "d": [1, 2]}
  assert "NaN" not in text and "Infinity" not in text
  with pytest.raises(RuntimeError):
    with files.atomic_path(tmp_path / "a" / "x.json") as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError
  assert json.loads(open(p).read())["c"] == 3                     # the old file is intact
  assert sorted(os.listdir(tmp_path / "a")) == ["x.json"]         # no temporary left behind
  files.write_csv(tmp_path / "r.csv", [{"x": 1, "y": "a", "z": 0}], ["x", "y"])
  assert open(tmp_path / "r.csv").read().splitlines() == ["x,y", "1,a"]

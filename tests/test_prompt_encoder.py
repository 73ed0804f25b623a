"""PromptEncoder parity with `sam2`'s PyTorch module on the randomized SAM2.1-t reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.model.prompt_encoder import PromptEncoder
from torch_reference import rel_err, to_numpy

PREFIX = "sam_prompt_encoder."
TOL = 1e-4


@pytest.fixture(scope="module")
def encoders(torch_t256):
  cfg, tm = torch_t256
  sd = {k: to_numpy(v) for k, v in tm.state_dict().items() if k.startswith(PREFIX)}
  ours = nnx.eval_shape(lambda: PromptEncoder(cfg, rngs=nnx.Rngs(0)))
  keymap.load_state_dict(ours, sd, prefix=PREFIX)
  return cfg, tm.sam_prompt_encoder, ours


@jax.jit
def _encode(module, points, boxes, masks):
  return module(points, boxes, masks)


def test_keys_bijective(torch_t256):
  cfg, tm = torch_t256
  ours = keymap.torch_keys(nnx.eval_shape(lambda: PromptEncoder(cfg, rngs=nnx.Rngs(0))))
  theirs = {k[len(PREFIX):]: tuple(v.shape) for k, v in tm.state_dict().items()
            if k.startswith(PREFIX)}
  assert len(theirs) == 17
  assert ours == theirs


def _prompts(case: str, size: int, rng: np.random.Generator):
  """(points, boxes, masks) as numpy, or None, for one prompt combination."""
  b = 3
  coords = rng.uniform(0, size, (b, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 2, (b, 4)).astype(np.int32)
  if case == "points_padded":  # every label, -1 pads mid-sequence as in ragged batches
    labels = np.array([[1, 0, -1, -1], [2, 3, 1, -1], [0, 1, 1, 0]], np.int32)
  x0, y0 = rng.uniform(0, size / 2, (2, b))
  boxes = np.stack([x0, y0, x0 + size / 3, y0 + size / 4], -1).astype(np.float32)
  masks = (3.0 * rng.standard_normal((b, size // 4, size // 4))).astype(np.float32)
  return {
      "points": ((coords, labels), None, None),
      "points_padded": ((coords, labels), None, None),
      "box": (None, boxes, None),
      "box_points": ((coords, labels), boxes, None),
      "mask_points": ((coords, labels), None, masks),
      "mask_only": (None, None, masks),
      "nothing": (None, None, None),
  }[case]


CASES = ["points", "points_padded", "box", "box_points", "mask_points", "mask_only", "nothing"]


@pytest.mark.parametrize("case", CASES)
def test_prompt_encoder_matches_torch(encoders, case):
  cfg, tpe, ours = encoders
  rng = np.random.default_rng(CASES.index(case))
  points, boxes, masks = _prompts(case, cfg.image_size, rng)
  t = lambda a: None if a is None else torch.from_numpy(a)
  j = lambda a: None if a is None else jnp.asarray(a)
  with torch.no_grad():
    t_sparse, t_dense = tpe(None if points is None else (t(points[0]), t(points[1])), t(boxes),
                            None if masks is None else t(masks[:, None]))
  sparse, dense = _encode(ours, None if points is None else (j(points[0]), j(points[1])),
                          j(boxes), j(masks))
  t_sparse = to_numpy(t_sparse)
  t_dense = to_numpy(t_dense).transpose(0, 2, 3, 1)
  assert sparse.shape == t_sparse.shape
  assert dense.shape == t_dense.shape
  if t_sparse.size:
    assert rel_err(sparse, t_sparse) <= TOL
  assert rel_err(dense, t_dense) <= TOL


def test_dense_pe_matches_torch(encoders):
  cfg, tpe, ours = encoders
  with torch.no_grad():
    want = to_numpy(tpe.get_dense_pe()).transpose(0, 2, 3, 1)
  got = ours.get_dense_pe()
  e = cfg.image_embedding_size
  assert got.shape == (1, e, e, 256)
  assert rel_err(got, want) <= TOL

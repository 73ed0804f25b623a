"""`qsam2_jax.model.resize` against `torch.nn.functional.interpolate` (align_corners=False)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qsam2_jax.model import resize
from torch_reference import rel_err

MODES = [("bilinear", False), ("bilinear", True), ("bicubic", False)]
SIZES = [
    ((480, 640), (1024, 1024)),  # image predictor input resize
    ((1024, 1024), (256, 256)),  # high-res mask -> low-res logits
    ((256, 256), (480, 640)),  # logits -> original image size
    ((7, 7), (64, 64)),  # pos_embed, t/s/l at 256²
    ((14, 14), (256, 256)),  # pos_embed, b+ at 1024²
    ((37, 37), (11, 11)),
    ((37, 11), (11, 37)),  # one axis up, one down
    ((333, 777), (1000, 999)),  # odd sizes, ~1e3 pixels (float32 coordinate rounding matters)
]


def _torch(x: np.ndarray, out_hw, mode: str, antialias: bool) -> np.ndarray:
  return F.interpolate(torch.from_numpy(x), size=tuple(out_hw), mode=mode, align_corners=False,
                       antialias=antialias).numpy()


@pytest.mark.parametrize("in_hw,out_hw", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode,antialias", MODES, ids=["bilinear", "bilinear_aa", "bicubic"])
def test_matches_torch(in_hw, out_hw, mode, antialias):
  x = np.random.default_rng(0).standard_normal((1, 2, *in_hw)).astype(np.float32)
  want = _torch(x, out_hw, mode, antialias)
  got = resize.resize_2d(jnp.asarray(x), out_hw, mode=mode, antialias=antialias)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("mode,antialias", MODES, ids=["bilinear", "bilinear_aa", "bicubic"])
def test_nhwc_axes_and_jit(mode, antialias):
  x = np.random.default_rng(1).standard_normal((2, 3, 45, 30)).astype(np.float32)
  want = _torch(x, (17, 64), mode, antialias).transpose(0, 2, 3, 1)
  fn = jax.jit(lambda v: resize.resize_2d(v, (17, 64), axes=(-3, -2), mode=mode,
                                          antialias=antialias))
  got = fn(jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert rel_err(got, want) <= 1e-5


def test_identity_size_and_dtypes():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 9)), jnp.bfloat16)
  assert resize.resize_2d(x, (9, 9), mode="bicubic").dtype == jnp.bfloat16
  np.testing.assert_array_equal(resize.resize_2d(x, (9, 9)), x)  # torch copies too
  u8 = jnp.arange(16, dtype=jnp.uint8).reshape(4, 4)
  assert resize.resize_2d(u8, (8, 8)).dtype == jnp.float32


@pytest.mark.parametrize("n_in,n_out", [(7, 64), (64, 7), (37, 11), (256, 480)])
def test_matrices_rows_sum_to_one(n_in, n_out):
  # Interpolation reproduces constants: every row is a partition of unity.
  for m in (resize.bicubic_matrix(n_in, n_out), resize.bilinear_matrix(n_in, n_out, False),
            resize.bilinear_matrix(n_in, n_out, True)):
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)


def test_gradient_is_transposed_weights():
  # d sum(w ⊙ resize(x)) / dx = Mhᵀ w Mw: the resize is a plain linear map, usable in training.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
  w = rng.standard_normal((9, 4))
  grad = jax.grad(lambda v: jnp.sum(resize.resize_2d(v, (9, 4), mode="bicubic") * w))(x)
  mh, mw = resize.bicubic_matrix(5, 9), resize.bicubic_matrix(6, 4)
  np.testing.assert_allclose(grad, mh.T @ w @ mw, rtol=1e-5, atol=1e-6)


def test_rejects_unknown_modes():
  with pytest.raises(ValueError, match="unknown resize mode"):
    resize.resize_2d(jnp.zeros((4, 4)), (2, 2), mode="area")
  with pytest.raises(ValueError, match="antialiased bicubic"):
    resize.resize_2d(jnp.zeros((4, 4)), (2, 2), mode="bicubic", antialias=True)

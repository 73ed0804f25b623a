"""`layers.attention` (the CPU path: heads-major, query blocks, key mask) against float64 numpy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qsam2_jax.model import layers


def _reference(q, k, v, key_valid=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if key_valid is not None:
    s = np.where(np.asarray(key_valid)[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_matches_float64(monkeypatch, blocked, masked):
  # A small score budget sends these shapes through the query-block loop; 80 keys make two
  # 32-key blocks (a loop with an online softmax) and a 16-key remainder.
  monkeypatch.setattr(layers, "_CPU_SCORE_BYTES", 1024 if blocked else 1 << 30)
  monkeypatch.setattr(layers, "_CPU_QUERY_BLOCK", 16)
  monkeypatch.setattr(layers, "_CPU_KEY_BLOCK", 32)
  kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
  b, lq, lk, h, d = 2, 64, 80, 3, 8
  q = jax.random.normal(kq, (b, lq, h, d)) * 3
  k = jax.random.normal(kk, (b, lk, h, d))
  v = jax.random.normal(kv, (b, lk, h, d))
  key_valid = None
  if masked:
    key_valid = jax.random.bernoulli(km, 0.6, (b, lk)).at[:, 0].set(True)
    key_valid = key_valid.at[1, 32:64].set(False)  # a whole key block masked: skipped
  out = jax.jit(layers.attention)(q, k, v, key_valid)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, key_valid), atol=2e-5, rtol=0)
  if masked:  # masked keys have exactly zero weight: changing them changes nothing
    k2 = jnp.where(key_valid[:, :, None, None], k, 1e3)
    v2 = jnp.where(key_valid[:, :, None, None], v, -1e3)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.attention)(q, k2, v2, key_valid)),
                                  np.asarray(out))

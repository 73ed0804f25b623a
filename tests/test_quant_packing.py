"""Bit-packing of 2/3/4/8-bit codes: layout by hand, round trips, dequantization bitwise."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsam2_jax.quant import core as fq
from qsam2_jax.quant.packing import pack, packed_size, unpack


def test_layout_lsb_first_by_hand():
  assert pack(np.array([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]          # 57
  assert pack(np.array([1, 2, 3, 0, 3]), 2).tolist() == [57, 3]
  assert pack(np.array([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
  # 3 bits straddle bytes: 5 | 3 << 3 | 7 << 6 = 477 = 0b1_1101_1101
  assert pack(np.array([5, 3, 7]), 3).tolist() == [477 & 0xFF, 477 >> 8]
  assert pack(np.arange(8), 3).tolist() == [0b10001000, 0b11000110, 0b11111010]
  assert pack(np.array([200, 7]), 8).tolist() == [200, 7]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 13, 255, 1001])
def test_round_trip(bits, n):
  codes = np.random.default_rng(bits * 1000 + n).integers(0, 2 ** bits, size=n, dtype=np.uint8)
  packed = pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == packed_size(n, bits) == -(-n * bits // 8)
  np.testing.assert_array_equal(unpack(packed, bits, n), codes)
  if n:   # unused high bits of the last byte are zero
    assert int(packed[-1]) >> ((n * bits - 1) % 8 + 1) == 0


def test_multi_dimensional_codes_flatten_in_c_order():
  codes = np.random.default_rng(0).integers(0, 4, size=(3, 5, 7))
  np.testing.assert_array_equal(unpack(pack(codes, 2), 2, codes.size).reshape(codes.shape), codes)


def test_bad_input():
  with pytest.raises(ValueError):
    pack(np.array([4]), 2)
  with pytest.raises(ValueError):
    pack(np.array([-1]), 3)
  with pytest.raises(TypeError):
    pack(np.array([1.0]), 4)
  with pytest.raises(ValueError):
    unpack(np.zeros(2, np.uint8), 3, 7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantized_unpacked_codes_equal_fake_quant_bitwise(bits):
  rng = np.random.default_rng(bits)
  x = jnp.asarray(rng.normal(size=(37, 11)).astype(np.float32))
  amax = jnp.max(jnp.abs(x), axis=0, keepdims=True)
  lo, hi = -0.7 * amax, 0.7 * amax
  n = fq.num_steps(bits)
  step = fq.step_size(lo, hi, n)
  codes = np.asarray(fq.quantize(x, lo, step, n)).astype(np.uint8)
  back = unpack(pack(codes, bits), bits, codes.size).reshape(codes.shape)
  np.testing.assert_array_equal(np.asarray(fq.dequantize(back, lo, step)),
                                np.asarray(fq.fake_quant(x, lo, step, n)))

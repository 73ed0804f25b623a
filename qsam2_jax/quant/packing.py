"""Dense bit-packing of unsigned b-bit codes (b = 1..8) into bytes, numpy, integer ops only.

Layout: the codes (flattened in C order) form one little-endian bit stream, LSB first: code i
occupies stream bits [i*b, (i+1)*b), its least significant bit first, and stream bit j is bit
(j mod 8) of byte j // 8. So 2-bit codes c0..c3 share a byte as c0 | c1 << 2 | c2 << 4 |
c3 << 6, 4-bit codes c0 | c1 << 4, and 3-bit codes straddle bytes (8 codes in 3 bytes). The
packed array has exactly ceil(n * b / 8) bytes, the unused high bits of the last byte zero; the
code count n is not stored and must be passed to `unpack`.
"""

from __future__ import annotations

import math

import numpy as np


def _group(bits: int):
  """Codes per group and bytes per group: the smallest whole number of both (<= 64 bits)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in 1..8, got {bits}")
  codes = 8 // math.gcd(8, bits)
  return codes, codes * bits // 8


def packed_size(n: int, bits: int) -> int:
  return (n * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Flattened unsigned codes (each < 2**bits) -> uint8 array of `packed_size(n, bits)` bytes."""
  codes = np.asarray(codes)
  if codes.dtype.kind not in "iu":
    raise TypeError(f"codes must be integers, got {codes.dtype}")
  flat = codes.reshape(-1)
  n = flat.size
  if n and (flat.min() < 0 or flat.max() >= 1 << bits):
    raise ValueError(f"codes outside [0, {(1 << bits) - 1}] for {bits}-bit packing")
  per, nbytes = _group(bits)
  groups = -(-n // per)
  c = np.zeros(groups * per, np.uint64)
  c[:n] = flat.astype(np.uint64)
  c = c.reshape(groups, per)
  word = np.zeros(groups, np.uint64)
  for k in range(per):
    word |= c[:, k] << np.uint64(k * bits)
  out = np.empty((groups, nbytes), np.uint8)
  for j in range(nbytes):
    out[:, j] = ((word >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.uint8)
  return out.reshape(-1)[:packed_size(n, bits)]


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
  """The first `n` codes of `packed` (from `pack`) as uint8."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if packed.size < packed_size(n, bits):
    raise ValueError(f"{packed.size} bytes hold fewer than {n} {bits}-bit codes")
  per, nbytes = _group(bits)
  groups = -(-n // per)
  b = np.zeros(groups * nbytes, np.uint64)
  m = min(packed.size, b.size)
  b[:m] = packed[:m]
  b = b.reshape(groups, nbytes)
  word = np.zeros(groups, np.uint64)
  for j in range(nbytes):
    word |= b[:, j] << np.uint64(8 * j)
  mask = np.uint64((1 << bits) - 1)
  out = np.empty((groups, per), np.uint8)
  for k in range(per):
    out[:, k] = ((word >> np.uint64(k * bits)) & mask).astype(np.uint8)
  return out.reshape(-1)[:n]

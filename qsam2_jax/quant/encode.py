"""Weight encoding of quantized models: fake-quantized weights in PyTorch layout, and codes.

A fake-quantized model multiplies with `layer.quantized_kernel()`, not with its stored `kernel`.
`dequantized_state_dict` puts those values under the official `sam2` keys (everything else as
stored), so the PyTorch package reproduces the weight-quantized model. `encode_weights` gives
the integer codes and per-channel ranges behind them, in PyTorch layout, for the packed file
(`qsam2_jax.quant.packed_file`).

Everything is computed in evaluation mode and compiled, like the model's own forward (XLA fuses
`lo + step * u` into one FMA, so compiled and eager float32 values can differ in the last bit).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES, set_mode
from qsam2_jax.quant.rules import find_layers, module_path


@dataclasses.dataclass(frozen=True)
class EncodedWeight:
  """One quantized kernel as stored: `lo + step * codes`, in PyTorch layout.

  Attributes:
    key: the state-dict key (`...weight`).
    codes: uint8 unsigned codes 0..n, the PyTorch weight's shape.
    lo, step: (groups,) float32; groups = output channels, or 1 for a per-tensor range.
    bits: code width.
    n: largest code (2**bits - 1, or 2**bits - 2 on the restricted grid).
    channel_axis: the output-channel axis of the PyTorch weight (None: per tensor).
  """
  key: str
  codes: np.ndarray
  lo: np.ndarray
  step: np.ndarray
  bits: int
  n: int
  channel_axis: Optional[int]

  def dequantize(self) -> np.ndarray:
    """The float32 weight, computed as the model's compiled forward computes it."""
    return dequantize(self.codes, self.lo, self.step, self.channel_axis)


def _broadcast(v: np.ndarray, ndim: int, axis: Optional[int]) -> np.ndarray:
  if axis is None:
    return np.asarray(v, np.float32).reshape((1,) * ndim)
  shape = [1] * ndim
  shape[axis] = -1
  return np.asarray(v, np.float32).reshape(shape)


def dequantize(codes: np.ndarray, lo: np.ndarray, step: np.ndarray,
               channel_axis: Optional[int]) -> np.ndarray:
  """`lo + step * codes` with (groups,) ranges along `channel_axis` (None: per tensor).

  Rounded once, as the fused multiply-add that XLA compiles `core.dequantize` into: the
  float64 product and sum of float32 values and 8-bit codes are exact, so one rounding to
  float32 gives the FMA result bitwise (a float32 numpy product-then-sum would not). Numpy,
  so loading a packed file compiles nothing.
  """
  codes = np.asarray(codes)
  lo64 = _broadcast(lo, codes.ndim, channel_axis).astype(np.float64)
  step64 = _broadcast(step, codes.ndim, channel_axis).astype(np.float64)
  return (lo64 + step64 * codes.astype(np.float64)).astype(np.float32)


def eval_copy(model: nnx.Module) -> nnx.Module:
  """The same parameters in a new module tree with every quantizer in evaluation mode.

  The caller's model keeps its mode (modes are static attributes: they live on the modules).
  """
  graphdef, state = nnx.split(model)
  return set_mode(nnx.merge(graphdef, state), "eval")


def quantized_layers(model: nnx.Module) -> List[Tuple[str, nnx.Module]]:
  """(PyTorch weight key, layer) of every layer whose kernel is quantized."""
  return [(module_path(path) + ".weight", layer)
          for path, layer in find_layers(model, QUANT_LAYER_TYPES)
          if layer.weight_quantizer is not None]


def _to_torch(layer: nnx.Module, kernel: np.ndarray) -> np.ndarray:
  """A kernel in the layer's Flax layout -> the PyTorch layout, by `keymap`'s one mapping."""
  to_torch, _ = keymap._transform(type(layer), "kernel", kernel.ndim)  # noqa: SLF001
  return np.ascontiguousarray(to_torch(kernel))


def _torch_channel_axis(layer: nnx.Module, ndim: int, flax_axis: int) -> int:
  probe = [1] * ndim
  probe[flax_axis % ndim] = 2
  return list(_to_torch(layer, np.empty(probe, np.uint8)).shape).index(2)


# One compile per distinct (layer structure, shape): a model repeats few of them, and small
# programs compile much faster than one program over every layer.
@nnx.jit
def _quantized_kernel(layer):
  return layer.quantized_kernel()


@nnx.jit
def _encode(layer):
  q = layer.encode_weight()
  return q.codes, q.lo, q.step


def quantized_kernels(model: nnx.Module) -> Dict[str, np.ndarray]:
  """PyTorch key -> the fake-quantized weight the forward uses (PyTorch layout, float32)."""
  named = quantized_layers(eval_copy(model))
  return {key: _to_torch(layer, np.asarray(_quantized_kernel(layer), np.float32))
          for key, layer in named}


def dequantized_state_dict(model: nnx.Module) -> Dict[str, np.ndarray]:
  """The official-format state dict of a (possibly quantized) model, weights fake-quantized.

  Quantized kernels are replaced by `quantized_kernel()` (evaluation mode); every other tensor
  is as stored. Clip factors and statistics are not SAM2 tensors and are left out, so the
  PyTorch `sam2` package loads the result strictly. A float model gives `keymap.state_dict`.
  """
  sd = keymap.state_dict(model)
  sd.update(quantized_kernels(model))
  return sd


def encode_weights(model: nnx.Module) -> Dict[str, EncodedWeight]:
  """PyTorch key -> codes and ranges of every quantized kernel (evaluation mode).

  `EncodedWeight.dequantize()` equals `quantized_kernels(model)[key]` bitwise.
  """
  out = {}
  for key, layer in quantized_layers(eval_copy(model)):
    codes, lo, step = _encode(layer)
    codes = np.asarray(codes)
    lo, step = np.asarray(lo, np.float32), np.asarray(step, np.float32)
    spec = layer.weight_spec
    groups = lo.size
    axis = None
    if groups > 1:
      axis = _torch_channel_axis(layer, codes.ndim, layer.WEIGHT_CHANNEL_AXIS)
    out[key] = EncodedWeight(key=key, codes=_to_torch(layer, codes), lo=lo.reshape(-1),
                             step=np.broadcast_to(step, lo.shape).reshape(-1).copy(),
                             bits=int(spec.bits), n=int(spec.n), channel_axis=axis)
  return out

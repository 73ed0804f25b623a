"""Quantized drop-in layers and the mode switch.

`QLinear`, `QConv` and `QConvTranspose2x2` subclass the model's own `layers.Linear`,
`layers.Conv` and `layers.ConvTranspose2x2` and take over the *same* `kernel` / `bias` Param
objects of the layer they replace, so paths, names, layouts, `isinstance` checks and
`qsam2_jax.keymap` keep working. They add two optional submodules, `weight_quantizer` (per
output channel by default) and `input_quantizer`; None means float (16 bits is None too, so a
16-bit layer computes exactly what the float layer computes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.model import layers
from qsam2_jax.quant import core as fq
from qsam2_jax.quant.quantizers import ClipFactor, Quantizer, QuantSpec, make_quantizer

MODES = ("train", "eval", "calibrate")


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A kernel as stored: unsigned `codes` (the kernel's shape) and `lo + step * codes`.

  `lo` and `step` broadcast against the kernel (one value per output channel, or scalars).
  """
  codes: jax.Array
  lo: jax.Array
  step: jax.Array
  bits: int
  channel_axis: int

  def dequantize(self) -> jax.Array:
    return fq.dequantize(self.codes, self.lo, self.step)


def _adopt(new: nnx.Module, base: nnx.Module) -> None:
  """Makes `new` share every attribute of `base` (the same Param objects, not copies)."""
  for name, value in vars(base).items():
    if not name.startswith("_"):
      setattr(new, name, value)


def _padding(p):
  """nnx.Conv's padding forms (a string, an int, or (lo, hi) pairs) as lax takes them."""
  if isinstance(p, str):
    return p.upper()
  if isinstance(p, int):
    return [(p, p)] * 2
  return [(q, q) if isinstance(q, int) else tuple(q) for q in p]


def _maybe(quantizer: Optional[Quantizer], x: jax.Array) -> jax.Array:
  return x if quantizer is None else quantizer(x)


class _QuantMixin:
  """Shared by the quantized layers: the kernel as the forward sees it, and its codes."""
  WEIGHT_CHANNEL_AXIS = -1

  def _init_quantizers(self, weight: Optional[QuantSpec], act: Optional[QuantSpec],
                       in_features: int) -> None:
    self.weight_spec = weight
    self.act_spec = act
    self.weight_quantizer = make_quantizer(weight, weight=self.kernel[...],
                                           channel_axis=self.WEIGHT_CHANNEL_AXIS)
    self.input_quantizer = make_quantizer(act, num_channels=in_features)

  def quantized_kernel(self) -> jax.Array:
    """The kernel the forward multiplies with (fake-quantized, float32)."""
    return _maybe(self.weight_quantizer, self.kernel[...])

  def encode_weight(self) -> Optional[QuantizedWeight]:
    """Codes and ranges of the kernel (call in eval mode), or None for a float kernel."""
    if self.weight_quantizer is None:
      return None
    codes, lo, step = self.weight_quantizer.encode(self.kernel[...])
    return QuantizedWeight(codes, lo, step, self.weight_spec.bits, self.WEIGHT_CHANNEL_AXIS)


class QLinear(_QuantMixin, layers.Linear):
  """`layers.Linear` with fake-quantized kernel and input."""

  def __init__(self, base: layers.Linear, weight: Optional[QuantSpec],
               act: Optional[QuantSpec]):
    # No super().__init__: the parameters are `base`'s own objects.
    _adopt(self, base)
    self._init_quantizers(weight, act, base.in_features)

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    x = _maybe(self.input_quantizer, x)
    kernel = self.quantized_kernel()
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class QConv(_QuantMixin, layers.Conv):
  """`layers.Conv` (2-D, NHWC, HWIO kernel) with fake-quantized kernel and input."""

  def __init__(self, base: layers.Conv, weight: Optional[QuantSpec], act: Optional[QuantSpec]):
    if len(base.kernel_size) != 2 or base.mask is not None:
      raise ValueError("QConv supports the model's 2-D convolutions without kernel mask")
    _adopt(self, base)
    self._init_quantizers(weight, act, base.in_features)

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    x = _maybe(self.input_quantizer, x)
    batch_shape = x.shape[:-3]
    if len(batch_shape) != 1:
      x = x.reshape((-1,) + x.shape[-3:])
    kernel = self.quantized_kernel()
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)

    def pair(v):
      v = 1 if v is None else v
      return (v, v) if isinstance(v, int) else tuple(v)

    kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.conv_general_dilated(
        x, kernel, pair(self.strides), _padding(self.padding),
        lhs_dilation=pair(self.input_dilation), rhs_dilation=pair(self.kernel_dilation),
        dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                         ("NHWC", "HWIO", "NHWC")),
        feature_group_count=self.feature_group_count, precision=self.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if len(batch_shape) != 1:
      y = y.reshape(batch_shape + y.shape[1:])
    return y


class QConvTranspose2x2(_QuantMixin, layers.ConvTranspose2x2):
  """`layers.ConvTranspose2x2` with fake-quantized kernel (in, out, 2, 2) and input."""
  WEIGHT_CHANNEL_AXIS = 1

  def __init__(self, base: layers.ConvTranspose2x2, weight: Optional[QuantSpec],
               act: Optional[QuantSpec]):
    _adopt(self, base)
    self._init_quantizers(weight, act, base.kernel.shape[0])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _maybe(self.input_quantizer, x)
    dtype = self.dtype or x.dtype
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,coij->bhiwjo", x.astype(dtype), self.quantized_kernel().astype(dtype))
    y = y.reshape(b, 2 * h, 2 * w, -1)
    return y + self.bias[...].astype(dtype)


QUANTIZED_LAYERS = ((layers.ConvTranspose2x2, QConvTranspose2x2), (layers.Conv, QConv),
                    (layers.Linear, QLinear))
# Every layer class whose kernel (and input) can be quantized.
QUANT_LAYER_TYPES = tuple(q for _, q in QUANTIZED_LAYERS)


def optimizer_labels(model: nnx.Module, clip: str = "clip", default: str = "params"
                     ) -> nnx.State:
  """Fixed labels of `nnx.state(model, nnx.Param)` for `optax.partition(transforms, labels)`.

  `ClipFactor`s get `clip`, every other Param `default`, e.g.
  `nnx.Optimizer(model, optax.partition({"params": adamw, "clip": adam}, labels), wrt=nnx.Param)`.
  Pass the tree, not a function: `nnx.Optimizer.update` hands optax plain arrays, whose type
  no longer tells a clip factor from a weight.
  """
  return jax.tree.map(lambda v: clip if isinstance(v, ClipFactor) else default,
                      nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))


def set_mode(model: nnx.Module, mode: str) -> nnx.Module:
  """Switches every quantizer of `model` to `train`, `eval` or `calibrate` (in place).

  train: EMA statistics (and factor EMAs) update; eval: frozen; calibrate: statistics average
  over the batches seen and learnable factors are set to their data-dependent init, the
  MSE-optimal value or LSQ's formula (run it on a fresh quantized model, before building the
  optimizer). Each mode compiles once.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer):
      node.use_running_average = mode == "eval"
      node.calibrating = mode == "calibrate"
  return model


def calibrate(model: nnx.Module, forward: Callable[[nnx.Module, Any], Any],
              batches: Iterable[Any]) -> nnx.Module:
  """Runs `forward(model, batch)` (under `nnx.jit`) over `batches` in calibrate mode.

  Leaves the model in train mode.
  """
  set_mode(model, "calibrate")
  step = nnx.jit(lambda m, b: forward(m, b))
  for batch in batches:
    step(model, batch)
  return set_mode(model, "train")

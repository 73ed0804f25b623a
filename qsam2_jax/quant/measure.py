"""How far a quantized (or VRC-refitted) SAM2 is from its float model (method.md §6).

  errors = output_errors(fp, model, held_out_images)   # per layer and end to end
  print(errors.table())

Per layer, each compared layer runs on the *float* model's input next to the float layer
(`ErrorTap`), which isolates its own error; end to end, `calibration.model_outputs` of both
models on the same images and synthetic prompts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.errors import UserError
from qsam2_jax.files import jsonable
from qsam2_jax.quant.calibration import _FLOAT, _outputs_jit, _progress, batches, commit_state
from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES, QLinear
from qsam2_jax.quant.rules import ENCODER_LINEARS, find_layers, get_child, module_path, set_child


class _ErrStat(nnx.Variable):
  """An error tap's running sums (temporary)."""


class ErrorTap(nnx.Module):
  """Wraps a float layer: returns its output, and sums the squared differences of `other`
  (and of `weight_only`, the same layer with a float input) on the same input.

  A `QLinear` with a weight quantizer is evaluated inline, its quantized kernel computed once
  for both (an MSE weight range costs a 64-point search per call).
  """

  def __init__(self, ref: nnx.Module, other: nnx.Module, weight_only: Optional[nnx.Module]):
    self.ref = ref
    self.other = other
    self.inline = isinstance(other, QLinear) and other.weight_quantizer is not None
    self.weight_only = None if self.inline else weight_only
    self.has_weight_only = self.inline or weight_only is not None
    self.sums = _ErrStat(jnp.zeros((3,), jnp.float32))   # ||y||^2, ||dy||^2, ||dy_w||^2
    self.calls = _ErrStat(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    y = self.ref(x, *args, **kwargs)
    yf = y.astype(jnp.float32)

    def sq(a):
      return jnp.sum(jnp.square(a.astype(jnp.float32) - yf))

    if self.inline:
      q = self.other
      kernel = q.quantized_kernel()
      xq = x if q.input_quantizer is None else q.input_quantizer(x)
      dq, dw = sq(_linear(q, xq, kernel)), sq(_linear(q, x, kernel))
    else:
      dq = sq(self.other(x, *args, **kwargs))
      dw = sq(self.weight_only(x, *args, **kwargs)) if self.weight_only is not None else 0.0
    self.sums[...] = self.sums[...] + jnp.stack([jnp.sum(jnp.square(yf)), dq, dw])
    self.calls[...] = self.calls[...] + 1
    return y


def _linear(layer: QLinear, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`QLinear.__call__` after its quantizers: x @ kernel + bias in the layer's dtype."""
  bias = layer.bias[...] if layer.bias is not None else None
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  kwargs = {}
  if layer.preferred_element_type is not None:
    kwargs["preferred_element_type"] = layer.preferred_element_type
  y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision,
                        **kwargs)
  return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _weight_only(layer: nnx.Module) -> Optional[nnx.Module]:
  """The quantized layer without its input quantizer (same Params and weight quantizer)."""
  if not isinstance(layer, QUANT_LAYER_TYPES) or layer.weight_quantizer is None:
    return None
  view = type(layer)(layer, None, None)
  view.weight_quantizer = layer.weight_quantizer
  view.weight_spec = layer.weight_spec
  return view


@dataclasses.dataclass
class LayerError:
  """Relative output error of one layer vs the float layer, on the float model's inputs.

  err: ||f_q(x) - f(x)|| / ||f(x)|| with the layer as quantized (weights and input);
  weight_err: the same with a float input (VRC's criterion; None for float layers).
  """
  name: str
  err: float
  weight_err: Optional[float]
  calls: int


@dataclasses.dataclass
class OutputErrors:
  """What `output_errors` measured (relative L2 errors over all images).

  Attributes:
    layers: per compared layer that ran (see `LayerError`), in model order.
    not_run: compared layers the image path never calls (memory attention / encoder).
    outputs: end to end, per `model_outputs` key: ||out_q - out|| / ||out||.
    mask_iou: mean IoU of the predicted masks (logits > 0), quantized vs float.
  """
  layers: Dict[str, LayerError]
  not_run: List[str]
  outputs: Dict[str, float]
  mask_iou: float
  num_images: int

  def encoder_linear_error(self, weight_only: bool = False) -> float:
    """Mean relative error over the image encoder's trunk linears (NaN if none compared)."""
    rx = re.compile(ENCODER_LINEARS)
    vals = [(e.weight_err if weight_only else e.err) for n, e in self.layers.items()
            if rx.fullmatch(n)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")

  def summary(self) -> Dict[str, Any]:
    return jsonable({
        "num_images": self.num_images, "num_layers": len(self.layers),
        "encoder_linear_err": self.encoder_linear_error(),
        "encoder_linear_weight_err": self.encoder_linear_error(weight_only=True),
        "layer_err_mean": float(np.mean([e.err for e in self.layers.values()]))
        if self.layers else None,
        "outputs": self.outputs, "mask_iou": self.mask_iou})

  def table(self) -> str:
    lines = [f"{'layer':58s} {'output err':>10s} {'weight-only':>11s}"]
    for e in self.layers.values():
      w = f"{100 * e.weight_err:10.3f}%" if e.weight_err is not None else f"{'-':>11s}"
      lines.append(f"{e.name:58s} {100 * e.err:9.3f}% {w}")
    if self.not_run:
      lines.append(f"({len(self.not_run)} layers not run on the image path: memory modules)")
    s = self.summary()
    lines.append(f"total, {self.num_images} images: encoder linears mean "
                 f"{100 * s['encoder_linear_err']:.3f}%"
                 + (f" (weight-only {100 * s['encoder_linear_weight_err']:.3f}%)"
                    if s["encoder_linear_weight_err"] is not None else "")
                 + f"; mask IoU vs float {self.mask_iou:.4f}")
    lines.append("end to end: " + ", ".join(f"{k} {100 * v:.3f}%"
                                            for k, v in self.outputs.items()))
    return "\n".join(lines)


def output_errors(fp_model: nnx.Module, q_model: nnx.Module, images: np.ndarray, *,
                  pattern: Optional[str] = None, batch_size: int = 4, progress: bool = True,
                  prompt_seed: int = 0) -> OutputErrors:
  """Per-layer and end-to-end errors of `q_model` against the float `fp_model`.

  Per layer: each compared layer of `q_model` (its quantized layers, or with `pattern` its
  Linear/Conv layers matching it, e.g. VRC-refitted float layers) is run on the *float model's*
  input to that layer, next to the float layer: this isolates each layer's own error, as VRC's
  criterion does. End to end: `model_outputs` of both models on the same images and prompts.
  Neither model is changed (quantizers should be in evaluation mode).
  """
  if pattern is None:
    pairs = find_layers(q_model, QUANT_LAYER_TYPES)
  else:
    pairs = find_layers(q_model, _FLOAT, pattern)
  if not pairs:
    raise UserError("no layer to compare: the model has no quantized layer"
                    + (f" and none matches {pattern!r}" if pattern else ""))
  tapped = nnx.clone(fp_model)
  names = []
  for path, layer in pairs:
    ref = get_child(tapped, path)
    set_child(tapped, path, ErrorTap(ref, layer, _weight_only(layer)))
    names.append(module_path(path))
  commit_state(tapped)
  commit_state(q_model)
  sq = {}
  data = batches(images, batch_size, prompt_seed)
  mask_iou = []
  for batch in _progress(data, "errors", progress):
    ref = _outputs_jit(tapped, batch)
    out = _outputs_jit(q_model, batch)
    for k in ref:
      a, b = np.asarray(out[k], np.float64), np.asarray(ref[k], np.float64)
      s = sq.setdefault(k, [0.0, 0.0])
      s[0] += float(np.sum((a - b) ** 2))
      s[1] += float(np.sum(b ** 2))
    pm, rm = np.asarray(out["mask_logits"]) > 0, np.asarray(ref["mask_logits"]) > 0
    inter = np.sum(pm & rm, axis=(-2, -1))
    union = np.sum(pm | rm, axis=(-2, -1))
    mask_iou.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0).ravel().tolist())
  per, not_run = {}, []
  for (path, _), name in zip(pairs, names):
    tap = get_child(tapped, path)
    calls = int(tap.calls[...])
    if calls == 0:
      not_run.append(name)
      continue
    norm, d, dw = (float(v) for v in np.asarray(tap.sums[...], np.float64))
    norm = max(norm, 1e-30)
    per[name] = LayerError(name, math.sqrt(d / norm),
                           math.sqrt(dw / norm) if tap.has_weight_only else None, calls)
  outputs = {k: math.sqrt(v[0] / max(v[1], 1e-30)) for k, v in sq.items()}
  return OutputErrors(per, not_run, outputs, float(np.mean(mask_iou)), len(images))


def model_fingerprint(model: nnx.Module, images: np.ndarray, *, batch_size: int = 4,
                      prompt_seed: int = 0) -> Dict[str, np.ndarray]:
  """`model_outputs` on `images` as numpy (to check that a restored checkpoint matches)."""
  outs = [jax.device_get(_outputs_jit(model, b))
          for b in batches(images, batch_size, prompt_seed)]
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

"""A packed low-bit file loaded *as packed*: codes and ranges stay in device memory.

`packed_file.load` dequantizes every weight to float32 while loading, so the model resident in
memory is the float model. Here (`load_packed`, and `from_checkpoint(..., keep_packed=True)`
of both predictors) each quantized kernel stays a `PackedKernel`: the file's densely packed
uint8 bytes plus one float32 (lo, step) pair per output channel. Reading the kernel
(`layer.kernel[...]`, what every layer's forward does) unpacks and dequantizes it with jnp ops,
so inside a jitted forward each layer rebuilds its float kernel just before its matmul and
the float kernels are temporaries, not resident state. The floating-point rest keeps the
file's 16-bit storage and is widened to float32 on read: the values are the ones
`packed_file.load` gives, so the forward computes the same function as the fake-quantized
model in evaluation mode (up to the last-bit freedom XLA has in compiling `lo + step * code`).

Resident bytes: `resident_bytes(model)` sums the model's device buffers.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.errors import UserError
from qsam2_jax.quant import core as fq
from qsam2_jax.quant import packed_file
from qsam2_jax.quant.packing import packed_size

# Widest group of bytes the device unpacker assembles into one uint32 word (bits 1-4, 6, 8).
_MAX_GROUP_BYTES = 4


class PackedKernel(nnx.Variable):
  """A quantized kernel as stored: `{"codes": uint8 bytes, "lo": (g,), "step": (g,)}`.

  Metadata (static): `bits`, `torch_shape`, `channel_axis` (of the PyTorch layout, None for a
  per-tensor range) and `layout` (the keymap transform to the layer's own layout). Reading the
  variable returns the float32 kernel in the layer's layout; `get_raw_value()` the stored dict.
  """

  def get_value(self, *, index: Any = ...) -> jax.Array:
    w = _dequantize(self.get_metadata(), self.get_raw_value())
    return w if index is ... else w[index]


def unpack_codes(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """`packing.unpack` with jnp integer ops: the first `n` codes of `packed` as uint8.

  `packed` must be padded to whole groups (`_group_bytes`); integer ops only, so any backend
  gives the same codes.
  """
  per, nbytes = _group(bits)
  b = packed.reshape(-1, nbytes).astype(jnp.uint32)
  word = b[:, 0]
  for j in range(1, nbytes):
    word = word | (b[:, j] << jnp.uint32(8 * j))
  shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
  codes = (word[:, None] >> shifts[None, :]) & jnp.uint32((1 << bits) - 1)
  return codes.reshape(-1)[:n].astype(jnp.uint8)


def _group(bits: int) -> Tuple[int, int]:
  from qsam2_jax.quant.packing import _group as group
  per, nbytes = group(bits)
  if nbytes > _MAX_GROUP_BYTES:
    raise UserError(f"keep_packed supports code widths whose groups fit 32 bits (1-4, 6, 8 "
                    f"bits), got {bits}: load the file without keep_packed")
  return per, nbytes


def _dequantize(meta: Dict[str, Any], value: Dict[str, jax.Array]) -> jax.Array:
  shape = tuple(meta["torch_shape"])
  n = int(np.prod(shape, dtype=np.int64))
  codes = unpack_codes(value["codes"], meta["bits"], n).reshape(shape)
  axis = meta["channel_axis"]
  bshape = [1] * len(shape)
  if axis is not None:
    bshape[axis] = -1
  w = fq.dequantize(codes, value["lo"].reshape(bshape), value["step"].reshape(bshape))
  return _LAYOUTS[meta["layout"]](w)


def _widen_hook(var: nnx.Variable, value: jax.Array) -> jax.Array:
  return value.astype(jnp.float32)


# Layer layouts by (rank, transpose kind), the keymap's `to_flax` transforms.
_LAYOUTS = {
    "identity": lambda w: w,
    "linear": lambda w: w.T,                              # (out, in) -> (in, out)
    "conv": lambda w: w.transpose(2, 3, 1, 0),            # OIHW -> HWIO
}


def _layout(layer: nnx.Module, rank: int) -> str:
  from qsam2_jax.model import layers
  if isinstance(layer, layers.ConvTranspose2x2):
    return "identity"
  return {2: "linear", 4: "conv"}.get(rank, "identity")


def _module_at(model: nnx.Module, parts) -> Any:
  node = model
  for p in parts:
    node = node[int(p)] if p.isdigit() else getattr(node, p)
  return node


def _ranges(e: Dict[str, Any], data: bytes, path: str, key: str) -> Tuple[np.ndarray, np.ndarray]:
  """(lo, step) float32 per channel, derived as `packed_file.tensors_from` derives them."""
  arr = packed_file._array
  lo = arr(data, e["lo"], "float32", None, path, key) if e.get("lo") else None
  step = arr(data, e["step"], "float32", None, path, key) if e.get("step") else None
  if e["range"] == "symmetric":
    if e.get("step_rule") not in packed_file._STEP_RULES:
      raise packed_file.PackedFileError(f"{path}: tensor {key} has unknown step rule "
                                        f"{e.get('step_rule')!r}")
    step = packed_file._symmetric_step(lo, e["n"], e["step_rule"])
  elif e["range"] == "neg_k_step":
    lo = -np.float32(e["k"]) * step
  elif e["range"] != "affine":
    raise packed_file.PackedFileError(f"{path}: tensor {key} has unknown range form "
                                      f"{e['range']!r}")
  lo, step = np.asarray(lo, np.float32), np.asarray(step, np.float32)
  return lo, np.broadcast_to(step, lo.shape).copy()


def load_packed(path: str | os.PathLike, *, config: Optional[str] = None, dtype=None,
                image_size: Optional[int] = None):
  """(model, cfg) from a packed file with its kernels kept packed (see the module docstring).

  The model is for inference (evaluation mode); its `PackedKernel`s are not trainable.
  """
  from qsam2_jax.model import configs
  path = os.fspath(path)
  manifest, data = packed_file.read(path)
  cfg = configs.get_config(config or manifest["config"],
                           image_size=image_size or manifest["image_size"])
  model = packed_file.packed_model(cfg, manifest.get("quant"), dtype=dtype)
  floats: Dict[str, np.ndarray] = {}
  for key, e in manifest["tensors"].items():
    shape = tuple(e["shape"])
    if e["kind"] == "float":
      floats[key] = packed_file._array(data, e["data"], e["dtype"], shape, path, key)
      continue
    parts = key.split(".")
    if parts[-1] != "weight":
      raise packed_file.PackedFileError(f"{path}: quantized tensor {key} is not a weight")
    layer = _module_at(model, parts[:-1])
    size = int(np.prod(shape, dtype=np.int64))
    if e["codes"][1] != packed_size(size, e["bits"]):
      raise packed_file.PackedFileError(f"{path}: tensor {key} has {e['codes'][1]} bytes of "
                                        f"codes, expected {packed_size(size, e['bits'])}")
    codes = packed_file._array(data, e["codes"], "uint8", None, path, key)
    per, nbytes = _group(e["bits"])
    padded = np.zeros(-(-size // per) * nbytes, np.uint8)
    padded[:codes.size] = codes
    lo, step = _ranges(e, data, path, key)
    layer.kernel = PackedKernel(
        {"codes": jnp.asarray(padded), "lo": jnp.asarray(lo), "step": jnp.asarray(step)},
        bits=int(e["bits"]), torch_shape=shape, channel_axis=e["channel_axis"],
        layout=_layout(layer, len(shape)))
  # The float rest at its stored width (16 bits unless the file says float32), widened on read.
  keymap.check_state_dict(model, floats, source=path)
  for name, _, var, (_, to_flax) in keymap._model_leaves(model):
    arr = np.ascontiguousarray(to_flax(floats[name]))
    var.set_value(jnp.asarray(arr))
    if arr.dtype != np.float32:
      var.set_metadata("on_get_value", _widen_hook)
  packed_file.restore_quantizer_state(model, manifest, data, path, skip=(PackedKernel,))
  return model, cfg


def packed_kernels(model: nnx.Module) -> Dict[str, PackedKernel]:
  """PyTorch weight key -> the `PackedKernel` of every kernel kept packed."""
  from qsam2_jax.quant.rules import module_path
  return {module_path(path[:-1]) + ".weight": var for path, var in nnx.iter_graph(model)
          if isinstance(var, PackedKernel)}


def to_layer_layout(var: PackedKernel, torch_weight: np.ndarray) -> np.ndarray:
  """A PyTorch-layout weight in the layout `var` reads as (for comparisons)."""
  return np.asarray(_LAYOUTS[var.get_metadata()["layout"]](np.asarray(torch_weight)))


def resident_bytes(model: nnx.Module) -> int:
  """Bytes of the device buffers the model holds (its whole `nnx.state`)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))
                 if isinstance(x, jax.Array)))

"""The packed low-bit model file: b-bit codes, their ranges, the float rest, one JSON manifest.

Layout (little endian)::

  8 bytes   magic b"QSAM2PK1"
  8 bytes   uint64 length L of the manifest
  L bytes   manifest: UTF-8 JSON, zlib-compressed (`zlib.decompress` + `json.loads`; plain it
            would be ~2 % of a 2-bit tiny model)
  ...       data: the tensors' bytes back to back, at the offsets the manifest gives

Every tensor is keyed by its official `sam2` state-dict key and stored in PyTorch layout, so the
file is readable without this project (numpy and `packing.unpack`):

- quantized weights: codes packed densely with `packing.pack` (C order of the PyTorch weight),
  and a float32 range per output channel. The weight is `lo + step * code`. Symmetric grids
  store only `lo` (`range: "symmetric"`: step = max(-2 lo / n, MIN_STEP)), LSQ grids only `step`
  (`range: "neg_k_step"`: lo = -k step); the writer checks that the derivation reproduces the
  stored range bitwise and otherwise keeps both (`"affine"`). Ranges stay float32 so the codes
  dequantize to exactly the fake-quantized weights; at 1 value per channel they cost 32 / fan_in
  bits per weight.
- the floating-point rest (biases, norms, embeddings, unquantized layers) at 16 bits by default
  (`float_dtype="auto"`): float16 for a tensor whose nonzero magnitudes all lie in float16's
  normal range [2^-14, 65504] (3 more mantissa bits than bfloat16: 8x smaller rounding error),
  else bfloat16 (float32's range: nothing overflows or flushes to zero, e.g. tiny layer-scale
  gammas). Either way 16 bits, the width of the BF16 baseline the size claim is measured
  against. `float_dtype="float32"` stores the rest losslessly.
- quantizer state that the forward still needs (activation quantizers' clip factors and
  statistics), float32 / int32, keyed by NNX path.

The manifest also holds the config, image size, `config_overrides` (reduced architectures),
the `QuantRecipe` (which rebuilds the module structure), the rules and the bits of every
layer, the provenance, and a CRC-32 of the data so a corrupt file is refused. Files are
written to a temporary name and renamed into place.

`load` (and so `checkpoint.load_sam2` and `ImagePredictor.from_checkpoint`) builds the recipe's
layers without weight quantizers, fills the kernels with the dequantized weights and restores
the activation quantizers, in evaluation mode: the forward of the fake-quantized model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.errors import UserError
from qsam2_jax.files import write_bytes
from qsam2_jax.model import layers as model_layers
from qsam2_jax.model.overrides import apply_overrides
from qsam2_jax.quant import core as fq
from qsam2_jax.quant import encode
from qsam2_jax.quant.packing import pack, packed_size, unpack
from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES, set_mode
from qsam2_jax.quant.rules import module_path

MAGIC = b"QSAM2PK1"
FORMAT = "qsam2-packed"
VERSION = 1
FLOAT_DTYPES = ("auto", "bfloat16", "float16", "float32")
_HEADER = struct.Struct("<8sQ")
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MAX = 65504.0
_NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float32": np.dtype(np.float32), "int32": np.dtype(np.int32),
              "uint8": np.dtype(np.uint8)}


class PackedFileError(UserError):
  """A packed file that cannot be read: names the file and what is wrong."""


# ---------------------------------------------------------------------------- float storage


def float_storage_dtype(x: np.ndarray, mode: str = "auto") -> str:
  """The storage dtype of a float tensor under `mode` (see the module docstring)."""
  if mode not in FLOAT_DTYPES:
    raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {mode!r}")
  if mode != "auto":
    return mode
  a = np.abs(np.asarray(x, np.float32))
  nz = a[a > 0]
  if nz.size == 0 or (nz.min() >= _FP16_MIN_NORMAL and nz.max() <= _FP16_MAX):
    return "float16"
  return "bfloat16"


def round_float(x: np.ndarray, mode: str = "auto") -> np.ndarray:
  """`x` as the packed file stores it, back in float32 (what a loaded model computes with)."""
  return np.asarray(x, np.float32).astype(_NP_DTYPES[float_storage_dtype(x, mode)]).astype(
      np.float32)


# ---------------------------------------------------------------------------- building


# `core.step_size` of the symmetric range [lo, -lo]: (hi - lo) / n, as XLA may compile it.
# XLA rewrites a division by a constant into a multiplication by its float32 reciprocal
# (seen on CPU); the writer records which rule reproduces the stored steps.
_STEP_RULES = {
    "div": lambda width, n: width / np.float32(n),
    "mul_recip": lambda width, n: width * (np.float32(1.0) / np.float32(n)),
}


def _symmetric_step(lo: np.ndarray, n: int, rule: str) -> np.ndarray:
  lo = np.asarray(lo, np.float32)
  return np.maximum(_STEP_RULES[rule](-lo - lo, n), np.float32(fq.MIN_STEP))


def _range_form(w: encode.EncodedWeight) -> Tuple[str, Dict[str, Any]]:
  """The smallest exact storage of a weight's (lo, step): see the module docstring."""
  for rule in _STEP_RULES:
    if np.array_equal(_symmetric_step(w.lo, w.n, rule), w.step):
      return "symmetric", {"step_rule": rule}
  k = -w.lo[0] / w.step[0] if w.step[0] > 0 else 0.0
  if k > 0 and float(k).is_integer() and np.array_equal(-np.float32(k) * w.step, w.lo):
    return "neg_k_step", {"k": int(k)}
  return "affine", {}


def _layer_bits(model: nnx.Module) -> Dict[str, Dict[str, Any]]:
  """Module path -> bits and methods of every quantizable layer's kernel and input."""
  out = {}
  for path, layer in nnx.iter_graph(model):
    if not isinstance(layer, QUANT_LAYER_TYPES):
      continue
    ws, acts = layer.weight_spec, layer.act_spec
    out[module_path(path)] = {
        "class": type(layer).__name__,
        "weight_bits": ws.bits if ws is not None else 16,
        "act_bits": acts.bits if acts is not None else 16,
        "weight_method": ws.method if ws is not None else None,
        "act_method": acts.method if acts is not None else None}
  return out


def _rules(recipe: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
  if not recipe:
    return []
  from qsam2_jax.quant.recipe import QuantRecipe
  return [{"pattern": r.pattern,
           "weight": dataclasses.asdict(r.weight) if r.weight is not None else None,
           "act": dataclasses.asdict(r.act) if r.act is not None else None}
          for r in QuantRecipe.from_dict(recipe).rules()]


def quantizer_state(model: nnx.Module) -> Dict[str, np.ndarray]:
  """NNX path -> value of every non-SAM2 variable the forward of `packed_model` reads.

  Weight quantizers are left out: a packed model stores their output, not their state.
  """
  out = {}
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable) or type(var) in (nnx.Param, model_layers.Buffer):
      continue
    if "weight_quantizer" in path:
      continue
    out[module_path(path)] = np.asarray(var.get_value())
  return out


@dataclasses.dataclass
class PackedModel:
  """A packed file in memory: the manifest and the data section."""
  manifest: Dict[str, Any]
  data: bytes

  def header(self) -> bytes:
    text = json.dumps(self.manifest, separators=(",", ":")).encode()
    text = zlib.compress(text, 9)
    return _HEADER.pack(MAGIC, len(text)) + text

  @property
  def file_size(self) -> int:
    return len(self.header()) + len(self.data)


class _Data:
  """Appends byte blobs and returns their [offset, nbytes]."""

  def __init__(self):
    self.parts: List[bytes] = []
    self.size = 0

  def add(self, arr: np.ndarray) -> List[int]:
    b = np.ascontiguousarray(arr).tobytes()
    ref = [self.size, len(b)]
    self.parts.append(b)
    self.size += len(b)
    return ref


def build(model: nnx.Module, meta: Dict[str, Any], *, float_dtype: str = "auto") -> PackedModel:
  """Packs `model` (float or fake-quantized, in any mode; encoded in evaluation mode).

  Args:
    model: a `SAM2Base`, possibly with quantized layers.
    meta: must hold `config` and `image_size`; `quant` (the `QuantRecipe` dict) for a quantized
      model; the rest (kind, source, step, ...) is kept as provenance.
    float_dtype: storage of the floating-point rest (`FLOAT_DTYPES`).
  """
  if float_dtype not in FLOAT_DTYPES:
    raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
  for k in ("config", "image_size"):
    if k not in meta:
      raise ValueError(f"meta needs {k!r}")
  encoded = encode.encode_weights(model)
  sd = keymap.state_dict(model)
  data = _Data()
  tensors: Dict[str, Dict[str, Any]] = {}
  for key, value in sd.items():
    w = encoded.get(key)
    if w is None:
      dt = float_storage_dtype(value, float_dtype)
      tensors[key] = {"kind": "float", "dtype": dt, "shape": list(value.shape),
                      "data": data.add(np.asarray(value, np.float32).astype(_NP_DTYPES[dt]))}
      continue
    if w.codes.shape != value.shape:
      raise AssertionError(f"{key}: codes {w.codes.shape} but weight {value.shape}")
    form, extra = _range_form(w)
    entry = {"kind": "quantized", "shape": list(value.shape), "bits": w.bits, "n": w.n,
             "channel_axis": w.channel_axis, "range": form, **extra,
             "codes": data.add(pack(w.codes, w.bits))}
    entry["lo"] = data.add(w.lo) if form in ("symmetric", "affine") else None
    entry["step"] = data.add(w.step) if form in ("neg_k_step", "affine") else None
    tensors[key] = entry
  state = {}
  for path, value in quantizer_state(model).items():
    dt = "int32" if np.issubdtype(value.dtype, np.integer) else "float32"
    state[path] = {"dtype": dt, "shape": list(value.shape),
                   "data": data.add(value.astype(_NP_DTYPES[dt]))}
  blob = b"".join(data.parts)
  recipe = meta.get("quant") or None
  manifest = {
      "format": FORMAT, "version": VERSION,
      "config": meta["config"], "image_size": int(meta["image_size"]),
      "config_overrides": meta.get("config_overrides") or None,
      "quant": recipe, "rules": _rules(recipe), "layers": _layer_bits(model),
      "float_dtype": float_dtype,
      "source": {k: v for k, v in meta.items() if k not in ("config", "image_size", "quant",
                                                             "format", "config_overrides")},
      "tensors": tensors, "quantizer_state": state,
      "data_size": len(blob), "crc32": zlib.crc32(blob)}
  return PackedModel(manifest, blob)


def write(path: str | os.PathLike, packed: PackedModel) -> str:
  """Writes a packed file atomically (temporary name in the same folder, then rename)."""
  return write_bytes(path, packed.header(), packed.data, sync=True)


def save(path: str | os.PathLike, model: nnx.Module, meta: Dict[str, Any], *,
         float_dtype: str = "auto") -> PackedModel:
  """`build` + `write`; returns the packed model (its manifest has every tensor's size)."""
  packed = build(model, meta, float_dtype=float_dtype)
  write(path, packed)
  return packed


# ---------------------------------------------------------------------------- reading


def is_packed_file(path: str | os.PathLike) -> bool:
  """True when `path` is a file starting with the packed magic."""
  try:
    with open(path, "rb") as f:
      return f.read(len(MAGIC)) == MAGIC
  except (IsADirectoryError, FileNotFoundError, PermissionError):
    return False


def _read_header(f, path: str) -> Dict[str, Any]:
  head = f.read(_HEADER.size)
  if len(head) < _HEADER.size or head[:len(MAGIC)] != MAGIC:
    raise PackedFileError(f"{path}: not a qsam2 packed model file (bad magic)")
  _, length = _HEADER.unpack(head)
  text = f.read(length)
  if len(text) != length:
    raise PackedFileError(f"{path}: truncated manifest ({len(text)} of {length} bytes)")
  try:
    manifest = json.loads(zlib.decompress(text))
  except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PackedFileError(f"{path}: corrupt manifest ({e})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise PackedFileError(f"{path}: manifest is not a {FORMAT} manifest")
  if manifest.get("version") != VERSION:
    raise PackedFileError(f"{path}: packed format version {manifest.get('version')} is not "
                          f"supported (this reader: {VERSION})")
  return manifest


def read_manifest(path: str | os.PathLike) -> Dict[str, Any]:
  """The manifest only (no data read), plus `file_size` and `header_size` in bytes."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PackedFileError(f"packed model file not found: {path}")
  with open(path, "rb") as f:
    manifest = _read_header(f, path)
    header = f.tell()
  return {**manifest, "file_size": os.path.getsize(path), "header_size": header}


def read(path: str | os.PathLike) -> Tuple[Dict[str, Any], bytes]:
  """(manifest, data) of a packed file, checked against its size and CRC-32."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PackedFileError(f"packed model file not found: {path}")
  with open(path, "rb") as f:
    manifest = _read_header(f, path)
    data = f.read()
  if len(data) != manifest.get("data_size"):
    raise PackedFileError(f"{path}: data section has {len(data)} bytes, the manifest says "
                          f"{manifest.get('data_size')} (truncated or corrupt file)")
  if zlib.crc32(data) != manifest.get("crc32"):
    raise PackedFileError(f"{path}: CRC-32 mismatch: the file is corrupt")
  return manifest, data


def _array(data: bytes, ref: List[int], dtype: str, shape, path: str, key: str) -> np.ndarray:
  off, nbytes = ref
  dt = _NP_DTYPES[dtype]
  count = int(np.prod(shape, dtype=np.int64)) if shape is not None else nbytes // dt.itemsize
  if off < 0 or off + nbytes > len(data) or nbytes != count * dt.itemsize:
    raise PackedFileError(f"{path}: tensor {key} has an inconsistent data reference")
  arr = np.frombuffer(data, dt, count, off)
  return arr.reshape(shape) if shape is not None else arr


def tensors_from(manifest: Dict[str, Any], data: bytes, path: str = "packed file"
                 ) -> Dict[str, np.ndarray]:
  """The float32 PyTorch-layout state dict a packed file holds (weights dequantized)."""
  out = {}
  for key, e in manifest["tensors"].items():
    shape = tuple(e["shape"])
    if e["kind"] == "float":
      out[key] = _array(data, e["data"], e["dtype"], shape, path, key).astype(np.float32)
      continue
    size = int(np.prod(shape, dtype=np.int64))
    codes_ref = e["codes"]
    if codes_ref[1] != packed_size(size, e["bits"]):
      raise PackedFileError(f"{path}: tensor {key} has {codes_ref[1]} bytes of codes, expected "
                            f"{packed_size(size, e['bits'])}")
    packed_codes = _array(data, codes_ref, "uint8", None, path, key)
    codes = unpack(packed_codes, e["bits"], size).reshape(shape)
    lo = _array(data, e["lo"], "float32", None, path, key) if e.get("lo") else None
    step = _array(data, e["step"], "float32", None, path, key) if e.get("step") else None
    if e["range"] == "symmetric":
      if e.get("step_rule") not in _STEP_RULES:
        raise PackedFileError(f"{path}: tensor {key} has unknown step rule "
                              f"{e.get('step_rule')!r}")
      step = _symmetric_step(lo, e["n"], e["step_rule"])
    elif e["range"] == "neg_k_step":
      lo = -np.float32(e["k"]) * step
    elif e["range"] != "affine":
      raise PackedFileError(f"{path}: tensor {key} has unknown range form {e['range']!r}")
    out[key] = encode.dequantize(codes, lo, step, e["channel_axis"])
  return out


def packed_model(cfg, recipe: Optional[Dict[str, Any]], *, dtype=None) -> nnx.Module:
  """The abstract module tree a packed file loads into.

  The recipe's rules without their weight side: kernels hold their dequantized values, so only
  activation quantizers remain (a weight-only model loads as a plain float `SAM2Base`). Skipping
  the weight quantizers also skips their initialisation, the slow part of building a quantized
  model.
  """
  from qsam2_jax.model.sam2 import abstract_sam2
  if not recipe:
    return abstract_sam2(cfg, dtype=dtype)
  from qsam2_jax.quant.recipe import QuantRecipe
  from qsam2_jax.quant.rules import quantize_model
  rules = [dataclasses.replace(r, weight=None, act=None if r.act is None or r.act.passthrough
                               else r.act) for r in QuantRecipe.from_dict(recipe).rules()]
  return abstract_sam2(cfg, dtype=dtype, transform=lambda m: quantize_model(m, rules)[0])


def load(path: str | os.PathLike, *, config: Optional[str] = None, dtype=None,
         image_size: Optional[int] = None):
  """(model, cfg) from a packed file, quantizers in evaluation mode."""
  from qsam2_jax.model import configs
  path = os.fspath(path)
  manifest, data = read(path)
  cfg = configs.get_config(config or manifest["config"],
                           image_size=image_size or manifest["image_size"])
  if cfg.name == configs.get_config(manifest["config"]).name:
    try:
      cfg = apply_overrides(cfg, manifest.get("config_overrides"))
    except ValueError as e:
      raise PackedFileError(f"{path}: {e}") from e
  model = packed_model(cfg, manifest.get("quant"), dtype=dtype)
  keymap.load_state_dict(model, tensors_from(manifest, data, path), source=path)
  restore_quantizer_state(model, manifest, data, path)
  return model, cfg


def restore_quantizer_state(model: nnx.Module, manifest: Dict[str, Any], data: bytes,
                            path: str, skip: Tuple[type, ...] = ()) -> None:
  """Sets the activation quantizers' state from the file; evaluation mode for quantized files.

  `skip`: further Variable types that hold SAM2 tensors (`packed_model.PackedKernel`).
  """
  want = {module_path(p): v for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and type(v) not in (nnx.Param, model_layers.Buffer)
          and not isinstance(v, skip)}
  have = manifest.get("quantizer_state", {})
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise PackedFileError(f"{path}: quantizer state does not match the recipe "
                          f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
  for key, var in want.items():
    e = have[key]
    shape = tuple(var.get_value().shape)
    if tuple(e["shape"]) != shape:
      raise PackedFileError(f"{path}: quantizer state {key} has shape {tuple(e['shape'])}, "
                            f"the model expects {shape}")
    arr = _array(data, e["data"], e["dtype"], shape, path, key)
    var.set_value(jnp.asarray(arr, var.get_value().dtype))
  if manifest.get("quant"):
    set_mode(model, "eval")

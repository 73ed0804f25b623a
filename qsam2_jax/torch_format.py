"""Reads PyTorch `.pt` checkpoints (the zip format of `torch.save`) into numpy, without torch.

The library must load official SAM2 checkpoints on machines without PyTorch (TPU hosts). The
unpickler is restricted like `torch.load(weights_only=True)`: it only rebuilds tensors, storages
and plain containers, so a checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import errno
import os
import pickle
import zipfile
from typing import Any, Dict

import numpy as np

from qsam2_jax.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class NotACheckpointError(UserError):
  """The file is not a PyTorch checkpoint in the zip format."""


def _np_dtype(name: str):
  dt = _STORAGE_DTYPES[name]
  if dt == "bfloat16":
    import ml_dtypes  # a JAX dependency
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dt)


class _StorageType:
  def __init__(self, name: str):
    self.dtype = _np_dtype(name)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self._zf, self._prefix, self._source = zf, prefix, source
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)  # only referenced from persistent ids, never called
    if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
      return {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict}[name]
    raise pickle.UnpicklingError(
        f"{self._source}: refusing to load '{module}.{name}': only tensors and plain containers "
        "are allowed (like torch.load(weights_only=True))")

  def persistent_load(self, pid):
    kind, storage_type, key = pid[0], pid[1], pid[2]
    if kind != "storage":
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {kind!r}")
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: unsupported storage type {storage_type!r}")
    if key not in self._storages:
      raw = self._zf.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
    return self._storages[key]


_ZIP_MAGIC = b"PK\x03\x04"


def _not_a_checkpoint(path: str, head: bytes) -> str:
  """Why a file that is not a zip is not a checkpoint, in words."""
  if not head:
    return f"{path} is empty, not a PyTorch checkpoint"
  if head[:1] == b"\x80":
    return (f"{path} is in the legacy (pre-1.6) torch.save format; re-save it with a recent "
            "torch (torch.save writes zip files since 1.6)")
  try:
    head.decode("utf-8")
    kind = "a text file"
  except UnicodeDecodeError:
    kind = "neither a zip nor a text file"
  return f"{path} is {kind}, not a PyTorch checkpoint (expected the zip format of torch.save)"


def open_pt(path: str | os.PathLike, flag: str = "") -> zipfile.ZipFile:
  """Opens a `torch.save` zip, or says in words why `path` is not one (missing, a folder, a
  text file, the legacy format, truncated). Reads only the zip's directory."""
  path = os.fspath(path)
  name = f"{flag} {path}" if flag else path
  if os.path.isdir(path):
    raise NotACheckpointError(f"{name}: is a folder, expected a PyTorch .pt file")
  if not os.path.isfile(path):
    raise FileNotFoundError(errno.ENOENT, "checkpoint not found", name)
  with open(path, "rb") as f:
    head = f.read(64)
  if head[:4] != _ZIP_MAGIC:
    raise NotACheckpointError(_not_a_checkpoint(name, head))
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise NotACheckpointError(
        f"{name} is truncated or damaged: it starts like a torch.save zip but its end is "
        f"missing ({os.path.getsize(path):,} bytes); copy or download it again") from e
  if not any(n.endswith("data.pkl") for n in zf.namelist()):
    zf.close()
    raise NotACheckpointError(f"{name} is a zip file but holds no data.pkl: not a torch "
                              "checkpoint")
  return zf


def read_pt(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file into the same structure with numpy arrays for tensors."""
  path = os.fspath(path)
  zf = open_pt(path)
  with zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in zf.namelist() \
        else "little"
    if byteorder != "little":
      raise NotACheckpointError(f"{path}: big-endian checkpoints are not supported")
    with zf.open(pkl[0]) as f:
      try:
        return _Unpickler(f, zf, prefix, path).load()
      except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise NotACheckpointError(f"{path}: cannot read the checkpoint (damaged or truncated? "
                                  f"{type(e).__name__}: {e})") from e

"""The one mapping between PyTorch `sam2` state-dict keys and our NNX parameters.

The NNX module tree mirrors PyTorch's attribute names, so a key is the NNX path joined by dots
with the leaf renamed (`kernel`/`scale`/`embedding` -> `weight`). Layouts change by the type of
the module that owns the leaf (Linear transposed, Conv OIHW <-> HWIO, NCHW position tables ->
NHWC). It lives in the library, not in `convert/`, because `ImagePredictor.from_checkpoint`
accepts official `.pt` files directly; `convert/` owns the torch I/O and the command lines.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.errors import UserError
from qsam2_jax.model import layers

_LEAF_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Top-level position tables stored NCHW in PyTorch and NHWC here.
_NHWC_TABLES = ("pos_embed", "pos_embed_window")


class CheckpointMismatchError(UserError):
  """The checkpoint does not match the model: lists every missing, extra and mis-shaped key."""


def _owner_types(model: nnx.Module) -> Dict[Tuple, type]:
  return {tuple(path): type(node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def _transform(owner: type, leaf: str, rank: int) -> Tuple[Callable, Callable]:
  """(to_torch, to_flax) array transforms for one leaf."""
  ident = (lambda a: a, lambda a: a)
  if leaf in _NHWC_TABLES:
    return (lambda a: a.transpose(0, 3, 1, 2), lambda a: a.transpose(0, 2, 3, 1))
  if leaf != "kernel" or issubclass(owner, layers.ConvTranspose2x2):
    return ident
  if rank == 2:
    return (lambda a: a.T, lambda a: a.T)
  if rank == 4:
    return (lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
  return ident


def _model_leaves(model: nnx.Module) -> Iterator[Tuple[str, Tuple, Any, Tuple[Callable, Callable]]]:
  """Yields (torch_key, nnx_path, variable, transforms) for every checkpointed tensor."""
  owners = _owner_types(model)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, (nnx.Param, layers.Buffer)):
      continue
    if type(var) not in (nnx.Param, layers.Buffer):
      continue  # subclasses (e.g. learnable clip factors) are not SAM2 tensors
    path = tuple(path)
    owner = owners.get(path[:-1], nnx.Module)
    leaf = path[-1]
    name = ".".join(str(p) for p in path[:-1] + (_LEAF_RENAME.get(leaf, leaf),))
    yield name, path, var, _transform(owner, leaf, len(var.shape))


def torch_keys(model: nnx.Module) -> Dict[str, Tuple[int, ...]]:
  """The state-dict keys (and PyTorch shapes) this model reads and writes."""
  out = {}
  for name, _, var, (to_torch, _) in _model_leaves(model):
    out[name] = tuple(to_torch(np.empty(var.shape, np.uint8)).shape)
  return out


def check_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], source: str = "checkpoint",
                     prefix: str = "") -> None:
  """Raises one `CheckpointMismatchError` naming every missing, unexpected or mis-shaped key."""
  want = {prefix + k: v for k, v in torch_keys(model).items()}
  have = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k.startswith(prefix)}
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if not (missing or extra or shaped):
    return
  lines = [f"{source} does not match the model ({len(want)} tensors expected):"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
  if extra:
    lines.append(f"  unexpected keys ({len(extra)}): " + ", ".join(extra))
  for k in shaped:
    lines.append(f"  wrong shape: {k}: checkpoint {have[k]}, model expects {want[k]}")
  raise CheckpointMismatchError("\n".join(lines))


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], source: str = "checkpoint",
                    prefix: str = "") -> None:
  """Copies a PyTorch-layout state dict (numpy arrays) into `model` in place (strict)."""
  check_state_dict(model, state_dict, source, prefix)
  for name, _, var, (_, to_flax) in _model_leaves(model):
    arr = np.asarray(state_dict[prefix + name])
    var.set_value(jnp.asarray(np.ascontiguousarray(to_flax(arr)), dtype=var.get_value().dtype))


def state_dict(model: nnx.Module, prefix: str = "") -> Dict[str, np.ndarray]:
  """The model's tensors as a PyTorch-layout state dict of numpy arrays (contiguous copies)."""
  out = {}
  for name, _, var, (to_torch, _) in _model_leaves(model):
    out[prefix + name] = np.ascontiguousarray(to_torch(np.asarray(var.get_value())))
  return out

"""Checkpoint I/O in one place: official `.pt` files in, Orbax directories in and out.

An Orbax model checkpoint here is a `CheckpointManager` directory: `<dir>/<step>/model` (the
NNX state) and `<dir>/<step>/meta` (JSON: config name, image size, what produced it). A converted
official checkpoint is step 0; training runs add steps.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qsam2_jax import keymap
from qsam2_jax.errors import UserError
from qsam2_jax.files import atomic_path
from qsam2_jax.model import configs
from qsam2_jax.model.overrides import apply_overrides, config_overrides
from qsam2_jax.model.sam2 import SAM2Base, abstract_sam2
from qsam2_jax.torch_format import NotACheckpointError, open_pt, read_pt

FORMAT = "qsam2-jax"
_PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
# (embed_dim, blocks) -> size, from the configs themselves.
_SIZES = {(c.hiera.embed_dim, c.hiera.depth): c.size for c in configs.CONFIGS.values()}


class CheckpointError(UserError):
  """A checkpoint that cannot be used, with the path and the reason."""


# ---------------------------------------------------------------------------- official .pt files


def read_torch_state_dict(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """The `"model"` state dict of an official (or training) `.pt` file, as numpy arrays."""
  return official_state_dict(read_pt(path), path, lambda v: isinstance(v, np.ndarray))


def official_state_dict(obj: Any, path: str | os.PathLike,
                        is_tensor: Callable[[Any], bool]) -> Dict[str, Any]:
  """The state dict inside a loaded `.pt` object: `obj["model"]` (or `obj` itself), every
  value a tensor, DDP's `module.` prefix removed; a clear error for anything else."""
  sd = obj.get("model", obj) if isinstance(obj, dict) else None
  if not isinstance(sd, dict) or not all(is_tensor(v) for v in sd.values()):
    raise NotACheckpointError(
        f"{path}: expected a dict with a 'model' state dict of tensors (the official SAM2 format)")
  return {k.removeprefix("module."): v for k, v in sd.items()}


def detect_config(state_dict: Mapping[str, Any], source: str = "checkpoint",
                  image_size: Optional[int] = None) -> configs.SAM2Config:
  """SAM2.0/2.1 and t/s/b+/l from the keys and shapes of a PyTorch-layout state dict."""
  if _PATCH_KEY not in state_dict:
    raise CheckpointError(
        f"{source}: cannot detect the SAM2 config: key '{_PATCH_KEY}' is missing "
        "(is this a SAM2 checkpoint?); pass the config explicitly")
  embed_dim = int(np.shape(state_dict[_PATCH_KEY])[0])
  blocks = {int(m.group(1)) for k in state_dict
            if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
  size = _SIZES.get((embed_dim, len(blocks)))
  if size is None:
    raise CheckpointError(
        f"{source}: no SAM2 config has embed_dim {embed_dim} with {len(blocks)} blocks "
        f"(known: {sorted(_SIZES)}); pass the config explicitly")
  version = "2.1" if "no_obj_embed_spatial" in state_dict else "2.0"
  name = f"sam2.1_hiera_{size}" if version == "2.1" else f"sam2_hiera_{size}"
  return configs.get_config(name, image_size=image_size)


def abstract_model(cfg: configs.SAM2Config, *, quant: Optional[Dict[str, Any]] = None,
                   dtype=None) -> SAM2Base:
  """The (possibly quantized) model with shapes only: the target of a restore.

  `quant` is a `QuantRecipe` dict as stored in checkpoint metadata; the quantized layers are
  traced abstractly too, so nothing is computed.
  """
  if not quant:
    return abstract_sam2(cfg, dtype=dtype)
  from qsam2_jax.quant.recipe import QuantRecipe
  recipe = QuantRecipe.from_dict(quant)
  return abstract_sam2(cfg, dtype=dtype, transform=lambda m: recipe.apply(m)[0])


def model_from_state_dict(state_dict: Mapping[str, Any], cfg: configs.SAM2Config, *,
                          dtype=None, source: str = "checkpoint") -> SAM2Base:
  """Builds the model with the given PyTorch-layout weights (strict: every key, every shape)."""
  model = abstract_sam2(cfg, dtype=dtype)
  keymap.load_state_dict(model, state_dict, source=source)
  return model


# ---------------------------------------------------------------------------- Orbax directories


def _manager(directory: str, create: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(create=create, max_to_keep=None)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts)


def save_model(directory: str | os.PathLike, model: nnx.Module, meta: Dict[str, Any], *,
               step: int = 0, overwrite: bool = False) -> str:
  """Writes `model` (its whole NNX state) and `meta` as an Orbax checkpoint, atomically.

  Everything is written under a temporary name next to `directory`, then renamed into place,
  so an interrupted call leaves no half-written checkpoint behind.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise CheckpointError(f"{directory} already exists (pass overwrite=True / --overwrite)")
  meta = {"format": FORMAT, **meta}
  with atomic_path(directory, keep_ext=False) as tmp, _manager(tmp, create=True) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
  return directory


def _resolve_step(directory: str, step: Optional[int]) -> Tuple[ocp.CheckpointManager, int]:
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory not found: {directory}")
  mngr = _manager(directory)
  steps = mngr.all_steps()
  if not steps:
    mngr.close()
    raise CheckpointError(f"{directory} holds no Orbax checkpoint steps (not a checkpoint, or "
                          "an interrupted save)")
  if step is None:
    step = max(steps)
  elif step not in steps:
    mngr.close()
    raise CheckpointError(f"{directory} has no step {step}; available: {sorted(steps)}")
  return mngr, step


def _read_meta_of(mngr: ocp.CheckpointManager, directory: str, step: int) -> Dict[str, Any]:
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - Orbax raises many types for a broken directory
    raise CheckpointError(f"{directory} step {step}: cannot read its metadata: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{directory}: not a {FORMAT} checkpoint (metadata: {meta!r})")
  return {**meta, "step": step}


def _restore_model_of(mngr: ocp.CheckpointManager, directory: str, step: int, target: nnx.Module,
                      sharding: Optional[Callable[[jax.ShapeDtypeStruct], Any]]) -> nnx.Module:
  graphdef, abstract = nnx.split(target)
  device = jax.local_devices()[0]
  shard = sharding or (lambda leaf: jax.sharding.SingleDeviceSharding(device))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(x)), abstract)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract)))["model"]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{directory} step {step}: cannot restore the model state: {e}") from e
  return nnx.merge(graphdef, restored)


def read_meta(directory: str | os.PathLike, step: Optional[int] = None) -> Dict[str, Any]:
  """The JSON metadata of a checkpoint step (the latest when `step` is None), plus `step`."""
  directory = os.fspath(directory)
  mngr, step = _resolve_step(directory, step)
  with mngr:
    return _read_meta_of(mngr, directory, step)


def restore_state(directory: str | os.PathLike, target: nnx.Module, *, step: Optional[int] = None,
                  sharding: Optional[Callable[[jax.ShapeDtypeStruct], Any]] = None) -> nnx.Module:
  """Restores a step's model state into the abstract `target` (shapes from `nnx.eval_shape`).

  `sharding` maps each abstract leaf to its sharding on the current mesh (default: the first
  local device), so checkpoints restore onto any topology.
  """
  directory = os.fspath(directory)
  mngr, step = _resolve_step(directory, step)
  with mngr:
    return _restore_model_of(mngr, directory, step, target, sharding)


# ---------------------------------------------------------------------------- metadata


def sam_config(meta: Mapping[str, Any], *, config: Optional[str] = None,
               image_size: Optional[int] = None) -> configs.SAM2Config:
  """The SAM2 config that checkpoint metadata describes, its `config_overrides` applied.

  `config` / `image_size` replace the stored name / size; the overrides describe changes to
  the stored config, so they apply only when `config` names the same one.
  """
  cfg = configs.get_config(config or meta["config"],
                           image_size=image_size or meta.get("image_size"))
  if cfg.name != configs.get_config(meta["config"]).name:
    return cfg
  try:
    return apply_overrides(cfg, meta.get("config_overrides"))
  except ValueError as e:
    raise CheckpointError(f"{meta.get('source', 'checkpoint')}: {e}") from e


def model_meta(cfg: configs.SAM2Config, kind: str, source: Optional[str] = None, *,
               quant: Any = None, **extra: Any) -> Dict[str, Any]:
  """The metadata a model checkpoint of this project stores (one builder for every writer).

  Args:
    cfg: the model's config; its name, image size and `config_overrides` are recorded.
    kind: what produced it ("fp", "calibrated", "ptq", "qat", ...).
    source: where its weights came from (a path).
    quant: the `QuantRecipe` (or its dict) of a quantized model.
    extra: anything else worth keeping (run settings, summaries).
  """
  meta: Dict[str, Any] = {"config": cfg.name, "image_size": int(cfg.image_size), "kind": kind}
  if source is not None:
    meta["source"] = os.fspath(source)
  over = config_overrides(cfg)  # reduced / modified architectures restore too
  if over:
    meta["config_overrides"] = over
  if quant is not None:
    meta["quant"] = quant if isinstance(quant, dict) else quant.to_dict()
  meta.update(extra)
  return meta


def describe(path: str | os.PathLike, step: Optional[int] = None) -> Dict[str, Any]:
  """What a checkpoint is, without loading its weights.

  An Orbax directory gives its stored metadata (config, image size, recipe, kind, step, ...);
  a packed file its manifest's; an official `.pt` file only {"kind": "fp"}. `source` is the
  absolute path of `path` (an Orbax checkpoint's own provenance stays under `origin`).
  """
  from qsam2_jax.quant import packed_file
  path = os.fspath(path)
  if os.path.isdir(path):
    meta = {k: v for k, v in read_meta(path, step).items() if k != "format"}
  elif not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  elif packed_file.is_packed_file(path):
    m = packed_file.read_manifest(path)
    meta = {**m.get("source", {}), "config": m["config"], "image_size": m["image_size"],
            "quant": m.get("quant"), "kind": "packed"}
    if m.get("config_overrides"):
      meta["config_overrides"] = m["config_overrides"]
  else:
    meta = {"kind": "fp"}
  if "source" in meta and os.path.isdir(path):
    meta["origin"] = meta["source"]
  meta["source"] = os.path.abspath(path)
  return meta


def check(path: str | os.PathLike, flag: Optional[str] = None, *, step: Optional[int] = None,
          float_only: Optional[str] = None) -> Dict[str, Any]:
  """What `load_sam2(path)` would load (`describe`), checked without loading any weight.

  A missing path, a folder that is no checkpoint, a file that is neither a packed file nor a
  `torch.save` zip (a text file, a truncated file), a missing step, or a quantized checkpoint
  where `float_only` asks for a float one: a `CheckpointError` / `NotACheckpointError` naming
  `flag` and the path.
  """
  from qsam2_jax.quant import packed_file
  p = os.fspath(path)
  name = f"{flag} {p}" if flag else p
  if not os.path.exists(p):
    raise CheckpointError(f"{name}: checkpoint not found")
  if os.path.isdir(p):
    if not any(n.isdigit() for n in os.listdir(p)):
      raise CheckpointError(f"{name}: a folder but not a checkpoint of this project (no Orbax "
                            "checkpoint steps <step>/ in it; convert an official .pt with "
                            "convert.from_torch)")
    meta = describe(p, step)
  elif packed_file.is_packed_file(p):
    meta = describe(p)
  else:
    open_pt(p, flag or "").close()
    meta = {"kind": "fp", "source": os.path.abspath(p)}
  _check_float(meta, name, float_only)
  return meta


# ---------------------------------------------------------------------------- one entry point


def load_with_meta(path: str | os.PathLike, *, config: Optional[str] = None, dtype=None,
                   image_size: Optional[int] = None, step: Optional[int] = None,
                   float_only: Optional[str] = None,
                   sharding: Optional[Callable[[jax.ShapeDtypeStruct], Any]] = None
                   ) -> Tuple[SAM2Base, Dict[str, Any]]:
  """`load_sam2`, returning the checkpoint's metadata (`describe`) in place of the config.

  The metadata's `config` and `image_size` are those of the loaded model.
  """
  model, cfg, meta = _load(path, config=config, dtype=dtype, image_size=image_size, step=step,
                           float_only=float_only, sharding=sharding)
  return model, meta


def load_sam2(path: str | os.PathLike, *, config: Optional[str] = None, dtype=None,
              image_size: Optional[int] = None, step: Optional[int] = None,
              float_only: Optional[str] = None,
              sharding: Optional[Callable[[jax.ShapeDtypeStruct], Any]] = None,
              keep_packed: bool = False) -> Tuple[SAM2Base, configs.SAM2Config]:
  """Loads an official `.pt` file, a packed low-bit file or an Orbax directory of this project.

  The one loader: every command and the predictors load through it.

  Args:
    path: `.pt` file, packed file (`qsam2_jax.quant.packed_file`) or checkpoint directory.
    config: config name; detected from the checkpoint when None. Orbax metadata's
      `config_overrides` (reduced architectures) are applied.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    image_size: model input size (default: the checkpoint's, 1024 for official files).
    step: Orbax step (default: latest).
    float_only: refuse a quantized checkpoint (packed or Orbax); the text names what needs a
      float one, e.g. "train.qat --init" -> "... train.qat --init needs a float checkpoint".
    sharding: leaf -> sharding of an Orbax restore (default: the first local device).
    keep_packed: `path` must be a packed file, whose kernels then stay packed in memory
      (codes dequantized inside the jitted forward, `qsam2_jax.quant.packed_model`).
  """
  if keep_packed:
    from qsam2_jax.quant import packed_file
    from qsam2_jax.quant.packed_model import load_packed
    if not packed_file.is_packed_file(path):
      raise UserError(f"keep_packed=True needs a packed low-bit file (convert.to_torch "
                      f"--packed), got {os.fspath(path)}")
    return load_packed(path, config=config, dtype=dtype, image_size=image_size)
  model, cfg, _ = _load(path, config=config, dtype=dtype, image_size=image_size, step=step,
                        float_only=float_only, sharding=sharding)
  return model, cfg


def _load(path, *, config, dtype, image_size, step, float_only, sharding):
  from qsam2_jax.quant import packed_file  # late, like the recipe: float paths skip quant
  path = os.fspath(path)
  if os.path.isdir(path):
    mngr, step = _resolve_step(path, step)
    with mngr:  # one manager: the metadata and the state of the same step
      meta = {k: v for k, v in _read_meta_of(mngr, path, step).items() if k != "format"}
      _check_float(meta, path, float_only)
      cfg = sam_config(meta, config=config, image_size=image_size)
      target = abstract_model(cfg, quant=meta.get("quant"), dtype=dtype)
      model = _restore_model_of(mngr, path, step, target, sharding)
    if meta.get("quant"):
      from qsam2_jax.quant import set_mode
      set_mode(model, "eval")  # frozen statistics: restoring is for evaluation and export
    if "source" in meta:
      meta["origin"] = meta["source"]
  elif not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  elif packed_file.is_packed_file(path):
    meta = describe(path)
    _check_float(meta, path, float_only)
    model, cfg = packed_file.load(path, config=config, dtype=dtype, image_size=image_size)
  else:
    sd = read_torch_state_dict(path)
    cfg = (configs.get_config(config, image_size=image_size) if config
           else detect_config(sd, path, image_size))
    model = model_from_state_dict(sd, cfg, dtype=dtype, source=path)
    meta = {"kind": "fp"}
  meta.update(config=cfg.name, image_size=cfg.image_size, source=os.path.abspath(path))
  return model, cfg, meta


def _check_float(meta: Dict[str, Any], path: str, float_only: Optional[str]) -> None:
  if float_only and meta.get("quant"):
    raise CheckpointError(f"{path} is already quantized; {float_only} needs a float checkpoint")


# ---------------------------------------------------------------------------- training runs


class RunCheckpointer:
  """Checkpoints of a training run: `<dir>/<step>/{model, opt, train, data, meta}`.

  An Orbax `CheckpointManager`: a save blocks only for the device-to-host copy and writes in the
  background (so the caller may donate the state right after `save` returns); the last `keep`
  steps are kept; a step becomes visible only once all its items are committed (written under a
  temporary name, then renamed), so a killed run leaves its earlier checkpoints intact.
  `load_sam2(dir)` reads the `model` and `meta` items like any model checkpoint of this project.

  Items: `model` (the whole NNX state: weights, clip factors, quantizer statistics), `opt`
  (optimizer state), `train` (small arrays such as the RNG key), `data` (any Orbax argument,
  e.g. a Grain iterator's) and `meta` (JSON; must hold `config` and `image_size`, and `quant`
  for quantized models). Every process of a multi-process run calls `save` and `restore`.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts)

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    return self._mngr.latest_step()

  def all_steps(self) -> list:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, *, model: Any, meta: Dict[str, Any], opt: Any = None,
           train: Any = None, data: Any = None, clip_data: Any = None) -> bool:
    """Starts saving `step` (returns once the arrays are copied to the host).

    `model`, `opt`, `train`: pytrees of arrays (e.g. `nnx.state(model)`); `data`: an Orbax
    save argument such as `grain.checkpoint.CheckpointSave(iterator)`; `clip_data` likewise
    for a second iterator (the trainer's video clips).
    """
    args = {"model": ocp.args.StandardSave(model),
            "meta": ocp.args.JsonSave({"format": FORMAT, **meta, "step": int(step)})}
    for name, tree in (("opt", opt), ("train", train)):
      if tree is not None:
        args[name] = ocp.args.StandardSave(tree)
    for name, arg in (("data", data), ("clip_data", clip_data)):
      if arg is not None:
        args[name] = arg
    return self._mngr.save(int(step), args=ocp.args.Composite(**args), force=True)

  def restore(self, step: Optional[int] = None, *, model: Any, opt: Any = None,
              train: Any = None, data: Any = None, clip_data: Any = None) -> Dict[str, Any]:
    """Restores `step` (default: the latest) into abstract targets.

    `model`, `opt`, `train`: pytrees of `jax.ShapeDtypeStruct`s carrying the shardings of the
    *current* mesh (`parallel.abstract_with_shardings`), so a run saved on one topology resumes
    on another; `data`: an Orbax restore argument (a Grain iterator is restored in place).
    Returns item name -> restored value, plus `meta`.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f"{self.directory} holds no complete checkpoint to resume from")
    args = {"model": ocp.args.StandardRestore(model), "meta": ocp.args.JsonRestore()}
    for name, tree in (("opt", opt), ("train", train)):
      if tree is not None:
        args[name] = ocp.args.StandardRestore(tree)
    for name, arg in (("data", data), ("clip_data", clip_data)):
      if arg is not None:
        args[name] = arg
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a broken directory
      raise CheckpointError(f"{self.directory} step {step}: cannot restore the run state "
                            f"({type(e).__name__}: {e})") from e
    return {name: out[name] for name in args}

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "RunCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

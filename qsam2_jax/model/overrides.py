"""Changes to a named SAM2 config, as JSON: how reduced or modified architectures are stored.

A checkpoint records its config by name (`sam2.1_hiera_t`) and image size; anything else that
differs from that named config is stored as `config_overrides`, e.g.
{"hiera": {"stages": [1, 1, 1, 1], "global_att_blocks": [2]}}, so the model restores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

from qsam2_jax.model.configs import SAM2Config, get_config


def _json(v: Any) -> Any:
  return list(v) if isinstance(v, tuple) else v


def _py(v: Any) -> Any:
  return tuple(v) if isinstance(v, list) else v


def config_overrides(cfg: SAM2Config) -> Dict[str, Any]:
  """How `cfg` differs from the named config it derives from ({} when it does not)."""
  base = get_config(cfg.name, image_size=cfg.image_size)
  out: Dict[str, Any] = {}
  for f in dataclasses.fields(cfg):
    mine, theirs = getattr(cfg, f.name), getattr(base, f.name)
    if mine == theirs:
      continue
    if dataclasses.is_dataclass(mine):
      out[f.name] = {g.name: _json(getattr(mine, g.name)) for g in dataclasses.fields(mine)
                     if getattr(mine, g.name) != getattr(theirs, g.name)}
    else:
      out[f.name] = _json(mine)
  return out


def apply_overrides(cfg: SAM2Config, overrides: Optional[Mapping[str, Any]]) -> SAM2Config:
  """`cfg` with `config_overrides` applied; a ValueError names an unknown field."""
  changes = {}
  for key, value in (overrides or {}).items():
    if key in ("name", "image_size") or not hasattr(cfg, key):
      raise ValueError(f"config_overrides: {cfg.name} has no overridable field {key!r}")
    current = getattr(cfg, key)
    if dataclasses.is_dataclass(current):
      names = {g.name for g in dataclasses.fields(current)}
      unknown = sorted(set(value) - names)
      if unknown:
        raise ValueError(f"config_overrides[{key!r}]: unknown fields {unknown}")
      changes[key] = dataclasses.replace(current, **{k: _py(v) for k, v in value.items()})
    else:
      changes[key] = _py(value)
  return cfg.replace(**changes)

"""Writing result files: atomically, and JSON with one NaN convention.

Every writer of the project goes through `atomic_path`: the content is written under a temporary
name next to the target and renamed into place, so an interrupted run leaves either the old file
or the new one, never half of one. JSON files write NaN and infinities as `null` (plain JSON:
any reader accepts them; `json.dump` would write the non-standard `NaN`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_ext: bool = True) -> Iterator[str]:
  """Yields a temporary path next to `path`; renamed onto it if the block succeeds, removed
  otherwise. The block may create a file or a directory there (an existing directory at `path`
  is replaced). `keep_ext`: the temporary name ends with `path`'s extension (for writers that
  choose the format by it); off for directories, whose names may hold dots."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  root, ext = os.path.splitext(path) if keep_ext else (path, "")
  tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}{ext}"
  try:
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path):
      old = f"{root}.old-{uuid.uuid4().hex[:8]}{ext}"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)


def jsonable(v: Any) -> Any:
  """A JSON-safe copy: NaN / inf -> None, numpy scalars and arrays -> Python, tuples -> lists."""
  if isinstance(v, float):
    return v if math.isfinite(v) else None
  if isinstance(v, Mapping):
    return {str(k): jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  if hasattr(v, "tolist") and callable(v.tolist):  # numpy arrays and scalars
    return jsonable(v.tolist())
  if hasattr(v, "item") and callable(v.item):
    return jsonable(v.item())
  return v


def write_json(path: str | os.PathLike, obj: Any) -> str:
  """Atomic JSON, NaN and inf written as null."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(jsonable(obj), f, indent=1, allow_nan=False)
  return os.fspath(path)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              fields: Sequence[str]) -> str:
  """Atomic CSV of dict rows, columns `fields` (other keys ignored)."""
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow(r)
  return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)
  return os.fspath(path)


def write_bytes(path: str | os.PathLike, *parts: bytes, sync: bool = False) -> str:
  """Atomic binary file of `parts` back to back (`sync`: fsync before the rename)."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    for p in parts:
      f.write(p)
    if sync:
      f.flush()
      os.fsync(f.fileno())
  return os.path.abspath(os.fspath(path))

"""Checks a command runs before any model is built or data is read in bulk (fail fast).

Inputs: exists, the right kind, readable. Outputs: creatable and writable, probed with a
temporary file in the nearest existing folder (so a read-only mount, a path under a regular file
or a missing permission is reported at once, not after the work); an existing folder that is not
one of this project's runs is never replaced. `created_by_us` removes, when the command fails,
the outputs it created. Every failure is a `UserError` naming the flag and the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Iterator, Optional

from qsam2_jax.errors import UserError

# Files that mark a folder as a run / checkpoint of this project.
_STEP_MARKER = "_CHECKPOINT_METADATA"        # Orbax: <dir>/<step>/_CHECKPOINT_METADATA
_RUN_FILES = (os.path.join("logs", "metrics.jsonl"), os.path.join("vrc", "vrc_report.json"),
              "vrc_report.json", "errors.json", "ptq_errors.json")


def _flag(flag: Optional[str], path: str) -> str:
  return f"{flag} {path}" if flag else str(path)


def input_path(path: str | os.PathLike, flag: Optional[str] = None, *, kind: str = "any",
               what: str = "") -> str:
  """`path` exists, is a `kind` ("file", "dir" or "any") and is readable; returns it.

  `what` describes the expected content for the message, e.g. "an official .pt file".
  """
  p = os.fspath(path)
  want = f" (expected {what})" if what else ""
  if not os.path.exists(p):
    raise UserError(f"{_flag(flag, p)} does not exist{want}")
  if kind == "file" and os.path.isdir(p):
    raise UserError(f"{_flag(flag, p)}: is a folder, expected a file{want}")
  if kind == "dir" and not os.path.isdir(p):
    raise UserError(f"{_flag(flag, p)}: is a file, expected a folder{want}")
  if not os.access(p, os.R_OK | (os.X_OK if os.path.isdir(p) else 0)):
    raise UserError(f"{_flag(flag, p)}: not readable (permission denied)")
  return p


def _nearest_existing(path: str) -> str:
  q = path
  while not os.path.lexists(q):
    parent = os.path.dirname(q)
    if parent == q:
      break
    q = parent
  return q


def probe_writable(path: str | os.PathLike, flag: Optional[str] = None) -> None:
  """The folder `path` (existing or not) can be created and written: a temporary file is
  created and removed in its nearest existing ancestor. Creates nothing that stays."""
  p = os.path.abspath(os.fspath(path))
  base = _nearest_existing(p)
  if not os.path.isdir(base):
    raise UserError(f"{_flag(flag, path)}: cannot be created: {base} is a file, not a folder")
  try:
    fd, tmp = tempfile.mkstemp(prefix=".qsam2-write-probe-", dir=base)
  except OSError as e:
    why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
    raise UserError(f"{_flag(flag, path)}: cannot write in {base} ({why})") from None
  os.close(fd)
  os.remove(tmp)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
  """An Orbax checkpoint folder: some `<digits>/` step holds Orbax's metadata file."""
  p = os.fspath(path)
  try:
    names = os.listdir(p)
  except OSError:
    return False
  return any(n.isdigit() and os.path.exists(os.path.join(p, n, _STEP_MARKER)) for n in names)


def is_run_dir(path: str | os.PathLike) -> bool:
  """A folder written by this project's commands: a checkpoint, or a run's logs / reports."""
  p = os.fspath(path)
  return is_checkpoint_dir(p) or any(os.path.exists(os.path.join(p, f)) for f in _RUN_FILES)


def _listing(p: str, limit: int = 3) -> str:
  names = sorted(os.listdir(p))
  shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit
                                      else "")
  return shown


def output_dir(path: str | os.PathLike, flag: str = "--out", *, overwrite: bool = False,
               resume: bool = False, what: str = "a run", empty_ok: bool = True) -> bool:
  """Checks a folder a command creates (a run, a checkpoint): returns whether it holds one.

  Absent or empty: fine (an existing empty folder needs `overwrite` unless `empty_ok`, for
  writers that replace the folder). Holding one of our runs: needs `overwrite` (replace) or
  `resume`.
  Holding anything else: refused even with `overwrite` (it would be deleted). Always probed
  for writing.
  """
  p = os.fspath(path)
  if os.path.exists(p) and not os.path.isdir(p):
    raise UserError(f"{flag} {p}: exists and is a file, expected a folder for {what}")
  nonempty = os.path.isdir(p) and bool(os.listdir(p))
  ours = nonempty and is_run_dir(p)
  if nonempty and not ours:
    raise UserError(f"{flag} {p}: exists and is not {what} of this project (holds "
                    f"{_listing(p)}); give a new or empty folder")
  if os.path.isdir(p) and not nonempty and not (empty_ok or overwrite):
    raise UserError(f"{flag} {p}: already exists (pass --overwrite to replace it)")
  if ours and not (overwrite or resume):
    raise UserError(f"{flag} {p}: already holds {what}; pass --overwrite to replace it"
                    + (" (or --resume to continue it)" if what == "a run" else ""))
  probe_writable(p, flag)
  return bool(ours)


def output_file(path: str | os.PathLike, flag: str = "--out") -> None:
  """Checks a file a command writes: not a folder, and its folder creatable and writable."""
  p = os.fspath(path)
  if os.path.isdir(p):
    raise UserError(f"{flag} {p}: is a folder, expected a file name")
  if os.path.exists(p) and not os.access(p, os.W_OK):
    raise UserError(f"{flag} {p}: exists and is not writable")
  probe_writable(os.path.dirname(os.path.abspath(p)), flag)


def output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
  """Checks a folder that results are written into (existing files of the same names are
  replaced, others kept): not a file, creatable and writable."""
  p = os.fspath(path)
  if os.path.exists(p) and not os.path.isdir(p):
    raise UserError(f"{flag} {p}: exists and is a file, expected a folder")
  probe_writable(p, flag)


@contextlib.contextmanager
def created_by_us(*paths: str | os.PathLike) -> Iterator[None]:
  """Removes, if the block raises, each of `paths` that did not exist when it started (with
  the folders above it that the block created)."""
  fresh = []
  for p in paths:
    p = os.path.abspath(os.fspath(p))
    if os.path.lexists(p):
      continue
    top = p   # the highest missing folder on the way to `p`
    while not os.path.lexists(os.path.dirname(top)) and os.path.dirname(top) != top:
      top = os.path.dirname(top)
    fresh.append(top)
  try:
    yield
  except BaseException:
    for p in fresh:
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      elif os.path.lexists(p):
        with contextlib.suppress(OSError):
          os.remove(p)
    raise

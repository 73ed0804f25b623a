"""User-facing errors: one clear line instead of a traceback, shared by every command.

Every user mistake (a flag, a file, a key, a prompt) raises `UserError` (or a subclass) whose
message names the flag / file / key and what was expected. A command's `main` wrapped in
`report_user_errors` prints it as `error: ...` and exits with status 2; `--debug` (or
`QSAM2_DEBUG=1`) prints the traceback as well. Library code raises the same typed errors, so an
API caller reads the same words.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, Optional, Sequence


class UserError(ValueError):
  """Bad input from the user (a file, a key, a flag, a prompt): the message says what and why."""


# OSError covers what the file system refuses (missing, not a folder, read-only, full, denied).
_REPORTED = (UserError, OSError)
DEBUG_FLAG = "--debug"


def describe_error(e: BaseException) -> str:
  """The one line printed for a reported error."""
  if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
    where = e.filename if e.filename is not None else ""
    return f"{where}: {e.strerror}" if where else e.strerror
  text = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
  return text


def report_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps a command's `main(argv)`: known input errors print `error: ...` and return 2.

  `--debug` anywhere in argv (removed before `main` sees it) or `QSAM2_DEBUG=1` also prints the
  traceback. The shared `cli.ArgumentParser` lists `--debug` in every `--help`.
  """

  @functools.wraps(main)
  def wrapper(argv: Optional[Sequence[str]] = None, *args, **kwargs) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("QSAM2_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
      return main(argv, *args, **kwargs) or 0
    except _REPORTED as e:
      if debug:
        traceback.print_exc()
      print(f"error: {describe_error(e)}", file=sys.stderr)
      return 2

  return wrapper

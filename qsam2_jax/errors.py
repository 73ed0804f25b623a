"""User-facing errors: one clear paragraph instead of a traceback, shared by every command."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(ValueError):
  """Bad input from the user (a file, a key, a flag, a prompt): the message says what and why."""


_REPORTED = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
             PermissionError)


def report_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps a command's `main`: known input errors print `error: ...` and exit with status 2."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs) or 0
    except _REPORTED as e:
      print(f"error: {e}", file=sys.stderr)
      return 2

  return wrapper

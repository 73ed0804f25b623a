"""Command-line pieces shared by the `train`, `eval` and `benchmarks` commands: argparse value
types with one wording, and a parser whose errors are one `error: ...` line (exit 2)."""

from __future__ import annotations

import argparse
import math
from typing import Union

from qsam2_jax.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors become `UserError`s, printed by `report_user_errors` as one line."""

  def error(self, message: str):
    raise UserError(f"{message} (see --help)")


def _int(text: str, kind: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None


def positive_int(text: str) -> int:
  value = _int(text, "positive")
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1 (a positive integer), got {value}")
  return value


def nonnegative_int(text: str) -> int:
  value = _int(text, "non-negative")
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be at least 0 (a non-negative integer), got {value}")
  return value


def nonnegative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
  return value


def vrc_lambda(text: str) -> Union[float, str]:
  """VRC's lambda_0: a non-negative number or 'auto'."""
  if text == "auto":
    return text
  try:
    return nonnegative_float(text)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
        f"must be a non-negative number or 'auto', got {text!r}") from None


def vrc_lambda_or_off(text: str) -> Union[float, str]:
  """`vrc_lambda`, or 'off' (no VRC)."""
  if text == "off":
    return text
  try:
    return vrc_lambda(text)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
        f"must be a non-negative number, 'auto' or 'off', got {text!r}") from None

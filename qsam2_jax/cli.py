"""Command-line pieces shared by every command (`convert`, `train`, `eval`, `benchmarks`):
argparse value types with one wording, one spelling set for dtypes, and a parser whose errors
are one `error: ...` line (exit 2). The library itself parses no command line; it lives here so
that every entry package imports it downward."""

from __future__ import annotations

import argparse
import math
from typing import Union

from qsam2_jax.errors import DEBUG_FLAG, UserError


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors become `UserError`s, printed by `report_user_errors` as one line.

  Every command gets `--debug` (`report_user_errors` takes it out of argv before parsing).
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                      help="on an error, also print the traceback")

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


def image_size(text: str) -> int:
  """`--image-size`: the model's input side, a multiple of 32 of at least 64 (Hiera's strides)."""
  value = _int(text, "positive")
  if value < 64 or value % 32:
    raise argparse.ArgumentTypeError(f"must be a multiple of 32, at least 64, got {value}")
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


# Compute dtypes: both spellings accepted everywhere, one canonical name (the numpy one).
DTYPES = ("float32", "bfloat16")
DTYPE_SPELLINGS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                   "bf16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def dtype_name(text: str) -> str:
  """`--dtype`: fp32 / float32 / bf16 / bfloat16 -> "float32" or "bfloat16"."""
  try:
    return DTYPE_SPELLINGS[text.lower()]
  except KeyError:
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DTYPE_SPELLINGS)}, got {text!r}") from None


def short_dtype_name(text: str) -> str:
  """`dtype_name`, spelled fp32 / bf16 (the benchmarks' table labels)."""
  return SHORT_DTYPE[dtype_name(text)]


def short_dtype_list(text: str) -> list[str]:
  """`--dtypes fp32,bfloat16`: a comma-separated list of `short_dtype_name`s."""
  names = [t.strip() for t in text.split(",") if t.strip()]
  if not names:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list of dtypes, got {text!r}")
  return [short_dtype_name(t) for t in names]


def compute_dtype(name: str):
  """The JAX compute dtype of a `--dtype` value (None = float32, the parameters' dtype)."""
  import jax.numpy as jnp
  return jnp.bfloat16 if DTYPE_SPELLINGS.get(name, name) == "bfloat16" else None

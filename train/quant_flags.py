"""The quantizer-option flags (`QuantRecipe` fields, `recipe.OPTION_FLAGS`) of train.qat and
train.ptq: defined once, so both commands spell and document them alike."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Mapping, Optional, Sequence

from qsam2_jax.cli import nonnegative_float, positive_int
from qsam2_jax.quant.quantizers import LSQ_INITS
from qsam2_jax.quant.recipe import (
  ACT_BITS,
  ACT_GRANULARITIES,
  ACT_RANGE_KINDS,
  BITS,
  OPTION_FLAGS,
  WEIGHT_GRANULARITIES,
  QuantRecipe,
)


def unit_interval(text: str) -> float:
  """A momentum: a number in [0, 1)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
  return value


def add_quant_option_args(group, names: Optional[Sequence[str]] = None) -> None:
  """Adds the flags of the options `names` (default all) to an argparse group or parser.

  No defaults are set here: a flag not given is absent from the namespace (qat's parser
  suppresses defaults) or None (ptq), and `QuantRecipe`'s default applies.
  """
  d = QuantRecipe()
  helps = {
      "high_bits": (dict(type=int, choices=BITS),
                    f"weight bits of the paper preset's first/last layers (default {d.high_bits})"),
      "high_act_bits": (dict(type=int, choices=ACT_BITS),
                        "their activation bits (default: --high-bits; 16 in weight-only "
                        "recipes)"),
      "weight_granularity": (dict(choices=WEIGHT_GRANULARITIES),
                             f"one weight range per output channel or per tensor "
                             f"(default {d.weight_granularity})"),
      "act_granularity": (dict(choices=ACT_GRANULARITIES),
                          "one input range per tensor, per channel (last axis) or per token "
                          f"(lsc / minmax / mse) (default {d.act_granularity})"),
      "act_range": (dict(choices=ACT_RANGE_KINDS),
                    "input range: [lo, hi], [-a, a] or [0, hi] (default: symmetric for pact, "
                    "asymmetric otherwise)"),
      "restricted": (dict(action=argparse.BooleanOptionalAction),
                     "weights on the restricted symmetric grid, zero a level (default off)"),
      "ema_momentum": (dict(type=unit_interval),
                       f"EMA momentum of activation statistics and ranges in training "
                       f"(default {d.ema_momentum})"),
      "factor_momentum": (dict(type=unit_interval),
                          "keep an EMA of the clip factors (this momentum) and evaluate with "
                          "it (default: off)"),
      "grad_scale": (dict(action=argparse.BooleanOptionalAction),
                     "LSQ's gradient scale 1/sqrt(N Q_P) on LSC and LSQ factors (default on)"),
      "search_points": (dict(type=positive_int),
                        f"candidates of the MSE range search (default {d.search_points})"),
      "lsq_init": (dict(choices=LSQ_INITS),
                   "LSQ's initial step: paper = 2 mean|x| / sqrt(Q_P) (Esser et al. 2020), "
                   f"mse = the MSE-optimal range (default {d.lsq_init})"),
      "pact_l2": (dict(type=nonnegative_float),
                  "PACT's L2 penalty lambda on its clips: lambda * alpha^2 added to the loss "
                  f"(default {d.pact_l2:g})"),
      "attn_bits": (dict(type=int, choices=ACT_BITS),
                    "paper preset: bits of q, k, v of every attention and of the mask "
                    "decoder's hypernetwork product (default: the activation bits; 16 = float)"),
      "softmax_bits": (dict(type=int, choices=ACT_BITS),
                       "paper preset: bits of the softmax probabilities, fixed grid on [0, 1] "
                       "(default 8; 16 in weight-only recipes; 16 = float)"),
  }
  for name in names or OPTION_FLAGS:
    kwargs, text = helps[name]
    group.add_argument(OPTION_FLAGS[name], dest=name, help=text, **kwargs)


def given_options(values: Mapping[str, Any]) -> Dict[str, Any]:
  """The option fields set in `values` (a namespace dict or config), None meaning not set."""
  return {k: values[k] for k in OPTION_FLAGS if values.get(k) is not None}

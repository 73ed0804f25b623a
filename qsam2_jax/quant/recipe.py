"""A quantization recipe: the choices that rebuild a quantized model's structure.

Stored in every checkpoint's metadata, so a quantized checkpoint restores into the same layers
(quantizers, their `QuantSpec`s, clip factors, statistics) without the command line that made
it. Every `QuantSpec` option is a recipe field and a flag of `train.qat` (`OPTION_FLAGS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from flax import nnx

from qsam2_jax.errors import UserError
from qsam2_jax.quant.quantizers import GRANULARITIES, LSQ_INITS
from qsam2_jax.quant.rules import ACT_RANGES, QuantReport, preset_rules, quantize_model

# The vocabulary every command shares (flags, metadata, report labels), defined once here.
METHODS = ("lsc", "lsq", "pact", "minmax", "mse")  # quantizer families a recipe can use
PRESETS = ("paper", "encoder")                      # which layers a recipe quantizes
BITS = (2, 3, 4, 8, 16)                             # widths a recipe holds (16 = float)
TARGET_BITS = (2, 3, 4, 8)                          # `--bits` of every command
ACT_BITS = (2, 3, 4, 8, 16)                         # `--act-bits` (16 = weight-only)
# `train.qat --method`: name -> (quantizer family, VRC re-fit first); fp = no quantization.
# qsam2 is the paper's method (VRC + LSC); lsc is LSC alone.
TRAIN_METHODS = {"qsam2": ("lsc", True), "lsc": ("lsc", False), "lsq": ("lsq", False),
                 "pact": ("pact", False), "minmax": ("minmax", False), "fp": (None, False)}
# Other spellings accepted for the same methods.
METHOD_ALIASES = {"vrc+lsc": "qsam2", "float": "fp"}
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = GRANULARITIES                    # per_tensor, per_channel, per_token
ACT_RANGE_KINDS = tuple(ACT_RANGES)                 # asymmetric, symmetric, unsigned
# PACT's lambda of lambda alpha^2 (`--pact-l2`). PACT ties it to the network's weight decay;
# the trainer's weight decay is AdamW's decoupled one (another scale), so the default is 1e-4,
# a usual SGD weight decay of the ResNets PACT was trained on.
DEFAULT_PACT_L2 = 1e-4
# Quantizer options: recipe field -> the flag that sets it (train.qat; train.ptq where marked).
OPTION_FLAGS = {
    "high_bits": "--high-bits", "high_act_bits": "--high-act-bits",
    "weight_granularity": "--weight-granularity", "act_granularity": "--act-granularity",
    "act_range": "--act-range", "restricted": "--restricted", "ema_momentum": "--ema-momentum",
    "factor_momentum": "--factor-momentum", "grad_scale": "--grad-scale",
    "search_points": "--search-points", "lsq_init": "--lsq-init", "pact_l2": "--pact-l2",
    "attn_bits": "--attn-bits", "softmax_bits": "--softmax-bits"}
# The options that matter without training (PTQ: no gradient, no EMA, no LSQ / PACT).
PTQ_OPTIONS = ("high_bits", "high_act_bits", "weight_granularity", "act_granularity",
               "act_range", "restricted", "search_points", "attn_bits", "softmax_bits")
# Softmax probability bits of the paper preset when the recipe quantizes activations.
DEFAULT_SOFTMAX_BITS = 8


def label(bits: int, act_bits: Optional[int], method: str, preset: str) -> str:
  """`W2A2 qsam2 paper`: how commands and reports name a quantized model."""
  return f"W{bits}A{act_bits or bits} {method} {preset}"


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
  """W`bits`A`act_bits` with `method` on the layers `preset` selects (16 bits = float).

  The other fields are the `QuantSpec` options of every quantized layer (`quantizers.QuantSpec`
  and `rules.make_rule` say what each does); their defaults are method.md's.
  """

  bits: int = 4
  act_bits: Optional[int] = None  # None: same as `bits`; 16: weight-only
  method: str = "lsc"
  preset: str = "paper"
  high_bits: int = 8
  high_act_bits: Optional[int] = None  # None: `high_bits`, or 16 in weight-only recipes
  weight_granularity: str = "per_channel"
  act_granularity: str = "per_tensor"
  act_range: Optional[str] = None  # None: the method's (pact symmetric, others asymmetric)
  restricted: bool = False  # weights on the symmetric grid with zero as a level
  ema_momentum: float = 0.9  # EMA of activation statistics / ranges
  factor_momentum: Optional[float] = None  # EMA of the learnable factors, used in evaluation
  grad_scale: bool = True  # LSQ's 1/sqrt(N Q_P) on LSC / LSQ factors
  search_points: int = 64  # candidates of the MSE range search
  lsq_init: str = "paper"  # LSQ step init: 2 mean|x|/sqrt(Q_P) (paper) or mse
  pact_l2: float = DEFAULT_PACT_L2  # PACT's lambda alpha^2 loss term
  # Activation x activation products (paper preset; method.md §3): q, k, v and the mask
  # decoder's hypernetwork product at `attn_bits` (None: the activation bits), softmax
  # probabilities on the fixed [0, 1] grid at `softmax_bits` (None: 8, or 16 in weight-only
  # recipes). 16 = float.
  attn_bits: Optional[int] = None
  softmax_bits: Optional[int] = None

  def __post_init__(self):
    if self.bits not in BITS:
      raise UserError(f"weight bits must be one of {BITS}, got {self.bits}")
    if self.act_bits is not None and self.act_bits not in BITS:
      raise UserError(f"activation bits must be one of {BITS}, got {self.act_bits}")
    if self.method not in METHODS:
      raise UserError(f"unknown quantization method {self.method!r}; expected one of {METHODS}")
    if self.preset not in PRESETS:
      raise UserError(f"unknown preset {self.preset!r}; expected one of {PRESETS}")
    for name, allowed in (("high_bits", BITS), ("high_act_bits", (None,) + BITS),
                          ("attn_bits", (None,) + BITS), ("softmax_bits", (None,) + BITS),
                          ("weight_granularity", WEIGHT_GRANULARITIES),
                          ("act_granularity", ACT_GRANULARITIES),
                          ("act_range", (None,) + ACT_RANGE_KINDS), ("lsq_init", LSQ_INITS),
                          ("restricted", (False, True)), ("grad_scale", (False, True))):
      if getattr(self, name) not in allowed:
        self._bad(name, f"one of {', '.join(str(a) for a in allowed if a is not None)}")
    if not 0 <= self.ema_momentum < 1:
      self._bad("ema_momentum", "in [0, 1)")
    if self.factor_momentum is not None and not 0 < self.factor_momentum < 1:
      self._bad("factor_momentum", "in (0, 1) (or unset: no factor EMA)")
    if not (isinstance(self.search_points, int) and self.search_points >= 2):
      self._bad("search_points", "an integer, at least 2")
    if not (math.isfinite(self.pact_l2) and self.pact_l2 >= 0):
      self._bad("pact_l2", "a non-negative number")
    try:
      self.rules()   # the combinations QuantSpec rejects (e.g. per_token with lsq / pact)
    except ValueError as e:
      raise UserError(f"quantization recipe {self.label}: {e}") from None

  def _bad(self, name: str, expected: str) -> None:
    raise UserError(f"{OPTION_FLAGS[name]} ({name}) must be {expected}, got "
                    f"{getattr(self, name)!r}")

  @property
  def effective_act_bits(self) -> int:
    return self.bits if self.act_bits is None else self.act_bits

  @property
  def effective_attn_bits(self) -> int:
    return self.effective_act_bits if self.attn_bits is None else self.attn_bits

  @property
  def effective_softmax_bits(self) -> int:
    if self.softmax_bits is not None:
      return self.softmax_bits
    return 16 if self.effective_act_bits >= 16 else DEFAULT_SOFTMAX_BITS

  @property
  def tag(self) -> str:
    return f"w{self.bits}a{self.effective_act_bits}-{self.method}-{self.preset}"

  @property
  def label(self) -> str:
    return label(self.bits, self.act_bits, self.method, self.preset)

  def rules(self):
    return preset_rules(self.preset, self.bits, self.effective_act_bits, method=self.method,
                        high_bits=self.high_bits, high_act_bits=self.high_act_bits,
                        weight_granularity=self.weight_granularity,
                        act_granularity=self.act_granularity, act_range=self.act_range,
                        restricted=self.restricted, momentum=self.ema_momentum,
                        factor_momentum=self.factor_momentum, grad_scale=self.grad_scale,
                        search_points=self.search_points, lsq_init=self.lsq_init,
                        pact_l2=self.pact_l2, attn_bits=self.effective_attn_bits,
                        softmax_bits=self.effective_softmax_bits)

  def apply(self, model: nnx.Module) -> Tuple[nnx.Module, QuantReport]:
    """Quantizes `model` in place (clone it first to keep a float copy)."""
    return quantize_model(model, self.rules())

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "QuantRecipe":
    """The recipe of `to_dict` (metadata); fields it lacks (older checkpoints) take defaults,
    except the attention-product bits: recipes made before them had float attention (16)."""
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    for name in ("attn_bits", "softmax_bits"):
      kwargs.setdefault(name, 16)
    return cls(**kwargs)

  def options(self) -> Dict[str, Any]:
    """The quantizer options (`OPTION_FLAGS` fields) and their values."""
    return {name: getattr(self, name) for name in OPTION_FLAGS}

"""A quantization recipe: the few choices that rebuild a quantized model's structure.

Stored in every checkpoint's metadata, so a quantized checkpoint restores into the same layers
(quantizers, clip factors, statistics) without the command line that made it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from flax import nnx

from qsam2_jax.errors import UserError
from qsam2_jax.quant.rules import QuantReport, preset_rules, quantize_model

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


def label(bits: int, act_bits: Optional[int], method: str, preset: str) -> str:
  """`W2A2 qsam2 paper`: how commands and reports name a quantized model."""
  return f"W{bits}A{act_bits or bits} {method} {preset}"


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
  """W`bits`A`act_bits` with `method` on the layers `preset` selects (16 bits = float)."""

  bits: int = 4
  act_bits: Optional[int] = None  # None: same as `bits`; 16: weight-only
  method: str = "lsc"
  preset: str = "paper"
  high_bits: int = 8
  high_act_bits: Optional[int] = None  # None: `high_bits`, or 16 in weight-only recipes

  def __post_init__(self):
    if self.bits not in BITS:
      raise UserError(f"weight bits must be one of {BITS}, got {self.bits}")
    if self.act_bits is not None and self.act_bits not in BITS:
      raise UserError(f"activation bits must be one of {BITS}, got {self.act_bits}")
    if self.method not in METHODS:
      raise UserError(f"unknown quantization method {self.method!r}; expected one of {METHODS}")
    if self.preset not in PRESETS:
      raise UserError(f"unknown preset {self.preset!r}; expected one of {PRESETS}")

  @property
  def effective_act_bits(self) -> int:
    return self.bits if self.act_bits is None else self.act_bits

  @property
  def tag(self) -> str:
    return f"w{self.bits}a{self.effective_act_bits}-{self.method}-{self.preset}"

  @property
  def label(self) -> str:
    return label(self.bits, self.act_bits, self.method, self.preset)

  def rules(self):
    return preset_rules(self.preset, self.bits, self.effective_act_bits, method=self.method,
                        high_bits=self.high_bits, high_act_bits=self.high_act_bits)

  def apply(self, model: nnx.Module) -> Tuple[nnx.Module, QuantReport]:
    """Quantizes `model` in place (clone it first to keep a float copy)."""
    return quantize_model(model, self.rules())

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "QuantRecipe":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

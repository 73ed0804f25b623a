"""Quantization rules on module paths, presets, and `quantize_model`.

A rule is a regular expression matched (`re.fullmatch`) against a layer's dotted, PyTorch-style
module path (`image_encoder.trunk.blocks.3.attn.qkv`); the first matching rule decides how
the layer is quantized. Rules that matched no layer are reported, as are quantizable layers
that no rule matched (they stay float).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from flax import nnx

from qsam2_jax.model.layers import QuantSlot
from qsam2_jax.quant.core import PASSTHROUGH_BITS
from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES, QUANTIZED_LAYERS
from qsam2_jax.quant.quantizers import QuantSpec, make_quantizer

log = logging.getLogger(__name__)

# The image encoder's linear layers (Hiera trunk): the layers VRC re-fits.
ENCODER_LINEARS = (r"image_encoder\.trunk\.blocks\.\d+\."
                   r"(attn\.qkv|attn\.proj|mlp\.layers\.[01]|proj)")
# Kept at `high_bits` by the `paper` preset [ours: common practice for first/last layers]: the
# patch embedding, the decoder's output upscaling (transposed convs), both mask downsamplers
# (memory encoder and prompt encoder, whole stacks), the 4x4 `mask_downsample` and the
# ConvNeXt depthwise 7x7 convs of the memory fuser.
PAPER_HIGH_PRECISION = (
    r"image_encoder\.trunk\.patch_embed\.proj",
    r"sam_mask_decoder\.output_upscaling\.\d+",
    r"memory_encoder\.mask_downsampler\.encoder\.\d+",
    r"sam_prompt_encoder\.mask_downscaling\.\d+",
    r"mask_downsample",
    r"memory_encoder\.fuser\.layers\.\d+\.dwconv",
)
# Identity slots (`layers.QuantSlot`) on the inputs of activation x activation products:
# q, k, v of every attention (after RoPE in memory attention), the hypernetwork x upscaled-
# embedding product of the mask decoder, and the softmax probabilities.
ATTN_SLOTS = (r".*\.(q|k|v)_quant", r"sam_mask_decoder\.(hyper_in|upscaled)_quant")
SOFTMAX_SLOTS = r".*\.probs_quant"
# Weight quantizer of each rule method. PACT learns activation clips only; its weights use the
# per-channel min-max range, recomputed every step (method.md §4). PACT's paper quantizes weights
# with DoReFa, which maps tanh(w) / max|tanh(w)| to [-1, 1]: that rescales every kernel, which a
# network with BatchNorm after each conv absorbs but a pretrained SAM2 being fine-tuned does not.
_WEIGHT_METHOD = {"lsc": "lsc", "lsq": "lsq", "pact": "minmax", "minmax": "minmax", "mse": "mse"}
# Activation range kinds (`make_rule(act_range=...)`) -> QuantSpec (signed, symmetric).
ACT_RANGES = {"asymmetric": (True, False), "symmetric": (True, True), "unsigned": (False, True)}


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """`pattern` -> how matching layers quantize their kernel and input (None: float)."""
  pattern: str
  weight: Optional[QuantSpec]
  act: Optional[QuantSpec]


def make_rule(pattern: str, weight_bits: Optional[int], act_bits: Optional[int], *,
              method: str = "lsc", weight_granularity: str = "per_channel",
              act_granularity: str = "per_tensor", act_signed: bool = True,
              act_symmetric: Optional[bool] = None, act_range: Optional[str] = None,
              restricted: bool = False, pact_l2: float = 0.0, **options) -> QuantRule:
  """A rule from bit widths and a method, with the defaults of method.md §2.

  Weights: signed, symmetric, per output channel (`restricted`: the grid with zero as a
  level). Inputs: signed asymmetric per tensor (PACT: symmetric); `act_range` (a key of
  `ACT_RANGES`) overrides `act_signed` / `act_symmetric`. `weight_bits=None` / `act_bits=None`
  keep that side float; both None makes an exclusion rule. `pact_l2` goes to PACT input
  quantizers; `options` (momentum, factor_momentum, grad_scale, search_points, lsq_init) to
  both specs.
  """
  weight = act = None
  if weight_bits is not None:
    weight = QuantSpec(bits=weight_bits, method=_WEIGHT_METHOD[method],
                       granularity=weight_granularity, restricted=restricted, **options)
  if act_bits is not None:
    if act_range is not None:
      if act_range not in ACT_RANGES:
        raise ValueError(f"act_range must be one of {tuple(ACT_RANGES)}, got {act_range!r}")
      act_signed, act_symmetric = ACT_RANGES[act_range]
    sym = (method == "pact") if act_symmetric is None else act_symmetric
    act = QuantSpec(bits=act_bits, method=method, granularity=act_granularity,
                    signed=act_signed, symmetric=sym,
                    pact_l2=pact_l2 if method == "pact" else 0.0, **options)
  return QuantRule(pattern, weight, act)


def slot_rules(attn_bits: int, softmax_bits: int, *, method: str = "lsc", **options
               ) -> List[QuantRule]:
  """Rules of the activation x activation slots (`ATTN_SLOTS`, `SOFTMAX_SLOTS`); 16 bits
  gives an exclusion rule (the slot stays the identity).

  q, k, v and the hypernetwork operands: `method` input quantizers at `attn_bits`, always per
  tensor (the slots see (B, L, heads, head_dim) tensors, no layer's channel count). Softmax
  probabilities: the fixed unsigned grid on [0, 1] (`unit`) at `softmax_bits`, whatever the
  method.
  """
  options = {k: v for k, v in options.items() if k not in ("act_granularity", "restricted")}
  attn = [make_rule(p, None, None if attn_bits >= PASSTHROUGH_BITS else attn_bits,
                    method=method, act_granularity="per_tensor", **options) for p in ATTN_SLOTS]
  probs = QuantRule(SOFTMAX_SLOTS, None, None)
  if softmax_bits < PASSTHROUGH_BITS:
    probs = QuantRule(SOFTMAX_SLOTS, None, QuantSpec(bits=softmax_bits, method="unit",
                                                     signed=False))
  return attn + [probs]


def preset_rules(name: str, bits: int, act_bits: Optional[int] = None, *, method: str = "lsc",
                 high_bits: int = 8, high_act_bits: Optional[int] = None,
                 attn_bits: int = PASSTHROUGH_BITS, softmax_bits: int = PASSTHROUGH_BITS,
                 **options) -> List[QuantRule]:
  """`paper`: every Linear/Conv at W`bits`A`act_bits`, `PAPER_HIGH_PRECISION` at `high_bits`,
  and the activation x activation slots at `attn_bits` / `softmax_bits` (`slot_rules`; float
  by default here, `QuantRecipe` sets them to the activation bits and 8).

  `encoder`: only the image encoder's trunk linears (`ENCODER_LINEARS`); the rest stays float.
  `act_bits` defaults to `bits`; `options` go to `make_rule`. The high-precision layers'
  activations default to `high_bits`, except in weight-only recipes (`act_bits` 16), where
  every activation stays float.
  """
  act_bits = bits if act_bits is None else act_bits
  if name == "paper":
    high_act = high_act_bits
    if high_act is None:
      high_act = PASSTHROUGH_BITS if act_bits >= PASSTHROUGH_BITS else high_bits
    high = [make_rule(p, high_bits, high_act, method=method, **options)
            for p in PAPER_HIGH_PRECISION]
    slots = slot_rules(attn_bits, softmax_bits, method=method, **options)
    return high + slots + [make_rule(r".*", bits, act_bits, method=method, **options)]
  if name == "encoder":
    return [make_rule(ENCODER_LINEARS, bits, act_bits, method=method, **options)]
  raise ValueError(f"unknown preset {name!r} (paper, encoder)")


def module_path(path: Sequence) -> str:
  """('a', 'blocks', 3, 'qkv') -> 'a.blocks.3.qkv' (the PyTorch module name)."""
  return ".".join(str(p) for p in path)


def get_child(model: nnx.Module, path: Sequence):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def set_child(model: nnx.Module, path: Sequence, new) -> None:
  """Replaces the submodule at `path` (attribute or list slot) by `new`."""
  parent = get_child(model, path[:-1])
  key = path[-1]
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)


def find_layers(model: nnx.Module, types: Tuple[type, ...], pattern: Optional[str] = None
                ) -> List[Tuple[Tuple, nnx.Module]]:
  """(path, module) of every `types` instance whose dotted path fullmatches `pattern`."""
  rx = re.compile(pattern) if pattern is not None else None
  return [(tuple(p), n) for p, n in list(nnx.iter_graph(model))
          if isinstance(n, types) and (rx is None or rx.fullmatch(module_path(p)))]


class LayerQuant(NamedTuple):
  """How one layer was quantized (bits None or 16: float)."""
  layer_class: str
  weight_bits: Optional[int]
  act_bits: Optional[int]
  weight_method: Optional[str]
  act_method: Optional[str]
  rule: str


@dataclasses.dataclass
class QuantReport:
  """What `quantize_model` did.

  Attributes:
    layers: path -> `LayerQuant`.
    float_layers: quantizable layers left float (no rule matched, or an exclusion rule).
    unused_rules: patterns that matched no layer.
    slots: path -> `LayerQuant` of each quantized activation x activation slot.
  """
  layers: Dict[str, LayerQuant] = dataclasses.field(default_factory=dict)
  slots: Dict[str, LayerQuant] = dataclasses.field(default_factory=dict)
  float_layers: List[str] = dataclasses.field(default_factory=list)
  unused_rules: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"{len(self.layers)} quantized layers, {len(self.float_layers)} float"]
    for name, (cls, wb, ab, wm, am, pat) in self.layers.items():
      lines.append(f"  {name}: {cls} W{wb or 'f'}({wm}) A{ab or 'f'}({am})  [{pat}]")
    if self.slots:
      lines.append(f"  {len(self.slots)} quantized attention-product inputs")
    if self.float_layers:
      lines.append("  float: " + ", ".join(self.float_layers))
    if self.unused_rules:
      lines.append("  unused rules: " + ", ".join(self.unused_rules))
    return "\n".join(lines)


def quantize_model(model: nnx.Module, rules: Sequence[QuantRule]
                   ) -> Tuple[nnx.Module, QuantReport]:
  """Replaces matched layers by `QLinear` / `QConv` / `QConvTranspose2x2`, in place.

  The quantized layers own the original kernel/bias Params (no copy), so the returned model is
  `model` itself: `nnx.clone` it first to keep a float teacher. Weight factors are initialized
  by an MSE search on the current kernels (run VRC before this, or `calibrate` after it).
  Quantizers start in train mode (`set_mode`). Identity `QuantSlot`s of the model become the
  input quantizer of the first weightless rule matching their path (reported in `slots`);
  unmatched slots stay the identity.
  """
  compiled = [(re.compile(r.pattern), r) for r in rules]
  used = [0] * len(rules)
  report = QuantReport()
  base_types = tuple(b for b, _ in QUANTIZED_LAYERS)
  for path, layer in find_layers(model, base_types + (QuantSlot,)):
    if isinstance(layer, QUANT_LAYER_TYPES):
      continue
    name = module_path(path)
    slot = isinstance(layer, QuantSlot)
    rule = None
    for i, (rx, r) in enumerate(compiled):
      # A slot has no weight: only rules without a weight side (input-only or exclusion
      # rules, `slot_rules`) apply to it, so a layer catch-all never quantizes one.
      if (not slot or r.weight is None) and rx.fullmatch(name):
        used[i] += 1
        rule = r
        break
    if slot:
      quantizer = make_quantizer(rule and rule.act)
      if quantizer is not None:
        set_child(model, path, quantizer)
        report.slots[name] = LayerQuant(type(quantizer).__name__, None, rule.act.bits, None,
                                        rule.act.method, rule.pattern)
      continue
    if rule is None or (rule.weight is None and rule.act is None):
      report.float_layers.append(name)
      continue
    qcls = next(q for b, q in QUANTIZED_LAYERS if isinstance(layer, b))
    set_child(model, path, qcls(layer, rule.weight, rule.act))
    report.layers[name] = LayerQuant(
        qcls.__name__, rule.weight and rule.weight.bits, rule.act and rule.act.bits,
        rule.weight and rule.weight.method, rule.act and rule.act.method, rule.pattern)
  report.unused_rules = [r.pattern for r, u in zip(rules, used) if u == 0]
  if report.unused_rules:
    log.warning("quantization rules that matched no layer: %s", report.unused_rules)
  return model, report

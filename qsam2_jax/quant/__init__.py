"""Q-SAM2 quantization: fake quantizers, quantized layers, rules, VRC and packing.

Typical use::

  rules = preset_rules("paper", bits=2)                  # or make_rule(...) lists
  model, report = quantize_model(model, rules)           # in place; report.unused_rules
  calibrate(model, forward, calib_batches)               # data-dependent init, then train mode
  tx = optax.partition({"params": ..., "clip": ...}, optimizer_labels(model))
  ...QAT with nnx.Optimizer(model, tx, wrt=nnx.Param)... # ClipFactor is a Param subclass
  set_mode(model, "eval")

The plotting helpers live in `qsam2_jax.quant.vrc_plots` (imports matplotlib lazily).
"""

from qsam2_jax.quant.core import (
    GAUSSIAN_CLIP,
    PASSTHROUGH_BITS,
    dequantize,
    fake_quant,
    mse_quantize_symmetric,
    num_steps,
    quantize,
    scale_grad,
    ste_round,
)
from qsam2_jax.quant.packing import pack, packed_size, unpack
from qsam2_jax.quant.penalty import pact_l2_penalty
from qsam2_jax.quant.qlayers import (
    QConv,
    QConvTranspose2x2,
    QLinear,
    QuantizedWeight,
    calibrate,
    optimizer_labels,
    set_mode,
)
from qsam2_jax.quant.quantizers import (
    ClipFactor,
    LSCQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    Quantizer,
    QuantSpec,
    QuantStat,
    RangeQuantizer,
    UnitQuantizer,
    make_quantizer,
)
from qsam2_jax.quant.rules import (
    ATTN_SLOTS,
    ENCODER_LINEARS,
    PAPER_HIGH_PRECISION,
    SOFTMAX_SLOTS,
    LayerQuant,
    QuantReport,
    QuantRule,
    find_layers,
    make_rule,
    module_path,
    preset_rules,
    quantize_model,
    slot_rules,
)
from qsam2_jax.quant.vrc import (
    AUTO_GRID,
    DEFAULT_LAM0,
    GramAccumulator,
    VRCLayerReport,
    apply_vrc,
    block_std_reduction,
    capture_inputs,
    collect_grams,
    gram_moments,
    lambda_sweep,
    ridge_refit,
    vrc_refit,
)

__all__ = [
    "GAUSSIAN_CLIP", "PASSTHROUGH_BITS", "dequantize", "fake_quant", "mse_quantize_symmetric",
    "num_steps", "quantize", "scale_grad", "ste_round", "pack", "packed_size", "unpack",
    "pact_l2_penalty",
    "QConv", "QConvTranspose2x2", "QLinear", "QuantizedWeight", "calibrate", "optimizer_labels",
    "set_mode",
    "ClipFactor", "LSCQuantizer", "LSQQuantizer", "PACTQuantizer", "Quantizer", "QuantSpec",
    "QuantStat", "RangeQuantizer", "UnitQuantizer", "make_quantizer", "ATTN_SLOTS",
    "ENCODER_LINEARS", "PAPER_HIGH_PRECISION", "SOFTMAX_SLOTS", "LayerQuant", "QuantReport",
    "QuantRule", "find_layers", "make_rule", "module_path", "preset_rules", "quantize_model",
    "slot_rules",
    "AUTO_GRID", "DEFAULT_LAM0", "GramAccumulator", "VRCLayerReport", "apply_vrc",
    "block_std_reduction", "capture_inputs", "collect_grams", "gram_moments", "lambda_sweep",
    "ridge_refit", "vrc_refit",
]

"""Size of the packed low-bit model per component, from a packed file's manifest, against BF16.

Every number comes from the bytes actually stored: quantized weights as b-bit codes plus their
float32 per-channel ranges, the floating-point rest at 16 bits, activation-quantizer state at
32 bits. The baseline stores every tensor of the official state dict in BF16 (2 bytes per
value). `python -m eval.size` prints it; `convert.to_torch` and `eval.report` quote it.
"""

from __future__ import annotations

from typing import Any, Dict

# (state-dict prefix, label); everything else is "rest" (object-pointer heads, embeddings).
COMPONENTS = (
    ("image_encoder", "image encoder"),
    ("memory_attention", "memory attention"),
    ("memory_encoder", "memory encoder"),
    ("sam_prompt_encoder", "prompt encoder"),
    ("sam_mask_decoder", "mask decoder"),
)
REST = "rest"
BF16_BYTES = 2


def component_of(key: str) -> str:
  """The component label of a state-dict key or an NNX path."""
  head = key.split(".", 1)[0]
  for prefix, label in COMPONENTS:
    if head == prefix:
      return label
  return REST


def _empty() -> Dict[str, Any]:
  return {"params": 0, "quantized_params": 0, "code_bytes": 0, "range_bytes": 0,
          "float_bytes": 0, "state_bytes": 0, "params_by_bits": {}}


def _finish(c: Dict[str, Any]) -> Dict[str, Any]:
  c["bf16_bytes"] = BF16_BYTES * c["params"]
  c["packed_bytes"] = c["code_bytes"] + c["range_bytes"] + c["float_bytes"] + c["state_bytes"]
  c["bits_per_param"] = 8.0 * c["packed_bytes"] / c["params"] if c["params"] else float("nan")
  c["ratio"] = c["bf16_bytes"] / c["packed_bytes"] if c["packed_bytes"] else float("nan")
  c["params_by_bits"] = dict(sorted(c["params_by_bits"].items()))
  return c


def size_report(manifest: Dict[str, Any], file_size: int) -> Dict[str, Any]:
  """Per-component sizes from a packed file's manifest and its size on disk.

  Returns:
    {"components": {label: {...}}, "total": {...}, "encoder_ratio", "model_ratio",
     "file_size", "header_bytes"}; per component: params, quantized_params, params_by_bits
     ({"2": n, "float16": m, ...}), code/range/float/state bytes, packed_bytes, bf16_bytes,
     bits_per_param and ratio.
  """
  comps = {label: _empty() for _, label in COMPONENTS}
  comps[REST] = _empty()
  for key, e in manifest["tensors"].items():
    c = comps[component_of(key)]
    n = 1
    for d in e["shape"]:
      n *= int(d)
    c["params"] += n
    if e["kind"] == "quantized":
      c["quantized_params"] += n
      c["code_bytes"] += e["codes"][1]
      c["range_bytes"] += sum(e[k][1] for k in ("lo", "step") if e.get(k))
      label = str(e["bits"])
    else:
      c["float_bytes"] += e["data"][1]
      label = e["dtype"]
    c["params_by_bits"][label] = c["params_by_bits"].get(label, 0) + n
  for path, e in manifest.get("quantizer_state", {}).items():
    comps[component_of(path)]["state_bytes"] += e["data"][1]
  total = _empty()
  for c in comps.values():
    for k in ("params", "quantized_params", "code_bytes", "range_bytes", "float_bytes",
              "state_bytes"):
      total[k] += c[k]
    for b, n in c["params_by_bits"].items():
      total["params_by_bits"][b] = total["params_by_bits"].get(b, 0) + n
  comps = {k: _finish(v) for k, v in comps.items()}
  total = _finish(total)
  header = file_size - manifest["data_size"]
  return {"components": comps, "total": total,
          "encoder_ratio": comps["image encoder"]["ratio"],
          "model_ratio": total["bf16_bytes"] / file_size,
          "file_size": file_size, "header_bytes": header}

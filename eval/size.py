"""Model size: bits and bytes per component of the packed low-bit model, against BF16.

  python -m eval.size --ckpt runs/w2a2                 # packs the run in memory, measures it
  python -m eval.size --ckpt w2a2.qsam                 # a packed file (from convert.to_torch)
  python -m eval.size --ckpt runs/w2a2 --packed w2a2.qsam

Every number comes from the packed file's manifest, i.e. from the bytes actually stored:
quantized weights as b-bit codes plus their float32 per-channel ranges, the floating-point rest
at 16 bits, activation-quantizer state at 32 bits. The baseline stores every tensor of the
official state dict in BF16 (2 bytes per value). The encoder ratio compares the image encoder's
tensors; the whole-model ratio compares the BF16 model with the packed file's size on disk
(its compressed manifest included). Without --packed the run is packed into a temporary file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

from qsam2_jax.errors import UserError, report_user_errors

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


def _mb(n: float) -> str:
  return f"{n / 2**20:8.3f}"


def format_report(rep: Dict[str, Any], title: str) -> str:
  lines = [title,
           f"{'component':<17}{'params':>12}{'quantized':>12}{'bits/param':>11}"
           f"{'BF16 MiB':>10}{'packed MiB':>11}{'ratio':>8}  params by storage"]
  rows = list(rep["components"].items()) + [("total (data)", rep["total"])]
  for name, c in rows:
    if not c["params"]:
      continue
    by = ", ".join(f"{k}{'-bit' if k.isdigit() else ''}: {v:,}"
                   for k, v in c["params_by_bits"].items())
    lines.append(f"{name:<17}{c['params']:>12,}{c['quantized_params']:>12,}"
                 f"{c['bits_per_param']:>11.3f}{_mb(c['bf16_bytes']):>10}"
                 f"{_mb(c['packed_bytes']):>11}{c['ratio']:>7.2f}x  {by}")
  t = rep["total"]
  lines += [
      f"image encoder: {rep['encoder_ratio']:.2f}x smaller than BF16",
      f"packed file on disk: {rep['file_size']:,} bytes ({rep['header_bytes']:,} manifest) "
      f"vs BF16 {t['bf16_bytes']:,} bytes: whole model {rep['model_ratio']:.2f}x smaller",
      f"(codes {t['code_bytes']:,} B, per-channel ranges {t['range_bytes']:,} B, float rest "
      f"{t['float_bytes']:,} B, activation-quantizer state {t['state_bytes']:,} B)"]
  return "\n".join(lines)


def measure(ckpt: Optional[str], *, step: Optional[int] = None, packed: Optional[str] = None,
            float_dtype: str = "auto") -> Dict[str, Any]:
  """The size report of a packed file, or of a checkpoint packed into a temporary file."""
  from qsam2_jax.quant import packed_file
  if packed is None and ckpt is not None and packed_file.is_packed_file(ckpt):
    packed = ckpt
  if packed is not None:
    manifest, _ = packed_file.read(packed)   # checks size and CRC: a corrupt file is refused
    rep = size_report(manifest, os.path.getsize(packed))
    rep.update(source=os.path.abspath(packed), config=manifest["config"],
               quant=manifest.get("quant"), float_dtype=manifest.get("float_dtype"))
    return rep
  from qsam2_jax.export import load_with_meta
  model, meta = load_with_meta(ckpt, step=step)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.qsam")
    pm = packed_file.save(path, model, meta, float_dtype=float_dtype)
    rep = size_report(pm.manifest, os.path.getsize(path))
  rep.update(source=os.path.abspath(ckpt), config=meta["config"], quant=meta.get("quant"),
             float_dtype=float_dtype, step=meta.get("step"))
  return rep


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m eval.size", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None,
                 help="run / Orbax checkpoint directory, official .pt or packed file (default: "
                      "the embedded random SAM2.1-t)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--packed", default=None,
                 help="an existing packed file to measure (instead of packing --ckpt)")
  p.add_argument("--float-dtype", default="auto",
                 choices=("auto", "bfloat16", "float16", "float32"),
                 help="storage of the floating-point rest when packing --ckpt (default: auto = "
                      "float16 where the range allows, else bfloat16)")
  p.add_argument("--json", default=None, help="also write the report as JSON here")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  ckpt = args.ckpt
  if ckpt is None and args.packed is None:
    from train.defaults import default_checkpoint
    ckpt = default_checkpoint()
  if args.packed is not None and not os.path.isfile(args.packed):
    raise UserError(f"--packed {args.packed}: no such file (write one with "
                    "`python -m convert.to_torch --ckpt RUN --packed FILE`)")
  rep = measure(ckpt, step=args.step, packed=args.packed, float_dtype=args.float_dtype)
  q = rep.get("quant")
  what = (f"W{q['bits']}A{q.get('act_bits') or q['bits']} {q.get('method')} {q.get('preset')}"
          if q else "float")
  print(format_report(rep, f"{rep['source']}: {rep['config']} ({what})"))
  if args.json:
    from eval.report import write_json
    write_json(args.json, {"kind": "eval.size", **rep})
  return 0


if __name__ == "__main__":
  sys.exit(main())

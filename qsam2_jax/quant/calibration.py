"""VRC and post-training quantization on a whole SAM2 model (method.md §1, §6).

The pieces the `train.calibrate` / `train.ptq` commands (and the trainer) compose:

  images = calibration_images(data, 16, cfg.image_size)          # (N, S, S, 3) normalized
  fp = nnx.clone(model)
  result = run_vrc(model, images, lam0="auto", bits=4)            # re-fits the encoder linears
  write_vrc_report(result, out_dir)                               # JSON, CSV, Fig. 3, Fig. 5
  ptq(model, QuantRecipe(bits=4, method="mse"), images)           # quantize + calibrate + eval

Their per-layer and end-to-end errors against the float model are measured in `quant.measure`.

Prompts: decoder activations are calibrated and measured with synthetic prompts (one random
box plus one random foreground point per image, `make_prompts`), since calibration images come
without annotations attached; they exercise the prompt encoder and mask decoder as a user's box
and click do.

Every jitted function here is module-level (`nnx.jit` caches on the model's graph structure), so
a second model of the same structure and mode (e.g. PTQ with another method) compiles nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsam2_jax.data.coco import describe, open_source
from qsam2_jax.data.transforms import resize_image
from qsam2_jax.errors import UserError
from qsam2_jax.files import jsonable, write_csv, write_json
from qsam2_jax.model import layers
from qsam2_jax.quant.qlayers import QUANT_LAYER_TYPES, set_mode
from qsam2_jax.quant.recipe import QuantRecipe
from qsam2_jax.quant.rules import (
  ENCODER_LINEARS,
  QuantReport,
  find_layers,
  module_path,
)
from qsam2_jax.quant.vrc import (
  AUTO_GRID,
  DEFAULT_LAM0,
  VRCLayerReport,
  apply_vrc,
  block_std_reduction,
  collect_grams,
  lambda_sweep,
)

log = logging.getLogger(__name__)

# `train.ptq --method`: a weight/activation range method, optionally after VRC.
PTQ_METHODS = ("minmax", "mse", "vrc+minmax", "vrc+mse")
# lambda_0 values of the Fig. 5 sweep (0 = no re-fit, the reference of the ratio).
SWEEP_GRID = (0.0,) + tuple(float(v) for v in np.logspace(-5, 0, 21))
_FLOAT = (layers.Linear, layers.Conv, layers.ConvTranspose2x2)

# ------------------------------------------------------------------------------ inputs


def calibration_images(data: Any, num_images: int, image_size: int, seed: int = 0, *,
                       start: int = 0) -> np.ndarray:
  """(N, S, S, 3) float32 images from a COCO / SA-1B path (or its opened reader,
  `data.coco.open_source`), preprocessed as SAM2 does.

  Square bilinear resize to `image_size` and ImageNet normalization (`data.transforms`). The
  images are positions `start .. start + num_images` of a seeded permutation of the dataset, so
  `start=N` gives images held out from a calibration set of N with the same seed.
  """
  if data is None:
    raise UserError("calibration_images needs a dataset path (COCO JSON/folder or SA-1B folder)")
  if num_images < 1:
    raise UserError(f"the number of calibration images must be at least 1, got {num_images}")
  src = open_source(data) if isinstance(data, (str, os.PathLike)) else data
  if start + num_images > len(src):
    raise UserError(f"{describe(src)}: {num_images} images requested"
                    + (f" after the first {start}" if start else "")
                    + f", but only {len(src)} available")
  order = np.random.default_rng(seed).permutation(len(src))[start:start + num_images]
  return np.stack([resize_image(src[int(i)].image, image_size) for i in order])


def make_prompts(num: int, image_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """One random box and one random foreground point per image, in model-input pixels.

  Boxes: centres in the middle 60 % of the image, sides 20-60 % of it, as corner points
  labelled 2 / 3 (SAM2's box encoding). Points: a foreground click (label 1) in the inner half
  of the box.
  """
  rng = np.random.default_rng(seed)
  s = float(image_size)
  centre = rng.uniform(0.2, 0.8, (num, 2)) * s
  half = rng.uniform(0.1, 0.3, (num, 2)) * s
  box = np.clip(np.stack([centre - half, centre + half], axis=1), 0.0, s - 1.0)
  point = (centre + rng.uniform(-0.5, 0.5, (num, 2)) * half)[:, None]
  return {"box_coords": box.astype(np.float32),
          "box_labels": np.tile(np.array([[2, 3]], np.int32), (num, 1)),
          "point_coords": point.astype(np.float32),
          "point_labels": np.ones((num, 1), np.int32)}


def batches(images: np.ndarray, batch_size: int, prompt_seed: Optional[int] = 0
            ) -> List[Any]:
  """Device batches of `images` (and their `make_prompts` when `prompt_seed` is not None).

  Prompts are drawn for all images at once, so they do not depend on the batch size.
  """
  if batch_size < 1:
    raise UserError(f"batch size must be at least 1, got {batch_size}")
  n = len(images)
  prompts = None if prompt_seed is None else make_prompts(n, images.shape[1], prompt_seed)
  out = []
  for i in range(0, n, batch_size):
    x = jnp.asarray(images[i:i + batch_size])
    if prompts is None:
      out.append(x)
    else:
      out.append((x, {k: jnp.asarray(v[i:i + batch_size]) for k, v in prompts.items()}))
  return out


def _progress(items: Sequence[Any], desc: str, enabled: bool):
  if not enabled:
    return items
  from tqdm import tqdm
  return tqdm(items, desc=desc, unit="batch", leave=False)


# ------------------------------------------------------------------------------ forwards


def model_outputs(model: nnx.Module, images: jax.Array, prompts: Mapping[str, jax.Array]
                  ) -> Dict[str, jax.Array]:
  """What a user of the image path sees: encoder features and the mask for `prompts`.

  One decode with each image's box and point together (`make_prompts`), single-mask output:
  the decoder computes every mask token (and SAM2.1's stability-based choice) either way, so one
  call exercises all its layers at half the compile time of separate box and point decodes.
  Returns float32 `image_embed` (B, h, w, 256), `high_res_feats_{0,1}`, `mask_logits`
  (B, 1, 4h, 4w) and `iou` (B, 1).
  """
  embed, high_res = model.image_features(images)
  coords = jnp.concatenate([prompts["box_coords"], prompts["point_coords"]], axis=1)
  labels = jnp.concatenate([prompts["box_labels"], prompts["point_labels"]], axis=1)
  masks, iou, _, _ = model.decode_prompts(embed, high_res, coords, labels,
                                          multimask_output=False, repeat_image=False)
  out = {"image_embed": embed, "high_res_feats_0": high_res[0], "high_res_feats_1": high_res[1],
         "mask_logits": masks, "iou": iou}
  return {k: v.astype(jnp.float32) for k, v in out.items()}


def commit_state(model: nnx.Module) -> nnx.Module:
  """Pins every array of `model` to the device it is on (in place).

  Fresh arrays (`jnp.zeros` quantizer statistics, `build_sam2`) are "uncommitted", and jit's
  cache key includes committedness: since a jitted step hands its state back committed, the
  second call would otherwise compile the whole model again.
  """
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, x.sharding), state))
  return model


def _trunk(model: nnx.Module, images: jax.Array) -> None:
  model.image_encoder.trunk(images)


# Module-level compiled forwards: one compile per model structure and quantizer mode.
_trunk_jit = nnx.jit(_trunk)
_outputs_jit = nnx.jit(lambda m, batch: model_outputs(m, *batch))


# ------------------------------------------------------------------------------ VRC


def default_sweep_layer(cfg) -> str:
  """`mlp.layers.1` of the first block of the last Hiera stage (the paper's Fig. 5 layer).

  For b+ (stages 2, 3, 16, 3) that is `blocks.21`, the paper's choice; for t, `blocks.10`.
  """
  return f"image_encoder.trunk.blocks.{cfg.hiera.stage_ends[-2] + 1}.mlp.layers.1"


def vrc_layer_names(cfg, pattern: str = ENCODER_LINEARS) -> List[str]:
  """The layers `run_vrc` re-fits in a model of `cfg`, in order (from shapes only: no weight
  is built, so a command checks names before loading anything)."""
  from qsam2_jax.model.sam2 import abstract_sam2
  return [module_path(p) for p, _ in find_layers(abstract_sam2(cfg), (layers.Linear,), pattern)]


def _check_sweep_layer(name: str, names: Sequence[str], cfg, flag: str = "sweep layer") -> None:
  if name in names:
    return
  blocks = sorted({int(m.group(1)) for n in names
                   if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", n))})
  span = f"blocks.0-{blocks[-1]}" if blocks else "blocks"
  raise UserError(f"{flag} {name!r} is not a VRC layer of {cfg.name}: expected "
                  f"image_encoder.trunk.<{span}>."
                  "<attn.qkv|attn.proj|mlp.layers.0|mlp.layers.1|proj>, "
                  f"e.g. {default_sweep_layer(cfg)}")


def check_sweep_layer(name: Optional[str], cfg, flag: str = "sweep layer") -> None:
  """Refuses a `sweep_layer` for `run_vrc` that a model of `cfg` does not have ("" / None: ok);
  `flag` names it in the message (e.g. "--sweep-layer")."""
  if name:
    _check_sweep_layer(name, vrc_layer_names(cfg), cfg, flag)


@dataclasses.dataclass
class VRCResult:
  """Everything `run_vrc` learnt: per-layer reports and what the report files need.

  Attributes:
    reports: one `VRCLayerReport` per re-fitted layer, in model order.
    block_reduction: block index -> mean weight-std reduction (fraction), paper Fig. 3.
    weights_before / weights_after: layer -> kernel (d_in, d_out) before / after, for the
      histograms.
    tokens: layer -> number of input rows the Gram matrix averaged.
    skipped: layers left unchanged because their Gram averaged fewer than
      `min_tokens_per_dim * d_in` rows (name -> (rows, d_in)).
    sweep_layer, sweep_bits, sweep: the Fig. 5 lambda sweep of one layer (`lambda_sweep` keys).
    seconds: wall time of the Gram pass (`grams`, compile included), the solves (`solve`)
      and the sweep (`sweep`).
  """
  reports: List[VRCLayerReport]
  block_reduction: Dict[int, float]
  lam0: Union[float, str]
  lam_mode: str
  bits: Optional[int]
  num_images: int
  image_size: int
  weights_before: Dict[str, np.ndarray]
  weights_after: Dict[str, np.ndarray]
  tokens: Dict[str, int]
  skipped: Dict[str, Tuple[int, int]]
  sweep_layer: Optional[str]
  sweep_bits: Optional[int]
  sweep: Optional[Dict[str, np.ndarray]]
  seconds: Dict[str, float]

  def summary(self) -> Dict[str, Any]:
    """JSON-ready headline numbers (stored as `meta["vrc"]` in checkpoints)."""
    red = [r.std_reduction for r in self.reports]
    if not red:
      return jsonable({"lam0": self.lam0, "lam_mode": self.lam_mode, "bits": self.bits,
                     "num_images": self.num_images, "image_size": self.image_size,
                     "num_layers": 0, "skipped": sorted(self.skipped),
                     "seconds": self.seconds})
    ratios = [r.q_ratio for r in self.reports if np.isfinite(r.q_ratio)]
    return jsonable({
        "lam0": self.lam0, "lam_mode": self.lam_mode, "bits": self.bits,
        "num_images": self.num_images, "image_size": self.image_size,
        "num_layers": len(self.reports), "skipped": sorted(self.skipped),
        "std_reduction_mean": float(np.mean(red)) if red else None,
        "out_err_mean": float(np.mean([r.out_err for r in self.reports])) if red else None,
        "q_ratio_median": float(np.median(ratios)) if ratios else None,
        "q_ratio_max": float(np.max(ratios)) if ratios else None,
        "block_std_reduction": {str(k): v for k, v in self.block_reduction.items()},
        "seconds": self.seconds})

  def table(self) -> str:
    """Per-layer lines for the terminal."""
    q = self.bits is not None
    head = f"{'layer':58s} {'lam0':>8s} {'std red.':>8s} {'out err':>8s}"
    head += f" {'q err':>8s} {'q base':>8s} {'ratio':>6s}" if q else ""
    lines = [head]
    for r in self.reports:
      line = (f"{r.name:58s} {r.lam0:8.1e} {100 * r.std_reduction:7.2f}% "
              f"{100 * r.out_err:7.3f}%")
      if q:
        line += f" {100 * r.q_err:7.3f}% {100 * r.q_err_base:7.3f}% {r.q_ratio:6.3f}"
      lines.append(line)
    s = self.summary()
    if not self.reports:
      return f"VRC re-fitted no layer ({len(self.skipped)} with too few input rows)"
    tail = (f"VRC on {s['num_layers']} layers from {self.num_images} images: mean weight-std "
            f"reduction {100 * s['std_reduction_mean']:.2f}%, mean output error "
            f"{100 * s['out_err_mean']:.3f}%")
    if s["q_ratio_median"] is not None:
      tail += (f", W{self.bits} quantized-error ratio median {s['q_ratio_median']:.3f} "
               f"(worst {s['q_ratio_max']:.3f})")
    if self.skipped:
      tail += (f"; {len(self.skipped)} layers left unchanged, fewer input rows than input "
               f"dims (use more or larger images): "
               + ", ".join(f"{n.replace('image_encoder.trunk.', '')} ({r}<{d})"
                           for n, (r, d) in self.skipped.items()))
    return "\n".join(lines + [tail])


def run_vrc(model: nnx.Module, images: np.ndarray, *,
            lam0: Union[float, str] = DEFAULT_LAM0, lam_mode: str = "relative",
            bits: Optional[int] = None, batch_size: int = 4, progress: bool = True,
            pattern: str = ENCODER_LINEARS, sweep_layer: Optional[str] = None,
            sweep_lam0s: Sequence[float] = SWEEP_GRID, grid: Sequence[float] = AUTO_GRID,
            min_tokens_per_dim: float = 1.0) -> VRCResult:
  """Variance-Reduced Calibration of the image encoder's linears, in place (method.md §1).

  One jitted trunk forward per batch accumulates every selected layer's X^T X (float32,
  highest precision on device; float64 sums on the host); then `apply_vrc` re-fits the kernels
  (layers of one shape solved together).

  Args:
    model: a float `SAM2Base` (its kernels are replaced).
    images: (N, S, S, 3) normalized images (`calibration_images`).
    lam0: lambda_0, or "auto" (per layer, from `grid`, minimizing the W`bits` quantized output
      error; needs `bits`).
    lam_mode: "relative" (lambda = lam0 * trace(S) / d_in) or "absolute".
    bits: target weight bits for the quantized errors in the report and auto-lambda.
    pattern: which layers (default: the Hiera trunk's linears).
    sweep_layer: the Fig. 5 layer (default `default_sweep_layer`; "" for no sweep), swept
      at `bits` (4 if None).
    min_tokens_per_dim: layers whose Gram averaged fewer than this many input rows per input
      dimension are left unchanged [ours]. With fewer rows than d_in, S is singular and the
      ridge solve zeroes the kernel along every direction the calibration images did not
      excite, which new images do excite (at 256² the last Hiera stage has 64 tokens per
      image for d_in up to 3072; at 1024² with 16 images no layer is affected). 0 disables.
  """
  if lam0 == "auto" and not bits:
    raise UserError("lambda 'auto' needs the target weight bits (--bits)")
  if lam_mode not in ("relative", "absolute"):
    raise UserError(f"lambda mode must be 'relative' or 'absolute', got {lam_mode!r}")
  if lam0 != "auto" and not (isinstance(lam0, (int, float)) and lam0 >= 0 and math.isfinite(lam0)):
    raise UserError(f"lambda must be a non-negative number or 'auto', got {lam0!r}")
  if any(isinstance(l, QUANT_LAYER_TYPES) for _, l in find_layers(model, _FLOAT, pattern)):
    raise UserError("VRC re-fits a float model; this one is already quantized")
  seconds = {}
  t = time.perf_counter()
  commit_state(model)
  order = [module_path(p) for p, _ in find_layers(model, (layers.Linear,), pattern)]
  if sweep_layer:
    _check_sweep_layer(sweep_layer, order, model.cfg)
  acc = collect_grams(model, pattern, _trunk_jit,
                      _progress(batches(images, batch_size, None), "VRC: Gram matrices",
                                progress), jit=False)
  grams = {n: acc.second_moment(n) for n in order}
  seconds["grams"] = time.perf_counter() - t

  t = time.perf_counter()
  by_name = {module_path(p): l for p, l in find_layers(model, (layers.Linear,), pattern)}
  skipped = {n: (acc.count[n], g.shape[0]) for n, g in grams.items()
             if acc.count[n] < min_tokens_per_dim * g.shape[0]}
  if skipped:
    log.warning("VRC leaves %d layers unchanged (fewer input rows than input dimensions): %s",
                len(skipped), ", ".join(skipped))
  fit = [n for n in order if n not in skipped]
  before = {n: np.asarray(by_name[n].kernel[...]) for n in fit}
  reports = (apply_vrc(model, {n: grams[n] for n in fit}, lam0=lam0, lam_mode=lam_mode,
                       bits=bits, grid=grid) if fit else [])
  after = {n: np.asarray(by_name[n].kernel[...]) for n in fit}
  seconds["solve"] = time.perf_counter() - t

  t = time.perf_counter()
  layer = default_sweep_layer(model.cfg) if sweep_layer is None else sweep_layer
  sweep = None
  sweep_bits = bits or 4
  if layer in before:
    sweep = lambda_sweep(before[layer], grams[layer], sweep_lam0s, bits=sweep_bits,
                         lam_mode=lam_mode)
  else:   # no sweep, or the sweep layer was left unchanged (too few input rows)
    layer = None
  seconds["sweep"] = time.perf_counter() - t
  return VRCResult(reports, block_std_reduction(reports), lam0, lam_mode, bits, len(images),
                   int(images.shape[1]), before, after, {n: acc.count[n] for n in order},
                   skipped, layer if sweep else None, sweep_bits if sweep else None, sweep,
                   seconds)


def write_vrc_report(result: VRCResult, out_dir: Union[str, os.PathLike]) -> Dict[str, str]:
  """Writes `vrc_report.json`, `vrc_layers.csv`, `vrc_std.png` (Fig. 3), `vrc_lambda.png` (Fig. 5).

  Returns name -> path of what was written (no `vrc_lambda.png` without a sweep layer).
  """
  from qsam2_jax.quant.vrc_plots import plot_lambda_sweep, plot_vrc_weights

  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, k) for k in
           ("vrc_report.json", "vrc_layers.csv", "vrc_std.png", "vrc_lambda.png")}
  report = {"summary": result.summary(),
            "skipped": {n: {"tokens": r, "d_in": d} for n, (r, d) in result.skipped.items()},
            "layers": [dict(r.as_dict(), tokens=result.tokens.get(r.name))
                       for r in result.reports],
            "sweep": None if result.sweep is None else {
                "layer": result.sweep_layer, "bits": result.sweep_bits,
                **{k: v for k, v in result.sweep.items()}}}
  write_json(paths["vrc_report.json"], report)
  fields = ["name", "d_in", "d_out", "tokens", "lam0", "lam", "std_before", "std_after",
            "std_reduction", "out_err", "q_err", "q_err_base", "q_ratio"]
  rows = []
  for r in result.reports:
    d = dict(r.as_dict(), d_in=r.shape[0], d_out=r.shape[1], tokens=result.tokens.get(r.name))
    rows.append({k: d[k] if isinstance(d[k], str) else f"{d[k]:.6g}" for k in fields})
  write_csv(paths["vrc_layers.csv"], rows, fields)
  if not result.reports:
    del paths["vrc_std.png"], paths["vrc_lambda.png"]
    return paths
  lam_txt = result.lam0 if isinstance(result.lam0, str) else f"{result.lam0:g}"
  plot_vrc_weights(list(result.weights_before.values()), list(result.weights_after.values()),
                   result.block_reduction, paths["vrc_std.png"],
                   title=f"VRC ({lam_txt}, {result.lam_mode}) on {len(result.reports)} "
                         "image-encoder linears")
  if result.sweep is not None:
    chosen = next((r.lam0 for r in result.reports if r.name == result.sweep_layer), None)
    plot_lambda_sweep(result.sweep["lam0"], result.sweep["out_err"], result.sweep["q_ratio"],
                      paths["vrc_lambda.png"],
                      layer=f"{result.sweep_layer} (W{result.sweep_bits})", chosen_lam0=chosen)
  else:
    del paths["vrc_lambda.png"]
  return paths


def unseen_quantizers(model: nnx.Module) -> List[str]:
  """Paths of the quantizers of `model` that have not run on any batch (`count` == 0)."""
  from qsam2_jax.quant.quantizers import Quantizer
  return ["/".join(map(str, path)) for path, node in nnx.iter_graph(model)
          if isinstance(node, Quantizer) and int(jax.device_get(node.count[...])) == 0]


def require_calibrated(model: nnx.Module, what: str = "range calibration") -> None:
  """Raises `UserError` listing the quantizers that saw no data after `what`.

  A quantizer without data would fall back to the batch statistics (or a data-blind range) in
  evaluation: never silently.
  """
  unseen = unseen_quantizers(model)
  if unseen:
    shown = ", ".join(unseen[:40]) + (f", ... ({len(unseen) - 40} more)" if len(unseen) > 40
                                      else "")
    raise UserError(f"{len(unseen)} quantizer(s) saw no data in {what}: {shown}")


# ------------------------------------------------------------------------------ PTQ


def split_method(method: str) -> Tuple[bool, str]:
  """'vrc+mse' -> (True, 'mse'); 'minmax' -> (False, 'minmax')."""
  if method not in PTQ_METHODS:
    raise UserError(f"unknown PTQ method {method!r}; expected one of {', '.join(PTQ_METHODS)}")
  vrc, _, base = method.rpartition("+")
  return bool(vrc), base


def calibrate_ranges(model: nnx.Module, images: np.ndarray, *, batch_size: int = 4,
                     progress: bool = True, prompt_seed: int = 0) -> nnx.Module:
  """`quant.calibrate` over `model_outputs` (images + `make_prompts`), then evaluation mode.

  Statistics / ranges become the mean over the batches and learnable factors their
  data-dependent init (MSE-optimal; LSQ: `lsq_init`). The compiled step is shared across
  calls (module-level jit).
  """
  set_mode(model, "calibrate")
  commit_state(model)
  for batch in _progress(batches(images, batch_size, prompt_seed), "range calibration",
                         progress):
    jax.block_until_ready(_outputs_jit(model, batch))
  return set_mode(model, "eval")


def ptq(model: nnx.Module, recipe: QuantRecipe, images: np.ndarray, *, batch_size: int = 4,
        progress: bool = True, prompt_seed: int = 0) -> QuantReport:
  """Post-training quantization in place: `recipe.apply`, range calibration, evaluation mode.

  No gradient steps. Run `run_vrc` first for VRC + PTQ. Memory-path layers (memory attention
  and encoder) see no calibration batch on the image path; their activation quantizers use the
  current batch's range until they do (quantizers' documented fallback).
  """
  _, report = recipe.apply(model)
  calibrate_ranges(model, images, batch_size=batch_size, progress=progress,
                   prompt_seed=prompt_seed)
  return report

"""The QAT run configuration: one frozen dataclass, full-scale defaults and a `smoke` variant.

  python -m train.qat --bits 2                                   # smoke: embedded model and data
  python -m train.qat --bits 2 --init ckpt/fp --data /data/sa1b --out runs/w2a2   # full defaults

`TrainConfig()` holds the defaults of a real run; `TrainConfig.smoke()` those used when neither
`--init` nor `--data` is given (the embedded random SAM2.1-t at 256² and a synthetic dataset), so
that the bare command finishes on a laptop CPU in minutes. Explicit flags override either.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Union

from qsam2_jax.cli import DTYPE_SPELLINGS, DTYPES
from qsam2_jax.errors import UserError
from qsam2_jax.quant.recipe import (
  ACT_BITS,
  METHOD_ALIASES,
  OPTION_FLAGS,
  PRESETS,
  TRAIN_METHODS,
  QuantRecipe,
)
from qsam2_jax.quant.recipe import TARGET_BITS as BITS

METHODS = tuple(TRAIN_METHODS) + tuple(METHOD_ALIASES)   # `--method` choices, aliases included
# `--method` -> `QuantRecipe.method`.
RECIPE_METHOD = {name: q for name, (q, _) in TRAIN_METHODS.items() if q is not None}
_RECIPE = QuantRecipe()  # the defaults of the quantizer options


def fit_batch(flag: str, b: int, devices: int, processes: int = 1) -> int:
  """`b` if it splits over the devices and processes, else an error naming sizes that would."""
  unit = math.lcm(devices, processes)
  if b % unit:
    down, up = b // unit * unit, -(-b // unit) * unit
    fits = f"{down} or {up}" if down else f"{up}"
    raise UserError(f"{flag} {b} does not fit {devices} device(s) in {processes} "
                    f"process(es): it must be a multiple of {unit}; use {flag} {fits}")
  return b


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every choice of a QAT run (flags of `python -m train.qat`; see its `--help`)."""
  # What is trained.
  bits: int = 4
  act_bits: Optional[int] = None  # None: = bits
  method: str = "qsam2"
  preset: str = "paper"
  high_bits: int = 8
  init: Optional[str] = None  # Orbax dir or .pt; None: the embedded default
  data: Optional[str] = None  # COCO JSON/folder or SA-1B folder; None: synthetic
  val_data: Optional[str] = None  # None: held out from `data` (synthetic: a second set)
  image_size: Optional[int] = None  # None: the checkpoint's
  dtype: str = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
  # Quantizer options: `QuantRecipe` fields of the same names (recipe.OPTION_FLAGS).
  high_act_bits: Optional[int] = None
  weight_granularity: str = _RECIPE.weight_granularity
  act_granularity: str = _RECIPE.act_granularity
  act_range: Optional[str] = None
  restricted: bool = _RECIPE.restricted
  ema_momentum: float = _RECIPE.ema_momentum
  factor_momentum: Optional[float] = None
  grad_scale: bool = _RECIPE.grad_scale
  search_points: int = _RECIPE.search_points
  lsq_init: str = _RECIPE.lsq_init
  pact_l2: float = _RECIPE.pact_l2
  attn_bits: Optional[int] = None
  softmax_bits: Optional[int] = None
  # VRC (method qsam2) and range calibration.
  vrc_lambda: Union[float, str] = 3e-3  # a number, "auto" or "off"
  vrc_lambda_mode: str = "relative"
  vrc_images: int = 16
  calib_images: int = 16
  calib_clips: int = 8  # range calibration over clips (memory path); 0: image batches only
  # Video clips (SAM2's training forward, train/clip_forward.py).
  video_data: Optional[str] = None  # DAVIS / SA-V folder; None: synthetic videos
  video_frames: int = 8  # T, frames per clip (SAM2: 8)
  video_objects: int = 3  # N, objects per clip (SAM2: 3)
  video_ratio: Optional[float] = None  # share of clip steps; None: 0.5 with videos (below)
  video_batch_size: Optional[int] = None  # clips per clip step; None: `video_batch`
  correction_clicks: int = 7  # SAM2's num_correction_pt_per_frame
  # Optimization.
  steps: int = 5000
  batch_size: int = 16  # global, over all processes
  masks_per_image: int = 8
  box_prob: float = 0.5  # share of masks prompted by their box (else clicks), train and eval
  lr: float = 1e-5
  vision_lr: Optional[float] = None  # the image encoder's weights; None: `lr`
  clip_lr: float = 1e-3
  weight_decay: float = 0.01
  warmup_steps: Optional[int] = None  # None: 5 % of the steps
  grad_clip: float = 1.0
  distill: float = 0.0
  remat: bool = False  # recompute encoder blocks, frames and clicks in the backward pass
  # Parallelism.
  mesh: Optional[str] = None  # "data=N,fsdp=M"; None: all devices on data
  distributed: str = "auto"
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  # Checkpoints, evaluation, logs.
  out: Optional[str] = None
  resume: bool = False
  overwrite: bool = False
  save_every: int = 500
  keep: int = 3
  eval_every: int = 500
  eval_images: int = 64
  eval_batch_size: Optional[int] = None  # None: --batch-size (fits the mesh; see batch_sizes)
  log_every: int = 10
  seed: int = 0
  data_threads: int = 4
  progress: bool = True

  @classmethod
  def smoke(cls, **overrides: Any) -> "TrainConfig":
    """The embedded-default variant: a few steps of SAM2.1-t at 256² on CPU.

    float32 compute: CPUs emulate bfloat16 matmuls, which is slower, not faster.
    """
    small = dict(steps=4, batch_size=2, masks_per_image=4, vrc_images=4, calib_images=4,
                 calib_clips=2, video_frames=3,
                 eval_images=8, save_every=4, eval_every=0, log_every=1,
                 dtype="float32", lr=1e-4, clip_lr=1e-3, data_threads=2)
    return cls(**{**small, **overrides})

  def __post_init__(self):
    # One spelling inside: aliases of methods and dtypes resolve here.
    object.__setattr__(self, "method", METHOD_ALIASES.get(self.method, self.method))
    object.__setattr__(self, "dtype", DTYPE_SPELLINGS.get(self.dtype, self.dtype))
    if self.bits not in BITS:
      raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
    if self.act_bits is not None and self.act_bits not in ACT_BITS:
      raise UserError(f"--act-bits must be one of {', '.join(map(str, ACT_BITS))}, got "
                      f"{self.act_bits}")
    if self.method not in METHODS:
      raise UserError(f"unknown --method {self.method!r}; expected one of {', '.join(METHODS)}")
    if self.preset not in PRESETS:
      raise UserError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
    if self.dtype not in DTYPES:
      raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
    lam = self.vrc_lambda
    if not (lam in ("auto", "off") or (isinstance(lam, (int, float)) and math.isfinite(lam)
                                       and lam >= 0)):
      raise UserError(f"--vrc-lambda must be a non-negative number, 'auto' or 'off', got {lam!r}")
    if self.vrc_lambda_mode not in ("relative", "absolute"):
      raise UserError(f"--vrc-lambda-mode must be relative or absolute, got "
                      f"{self.vrc_lambda_mode!r}")
    for name in ("steps", "batch_size", "masks_per_image", "vrc_images", "calib_images", "keep",
                 "log_every", "data_threads"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} must be at least 1, got "
                        f"{getattr(self, name)}")
    for name in ("video_frames", "video_objects"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} must be at least 1, got "
                        f"{getattr(self, name)}")
    if self.video_batch_size is not None and self.video_batch_size < 1:
      raise UserError("--video-batch-size must be at least 1")
    r = self.video_ratio
    if r is not None and not (math.isfinite(r) and 0.0 <= r <= 1.0):
      raise UserError(f"--video-ratio must be in [0, 1], got {r}")
    if self.clip_ratio > 0 and self.video_frames < 2:
      raise UserError(f"--video-frames {self.video_frames}: a clip step needs at least 2 frames "
                      "(the memory path runs from the second); use --video-ratio 0 for image "
                      "steps only")
    for name in ("save_every", "eval_every", "eval_images", "calib_clips", "correction_clicks"):
      if getattr(self, name) < 0:
        raise UserError(f"--{name.replace('_', '-')} must be at least 0")
    for name in ("lr", "vision_lr", "clip_lr", "weight_decay", "grad_clip", "distill"):
      v = getattr(self, name)
      if v is None:
        continue
      if not (math.isfinite(v) and v >= 0):
        raise UserError(f"--{name.replace('_', '-')} must be a non-negative number, got {v}")
    if not 0.0 <= self.box_prob <= 1.0:
      raise UserError(f"--box-prob must be in [0, 1], got {self.box_prob}")
    if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
      raise UserError(f"--warmup-steps must be in [0, --steps], got {self.warmup_steps}")
    if self.eval_batch_size is not None and self.eval_batch_size < 1:
      raise UserError("--eval-batch-size must be at least 1")
    if self.image_size is not None and (self.image_size < 64 or self.image_size % 32):
      raise UserError(f"--image-size must be a multiple of 32, at least 64, got "
                      f"{self.image_size}")
    if self.method == "fp" and self.distill > 0:
      raise UserError("--distill needs a quantized student (the teacher is the FP model)")
    self.recipe()  # checks the quantizer options (one error naming the flag)

  # ------------------------------------------------------------------ derived values

  def batch_sizes(self, devices: int, processes: int = 1) -> tuple[int, int]:
    """(training, evaluation) global batch sizes on a mesh of `devices` in `processes`.

    Every batch is split over all devices, and each process feeds its share, so both must be
    multiples of lcm(devices, processes). The evaluation batch defaults to the training one
    (which fits, or this raises); an explicit flag that does not fit is an error naming the
    nearest sizes that would.
    """
    def check(flag: str, b: int) -> int:
      return fit_batch(flag, b, devices, processes)

    train = check("--batch-size", self.batch_size)
    evaluation = train if self.eval_batch_size is None else check("--eval-batch-size",
                                                                  self.eval_batch_size)
    return train, evaluation

  @property
  def quantized(self) -> bool:
    return self.method != "fp"

  @property
  def use_vrc(self) -> bool:
    return TRAIN_METHODS[self.method][1] and self.vrc_lambda != "off"

  @property
  def tag(self) -> str:
    """Short run name: `w2a2-qsam2-paper`, `fp`."""
    if not self.quantized:
      return "fp"
    a = self.bits if self.act_bits is None else self.act_bits
    return f"w{self.bits}a{a}-{self.method}-{self.preset}"

  @property
  def clip_ratio(self) -> float:
    """The share of clip steps: --video-ratio, else 0.5 when videos come with the data (given
    with --video-data, or the embedded default's synthetic videos) and 0 beside --data alone."""
    if self.video_ratio is not None:
      return self.video_ratio
    return 0.5 if (self.video_data is not None or self.data is None) else 0.0

  def is_clip_step(self, step: int) -> bool:
    """Step `step` (0-based) is a clip step: floor(step·r) moves (the first step is one for
    r > 0, then evenly spread; a pure function of the step, so resuming keeps the pattern)."""
    r = self.clip_ratio
    return r > 0 and math.floor(step * r + 1e-9) != math.floor((step - 1) * r + 1e-9)

  def video_batch(self, devices: int, processes: int = 1) -> int:
    """Clips per clip step: --video-batch-size (which must fit, like `batch_sizes`), else about
    as many frames as an image batch (batch_size // video_frames), at least one, rounded up to
    a multiple of lcm(devices, processes)."""
    if self.video_batch_size is not None:
      return fit_batch("--video-batch-size", self.video_batch_size, devices, processes)
    unit = math.lcm(devices, processes)
    n = max(1, self.batch_size // self.video_frames)
    return -(-n // unit) * unit

  @property
  def warmup(self) -> int:
    return (max(1, round(0.05 * self.steps)) if self.warmup_steps is None
            else self.warmup_steps)

  def recipe(self):
    """The `QuantRecipe` of this run (None for `fp`)."""
    if not self.quantized:
      return None
    return QuantRecipe(bits=self.bits, act_bits=self.act_bits, method=RECIPE_METHOD[self.method],
                       preset=self.preset, **{k: getattr(self, k) for k in OPTION_FLAGS})

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

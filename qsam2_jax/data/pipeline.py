"""Grain input pipeline for QAT: deterministic, sharded per process, checkpointable.

The stream is a pure function of (seed, position):

  position g = 0, 1, 2, ...   (global: the same on every process)
  record     = shuffle_epoch(g // n)(g % n)       Grain's index shuffle, reseeded per epoch
  element    = make_example(source[record], rng=default_rng([seed, g]))

Global batch t is positions [t·B, (t+1)·B). Process p of n takes the contiguous rows
[p·B/n, (p+1)·B/n) of it, so the rows `jax.make_array_from_process_local_data` assembles are
exactly the global batch in order, whatever the number of processes (and each element's
augmentation depends on its position only). Iterator state is one position (`get_state()` /
`set_state()`, or `save_args` / `restore_args` inside an Orbax `Composite`).

Only this module imports Grain (an optional dependency for everything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import grain
import numpy as np

from qsam2_jax.data import coco, prompts, transforms

_STREAM = 0x5A3  # separates the element RNG from other uses of the same seed


@dataclass(frozen=True)
class DataConfig:
  """Geometry, augmentation, prompting and reading options of the training input."""
  image_size: int = 1024
  mask_size: Optional[int] = None  # GT mask side; None = image_size (SAM2 supervises full res)
  resize_mode: str = "square"  # or "longest" (keep aspect, pad); see transforms.py
  hflip_prob: float = 0.5
  prompts: prompts.PromptConfig = field(default_factory=prompts.PromptConfig)
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None  # None: repeat forever (training runs by steps)
  num_threads: int = 4  # Grain read threads (per process)
  prefetch_buffer_size: int = 4  # batches read ahead
  worker_count: int = 0  # > 0: decode in that many worker processes (mp_prefetch)

  @property
  def gt_size(self) -> int:
    return self.image_size if self.mask_size is None else self.mask_size

  def __post_init__(self):
    if self.resize_mode not in transforms.RESIZE_MODES:
      raise ValueError(f"resize_mode must be one of {transforms.RESIZE_MODES}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def element_rng(seed: int, position: int) -> np.random.Generator:
  """The RNG of the element at global stream position `position`."""
  return np.random.default_rng([seed, _STREAM, position])


def make_example(example: coco.Example, rng: np.random.Generator, cfg: DataConfig) -> dict:
  """Decoded record -> fixed-shape training element (numpy).

  Up to K = `cfg.prompts.max_masks` annotations are drawn at random; masks that vanish at the
  model or GT resolution are skipped; the rest of the K rows are zero with `valid = False`.

  Returns:
    image (S, S, 3) float32; point_coords (K, P, 2) float32; point_labels (K, P) int32;
    boxes (K, 4) float32 xyxy; use_box (K,) bool; gt_masks (K, G, G) bool; valid (K,) bool;
    index () int32 (the record). S = image_size, G = gt_size, P = prompts.num_points.
  """
  pc, s, g = cfg.prompts, cfg.image_size, cfg.gt_size
  k, p = pc.max_masks, pc.num_points
  flip = bool(rng.random() < cfg.hflip_prob)
  image = transforms.hflip(example.image) if flip else example.image
  out = {
      "image": transforms.resize_image(image, s, cfg.resize_mode),
      "point_coords": np.zeros((k, p, 2), np.float32),
      "point_labels": np.full((k, p), prompts.PAD_LABEL, np.int32),
      "boxes": np.zeros((k, 4), np.float32),
      "use_box": np.zeros((k,), bool),
      "gt_masks": np.zeros((k, g, g), bool),
      "valid": np.zeros((k,), bool),
      "index": np.int32(example.index),
  }
  row = 0
  for j in prompts.candidate_order(example.areas, rng, pc.min_area):
    if row == k:
      break
    mask = example.decode_mask(int(j))
    if flip:
      mask = transforms.hflip(mask)
    at_s = transforms.resize_mask(mask, s, cfg.resize_mode)
    at_g = at_s if g == s else transforms.resize_mask(mask, g, cfg.resize_mode)
    if not (at_s.any() and at_g.any()):  # vanished: no prompt, or a GT saying "absent"
      continue
    pr = prompts.sample_prompts(at_s, rng, pc)
    out["point_coords"][row] = pr["point_coords"]
    out["point_labels"][row] = pr["point_labels"]
    out["boxes"][row] = pr["box"]
    out["use_box"][row] = pr["use_box"]
    out["gt_masks"][row] = at_g
    out["valid"][row] = True
    row += 1
  return out


def batch_shapes(batch_size: int, cfg: DataConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of a batch of `batch_size` elements (for abstract tracing)."""
  k, p, s, g = cfg.prompts.max_masks, cfg.prompts.num_points, cfg.image_size, cfg.gt_size
  b = batch_size
  return {
      "image": ((b, s, s, 3), np.float32), "point_coords": ((b, k, p, 2), np.float32),
      "point_labels": ((b, k, p), np.int32), "boxes": ((b, k, 4), np.float32),
      "use_box": ((b, k), np.bool_), "gt_masks": ((b, k, g, g), np.bool_),
      "valid": ((b, k), np.bool_), "index": ((b,), np.int32),
  }


class _MakeElement:
  """Picklable `map_with_index` transform (worker processes get a copy)."""

  def __init__(self, source: Sequence[coco.Example], cfg: DataConfig):
    self.source, self.cfg = source, cfg

  def __call__(self, position: int, record: int) -> dict:
    return make_example(self.source[int(record)], element_rng(self.cfg.seed, position), self.cfg)


def shard_info(shard_index: Optional[int] = None, shard_count: Optional[int] = None
               ) -> tuple[int, int]:
  """(index, count) of this process; defaults from `ShardByJaxProcess` (call it after
  `jax.distributed.initialize`, which it reads)."""
  if shard_index is None and shard_count is None:
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return opts.shard_index, opts.shard_count
  if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  return shard_index, shard_count


def make_dataset(source: Sequence[coco.Example], global_batch_size: int, cfg: DataConfig, *,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None
                 ) -> grain.IterDataset:
  """This process's stream of batches of `global_batch_size // shard_count` elements.

  Args:
    source: a reader (`coco.CocoSource`, `coco.SA1BSource`, or any sequence of `Example`s).
    global_batch_size: rows per step over all processes; must divide by the process count.
    cfg: data options (seed, sizes, prompts, threads).
    shard_index, shard_count: this process's slot (default: the JAX process index / count).

  Returns:
    A Grain `IterDataset` of dicts shaped as `batch_shapes(global_batch_size // shard_count)`.
  """
  index, count = shard_info(shard_index, shard_count)
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"the global batch size ({global_batch_size}) must be a positive multiple "
                     f"of the number of processes ({count})")
  local = global_batch_size // count
  n = len(source)
  if n == 0:
    raise ValueError("the dataset is empty")
  ds = grain.MapDataset.range(n)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)  # a different permutation per epoch (seed + epoch)
  ds = ds.repeat(cfg.num_epochs)
  if cfg.num_epochs is not None:  # whole global batches only, or processes would disagree
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
    if len(ds) == 0:
      raise ValueError(f"{n} images x {cfg.num_epochs} epochs make no batch of "
                       f"{global_batch_size}")
  ds = ds.map_with_index(_MakeElement(source, cfg))
  ds = ds.batch(local, drop_remainder=True)
  ds = ds[index::count]  # batch t of this process = rows [index·local, ...) of global batch t
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                            prefetch_buffer_size=cfg.prefetch_buffer_size))
  if cfg.worker_count > 0:
    from absl import flags  # Grain's worker setup reads absl flags; outside absl.app they are
    if not flags.FLAGS.is_parsed():  # unparsed and every read raises: use their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return it


def make_iterator(source: Sequence[coco.Example], global_batch_size: int, cfg: DataConfig, *,
                  shard_index: Optional[int] = None, shard_count: Optional[int] = None
                  ) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: `next()` gives numpy batches; `get_state()` / `set_state()`."""
  return iter(make_dataset(source, global_batch_size, cfg, shard_index=shard_index,
                           shard_count=shard_count))


def save_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax v0 save arg for the iterator (`ocp.args.Composite(data=save_args(it), ...)`); Grain
  writes one small JSON per process (`process_<i>-of-<n>.json`)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax v0 restore arg: restores *in place* into a fresh iterator of the same pipeline. The
  process count must match the saved one (restart from a step-derived position otherwise)."""
  return grain.checkpoint.CheckpointRestore(iterator)

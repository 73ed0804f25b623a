"""Video clips for SAM2-style training: readers, clip sampling and a checkpointable Grain pipeline.

A *video source* is any sequence of `Video`s (`len`, indexing). A `Video` has a name, a number of
(annotated) frames, `frame(i)` -> (H, W, 3) uint8 and `masks(i)` -> {object id: (H, W) bool}.
Provided sources:

- `FolderVideos(root)`: DAVIS / SA-V folders. Frames are `JPEGImages/<video>/*.jpg` (DAVIS'
  `480p` sub-folders are used when present); ground truth, per video, one of
  - `Annotations/<video>/<frame>.png`: palette / grayscale PNGs of object ids (DAVIS; 0 is
    background, 255 void);
  - `Annotations/<video>/<object>/<frame>.png`: one binary PNG per object (SA-V, PNG form);
  - `Annotations/<video>_manual.json` (or `<video>.json`): SA-V's RLE masklets, one list of
    per-object COCO RLEs (or null) per annotated frame, every `frames_fps / fps`-th JPEG frame.
  Only annotated frames are used (SAM2's `rm_unannotated`).
- `SyntheticVideos`: the synthetic DAVIS-style videos of `qsam2_jax.data.synthetic`, generated on
  demand (the embedded default; no files needed).

Clip sampling follows SAM2's `RandomUniformSampler`: T consecutive annotated frames from a random
start, optionally reversed in time, objects drawn among those visible in the clip's first frame
(up to N; fewer are padded with `valid = False`). The clip is flipped left-right as a whole with
`hflip_prob`, frames square-resized to S (bilinear, antialiased) and masks like the image path's.

The Grain pipeline mirrors `qsam2_jax.data.pipeline` (same stream-position RNG, sharding per
process and iterator state), yielding batches of `images` (B, T, S, S, 3) uint8, `masks`
(B, T, N, S, S) bool, `valid` (B, N) bool and `index` (B,) int32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from qsam2_jax.data import transforms
from qsam2_jax.data.davis import read_label_png
from qsam2_jax.errors import UserError

_STREAM = 0xC11  # separates the clip RNG from the image pipeline's
MAX_RETRIES = 100  # starts tried for a first frame with a visible object (SAM2's value)
VOID_LABEL = 255


class VideoDataError(UserError):
  """A video folder that does not have the expected layout: says where and what is missing."""


class Video(Protocol):
  name: str

  def __len__(self) -> int: ...

  def frame(self, i: int) -> np.ndarray: ...

  def masks(self, i: int) -> Dict[int, np.ndarray]: ...


# ------------------------------------------------------------------------------ folders


def _read_png(path: str) -> np.ndarray:
  return read_label_png(path, VideoDataError)


def _jpegs(folder: str) -> Dict[str, str]:
  return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
          if os.path.splitext(n)[1].lower() in (".jpg", ".jpeg")}


def _stems(folder: str) -> List[str]:
  return sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.lower().endswith(".png"))


@dataclass(frozen=True)
class FolderVideo:
  """One video of a `FolderVideos` root (picklable: paths only, decoded on access).

  kind: "palette" (DAVIS), "objects" (SA-V PNG folders) or "rle" (SA-V JSON).
  frames: JPEG path of each annotated frame. ann: per annotated frame, the PNG path (palette),
  the annotation folder (objects) or the masklet index (rle).
  """
  name: str
  kind: str
  frames: tuple
  ann: tuple
  objects: tuple = ()  # objects: (id, folder) pairs; rle: the JSON path as a 1-tuple

  def __len__(self) -> int:
    return len(self.frames)

  def frame(self, i: int) -> np.ndarray:
    with Image.open(self.frames[i]) as img:
      return np.asarray(img.convert("RGB"))

  def masks(self, i: int) -> Dict[int, np.ndarray]:
    if self.kind == "palette":
      labels = _read_png(self.ann[i])
      if labels.ndim != 2:
        raise VideoDataError(f"{self.ann[i]}: expected a 2-D label map, got {labels.shape}")
      return {int(k): labels == k for k in np.unique(labels) if k not in (0, VOID_LABEL)}
    if self.kind == "objects":
      stem = self.ann[i]
      out = {}
      for obj, folder in self.objects:
        path = os.path.join(folder, stem + ".png")
        if os.path.exists(path):
          out[obj] = _read_png(path) != 0
      return out
    from qsam2_jax.data import rle
    masklet = _render(_load_json, self.objects[0])["masklet"][self.ann[i]]
    out = {}
    for obj, segm in enumerate(masklet):
      if segm is not None:
        h, w = segm["size"]
        out[obj] = rle.decode(segm, h, w).astype(bool)
    return out


def _load_json(path: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise VideoDataError(f"{path}: cannot read this JSON: {e}") from e
  if isinstance(data, list):
    data = {"masklet": data}
  key = "masklet" if "masklet" in data else "masks"
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise VideoDataError(f"{path}: expected SA-V masklets: a list, or a dict with 'masklet' "
                         "(one list of per-object RLEs per annotated frame)")
  data["masklet"] = data[key]
  return data


def _index_video(jpeg_root: str, ann_root: str, name: str, frames_fps: int) -> FolderVideo:
  frames_dir = os.path.join(jpeg_root, name)
  jpegs = _jpegs(frames_dir)
  if not jpegs:
    raise VideoDataError(f"video {name!r}: no JPEG frames in {frames_dir}")
  ann_dir = os.path.join(ann_root, name)
  for json_path in (os.path.join(ann_root, name + "_manual.json"),
                    os.path.join(ann_root, name + ".json")):
    if os.path.isfile(json_path):
      data = _load_json(json_path)
      fps = data.get("fps")
      fps = int(fps[0] if isinstance(fps, list) else fps) if fps else frames_fps
      if frames_fps % fps:
        raise VideoDataError(f"{json_path}: annotation fps {fps} does not divide the frame rate "
                             f"{frames_fps}")
      every = frames_fps // fps
      frames, ann = [], []
      for k, objs in enumerate(data["masklet"]):
        stem = f"{k * every:05d}"
        if objs is not None and None not in objs and stem in jpegs:
          frames.append(jpegs[stem])
          ann.append(k)
      return FolderVideo(name, "rle", tuple(frames), tuple(ann), (json_path,))
  if not os.path.isdir(ann_dir):
    raise VideoDataError(f"video {name!r} has no annotations: no folder {ann_dir} and no "
                         f"{name}_manual.json in {ann_root}")
  pngs = _stems(ann_dir)
  if pngs:
    stems = [s for s in pngs if s in jpegs]
    return FolderVideo(name, "palette", tuple(jpegs[s] for s in stems),
                       tuple(os.path.join(ann_dir, s + ".png") for s in stems))
  objects = []
  for d in sorted(os.listdir(ann_dir)):
    folder = os.path.join(ann_dir, d)
    if os.path.isdir(folder):
      try:
        objects.append((int(d), folder))
      except ValueError:
        raise VideoDataError(f"video {name!r}: {folder} is not an object folder (SA-V names "
                             "them by object id, e.g. 000, 001)") from None
  if not objects:
    raise VideoDataError(f"video {name!r} has no annotations: no PNG and no object folder in "
                         f"{ann_dir}")
  stems = sorted(set().union(*(_stems(f) for _, f in objects)) & set(jpegs))
  return FolderVideo(name, "objects", tuple(jpegs[s] for s in stems), tuple(stems),
                     tuple(objects))


class FolderVideos:
  """DAVIS / SA-V videos under `root` (module docstring), sorted by name.

  Args:
    root: dataset folder with `JPEGImages/` and `Annotations/`.
    videos: names to use (default: every folder of `JPEGImages/`).
    frames_fps: frame rate of the JPEGs (SA-V JSON annotations give their own fps).
  """

  def __init__(self, root: str | os.PathLike, videos: Optional[Sequence[str]] = None,
               frames_fps: int = 24):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise VideoDataError(f"video data not found: {root}")
    jpeg, ann = os.path.join(root, "JPEGImages"), os.path.join(root, "Annotations")
    missing = [d for d in (jpeg, ann) if not os.path.isdir(d)]
    if missing:
      raise VideoDataError(f"{root}: expected JPEGImages/<video>/*.jpg and Annotations/ (DAVIS / "
                           f"SA-V layout); missing {', '.join(missing)}")
    if os.path.isdir(os.path.join(jpeg, "480p")) and os.path.isdir(os.path.join(ann, "480p")):
      jpeg, ann = os.path.join(jpeg, "480p"), os.path.join(ann, "480p")
    names = sorted(d for d in os.listdir(jpeg) if os.path.isdir(os.path.join(jpeg, d))) \
        if videos is None else list(videos)
    if not names:
      raise VideoDataError(f"no video folders in {jpeg}")
    self.root = root
    self.videos = [_index_video(jpeg, ann, n, frames_fps) for n in names]

  def __len__(self) -> int:
    return len(self.videos)

  def __getitem__(self, i: int) -> FolderVideo:
    return self.videos[i]


# ------------------------------------------------------------------------------ synthetic


@dataclass(frozen=True)
class SyntheticVideo:
  """A video of `synthetic.synth_video`, rendered on first access (per process)."""
  seed: int
  index: int
  num_frames: int
  size: tuple

  @property
  def name(self) -> str:
    return f"synth_{self.index:04d}"

  def _video(self):
    from qsam2_jax.data import synthetic
    return _render(synthetic.synth_video, self.seed, self.index, self.num_frames, self.size)

  def __len__(self) -> int:
    return self.num_frames

  def frame(self, i: int) -> np.ndarray:
    return self._video().frames[i]

  def masks(self, i: int) -> Dict[int, np.ndarray]:
    labels = self._video().labels[i]
    return {int(k): labels == k for k in np.unique(labels) if k != 0}


_CACHE: Dict[tuple, Any] = {}


def _render(fn, *args):
  """A tiny per-process cache: a clip reads every frame of one video in a row."""
  if args not in _CACHE:
    if len(_CACHE) >= 4:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[args] = fn(*args)
  return _CACHE[args]


class SyntheticVideos:
  """`num_videos` synthetic videos of `num_frames` frames (height, width = `size`)."""

  def __init__(self, num_videos: int, num_frames: int, size: Sequence[int] = (256, 256),
               seed: int = 0):
    if num_videos < 1 or num_frames < 1:
      raise ValueError("need num_videos >= 1 and num_frames >= 1")
    self.videos = [SyntheticVideo(seed, i, num_frames, tuple(size)) for i in range(num_videos)]

  def __len__(self) -> int:
    return len(self.videos)

  def __getitem__(self, i: int) -> SyntheticVideo:
    return self.videos[i]


# ------------------------------------------------------------------------------ clips


@dataclass(frozen=True)
class ClipDataConfig:
  """Clip geometry, sampling and reading options."""
  num_frames: int = 8  # T (SAM2: 8)
  max_objects: int = 3  # N (SAM2: 3)
  image_size: int = 1024
  hflip_prob: float = 0.5
  reverse_time_prob: float = 0.0  # SAM2's RandomUniformSampler default
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None
  num_threads: int = 4
  prefetch_buffer_size: int = 2

  def __post_init__(self):
    if self.num_frames < 1 or self.max_objects < 1:
      raise ValueError(f"need num_frames >= 1 and max_objects >= 1: {self}")


def _resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
  img = Image.fromarray(frame)
  return np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)


def make_clip(video: Video, rng: np.random.Generator, cfg: ClipDataConfig, index: int = 0
              ) -> Dict[str, np.ndarray]:
  """One training clip of `video` (module docstring), as fixed-shape numpy arrays."""
  t, n, s = cfg.num_frames, cfg.max_objects, cfg.image_size
  if len(video) < t:
    raise VideoDataError(f"video {video.name!r} has {len(video)} annotated frames, fewer than "
                         f"the {t} of a clip")
  for _ in range(MAX_RETRIES):
    start = int(rng.integers(0, len(video) - t + 1))
    order = list(range(start, start + t))
    if rng.random() < cfg.reverse_time_prob:
      order = order[::-1]
    first = video.masks(order[0])
    visible = sorted(k for k, m in first.items() if m.any())
    if visible:
      break
  else:
    raise VideoDataError(f"video {video.name!r}: no object visible in the first frame of any "
                         f"of {MAX_RETRIES} sampled clips")
  objs = [visible[i] for i in rng.choice(len(visible), min(n, len(visible)), replace=False)]
  flip = bool(rng.random() < cfg.hflip_prob)
  images = np.zeros((t, s, s, 3), np.uint8)
  masks = np.zeros((t, n, s, s), bool)
  for j, f in enumerate(order):
    frame = video.frame(f)
    per_obj = first if j == 0 else video.masks(f)
    if flip:
      frame = transforms.hflip(frame)
    images[j] = _resize_frame(frame, s)
    for k, obj in enumerate(objs):
      m = per_obj.get(obj)
      if m is None:
        continue  # not annotated here: absent
      if m.shape != frame.shape[:2]:
        raise VideoDataError(f"video {video.name!r} frame {f}: mask of object {obj} is "
                             f"{m.shape}, the frame {frame.shape[:2]}")
      masks[j, k] = transforms.resize_mask(transforms.hflip(m) if flip else m, s)
  valid = np.zeros((n,), bool)
  valid[:len(objs)] = True
  return {"images": images, "masks": masks, "valid": valid, "index": np.int32(index)}


def batch_shapes(batch_size: int, cfg: ClipDataConfig) -> Dict[str, tuple]:
  """{key: (shape, dtype)} of a clip batch (for abstract tracing)."""
  b, t, n, s = batch_size, cfg.num_frames, cfg.max_objects, cfg.image_size
  return {"images": ((b, t, s, s, 3), np.uint8), "masks": ((b, t, n, s, s), np.bool_),
          "valid": ((b, n), np.bool_), "index": ((b,), np.int32)}


def element_rng(seed: int, position: int) -> np.random.Generator:
  return np.random.default_rng([seed, _STREAM, position])


class _MakeClip:
  """Picklable `map_with_index` transform."""

  def __init__(self, source: Sequence[Video], eligible: Sequence[int], cfg: ClipDataConfig):
    self.source, self.eligible, self.cfg = source, list(eligible), cfg

  def __call__(self, position: int, record: int) -> Dict[str, np.ndarray]:
    i = self.eligible[int(record)]
    return make_clip(self.source[i], element_rng(self.cfg.seed, position), self.cfg, i)


def make_dataset(source: Sequence[Video], global_batch_size: int, cfg: ClipDataConfig, *,
                 shard_index: Optional[int] = None, shard_count: Optional[int] = None):
  """This process's stream of clip batches (`global_batch_size // shard_count` clips each).

  Videos with fewer than T annotated frames are skipped (an error if none is left). The stream
  is a pure function of (seed, position) like the image pipeline's; the iterator's state
  (`get_state` / `set_state`, or `pipeline.save_args`) is one position.
  """
  import grain

  from qsam2_jax.data.pipeline import shard_info
  index, count = shard_info(shard_index, shard_count)
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"the global batch size ({global_batch_size}) must be a positive multiple "
                     f"of the number of processes ({count})")
  eligible = [i for i in range(len(source)) if len(source[i]) >= cfg.num_frames]
  if not eligible:
    where = getattr(source, "root", type(source).__name__)
    raise VideoDataError(f"{where}: no video has {cfg.num_frames} annotated frames (the clip "
                         f"length); use fewer frames per clip")
  local = global_batch_size // count
  ds = grain.MapDataset.range(len(eligible))
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  if cfg.num_epochs is not None:
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
    if len(ds) == 0:
      raise ValueError(f"{len(eligible)} videos x {cfg.num_epochs} epochs make no batch of "
                       f"{global_batch_size} clips")
  ds = ds.map_with_index(_MakeClip(source, eligible, cfg))
  ds = ds.batch(local, drop_remainder=True)
  ds = ds[index::count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))


def make_iterator(source: Sequence[Video], global_batch_size: int, cfg: ClipDataConfig, *,
                  shard_index: Optional[int] = None, shard_count: Optional[int] = None):
  """`iter(make_dataset(...))`: `next()` gives numpy batches; `get_state()` / `set_state()`."""
  return iter(make_dataset(source, global_batch_size, cfg, shard_index=shard_index,
                           shard_count=shard_count))


def open_videos(path: Optional[str | os.PathLike], *, num_frames: int = 8,
                synthetic_videos: int = 64, synthetic_size: Sequence[int] = (256, 256),
                seed: int = 0) -> Sequence[Video]:
  """`--video-data`: a DAVIS / SA-V folder, or None for synthetic videos (the default)."""
  if path is None:
    return SyntheticVideos(synthetic_videos, max(num_frames, 3), synthetic_size, seed)
  return FolderVideos(path)

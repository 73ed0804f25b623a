"""DAVIS- and SA-V-layout video datasets for evaluation: index the folders, read ground truth.

Layouts (ROOT = the dataset folder):
  davis: ROOT/JPEGImages/<video>/<frame>.jpg and ROOT/Annotations/<video>/<frame>.png, palette
    PNGs holding object ids (0 = background, 255 = void, scored as background). DAVIS' own
    `JPEGImages/480p` / `Annotations/480p` sub-folders are used when present.
  sav: ROOT/JPEGImages/<video>/<frame>.jpg and ROOT/Annotations/<video>/<obj_id:03d>/<frame>.png
    (one binary PNG per object, nonzero = object; SA-V annotates every 4th frame).

`python -m eval.video` scores predictions against what this module reads. The training reader
(`qsam2_jax.data.clips`) samples clips from the same layouts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from PIL import Image

from qsam2_jax.errors import UserError

PROTOCOLS = ("davis", "sav")
VOID_LABEL = 255  # DAVIS "void" pixels: background for scoring, as davis2017-evaluation does

# (T_a, H, W) label maps (davis) or {object id: (T_a, H, W) bool} (sav) over annotated frames.
VideoMasks = Union[np.ndarray, dict[int, np.ndarray]]

class DatasetError(UserError):
  """A dataset folder that does not have the expected layout: says where and what is missing."""


# ------------------------------------------------------------------------------------ dataset


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One video of the dataset.

  frames_dir: its JPEG folder. frame_names: every frame's stem, in playback order.
  annotated: indices (into frame_names) of the frames with ground truth, ascending.
  object_dirs: sav only: {object id: its annotation folder name}.
  """

  name: str
  frames_dir: str
  ann_dir: str
  frame_names: tuple[str, ...]
  annotated: tuple[int, ...]
  object_dirs: tuple[tuple[int, str], ...] = ()


def dataset_dirs(root: str) -> tuple[str, str]:
  """(JPEG root, annotation root) of a dataset, with DAVIS' `480p` sub-folders if present."""
  if not os.path.isdir(root):
    raise DatasetError(f"data root not found: {root}")
  jpeg, ann = os.path.join(root, "JPEGImages"), os.path.join(root, "Annotations")
  missing = [d for d in (jpeg, ann) if not os.path.isdir(d)]
  if missing:
    raise DatasetError(f"{root}: expected JPEGImages/<video>/*.jpg and Annotations/<video>/ "
                       f"(DAVIS / SA-V layout); missing {', '.join(missing)}")
  if os.path.isdir(os.path.join(jpeg, "480p")) and os.path.isdir(os.path.join(ann, "480p")):
    jpeg, ann = os.path.join(jpeg, "480p"), os.path.join(ann, "480p")
  return jpeg, ann


def _frame_names(folder: str) -> list[str]:
  from qsam2_jax.video_io import list_jpeg_frames  # same order as the predictor reads them
  return [os.path.splitext(os.path.basename(p))[0] for p in list_jpeg_frames(folder)]


def _png_stems(folder: str) -> set[str]:
  return {os.path.splitext(n)[0] for n in os.listdir(folder) if n.lower().endswith(".png")}


def _annotated(name: str, where: str, stems: set[str], frame_names: Sequence[str]) -> list[int]:
  index = {s: i for i, s in enumerate(frame_names)}
  stray = sorted(stems - set(index))
  if stray:
    raise DatasetError(f"video {name!r}: annotation {os.path.join(where, stray[0])}.png has no "
                       f"JPEG frame of the same name ({len(stray)} such PNGs)")
  annotated = sorted(index[s] for s in stems)
  if not annotated:
    raise DatasetError(f"video {name!r} has no annotations: no PNG in {where}")
  if annotated[0] != 0:
    raise DatasetError(f"video {name!r}: the first frame ({frame_names[0]}) has no annotation in "
                       f"{where}; its ground truth is the prompt")
  return annotated


def index_video(jpeg_root: str, ann_root: str, name: str, protocol: str) -> VideoItem:
  """Lists one video's frames and annotated frames, checking the layout and the first frame."""
  frames_dir, ann_dir = os.path.join(jpeg_root, name), os.path.join(ann_root, name)
  if not os.path.isdir(frames_dir):
    raise DatasetError(f"video {name!r} not found: no folder {frames_dir}")
  if not os.path.isdir(ann_dir):
    raise DatasetError(f"video {name!r} has no annotations: no folder {ann_dir}")
  frame_names = _frame_names(frames_dir)
  subdirs = sorted(d for d in os.listdir(ann_dir) if os.path.isdir(os.path.join(ann_dir, d)))
  if protocol == "davis":
    stems = _png_stems(ann_dir)
    if not stems and subdirs:
      raise DatasetError(f"video {name!r}: {ann_dir} holds per-object folders, not PNGs; this "
                         "is the SA-V layout (use --protocol sav)")
    item = VideoItem(name, frames_dir, ann_dir, tuple(frame_names),
                     tuple(_annotated(name, ann_dir, stems, frame_names)))
    first = os.path.join(ann_dir, frame_names[0] + ".png")
    _check_size(item, first)
    labels = read_label_png(first)
    if not np.any((labels != 0) & (labels != VOID_LABEL)):
      raise DatasetError(f"video {name!r}: no object in the first frame's annotation {first}, "
                         "nothing to prompt")
    return item
  objects: dict[int, str] = {}
  for d in subdirs:
    try:
      obj = int(d)
    except ValueError:
      raise DatasetError(f"video {name!r}: {os.path.join(ann_dir, d)} is not an object folder "
                         "(SA-V names them by object id, e.g. 000, 001)") from None
    if obj in objects:
      raise DatasetError(f"video {name!r}: folders {objects[obj]} and {d} name the same object")
    objects[obj] = d
  if not objects:
    hint = (" (it holds PNGs directly: the DAVIS layout, use --protocol davis)"
            if _png_stems(ann_dir) else "")
    raise DatasetError(f"video {name!r} has no annotations: no object folder in {ann_dir}{hint}")
  stems: set[str] = set()
  for d in subdirs:
    stems |= _png_stems(os.path.join(ann_dir, d))
  annotated = _annotated(name, ann_dir, stems, frame_names)
  item = VideoItem(name, frames_dir, ann_dir, tuple(frame_names), tuple(annotated),
                   tuple(sorted(objects.items())))
  for d in subdirs:  # every object needs its first-frame PNG: it is the prompt
    first = os.path.join(ann_dir, d, frame_names[0] + ".png")
    if not os.path.exists(first):
      raise DatasetError(f"video {name!r}: object {d} has no first-frame annotation {first}")
    _check_size(item, first)
  return item


def _check_size(item: VideoItem, png: str) -> None:
  """Annotations must have the frames' size (only the image headers are read)."""
  with Image.open(frame_path(item, 0)) as frame, Image.open(png) as ann:
    if frame.size != ann.size:
      raise DatasetError(f"video {item.name!r}: annotation {png} is {ann.size[0]}x{ann.size[1]} "
                         f"but the frames are {frame.size[0]}x{frame.size[1]}")


def video_list(spec: Optional[str]) -> Optional[list[str]]:
  """`a,b,c`, or a text file with one video name a line (like upstream's --video_list_file)."""
  if spec is None:
    return None
  if os.path.isfile(spec):
    with open(spec) as f:
      names = [line.strip() for line in f if line.strip()]
  else:
    names = [v.strip() for v in spec.split(",") if v.strip()]
  if not names:
    raise DatasetError(f"--videos {spec!r} names no video")
  return names


def index_dataset(root: str, protocol: str = "davis", videos: Optional[Sequence[str]] = None,
                  max_videos: Optional[int] = None) -> list[VideoItem]:
  """The videos to evaluate, in order (sorted names unless `videos` gives them)."""
  if protocol not in PROTOCOLS:
    raise DatasetError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  jpeg_root, ann_root = dataset_dirs(root)
  if videos is None:
    names = sorted(d for d in os.listdir(jpeg_root) if os.path.isdir(os.path.join(jpeg_root, d)))
    if not names:
      raise DatasetError(f"no video folders in {jpeg_root}")
  else:
    names = list(videos)
  if max_videos is not None:
    names = names[:max_videos]
  return [index_video(jpeg_root, ann_root, n, protocol) for n in names]


def read_label_png(path: str, error: Optional[type[UserError]] = None) -> np.ndarray:
  """Object ids of a palette or grayscale annotation PNG; `error` (default `DatasetError`) for
  an RGB or unreadable file (the training reader raises its own type)."""
  error = error or DatasetError
  try:
    with Image.open(path) as img:
      if img.mode in ("RGB", "RGBA"):
        raise error(f"{path}: an RGB PNG; expected palette (mode P) or grayscale PNGs "
                    "whose values are object ids")
      return np.array(img)
  except OSError as e:
    raise error(f"{path}: cannot read this PNG: {e}") from e


def load_ground_truth(item: VideoItem, protocol: str) -> VideoMasks:
  """Ground truth on the annotated frames: label maps (davis) or per-object stacks (sav)."""
  if protocol == "davis":
    maps = []
    for t in item.annotated:
      m = read_label_png(os.path.join(item.ann_dir, item.frame_names[t] + ".png"))
      if m.ndim != 2:
        raise DatasetError(f"{item.ann_dir}/{item.frame_names[t]}.png: expected a 2-D label map, "
                           f"got shape {m.shape}")
      m = m.astype(np.uint8 if m.max(initial=0) < 256 else np.int32)
      m[m == VOID_LABEL] = 0
      maps.append(m)
    shapes = {m.shape for m in maps}
    if len(shapes) != 1:
      raise DatasetError(f"video {item.name!r}: annotations of different sizes {sorted(shapes)}")
    return np.stack(maps)
  stacks = {}
  for obj, dirname in item.object_dirs:
    folder = os.path.join(item.ann_dir, dirname)
    frames = []
    for t in item.annotated:
      path = os.path.join(folder, item.frame_names[t] + ".png")
      if os.path.exists(path):
        frames.append(read_label_png(path) != 0)
      else:
        frames.append(None)  # this object is not annotated on this frame: empty
    shape = next(f.shape for f in frames if f is not None)
    stacks[obj] = np.stack([np.zeros(shape, bool) if f is None else f for f in frames])
  shapes = {v.shape for v in stacks.values()}
  if len(shapes) != 1:
    raise DatasetError(f"video {item.name!r}: object annotations of different sizes "
                       f"{sorted(shapes)}")
  return stacks


def first_frame_prompts(gt: VideoMasks, protocol: str) -> dict[int, np.ndarray]:
  """{object id: (H, W) bool} from the first annotated frame (frame 0)."""
  if protocol == "davis":
    first = gt[0]
    return {int(k): first == k for k in np.unique(first) if k != 0}
  return {obj: stack[0] for obj, stack in gt.items()}


# ------------------------------------------------------------------------------------ predict


def frame_path(item: VideoItem, t: int) -> str:
  from qsam2_jax.video_io import JPEG_EXTENSIONS
  for ext in JPEG_EXTENSIONS:
    p = os.path.join(item.frames_dir, item.frame_names[t] + ext)
    if os.path.exists(p):
      return p
  raise DatasetError(f"video {item.name!r}: frame {item.frame_names[t]} disappeared")

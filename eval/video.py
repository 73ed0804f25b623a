"""Semi-supervised video object segmentation: J, F and J&F on DAVIS- or SA-V-layout data.

  python -m eval.video                                   # embedded checkpoint and synthetic videos
  python -m eval.video --ckpt ckpt/fp --data DAVIS --protocol davis [--videos val.txt]
  python -m eval.video --ckpt ckpt/q4 --step 2000 --data sav_val --protocol sav --dtype bf16

The protocol is SAM2's (`tools/vos_inference.py` + the DAVIS / SA-V evaluators): every object's
ground-truth mask on the first frame is the only prompt (`add_new_mask`), the predictor
propagates forward through all frames, the logits are thresholded at 0, and only frames that
have annotations are scored, without the first and the last of them (docs/sam2-port.md §9).

Layouts (ROOT = --data):
  davis: ROOT/JPEGImages/<video>/<frame>.jpg and ROOT/Annotations/<video>/<frame>.png, palette
    PNGs holding object ids (0 = background, 255 = void, scored as background). Objects on the
    first frame are prompted; the returned masks are made non-overlapping (as upstream does for
    palette PNGs) and merged into label maps, the lower id winning ties. DAVIS' own
    `JPEGImages/480p` / `Annotations/480p` sub-folders are used when present.
  sav: ROOT/JPEGImages/<video>/<frame>.jpg and ROOT/Annotations/<video>/<obj_id:03d>/<frame>.png
    (one binary PNG per object, nonzero = object; SA-V annotates every 4th frame). Every object
    folder is prompted with its first-frame PNG; masks may overlap.

Writes into --out: jf.json (dataset means, per video, per object, the run's settings),
jf_per_video.csv, jf_per_object.csv and strips/<video>.png (ground truth vs prediction on a few
annotated frames) for the first --strips videos; fps is propagation frames/s (the first video
includes compilation). Checkpoints are whatever `load_sam2` reads: official `.pt` files and
Orbax directories, FP or quantized.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from eval import metrics, plots
from qsam2_jax.cli import (
  ArgumentParser,
  compute_dtype,
  dtype_name,
  image_size,
  nonnegative_int,
  positive_int,
)
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import write_csv, write_json

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
    labels = _read_png(first)
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
  with Image.open(_frame_path(item, 0)) as frame, Image.open(png) as ann:
    if frame.size != ann.size:
      raise DatasetError(f"video {item.name!r}: annotation {png} is {ann.size[0]}x{ann.size[1]} "
                         f"but the frames are {frame.size[0]}x{frame.size[1]}")


def _video_list(spec: Optional[str]) -> Optional[list[str]]:
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


def _read_png(path: str) -> np.ndarray:
  try:
    with Image.open(path) as img:
      if img.mode in ("RGB", "RGBA"):
        raise DatasetError(f"{path}: an RGB PNG; expected palette (mode P) or grayscale PNGs "
                           "whose values are object ids")
      return np.array(img)
  except OSError as e:
    raise DatasetError(f"{path}: cannot read this PNG: {e}") from e


def load_ground_truth(item: VideoItem, protocol: str) -> VideoMasks:
  """Ground truth on the annotated frames: label maps (davis) or per-object stacks (sav)."""
  if protocol == "davis":
    maps = []
    for t in item.annotated:
      m = _read_png(os.path.join(item.ann_dir, item.frame_names[t] + ".png"))
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
        frames.append(_read_png(path) != 0)
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


def predict_video(predictor: Any, item: VideoItem, prompts: dict[int, np.ndarray],
                  protocol: str) -> tuple[VideoMasks, float]:
  """Prompts frame 0 with the masks, propagates, and keeps the annotated frames' masks.

  Returns:
    (predictions in the ground truth's form, seconds spent in propagation).
  """
  state = predictor.init_state(item.frames_dir)
  for obj, mask in prompts.items():
    if mask.shape != (state.video_height, state.video_width):
      raise DatasetError(f"video {item.name!r}: annotations are {mask.shape[1]}x{mask.shape[0]} "
                         f"but frames are {state.video_width}x{state.video_height}")
    predictor.add_new_mask(state, 0, obj, mask)
  keep = {t: k for k, t in enumerate(item.annotated)}
  h, w = state.video_height, state.video_width
  ids = [int(i) for i in state.obj_ids]
  per_obj = {obj: np.zeros((len(keep), h, w), bool) for obj in ids}
  t0 = time.perf_counter()
  for frame_idx, obj_ids, logits in predictor.propagate_in_video(state):
    k = keep.get(frame_idx)
    if k is None:
      continue
    for i, obj in enumerate(obj_ids):
      per_obj[int(obj)][k] = logits[i, 0] > 0.0
  seconds = time.perf_counter() - t0
  if protocol == "sav":
    return per_obj, seconds
  return to_label_maps(per_obj, (len(keep), h, w)), seconds


def to_label_maps(per_obj: dict[int, np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
  """Merges per-object masks into label maps; the lowest id wins overlaps (as upstream)."""
  dtype = np.uint8 if max(per_obj, default=0) < 256 else np.int32
  labels = np.zeros(shape, dtype)
  for obj in sorted(per_obj, reverse=True):
    labels[per_obj[obj]] = obj
  return labels


# ------------------------------------------------------------------------------------ evaluate


def _summary(jf: dict[int, tuple[float, float]]) -> dict[str, float]:
  j = float(np.mean([v[0] for v in jf.values()])) if jf else float("nan")
  f = float(np.mean([v[1] for v in jf.values()])) if jf else float("nan")
  return {"J": j, "F": f, "J&F": (j + f) / 2}


def _strip(item: VideoItem, gt: VideoMasks, pred: VideoMasks, path: str, k: int = 5) -> str:
  picks = plots.pick_frames(len(item.annotated), k)
  images = []
  for p in picks:
    with Image.open(_frame_path(item, item.annotated[p])) as img:
      images.append(np.asarray(img.convert("RGB")))

  def at(masks: VideoMasks, p: int):
    return masks[p] if isinstance(masks, np.ndarray) else {o: s[p] for o, s in masks.items()}

  rows = {"ground truth": [at(gt, p) for p in picks], "prediction": [at(pred, p) for p in picks]}
  labels = [f"frame {item.frame_names[item.annotated[p]]}" for p in picks]
  return plots.overlay_strip(images, rows, path, col_labels=labels)


def _frame_path(item: VideoItem, t: int) -> str:
  from qsam2_jax.video_io import JPEG_EXTENSIONS
  for ext in JPEG_EXTENSIONS:
    p = os.path.join(item.frames_dir, item.frame_names[t] + ext)
    if os.path.exists(p):
      return p
  raise DatasetError(f"video {item.name!r}: frame {item.frame_names[t]} disappeared")


def evaluate(predictor: Any, items: Sequence[VideoItem], protocol: str = "davis", *,
             skip_first_last: bool = True, strips: int = 0, strip_dir: Optional[str] = None,
             progress: bool = True) -> dict[str, Any]:
  """Runs the protocol on every video and scores it with `eval.metrics`.

  Returns:
    {"dataset": {"J", "F", "J&F", "num_objects", "num_videos"}, "videos": {name: {"J", "F",
    "J&F", "objects": {id: {"J", "F", "J&F"}}, "num_frames", "scored_frames", "seconds",
    "fps"}}}; scores in percent.
  """
  from tqdm import tqdm
  videos: dict[str, dict[str, Any]] = {}
  per_video: dict[str, dict[int, tuple[float, float]]] = {}
  bar = tqdm(items, desc="eval.video", unit="video", disable=not progress)
  for n, item in enumerate(bar):
    if len(item.annotated) < (3 if skip_first_last else 1):
      raise DatasetError(f"video {item.name!r}: {len(item.annotated)} annotated frame(s), too "
                         "few to score without the first and the last (--score-all-frames)")
    gt = load_ground_truth(item, protocol)
    prompts = first_frame_prompts(gt, protocol)
    if not prompts:
      raise DatasetError(f"video {item.name!r}: no object in the first frame's annotation "
                         f"({item.frame_names[0]}.png), nothing to prompt")
    pred, seconds = predict_video(predictor, item, prompts, protocol)
    jf = metrics.jf_video(pred, gt, skip_first_last, protocol=protocol)
    per_video[item.name] = jf
    n_frames = len(item.frame_names)
    videos[item.name] = {
        **_summary(jf),
        "objects": {str(o): {"J": j, "F": f, "J&F": (j + f) / 2} for o, (j, f) in jf.items()},
        "num_frames": n_frames,
        "scored_frames": len(item.annotated) - (2 if skip_first_last else 0),
        "seconds": seconds, "fps": n_frames / seconds if seconds > 0 else float("nan"),
    }
    if n < strips and strip_dir:
      videos[item.name]["strip"] = _strip(item, gt, pred, os.path.join(strip_dir,
                                                                        f"{item.name}.png"))
    scored = {k: v for k, v in per_video.items() if v}
    if scored:
      bar.set_postfix({"J&F": f"{metrics.jf_dataset(scored)['J&F']:.1f}"})
  scored = {k: v for k, v in per_video.items() if v}
  if not scored:
    raise DatasetError("no object could be scored: none is in the ground truth of the scored "
                       "frames")
  return {"dataset": metrics.jf_dataset(scored), "videos": videos}


# ------------------------------------------------------------------------------------ report


def format_table(result: dict[str, Any]) -> str:
  """The per-video table and the dataset mean, as aligned text."""
  names = list(result["videos"])
  width = max([len("mean")] + [len(n) for n in names])
  head = f"{'video':<{width}}  objects  frames  scored      J      F    J&F    fps"
  lines = [head, "-" * len(head)]
  for name, v in result["videos"].items():
    lines.append(f"{name:<{width}}  {len(v['objects']):7d}  {v['num_frames']:6d}  "
                 f"{v['scored_frames']:6d}  {v['J']:5.1f}  {v['F']:5.1f}  {v['J&F']:5.1f}  "
                 f"{v['fps']:5.1f}")
  d = result["dataset"]
  lines.append("-" * len(head))
  lines.append(f"{'mean':<{width}}  {d['num_objects']:7d}  {'':6}  {'':6}  {d['J']:5.1f}  "
               f"{d['F']:5.1f}  {d['J&F']:5.1f}")
  return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str) -> dict[str, str]:
  """jf.json, jf_per_video.csv and jf_per_object.csv; returns their paths."""
  paths = {"json": os.path.join(out_dir, "jf.json"),
           "per_video": os.path.join(out_dir, "jf_per_video.csv"),
           "per_object": os.path.join(out_dir, "jf_per_object.csv")}
  write_json(paths["json"], result)
  videos = [{"video": name, "objects": len(v["objects"]), "frames": v["num_frames"],
             "scored_frames": v["scored_frames"], "J": f"{v['J']:.4f}", "F": f"{v['F']:.4f}",
             "J&F": f"{v['J&F']:.4f}", "seconds": f"{v['seconds']:.3f}", "fps": f"{v['fps']:.2f}"}
            for name, v in result["videos"].items()]
  write_csv(paths["per_video"], videos, ["video", "objects", "frames", "scored_frames", "J", "F",
                                         "J&F", "seconds", "fps"])
  objects = [{"video": name, "object": obj, "J": f"{s['J']:.4f}", "F": f"{s['F']:.4f}",
              "J&F": f"{s['J&F']:.4f}"}
             for name, v in result["videos"].items() for obj, s in v["objects"].items()]
  write_csv(paths["per_object"], objects, ["video", "object", "J", "F", "J&F"])
  return paths


# ------------------------------------------------------------------------------------ command


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m eval.video", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None,
                 help="Orbax checkpoint directory or official .pt (default: the embedded "
                      "random SAM2.1-t, convert.random_checkpoint.default_checkpoint())")
  p.add_argument("--step", type=nonnegative_int, default=None,
                 help="Orbax step (default: the latest)")
  p.add_argument("--data", default=None,
                 help="dataset root with JPEGImages/ and Annotations/ (default: the embedded "
                      "synthetic videos, qsam2_jax.data.synthetic.default_video_data())")
  p.add_argument("--protocol", choices=PROTOCOLS, default="davis",
                 help="davis: palette PNG label maps; sav: per-object PNG folders "
                      "(default: %(default)s)")
  p.add_argument("--videos", default=None,
                 help="comma-separated video names, or a text file with one name a line")
  p.add_argument("--max-videos", type=positive_int, default=None, help="evaluate the first N only")
  p.add_argument("--image-size", type=image_size, default=None,
                 help="model input size (default: the checkpoint's; 1024 for .pt files)")
  p.add_argument("--dtype", type=dtype_name, default="float32",
                 help="compute dtype: float32 (fp32) or bfloat16 (bf16); parameters stay float32 "
                      "(default: %(default)s)")
  p.add_argument("--out", default=None,
                 help="output folder (default: <ckpt>/eval like eval.image, or <file>_eval for "
                      "a file; runs/eval_video for the embedded checkpoint)")
  p.add_argument("--strips", type=nonnegative_int, default=3,
                 help="overlay PNG strips for the first K videos (default: %(default)s)")
  p.add_argument("--score-all-frames", action="store_true",
                 help="also score the first and the last annotated frames")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def build_predictor(ckpt: str, *, step: Optional[int] = None, image_size: Optional[int] = None,
                    dtype: str = "float32", protocol: str = "davis") -> tuple[Any, Any]:
  """(`VideoPredictor`, config) set up as upstream evaluates: no hole filling, and
  non-overlapping output masks for palette PNGs (davis) only."""
  from qsam2_jax.checkpoint import load_sam2
  from qsam2_jax.video_predictor import VideoPredictor
  model, cfg = load_sam2(ckpt, step=step, image_size=image_size,
                         dtype=compute_dtype(dtype))
  predictor = VideoPredictor(model, fill_hole_area=0, non_overlap_masks=protocol == "davis",
                             show_progress=False)
  return predictor, cfg


def _checkpoint_info(path: str, step: Optional[int]) -> dict[str, Any]:
  if not os.path.isdir(path):
    return {"kind": "official .pt"}
  from qsam2_jax.checkpoint import read_meta
  meta = read_meta(path, step)
  return {"step": meta["step"], "kind": meta.get("kind"), "quantized": bool(meta.get("quant")),
          "quant": meta.get("quant")}


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  # Validate first: the output folder, the dataset's layout, the checkpoint.
  from qsam2_jax import checkpoint, preflight
  out_flag = "--out" if args.out else "--out (default)"
  if args.out is None:
    from eval.image import default_out
    args.out = default_out(args.ckpt) if args.ckpt else os.path.join("runs", "eval_video")
  preflight.output_folder(args.out, out_flag)
  if args.data is None:
    from qsam2_jax.data.synthetic import default_video_data
    args.data = default_video_data()
  items = index_dataset(args.data, args.protocol, _video_list(args.videos), args.max_videos)
  if args.ckpt is not None:
    checkpoint.check(args.ckpt, "--ckpt", step=args.step)
  if args.ckpt is None:
    from convert.random_checkpoint import default_checkpoint
    args.ckpt = default_checkpoint()

  ckpt_info = _checkpoint_info(args.ckpt, args.step)
  predictor, cfg = build_predictor(args.ckpt, step=args.step, image_size=args.image_size,
                                   dtype=args.dtype, protocol=args.protocol)
  print(f"{len(items)} video(s) from {args.data} ({args.protocol} protocol), model {cfg.name} "
        f"at {cfg.image_size}² {args.dtype} from {args.ckpt}", flush=True)
  t0 = time.time()
  with preflight.created_by_us(args.out):
    result = evaluate(predictor, items, args.protocol, skip_first_last=not args.score_all_frames,
                      strips=args.strips, strip_dir=os.path.join(args.out, "strips"),
                      progress=not args.quiet)
    result["settings"] = {
        "ckpt": os.path.abspath(args.ckpt), **ckpt_info, "config": cfg.name,
        "image_size": cfg.image_size, "dtype": args.dtype, "data": os.path.abspath(args.data),
        "protocol": args.protocol, "skip_first_last": not args.score_all_frames,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 2),
    }
    paths = write_outputs(result, args.out)
  print(format_table(result))
  d = result["dataset"]
  print(f"J&F {d['J&F']:.2f}  J {d['J']:.2f}  F {d['F']:.2f}  "
        f"({d['num_objects']} objects, {d['num_videos']} videos)")
  print(f"wrote {paths['json']}, {paths['per_video']}, {paths['per_object']}")
  strips = [v["strip"] for v in result["videos"].values() if "strip" in v]
  if strips:
    print(f"overlay strips: {', '.join(strips)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

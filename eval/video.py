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
import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

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
from qsam2_jax.data.davis import (
  PROTOCOLS,
  DatasetError,
  VideoItem,
  VideoMasks,
  first_frame_prompts,
  frame_path,
  index_dataset,
  load_ground_truth,
  video_list,
)
from qsam2_jax.errors import report_user_errors
from qsam2_jax.files import write_csv, write_json


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
    with Image.open(frame_path(item, item.annotated[p])) as img:
      images.append(np.asarray(img.convert("RGB")))

  def at(masks: VideoMasks, p: int):
    return masks[p] if isinstance(masks, np.ndarray) else {o: s[p] for o, s in masks.items()}

  rows = {"ground truth": [at(gt, p) for p in picks], "prediction": [at(pred, p) for p in picks]}
  labels = [f"frame {item.frame_names[item.annotated[p]]}" for p in picks]
  return plots.overlay_strip(images, rows, path, col_labels=labels)


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
  items = index_dataset(args.data, args.protocol, video_list(args.videos), args.max_videos)
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

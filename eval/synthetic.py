"""Command line for the synthetic datasets (the library itself never parses arguments).

  python -m eval.synthetic images --out data/synth_coco --images 200 --size 256 256 --seed 0
  python -m eval.synthetic video  --out data/synth_davis --videos 8 --frames 24 --size 256 256
  python -m eval.synthetic images --out data/hard --style varied   # shapes a box fits badly
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from qsam2_jax import preflight
from qsam2_jax.cli import ArgumentParser, nonnegative_int, positive_int
from qsam2_jax.data import synthetic
from qsam2_jax.errors import UserError, report_user_errors

# What a dataset of ours holds (a folder holding neither is never replaced by --overwrite).
DATASET_MARKERS = ("annotations.json", "JPEGImages")


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(
      prog="python -m eval.synthetic",
      description="Generate a synthetic segmentation dataset of textured shapes: COCO-format "
                  "images (for mIoU / QAT) or DAVIS-layout videos (for J&F). Deterministic from "
                  "--seed; written to a temporary directory and renamed into place.")
  sub = parser.add_subparsers(dest="kind", required=True, metavar="{images,video}")

  def common(p: argparse.ArgumentParser, default_size: tuple[int, int]) -> None:
    p.add_argument("--out", required=True, help="output directory (must be absent or empty "
                                                "unless --overwrite)")
    p.add_argument("--size", nargs=2, type=positive_int, default=list(default_size),
                   metavar=("H", "W"), help=f"image height and width in pixels, each >= "
                   f"{synthetic.MIN_SIZE} (default: %(default)s)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="non-negative random seed (default: %(default)s)")
    p.add_argument("--style", choices=synthetic.STYLES, default="basic",
                   help="basic: ellipses, star-shaped polygons, rectangles; varied: also "
                        "non-convex, thin, holed and multi-part shapes, more occlusion and "
                        "unlabelled look-alikes in the background (at 128² the mask = box "
                        "floor falls from 0.66 to 0.49) (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

  images = sub.add_parser(
      "images", help="COCO instance segmentation: images/*.jpg + annotations.json (RLE masks)",
      description="Write images/*.jpg and annotations.json (COCO, RLE segmentations, bbox xywh, "
                  "one category per shape kind).")
  images.add_argument("--images", type=positive_int, default=64,
                      help="number of images (default: %(default)s)")
  common(images, (256, 256))

  video = sub.add_parser(
      "video", help="DAVIS video object segmentation: JPEGImages/ + Annotations/ (palette PNGs)",
      description="Write JPEGImages/<video>/00000.jpg... and Annotations/<video>/00000.png... "
                  "(palette PNGs, object ids 1..K). Objects move, occlude one another, and one "
                  "per video leaves the frame and comes back (needs --frames >= 3).")
  video.add_argument("--videos", type=positive_int, default=4,
                     help="number of videos (default: %(default)s)")
  video.add_argument("--frames", type=positive_int, default=24,
                     help="frames per video (default: %(default)s)")
  common(video, (256, 256))
  return parser


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if min(args.size) < synthetic.MIN_SIZE:
    raise UserError(f"--size: height and width must be >= {synthetic.MIN_SIZE}, got {args.size}")
  out_dir = Path(args.out)
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"--out {out_dir} exists and is not a directory")
  if out_dir.is_dir() and any(out_dir.iterdir()):
    if not args.overwrite:
      raise UserError(f"--out {out_dir} exists and is not empty (add --overwrite to replace it)")
    if not any((out_dir / m).exists() for m in DATASET_MARKERS):
      raise UserError(f"--out {out_dir} is not a synthetic dataset of this project (no "
                      f"{' or '.join(DATASET_MARKERS)}); --overwrite would delete it: give a new "
                      "or empty folder")
  preflight.probe_writable(out_dir, "--out")
  total = args.images if args.kind == "images" else args.videos
  bar = tqdm(total=total, unit="image" if args.kind == "images" else "video",
             disable=args.quiet, desc=f"synthetic {args.kind}")
  try:
    if args.kind == "images":
      out = synthetic.make_image_dataset(args.out, args.images, tuple(args.size), args.seed,
                                         overwrite=args.overwrite, progress=bar.update,
                                         style=args.style)
    else:
      out = synthetic.make_video_dataset(args.out, args.videos, args.frames, tuple(args.size),
                                         args.seed, overwrite=args.overwrite,
                                         progress=bar.update, style=args.style)
  except (FileExistsError, ValueError) as e:
    raise UserError(str(e)) from e
  finally:
    bar.close()
  unit = "image" if args.kind == "images" else "video"
  print(f"wrote {total} {unit}{'' if total == 1 else 's'} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The embedded end-to-end demo: official-format checkpoint -> Orbax -> box prompt -> PNG.

  python -m eval.demo [--ckpt sam2.1_hiera_t.pt] [--out demo_out] [--image-size 512]

Without --ckpt it builds a random-weight SAM2.1-t checkpoint in the official format with the
`sam2` package (official weights cannot be downloaded here), so the masks are meaningless; the
demo shows the pipeline: conversion, restore from Orbax, jitted prediction, overlay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from qsam2_jax import preflight
from qsam2_jax.cli import ArgumentParser, image_size, nonnegative_int
from qsam2_jax.errors import report_user_errors
from qsam2_jax.torch_format import open_pt


def overlay(image: np.ndarray, mask: np.ndarray, box: Sequence[float]) -> Image.Image:
  """The image with the mask tinted blue and the prompt box drawn in green."""
  from PIL import ImageDraw
  out = image.astype(np.float32)
  tint = np.array([30, 144, 255], np.float32)
  out[mask] = 0.45 * out[mask] + 0.55 * tint
  img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
  ImageDraw.Draw(img).rectangle([float(v) for v in box], outline=(0, 255, 0), width=3)
  return img


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m eval.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None, help="official .pt (default: a random SAM2.1-t)")
  p.add_argument("--out", default="demo_out", help="output folder")
  p.add_argument("--image-size", type=image_size, default=512,
                 help="model input size (1024 is SAM2's; smaller is faster on CPU)")
  p.add_argument("--seed", type=nonnegative_int, default=0)
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.ckpt is not None:
    open_pt(args.ckpt, "--ckpt").close()
  preflight.output_folder(args.out, "--out")
  ckpt = args.ckpt or os.path.join(args.out, "sam2.1_hiera_t_random.pt")
  orbax_dir = os.path.join(args.out, "orbax")
  data_dir = os.path.join(args.out, "image")
  png = os.path.join(args.out, "overlay.png")
  # A failure removes what this call created (the 156 MB random .pt included).
  with preflight.created_by_us(args.out, ckpt, orbax_dir, data_dir, png):
    return _demo(args, ckpt, orbax_dir, data_dir, png)


def _demo(args: argparse.Namespace, ckpt: str, orbax_dir: str, data_dir: str, png: str) -> int:
  t0 = time.time()
  # The commands' undecorated mains raise (the decorated ones would print and return 2).
  if args.ckpt is None and not os.path.exists(ckpt):
    from convert import random_checkpoint
    random_checkpoint.main.__wrapped__(["--config", "sam2.1_hiera_t", "--out", ckpt,
                                        "--seed", str(args.seed)])
  from convert import from_torch
  from_torch.main.__wrapped__(["--ckpt", ckpt, "--out", orbax_dir, "--overwrite",
                               "--image-size", str(args.image_size)])

  from qsam2_jax.data.synthetic import make_image_dataset
  if not os.path.exists(os.path.join(data_dir, "annotations.json")):
    make_image_dataset(data_dir, num_images=1, size=(480, 640), seed=args.seed)
  with open(os.path.join(data_dir, "annotations.json")) as f:
    coco = json.load(f)
  info = coco["images"][0]
  image = np.asarray(Image.open(os.path.join(data_dir, info["file_name"])).convert("RGB"))
  ann = next(a for a in coco["annotations"] if a["image_id"] == info["id"])
  x, y, w, h = ann["bbox"]
  box = np.array([x, y, x + w, y + h], np.float32)

  from qsam2_jax.predictor import ImagePredictor
  predictor = ImagePredictor.from_checkpoint(orbax_dir)
  t1 = time.time()
  predictor.set_image(image)
  masks, ious, _ = predictor.predict(box=box, multimask_output=False)
  t2 = time.time()
  predictor.set_image(image)
  masks, ious, _ = predictor.predict(box=box, multimask_output=False)
  t3 = time.time()
  from qsam2_jax.files import atomic_path
  with atomic_path(png) as tmp:
    overlay(image, masks[0], box).save(tmp)
  print(f"box {box.tolist()} -> mask of {int(masks[0].sum())} px, predicted IoU {ious[0]:.3f}")
  print(f"first call (compile) {t2 - t1:.1f} s, second call {t3 - t2:.2f} s, "
        f"total {t3 - t0:.1f} s")
  print(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

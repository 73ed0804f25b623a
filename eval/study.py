"""The quality study (issue 14): train an FP proxy, quantize it every way the paper compares,
evaluate every model, write docs/results.md — one command, resumable.

  python -m eval.study                                 # everything, synthetic data, runs/study
  python -m eval.study --stage pretrain --pretrain-steps 4000 --pretrain-mixed-steps 2000
  python -m eval.study --stage quantize --rows 'ptq-*,qat-qsam2-w2a2'
  python -m eval.study --stage report --report docs/results.md
  python -m eval.study --init ckpt/fp --pretrain-steps 0 --data coco/train --val-data coco/val \\
      --test-data coco/val2017 --video-data sav_train --test-video-data DAVIS

Stages (--stage, default all in this order; a comma list runs several):
  pretrain  synthetic train / validation / test splits (`eval.synthetic --style varied`,
            seeds 0 / 1 / 2; the test split is never used for choosing anything), SAM2.1-t at
            PyTorch's default init (`convert.random_checkpoint --no-randomize-constants`), and
            the FP proxy trained from it with `train.qat --method fp` on images and video clips
            in two phases: images with box prompts only (`--box-prob 1`, no clip steps: the
            recipe that leaves the all-background solution, docs/learning-curve.md), then
            SAM2's mix of boxes and clicks (`--box-prob 0.5`) and clip steps (`--video-ratio`)
            from the first phase's checkpoint (`--init`), so the proxy answers click prompts
            and tracks objects too.
  quantize  every selected row (eval/study_rows.py): PTQ min-max / MSE / VRC+MSE (`train.ptq`),
            QAT min-max / PACT / LSQ / Q-SAM2 and the W2A2 ablations (`train.qat`). Each QAT
            method's learning rate is picked from --lr-grid at W2A2 by the validation mIoU the
            trainer reports, then kept for the other widths; the extra seeds of the best
            baseline go to the baseline with the best validation mIoU.
  evaluate  per row on the test split: `eval.image` with ground-truth boxes and with one
            click (mIoU per COCO area), `eval.video` (J&F, first-frame mask prompt),
            `eval.size` (packed size vs BF16); plus the floors (mask = box, inscribed ellipse).
  report    --report (docs/results.md): the table, floors, gaps against the paper's claims,
            plots and the exact commands, every number read from the runs' done.json.

Every step is a public command run in a subprocess, in its own folder under --out
(eval/study_runs.py): a folder with done.json is skipped, an interrupted `train.qat` continues
with --resume, anything else unfinished starts over. Rerunning the same command therefore only
does what is left; a finished run planned with different flags is an error (delete its folder).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from eval import study_rows as sr
from eval.study_runs import Run, RunFailed, execute, read_done
from qsam2_jax.cli import ArgumentParser, nonnegative_int, positive_int
from qsam2_jax.data.synthetic import STYLES
from qsam2_jax.errors import UserError, report_user_errors

STAGES = ("pretrain", "quantize", "evaluate", "report")
EVALS = ("image-box", "image-click", "video", "size")
FLOORS = ("floor-box", "floor-ellipse")
INIT_FILE = "sam2.1_hiera_t_torch_init.pt"
PTQ_EVAL_IMAGES = 8   # train.calibrate / train.ptq --eval-images: the output errors' images


# ---------------------------------------------------------------------------- command line


def _floats(text: str) -> list[float]:
  try:
    vals = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  if not vals or any(not v > 0 for v in vals):
    raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
  return vals


def _ints(text: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
    raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
  return vals


def _share(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    v = -1.0
  if not 0.0 <= v <= 1.0:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
  return v


def _stages(text: str) -> list[str]:
  names = [s.strip() for s in text.split(",") if s.strip()]
  if names == ["all"]:
    return list(STAGES)
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"stages are all or {', '.join(STAGES)} (comma-separated),"
                                     f" got {text!r}")
  return [s for s in STAGES if s in names]


def build_parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog="python -m eval.study", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("what to run")
  g.add_argument("--out", default=os.path.join("runs", "study"),
                 help="study folder, one sub-folder per run (default: %(default)s)")
  g.add_argument("--stage", type=_stages, default=list(STAGES),
                 help="all (default) or pretrain, quantize, evaluate, report (comma-separated)")
  g.add_argument("--rows", default=None,
                 help="rows to quantize / evaluate / report: comma-separated names or shell "
                      "patterns, e.g. 'fp,ptq-minmax-w8a8' or 'qat-*-w2a2' (default: all; "
                      "`--list-rows` prints them)")
  g.add_argument("--list-rows", action="store_true", help="print the row names and exit")
  g.add_argument("--report", default=os.path.join("docs", "results.md"),
                 help="markdown file of the report stage; figures go to <name>_figures/ "
                      "(default: %(default)s)")
  g = p.add_argument_group("model and data (default: synthetic splits, PyTorch init)")
  g.add_argument("--init", help="float checkpoint to pretrain from (or, with --pretrain-steps 0, "
                                "the FP proxy itself) (default: SAM2.1-t at PyTorch's default "
                                "init)")
  g.add_argument("--randomized-constants", action="store_true",
                 help="default init with the constant tensors randomized (the embedded test "
                      "weights) instead of PyTorch's exact init")
  g.add_argument("--data", help="training images (COCO / SA-1B folder); needs --test-data")
  g.add_argument("--val-data", help="validation images: LR selection and training curves")
  g.add_argument("--test-data", help="test images for the table (never used for choices)")
  g.add_argument("--video-data", help="training videos (DAVIS / SA-V layout)")
  g.add_argument("--test-video-data", help="test videos for J&F (DAVIS layout)")
  g.add_argument("--image-size", type=positive_int, default=128,
                 help="model input and synthetic image side (default: %(default)s)")
  g.add_argument("--train-images", type=positive_int, default=2000,
                 help="synthetic training images (default: %(default)s)")
  g.add_argument("--val-images", type=positive_int, default=64,
                 help="synthetic validation images, all used by the trainer's evaluation "
                      "(default: %(default)s)")
  g.add_argument("--test-images", type=positive_int, default=200,
                 help="synthetic test images (default: %(default)s)")
  g.add_argument("--train-videos", type=positive_int, default=200,
                 help="synthetic training videos (default: %(default)s)")
  g.add_argument("--test-videos", type=positive_int, default=20,
                 help="synthetic test videos (default: %(default)s)")
  g.add_argument("--synthetic-style", choices=STYLES, default="varied",
                 help="style of the synthetic splits (`eval.synthetic --style`): varied has "
                      "shapes a box fits badly, so the floors are low (default: %(default)s)")
  g.add_argument("--video-length", type=positive_int, default=16,
                 help="frames per synthetic video (default: %(default)s)")
  g = p.add_argument_group("training budgets and recipe")
  g.add_argument("--pretrain-steps", type=nonnegative_int, default=4000,
                 help="FP proxy steps of the first phase (box prompts); 0 = no pretraining at "
                      "all, --init is the proxy (default: %(default)s)")
  g.add_argument("--pretrain-box-prob", type=_share, default=1.0,
                 help="share of box prompts in the first phase (default: %(default)s)")
  g.add_argument("--pretrain-mixed-steps", type=nonnegative_int, default=2000,
                 help="steps of the second phase, started from the first one's model with "
                      "--pretrain-mixed-box-prob (0: none) (default: %(default)s)")
  g.add_argument("--pretrain-mixed-box-prob", type=_share, default=0.5,
                 help="share of box prompts in the second phase, the rest 1-3 clicks "
                      "(default: %(default)s)")
  g.add_argument("--pretrain-video-ratio", type=float, default=0.0,
                 help="share of clip steps in the first phase; clips come in the second phase "
                 "(--video-ratio): with half clip steps (SAM2's mask / click / correction "
                 "prompts) the first phase stayed at held-out mIoU 0.0000 after 400 steps, "
                 "docs/status.md #14 (default: %(default)s)")
  g.add_argument("--pretrain-lr", type=float, default=1e-3, help="(default: %(default)s)")
  g.add_argument("--pretrain-vision-lr", type=float, default=1e-5,
                 help="image encoder LR of the pretraining; 1e-4 with lr 1e-3 stayed flat "
                      "(docs/learning-curve.md) (default: %(default)s)")
  g.add_argument("--pretrain-warmup", type=nonnegative_int, default=50,
                 help="warmup steps of each phase, at most its steps (default: %(default)s)")
  g.add_argument("--qat-steps", type=positive_int, default=1000,
                 help="steps of every QAT run, the equal budget (default: %(default)s)")
  g.add_argument("--lr-grid", type=_floats, default=[1e-5, 3e-5, 1e-4],
                 help="QAT weight LRs tried per method at W2A2 (default: 1e-5,3e-5,1e-4)")
  g.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                 help="seeds of Q-SAM2 and the best baseline at W2A2 (default: 0,1,2)")
  g.add_argument("--batch-size", type=positive_int, default=8, help="(default: %(default)s)")
  g.add_argument("--masks-per-image", type=positive_int, default=8,
                 help="(default: %(default)s)")
  g.add_argument("--video-ratio", type=float, default=0.5,
                 help="share of clip steps in every train.qat run (default: %(default)s)")
  g.add_argument("--video-frames", type=positive_int, default=8,
                 help="frames per training clip (default: %(default)s)")
  g.add_argument("--calib-images", type=positive_int, default=16,
                 help="QAT range-calibration images (default: %(default)s)")
  g.add_argument("--calib-clips", type=nonnegative_int, default=8,
                 help="range-calibration clips of --video-frames frames of the training videos, "
                      "of every QAT and PTQ run: the memory path's quantizers see data only "
                      "there (default: %(default)s)")
  g.add_argument("--vrc-images", type=positive_int, default=256,
                 help="VRC images (train.qat --vrc-images, train.calibrate --images) and the "
                      "calibration images of every PTQ method alike; VRC re-fits a layer only "
                      "with at least as many input rows as input dimensions, and the last Hiera "
                      "stage gives (S/32)^2 tokens an image for dimensions up to 3072: 192 "
                      "images at 128^2 (default: %(default)s)")
  g.add_argument("--dtype", default="float32", help="compute dtype of training "
                                                    "(default: %(default)s)")
  g.add_argument("--save-every", type=nonnegative_int, default=200,
                 help="checkpoint period of the training runs, so they resume (default: "
                      "%(default)s)")
  g.add_argument("--eval-every", type=nonnegative_int, default=250,
                 help="validation period of the pretraining (QAT: at the end) (default: "
                      "%(default)s)")
  g = p.add_argument_group("extra flags passed through (appended last, so they win)")
  g.add_argument("--train-args", default="", help="to every train.qat run, e.g. "
                 "'--correction-clicks 2 --calib-clips 2'")
  g.add_argument("--pretrain-args", default="", help="to the pretraining only")
  g.add_argument("--qat-args", default="", help="to every QAT run only")
  g.add_argument("--ptq-args", default="", help="to every train.ptq / train.calibrate run")
  g.add_argument("--image-eval-args", default="", help="to every eval.image run of a model")
  g.add_argument("--video-eval-args", default="", help="to every eval.video run")
  return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  for name in ("train_args", "pretrain_args", "qat_args", "ptq_args", "image_eval_args",
               "video_eval_args"):
    try:
      setattr(args, name, shlex.split(getattr(args, name)))
    except ValueError as e:
      raise UserError(f"--{name.replace('_', '-')}: {e}") from None
  if args.data and not args.test_data:
    raise UserError("--data needs --test-data: the table is measured on a test split that "
                    "nothing was chosen on")
  if args.image_size < 64 or args.image_size % 32:
    raise UserError(f"--image-size must be a multiple of 32, at least 64, got "
                    f"{args.image_size}")
  if args.pretrain_steps == 0 and args.init is None:
    print("note: --pretrain-steps 0 without --init: the proxy is the untrained init",
          file=sys.stderr)
  for flag in ("init", "data", "val_data", "test_data", "video_data", "test_video_data"):
    path = getattr(args, flag)
    if path is not None:
      if not os.path.exists(path):
        raise UserError(f"--{flag.replace('_', '-')} {path} does not exist")
      setattr(args, flag, os.path.abspath(path))
  args.out = os.path.abspath(args.out)
  if args.data is None and args.train_images < args.vrc_images + PTQ_EVAL_IMAGES:
    raise UserError(f"--train-images {args.train_images}: train.calibrate / train.ptq take "
                    f"--vrc-images {args.vrc_images} images and hold out {PTQ_EVAL_IMAGES} "
                    f"more, so at least {args.vrc_images + PTQ_EVAL_IMAGES} are needed")
  if 0 not in args.seeds:
    raise UserError("--seeds must include 0 (the seed of every other row)")
  return args


# ---------------------------------------------------------------------------- metric readers


def _json(path: str) -> Dict[str, Any]:
  import json
  with open(path) as f:
    return json.load(f)


def trainer_metrics(out: str) -> Dict[str, Any]:
  """The last validation mIoU (fraction) and loss of a train.qat run (its logs/metrics.jsonl)."""
  from eval.report import read_metrics_jsonl
  lines = read_metrics_jsonl(os.path.join(out, "logs", "metrics.jsonl"))
  val = [ln for ln in lines if isinstance(ln.get("eval/miou"), (int, float))]
  loss = [ln for ln in lines if isinstance(ln.get("loss"), (int, float))]
  return {"val_miou": val[-1]["eval/miou"] if val else None,
          "val_masks": val[-1].get("eval/masks") if val else None,
          "steps": max((ln.get("step", 0) for ln in lines), default=0),
          "final_loss": loss[-1]["loss"] if loss else None}


def image_metrics(out: str) -> Dict[str, Any]:
  m = _json(os.path.join(out, "image_metrics.json"))
  keys = ("mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "num", "num_small", "num_medium",
          "num_large", "AP", "num_images", "seconds")
  return {k: m.get(k) for k in keys}


def video_metrics(out: str) -> Dict[str, Any]:
  d = _json(os.path.join(out, "jf.json"))["dataset"]
  return {k: d.get(k) for k in ("J&F", "J", "F", "num_objects", "num_videos")}


def size_metrics(out: str) -> Dict[str, Any]:
  r = _json(os.path.join(out, "size.json"))
  return {"model_ratio": r.get("model_ratio"), "encoder_ratio": r.get("encoder_ratio"),
          "file_size": r.get("file_size"), "bf16_bytes": r.get("total", {}).get("bf16_bytes")}


# ---------------------------------------------------------------------------- the plan


class Plan:
  """The study's runs, their folders and commands, from the parsed flags.

  Pure bookkeeping: building a plan runs nothing; `lr_choice` and `best_baseline` read the
  LR-selection runs' done.json (None while they are not done).
  """

  def __init__(self, args: argparse.Namespace):
    self.a = args
    self.root = args.out

  # -------- folders
  def folder(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  # -------- data and init
  def data_runs(self) -> List[Run]:
    a, runs = self.a, []
    size = [str(a.image_size)] * 2
    splits = (("train-images", a.data, a.train_images, 0), ("val-images", a.val_data,
              a.val_images, 1), ("test-images", a.test_data, a.test_images, 2))
    for name, given, n, seed in splits:
      if given is None and not (name == "val-images" and a.data is not None):
        runs.append(Run(name, self.folder("data", name), "eval.synthetic",
                        ["images", "--images", n, "--size", *size, "--seed", seed,
                         "--style", a.synthetic_style, "--quiet"]))
    videos = (("train-videos", a.video_data, a.train_videos, 0),
              ("test-videos", a.test_video_data, a.test_videos, 2))
    for name, given, n, seed in videos:
      if given is None:
        runs.append(Run(name, self.folder("data", name), "eval.synthetic",
                        ["video", "--videos", n, "--frames", a.video_length, "--size", *size,
                         "--seed", seed, "--style", a.synthetic_style, "--quiet"]))
    return runs

  def split(self, name: str) -> str:
    """The path of a data split: the user's, or the synthetic one's out/."""
    given = {"train-images": self.a.data, "val-images": self.a.val_data,
             "test-images": self.a.test_data, "train-videos": self.a.video_data,
             "test-videos": self.a.test_video_data}[name]
    if given is not None:
      return given
    if name == "val-images" and self.a.data is not None:
      return None   # the trainer holds out the last images of --data
    return os.path.join(self.folder("data", name), "out")

  def init_run(self) -> Optional[Run]:
    if self.a.init is not None:
      return None
    flags = [] if self.a.randomized_constants else ["--no-randomize-constants"]
    return Run("init", self.folder("init"), "convert.random_checkpoint",
               ["--config", "sam2.1_hiera_t", "--seed", 0, *flags, "--out",
                os.path.join(self.folder("init"), "out", INIT_FILE)], out_flag=None)

  @property
  def init_path(self) -> str:
    return self.a.init or os.path.join(self.folder("init"), "out", INIT_FILE)

  # -------- training
  def _train_common(self, video_ratio: Optional[float] = None) -> List[Any]:
    a = self.a
    args = ["--data", self.split("train-images")]
    if self.split("val-images"):
      args += ["--val-data", self.split("val-images")]
    ratio = a.video_ratio if video_ratio is None else video_ratio
    args += ["--eval-images", a.val_images, "--video-data", self.split("train-videos"),
             "--video-ratio", ratio, "--video-frames", a.video_frames,
             "--image-size", a.image_size, "--batch-size", a.batch_size,
             "--masks-per-image", a.masks_per_image, "--dtype", a.dtype,
             "--save-every", a.save_every, "--no-progress"]
    return args

  def _pretrain(self, name: str, init: str, steps: int, box_prob: float,
                video_ratio: Optional[float] = None) -> Run:
    a = self.a
    args = ["--method", "fp", "--init", init, *self._train_common(video_ratio),
            "--steps", steps, "--lr", f"{a.pretrain_lr:g}",
            "--vision-lr", f"{a.pretrain_vision_lr:g}", "--box-prob", f"{box_prob:g}",
            "--warmup-steps", min(a.pretrain_warmup, steps),
            "--eval-every", a.eval_every, *a.train_args, *a.pretrain_args]
    return Run(name, self.folder(name), "train.qat", args, resumable=True,
               metrics=trainer_metrics)

  def pretrain_run(self) -> Optional[Run]:
    """The first phase: the init trained on box prompts (None with --pretrain-steps 0)."""
    if self.a.pretrain_steps == 0:
      return None
    return self._pretrain("pretrain", self.init_path, self.a.pretrain_steps,
                          self.a.pretrain_box_prob, self.a.pretrain_video_ratio)

  def pretrain_mixed_run(self) -> Optional[Run]:
    """The second phase: the first phase's model trained on boxes and clicks (`--init` of the
    first run: a fresh optimizer and schedule with the changed prompt mix)."""
    first = self.pretrain_run()
    if first is None or self.a.pretrain_mixed_steps == 0:
      return None
    return self._pretrain("pretrain-mixed", first.out, self.a.pretrain_mixed_steps,
                          self.a.pretrain_mixed_box_prob)

  def pretrain_runs(self) -> List[Run]:
    """The pretraining phases, in order (the last one makes the FP proxy)."""
    return [r for r in (self.pretrain_run(), self.pretrain_mixed_run()) if r is not None]

  @property
  def fp_path(self) -> str:
    """The FP proxy: the last pretraining phase's run folder, or the init with
    --pretrain-steps 0."""
    runs = self.pretrain_runs()
    return runs[-1].out if runs else self.init_path

  def vrc_run(self) -> Run:
    """`train.calibrate` of the proxy at W2 (VRC + LSQ starts from it; its figures are VRC's
    Fig. 3 / Fig. 5 on the trained weights)."""
    a = self.a
    return Run("vrc-w2", self.folder("quantize", "vrc-w2"), "train.calibrate",
               ["--init", self.fp_path, "--data", self.split("train-images"), "--images",
                a.vrc_images, "--eval-images", PTQ_EVAL_IMAGES, "--bits", 2, "--image-size",
                a.image_size, "--quiet", *a.ptq_args])

  def qat_run(self, row: sr.Row, lr: float, name: str, folder: str) -> Run:
    a = self.a
    init = os.path.join(self.vrc_run().out) if row.vrc_init else self.fp_path
    args = ["--method", row.method, "--bits", row.bits, "--init", init, *self._train_common(),
            "--steps", a.qat_steps, "--lr", f"{lr:g}", "--eval-every", 0, "--seed", row.seed,
            "--calib-images", a.calib_images, "--calib-clips", a.calib_clips,
            "--vrc-images", a.vrc_images, *row.qat_flags, *a.train_args, *a.qat_args]
    return Run(name, folder, "train.qat", args, resumable=True, metrics=trainer_metrics)

  def lr_runs(self, method: str) -> List[Run]:
    """The LR selection of `method` at W2A2 (seed 0): one run per --lr-grid value."""
    row = sr.Row("qat", method, 2, lr_of=method)
    return [self.qat_run(row, lr, f"lr {method} {lr:g}",
                         self.folder("lr", f"qat-{method}-w2a2-lr{lr:g}"))
            for lr in self.a.lr_grid]

  def lr_choice(self, method: str) -> Optional[tuple[float, float]]:
    """(chosen LR, its validation mIoU) once every run of the grid is done, else None."""
    best = None
    for lr, run in zip(self.a.lr_grid, self.lr_runs(method)):
      done = read_done(run.folder)
      if done is None:
        return None
      v = done["metrics"].get("val_miou")
      v = float("-inf") if v is None else v
      if best is None or v > best[1]:
        best = (lr, v)
    return best

  def best_baseline(self) -> Optional[str]:
    """The QAT baseline with the best validation mIoU at its chosen LR (None until known)."""
    scores = {}
    for m in sr.QAT_BASELINES:
      c = self.lr_choice(m)
      if c is None:
        return None
      scores[m] = c[1]
    return max(sr.QAT_BASELINES, key=lambda m: scores[m])

  def rows(self) -> List[sr.Row]:
    return sr.select(sr.table_rows(self.a.seeds), self.a.rows)

  def resolve(self, row: sr.Row) -> Optional[sr.Row]:
    """The row with the best baseline filled in; None while unknown."""
    if row.method != sr.BEST:
      return row
    best = self.best_baseline()
    return None if best is None else sr.resolve_best(row, best)

  def model_runs(self, row: sr.Row) -> Optional[List[Run]]:
    """The runs that make `row`'s model, last the model itself; None while the LR (or the best
    baseline) it needs is not chosen yet. The FP row's model is the pretraining (or --init)."""
    a = self.a
    if row.kind == "fp":
      return [r for r in (self.init_run(), *self.pretrain_runs()) if r is not None]
    if row.kind == "ptq":
      return [Run(row.name, self.folder("quantize", row.name), "train.ptq",
                  ["--init", self.fp_path, "--bits", row.bits, "--method", row.method,
                   "--data", self.split("train-images"), "--images", a.vrc_images,
                   "--eval-images", PTQ_EVAL_IMAGES, "--image-size", a.image_size,
                   "--video-data", self.split("train-videos"), "--calib-clips", a.calib_clips,
                   "--video-frames", a.video_frames, "--quiet", *a.ptq_args])]
    row = self.resolve(row)
    if row is None:
      return None
    choice = self.lr_choice(row.lr_of)
    if choice is None:
      return None
    lr = choice[0]
    if row.kind == "qat" and row.bits == 2 and row.seed == 0:   # the chosen LR's own run
      return [self.lr_runs(row.method)[a.lr_grid.index(lr)]]
    runs = [self.vrc_run()] if row.vrc_init else []
    return runs + [self.qat_run(row, lr, row.name, self.folder("quantize", row.name))]

  def model_path(self, row: sr.Row) -> Optional[str]:
    if row.kind == "fp":
      return self.fp_path
    runs = self.model_runs(row)
    return runs[-1].out if runs else None

  def eval_runs(self, row: sr.Row, model: str) -> List[Run]:
    a, name = self.a, self.resolve(row).name
    test, videos = self.split("test-images"), self.split("test-videos")
    size = ["--image-size", a.image_size]
    img = ["--ckpt", model, "--data", test, *size, "--overlays", 4, "--no-progress"]
    return [
        Run(f"{name} image-box", self.folder("eval", name, "image-box"), "eval.image",
            [*img, *a.image_eval_args], metrics=image_metrics),
        Run(f"{name} image-click", self.folder("eval", name, "image-click"), "eval.image",
            [*img, "--prompt", "click", *a.image_eval_args], metrics=image_metrics),
        Run(f"{name} video", self.folder("eval", name, "video"), "eval.video",
            ["--ckpt", model, "--data", videos, *size, "--quiet", *a.video_eval_args],
            metrics=video_metrics),
        Run(f"{name} size", self.folder("eval", name, "size"), "eval.size",
            ["--ckpt", model, "--json", os.path.join(self.folder("eval", name, "size"), "out",
                                                     "size.json")],
            out_flag=None, metrics=size_metrics)]

  def floor_runs(self) -> List[Run]:
    return [Run(f"floor {kind}", self.folder("eval", kind, "image-box"), "eval.image",
                ["--predict", kind, "--data", self.split("test-images"), "--overlays", 0,
                 "--no-progress"], metrics=image_metrics)
            for kind in FLOORS]


# ---------------------------------------------------------------------------- stages


def _run_all(runs: Sequence[Run], say: Callable[[str], None]) -> None:
  for r in runs:
    execute(r, say=say)


def stage_pretrain(plan: Plan, say=print) -> None:
  say("pretrain: data splits, init, FP proxy (box prompts, then boxes and clicks)")
  runs = plan.data_runs() + [r for r in (plan.init_run(), *plan.pretrain_runs()) if r]
  _run_all(runs, say)


def _need_fp(plan: Plan) -> None:
  for run in plan.pretrain_runs():
    if read_done(run.folder) is None:
      raise UserError(f"the FP proxy is not trained yet ({run.folder} has no done.json): run "
                      "--stage pretrain first")


def stage_quantize(plan: Plan, say=print) -> None:
  _need_fp(plan)
  say("quantize: " + ", ".join(r.name for r in plan.rows()))
  rows = [r for r in plan.rows() if r.kind != "fp"]
  _run_all(plan.data_runs(), say)   # nothing if done; needed when only quantize is run
  # LR selection first: every method whose choice a selected row needs.
  methods = sorted({r.lr_of for r in rows if r.trains and r.lr_of != sr.BEST})
  if any(r.lr_of == sr.BEST for r in rows):
    methods = sorted(set(methods) | set(sr.QAT_BASELINES))
  for m in methods:
    c = plan.lr_choice(m)
    if c is None:
      say(f"LR selection of {m} at W2A2 on the validation split: {plan.a.lr_grid}")
      _run_all(plan.lr_runs(m), say)
      c = plan.lr_choice(m)
    say(f"  {m}: lr {c[0]:g} (validation mIoU {c[1]:.4f})")
  if any(_uses_vrc(r) for r in rows):   # VRC's figures (Fig. 3, the lambda sweep of Fig. 5)
    _run_all([plan.vrc_run()], say)      # on the trained proxy, for the report
  for row in rows:
    runs = plan.model_runs(row)
    assert runs is not None, row   # every choice was made above
    _run_all(runs, say)


def _uses_vrc(row: sr.Row) -> bool:
  return row.vrc_init or "vrc" in row.method or row.method == "qsam2"


def stage_evaluate(plan: Plan, say=print) -> None:
  _need_fp(plan)
  say("evaluate on the test split")
  _run_all(plan.data_runs() + plan.floor_runs(), say)
  for row in plan.rows():
    runs = plan.model_runs(row)
    model = plan.model_path(row)
    if runs is None or any(read_done(r.folder) is None for r in runs):
      say(f"  skip  {row.name}: not quantized yet (--stage quantize)")
      continue
    _run_all(plan.eval_runs(row, model), say)


def stage_report(plan: Plan, say=print) -> None:
  from eval import study_report
  path = study_report.write(plan, plan.a.report)
  say(f"wrote {path}")


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  plan = Plan(args)
  if args.list_rows:
    for r in plan.rows():
      print(f"{r.name:28s} {r.label}")
    return 0
  stages = {"pretrain": stage_pretrain, "quantize": stage_quantize,
            "evaluate": stage_evaluate, "report": stage_report}
  print(f"study in {args.out}: stages {', '.join(args.stage)}")
  try:
    for s in args.stage:
      stages[s](plan)
  except RunFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

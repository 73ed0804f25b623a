"""`python -m eval.video` end to end on generated DAVIS- and SA-V-layout data.

The command runs in-process from the embedded default Orbax checkpoint (random SAM2.1-t at
256²). Its JSON is checked against an independent recomputation: this file reads the frames and
PNGs itself, prompts and propagates the `VideoPredictor` through its public API, thresholds and
merges the logits, and scores with `eval.metrics`. To keep compilation to one predictor, the
command's `build_predictor` is wrapped so every run reuses the first predictor (its jitted steps
stay compiled); the wrapper still goes through the real Orbax load once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval import metrics, plots
from eval import video as eval_video
from qsam2_jax.data.synthetic import make_video_dataset, save_palette_png

SEED = 12  # both generated videos have two objects: one compiled batch size
NUM_VIDEOS, NUM_FRAMES, SIZE = 2, 6, (256, 256)
SAV_VIDEO = "synth_0001"
SAV_FRAMES = (0, 2, 3, 5)  # SA-V annotates a subset of the frames (every 4th at 24 fps)


def _run(argv):
  """main(argv) -> (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = eval_video.main([str(a) for a in argv])
  return rc, out.getvalue(), err.getvalue()


def _labels(root, name, stems=None):
  folder = os.path.join(root, "Annotations", name)
  stems = stems or sorted(os.path.splitext(n)[0] for n in os.listdir(folder))
  return np.stack([np.array(Image.open(os.path.join(folder, f"{s}.png"))) for s in stems])


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
  return str(make_video_dataset(tmp_path_factory.mktemp("vos") / "davis", NUM_VIDEOS, NUM_FRAMES,
                                SIZE, seed=SEED))


@pytest.fixture(scope="module")
def sav_root(davis_root, tmp_path_factory):
  """The same videos in SA-V's layout: one folder of binary PNGs per object, frames subset."""
  root = tmp_path_factory.mktemp("vos") / "sav"
  shutil.copytree(os.path.join(davis_root, "JPEGImages"), root / "JPEGImages")
  for name in os.listdir(os.path.join(davis_root, "JPEGImages")):
    labels = _labels(davis_root, name)
    for obj in range(1, int(labels.max()) + 1):
      folder = root / "Annotations" / name / f"{obj:03d}"
      folder.mkdir(parents=True)
      for t in SAV_FRAMES:
        save_palette_png((labels[t] == obj).astype(np.uint8), folder / f"{t:05d}.png")
  return str(root)


@pytest.fixture(scope="module")
def ckpt():
  from convert.random_checkpoint import default_checkpoint
  return default_checkpoint()


@pytest.fixture(scope="module")
def predictors():
  """Wraps `build_predictor`: the first call builds, later calls with that checkpoint reuse it."""
  built = []
  real = eval_video.build_predictor

  def shared(ckpt, *, protocol="davis", **kwargs):
    if built and built[0][0] != ckpt:
      return real(ckpt, protocol=protocol, **kwargs)
    if not built:
      built.append((ckpt, *real(ckpt, protocol=protocol, **kwargs)))
    _, predictor, cfg = built[0]
    predictor.non_overlap_masks = protocol == "davis"
    return predictor, cfg

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(eval_video, "build_predictor", shared)
    yield built


@pytest.fixture(scope="module")
def davis_run(davis_root, ckpt, predictors, tmp_path_factory):
  out = tmp_path_factory.mktemp("out") / "davis"
  rc, stdout, stderr = _run(["--ckpt", ckpt, "--data", davis_root, "--out", out, "--strips", 1])
  assert rc == 0, stderr
  return out, stdout, json.loads((out / "jf.json").read_text())


@pytest.fixture(scope="module")
def sav_run(sav_root, ckpt, predictors, davis_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("out") / "sav"
  rc, stdout, stderr = _run(["--ckpt", ckpt, "--data", sav_root, "--protocol", "sav",
                             "--videos", SAV_VIDEO, "--out", out, "--strips", 0, "--quiet"])
  assert rc == 0, stderr
  return out, stdout, json.loads((out / "jf.json").read_text())


def _propagate(predictor, root, name, prompts):
  """{obj: (T, H, W) bool} of `logits > 0` after prompting frame 0 with the masks."""
  state = predictor.init_state(os.path.join(root, "JPEGImages", name))
  for obj, mask in prompts.items():
    predictor.add_new_mask(state, 0, obj, mask)
  masks = {}
  for t, obj_ids, logits in predictor.propagate_in_video(state):
    for i, obj in enumerate(obj_ids):
      masks.setdefault(obj, [None] * state.num_frames)[t] = logits[i, 0] > 0
  return {obj: np.stack(m) for obj, m in masks.items()}


def test_davis_end_to_end(davis_run, ckpt):
  out, stdout, result = davis_run
  names = [f"synth_{i:04d}" for i in range(NUM_VIDEOS)]
  d = result["dataset"]
  assert (d["num_videos"], d["num_objects"]) == (NUM_VIDEOS, 2 * NUM_VIDEOS)
  assert d["J&F"] == pytest.approx((d["J"] + d["F"]) / 2)
  assert f"J&F {d['J&F']:.2f}  J {d['J']:.2f}  F {d['F']:.2f}" in stdout
  for name in names:
    assert name in stdout
    assert result["videos"][name]["scored_frames"] == NUM_FRAMES - 2
  assert result["settings"]["ckpt"] == os.path.abspath(ckpt)
  assert result["settings"]["kind"] == "fp" and not result["settings"]["quantized"]
  with open(out / "jf_per_video.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["video"] for r in rows] == names
  assert float(rows[0]["J&F"]) == pytest.approx(result["videos"][names[0]]["J&F"], abs=1e-4)
  with open(out / "jf_per_object.csv") as f:
    assert len(list(csv.DictReader(f))) == 2 * NUM_VIDEOS
  strips = sorted(os.listdir(out / "strips"))
  assert strips == [f"{names[0]}.png"]  # --strips 1
  with Image.open(out / "strips" / strips[0]) as img:
    assert img.width > 5 * SIZE[1] // 2 and img.height > SIZE[0]


def test_json_equals_metrics_on_predictor_outputs(davis_run, sav_run, davis_root, sav_root,
                                                  predictors):
  """Recomputes both runs' numbers from the predictor's own outputs, without eval.video."""
  _, predictor, _ = predictors[0]
  davis = davis_run[2]
  per_video = {}
  predictor.non_overlap_masks = True
  for name in davis["videos"]:
    gt = _labels(davis_root, name)
    ids = [int(i) for i in np.unique(gt[0]) if i]
    masks = _propagate(predictor, davis_root, name, {i: gt[0] == i for i in ids})
    pred = np.zeros_like(gt)
    for obj in sorted(masks, reverse=True):  # lowest id wins, as in the DAVIS label maps
      pred[masks[obj]] = obj
    per_video[name] = metrics.jf_video(pred, gt, protocol="davis")
    got = davis["videos"][name]["objects"]
    assert sorted(got) == [str(i) for i in sorted(per_video[name])]
    for obj, (j, f) in per_video[name].items():
      assert got[str(obj)]["J"] == pytest.approx(j, abs=1e-9)
      assert got[str(obj)]["F"] == pytest.approx(f, abs=1e-9)
  want = metrics.jf_dataset(per_video)
  for key in ("J", "F", "J&F"):
    assert davis["dataset"][key] == pytest.approx(want[key], abs=1e-9)

  sav = sav_run[2]
  predictor.non_overlap_masks = False  # SA-V: per-object PNGs may overlap
  gt = _labels(davis_root, SAV_VIDEO)[list(SAV_FRAMES)]
  ids = [int(i) for i in np.unique(gt) if i]
  masks = _propagate(predictor, sav_root, SAV_VIDEO, {i: gt[0] == i for i in ids})
  jf = metrics.jf_video({o: m[list(SAV_FRAMES)] for o, m in masks.items()},
                        {i: gt == i for i in ids}, protocol="sav")
  got = sav["videos"][SAV_VIDEO]
  assert got["scored_frames"] == len(SAV_FRAMES) - 2
  assert sorted(got["objects"]) == [str(i) for i in sorted(jf)]
  for obj, (j, f) in jf.items():
    assert got["objects"][str(obj)]["J"] == pytest.approx(j, abs=1e-9)
    assert got["objects"][str(obj)]["F"] == pytest.approx(f, abs=1e-9)
  assert sav["dataset"]["J&F"] == pytest.approx(metrics.jf_dataset([jf])["J&F"], abs=1e-9)
  assert "J&F" in sav_run[1]


@pytest.mark.slow
def test_quantized_checkpoint(davis_root, ckpt, tmp_path):
  """A quantized Orbax checkpoint (W4A4 min-max, uncalibrated) evaluates like an FP one."""
  from qsam2_jax import checkpoint
  from qsam2_jax.quant.recipe import QuantRecipe
  model, cfg = checkpoint.load_sam2(ckpt)
  recipe = QuantRecipe(bits=4, method="minmax")
  model, _ = recipe.apply(model)
  qckpt = checkpoint.save_model(tmp_path / "q", model, {
      "config": cfg.name, "image_size": cfg.image_size, "kind": "quant",
      "quant": recipe.to_dict()})
  rc, stdout, stderr = _run(["--ckpt", qckpt, "--data", davis_root, "--max-videos", 1,
                             "--out", tmp_path / "out", "--strips", 0, "--quiet"])
  assert rc == 0, stderr
  result = json.loads((tmp_path / "out" / "jf.json").read_text())
  assert result["settings"]["quantized"] and result["settings"]["quant"] == recipe.to_dict()
  assert result["dataset"]["num_objects"] == 2 and "J&F" in stdout


# ------------------------------------------------------------------------------- user errors


@pytest.fixture
def broken(davis_root, tmp_path):
  """A writable copy of the DAVIS-layout data to break."""
  root = tmp_path / "data"
  shutil.copytree(davis_root, root)
  return root


def _error(argv, tmp_path):
  rc, stdout, stderr = _run(argv + ["--ckpt", "/nonexistent/ckpt", "--out", tmp_path / "out"])
  assert rc == 2, stdout + stderr
  assert stderr.startswith("error: ") and "Traceback" not in stderr
  return stderr


def test_missing_data_root(tmp_path):
  assert "data root not found" in _error(["--data", tmp_path / "nope"], tmp_path)
  assert "missing" in _error(["--data", tmp_path], tmp_path)  # no JPEGImages/ or Annotations/


def test_video_without_annotations(broken, tmp_path):
  shutil.rmtree(broken / "Annotations" / "synth_0001")
  assert "'synth_0001' has no annotations" in _error(["--data", broken], tmp_path)


def test_first_frame_unannotated(broken, tmp_path):
  os.remove(broken / "Annotations" / "synth_0000" / "00000.png")
  assert "first frame (00000) has no annotation" in _error(["--data", broken], tmp_path)


def test_first_frame_without_objects(broken, tmp_path):
  save_palette_png(np.zeros(SIZE, np.uint8), broken / "Annotations" / "synth_0000" / "00000.png")
  assert "no object in the first frame" in _error(["--data", broken], tmp_path)


def test_annotation_size_mismatch(broken, tmp_path):
  save_palette_png(np.ones((SIZE[0] // 2, SIZE[1]), np.uint8),
                   broken / "Annotations" / "synth_0000" / "00000.png")
  assert "but the frames are 256x256" in _error(["--data", broken], tmp_path)


def test_unknown_video(davis_root, tmp_path):
  assert "'synth_9999' not found" in _error(["--data", davis_root, "--videos",
                                              "synth_0000,synth_9999"], tmp_path)


def test_layout_protocol_mismatch(davis_root, sav_root, tmp_path):
  assert "use --protocol davis" in _error(["--data", davis_root, "--protocol", "sav"], tmp_path)
  assert "use --protocol sav" in _error(["--data", sav_root, "--protocol", "davis"], tmp_path)


def test_missing_checkpoint(davis_root, tmp_path):
  assert "checkpoint not found" in _error(["--data", davis_root, "--max-videos", "1"], tmp_path)


def test_overlay_and_frame_picks():
  img = np.full((20, 30, 3), 100, np.uint8)
  m = np.zeros((20, 30), bool)
  m[5:15, 5:20] = True
  for masks in ({2: m}, m.astype(np.uint8) * 2):  # mapping or label map
    out = plots.overlay(img, masks, alpha=1.0, outline=0)
    assert (out[m] == plots.color_of(2)).all() and (out[~m] == 100).all()
  edge = plots.overlay(img, {1: m}, alpha=0.0, outline=1)
  assert (edge[5, 10] == plots.color_of(1)).all() and (edge[10, 10] == 100).all()
  assert plots.pick_frames(6, 5) == [0, 1, 2, 4, 5]
  assert plots.pick_frames(3, 5) == [0, 1, 2] and plots.pick_frames(1, 5) == [0]

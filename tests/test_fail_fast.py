"""Fail fast and clean (issue 12): one table of user mistakes, each refused at once.

Every CLI case runs the command's `main(argv)` in process (two also as real subprocesses) and
asserts: exit status 2, at most 3 lines of output ending in one `error: ...` line that names the
flag or file, no traceback, under 10 s (validation happens before any model is built or data
read in bulk), and no new file or folder under the test's folder (the working directory too).
API cases assert the typed error, and that `ImagePredictor` and `VideoPredictor` use the same
words.

Read-only output folders: as root, permissions do not stop writes, so the fixture mounts a
read-only tmpfs (`mount -t tmpfs -o ro`); as another user a 0555 folder is read-only for real.
Where neither works (root without mount rights) the read-only cases are skipped with that
reason; the "under a regular file" cases (an uncreatable path) run everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest

from convert import from_torch, random_checkpoint, to_torch
from eval import demo, report, size, synthetic as synthetic_cli
from eval import image as eval_image
from eval import video as eval_video
from qsam2_jax.data import synthetic
from train import calibrate, ptq, qat

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 10.0


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Inputs shared by the cases (outside each case's watched folder)."""
  root = tmp_path_factory.mktemp("inputs")
  good = synthetic.make_image_dataset(root / "coco", 2, (32, 32), seed=0)
  bad = root / "bad_coco"
  bad.mkdir()
  (bad / "images").symlink_to(good / "images")
  data = json.loads((good / "annotations.json").read_text())
  data["annotations"][1]["segmentation"] = [[1.0, 2.0, 3.0]]   # a "polygon" of 3 numbers
  (bad / "annotations.json").write_text(json.dumps(data))
  (root / "text.pt").write_text("hello, I am not a checkpoint\n")
  with zipfile.ZipFile(root / "fake.pt", "w") as z:   # the layout of torch.save, junk inside
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    z.writestr("archive/byteorder", b"little")
  whole = (root / "fake.pt").read_bytes()
  (root / "truncated.pt").write_bytes(whole[:len(whole) // 2])
  (root / "plain_dir").mkdir()
  (root / "plain_dir" / "notes.txt").write_text("not a run")
  return {"coco": str(good), "bad_coco": str(bad), "text_pt": str(root / "text.pt"),
          "fake_pt": str(root / "fake.pt"), "truncated_pt": str(root / "truncated.pt"),
          "plain_dir": str(root / "plain_dir"), "a_file": str(root / "text.pt")}


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
  """A folder nothing can be written into, or None where this user cannot make one."""
  path = tmp_path_factory.mktemp("readonly")
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    yield str(path)
    os.chmod(path, 0o755)
    return
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    yield None
    return
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", str(path)], capture_output=True)


def _tree(root: Path) -> set:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
  name: str
  main: Callable[[Sequence[str]], int]
  argv: Callable[[dict, Path, Optional[str]], list]   # (files, work dir, read-only dir)
  fragment: str                                       # expected in the error line
  names: str                                          # the flag or file it must name
  needs_readonly: bool = False


def _out_under_file(f, w, ro):
  return ["--out", f["a_file"] + "/run"]


CASES = [
    # --- issue 12: uncreatable / read-only --out, before any loading
    Case("qat --out under a file", qat.main, lambda f, w, ro: _out_under_file(f, w, ro),
         "is a file, not a folder", "--out"),
    Case("qat --out read-only", qat.main, lambda f, w, ro: ["--out", ro + "/run"],
         "read-only file system" if os.geteuid() == 0 else "cannot write", "--out",
         needs_readonly=True),
    Case("ptq --out under a file", ptq.main, _out_under_file, "is a file, not a folder", "--out"),
    Case("ptq --out read-only", ptq.main, lambda f, w, ro: ["--out", ro + "/ptq"],
         "cannot write", "--out", needs_readonly=True),
    Case("calibrate --out under a file", calibrate.main, _out_under_file,
         "is a file, not a folder", "--out"),
    Case("from_torch --out read-only", from_torch.main,
         lambda f, w, ro: ["--ckpt", f["fake_pt"], "--out", ro + "/ckpt"], "cannot write",
         "--out", needs_readonly=True),
    Case("eval.image --out read-only", eval_image.main,
         lambda f, w, ro: ["--data", f["coco"], "--out", ro + "/eval"], "cannot write", "--out",
         needs_readonly=True),
    Case("eval.synthetic --out read-only", synthetic_cli.main,
         lambda f, w, ro: ["images", "--out", ro + "/syn", "--images", "1"], "cannot write",
         "--out", needs_readonly=True),
    Case("eval.synthetic --out under a file", synthetic_cli.main,
         lambda f, w, ro: ["images", "--out", f["a_file"] + "/syn"], "is a file, not a folder",
         "--out"),
    Case("eval.video --out under a file", eval_video.main,
         lambda f, w, ro: ["--out", f["a_file"] + "/v"], "is a file, not a folder", "--out"),
    Case("eval.report --out under a file", report.main,
         lambda f, w, ro: ["--runs", f["coco"], "--out", f["a_file"] + "/r.md"],
         "is a file, not a folder", "--out"),
    Case("to_torch --out under a file", to_torch.main,
         lambda f, w, ro: ["--ckpt", f["fake_pt"], "--out", f["a_file"] + "/x.pt"],
         "is a file, not a folder", "--out"),
    # --- unusable annotation: named with its file and index, no run folder left
    Case("qat --data with a 3-number polygon", qat.main,
         lambda f, w, ro: ["--data", f["bad_coco"], "--out", str(w / "run"), "--batch-size", "8",
                           "--eval-batch-size", "8"],
         "annotations[1] (id 2) has an unusable segmentation: polygon 0 has 3 numbers",
         "bad_coco/annotations.json"),
    Case("eval.image --data with a 3-number polygon", eval_image.main,
         lambda f, w, ro: ["--data", f["bad_coco"], "--out", str(w / "eval")],
         "polygon 0 has 3 numbers; expected an even count of at least 6",
         "bad_coco/annotations.json"),
    Case("ptq --data with a 3-number polygon", ptq.main,
         lambda f, w, ro: ["--data", f["bad_coco"], "--out", str(w / "ptq")],
         "has an unusable segmentation", "bad_coco/annotations.json"),
    # --- names resolved before the work
    Case("calibrate --sweep-layer TYPO", calibrate.main,
         lambda f, w, ro: ["--sweep-layer", "TYPO", "--out", str(w / "vrc")],
         "is not a VRC layer of sam2.1_hiera_t", "--sweep-layer"),
    # --- eval.demo leaves nothing behind
    Case("eval.demo --ckpt a text file", demo.main,
         lambda f, w, ro: ["--ckpt", f["text_pt"], "--out", str(w / "demo")],
         "is a text file, not a PyTorch checkpoint", "--ckpt"),
    Case("eval.demo --image-size 100", demo.main,
         lambda f, w, ro: ["--image-size", "100", "--out", str(w / "demo")],
         "must be a multiple of 32", "--image-size"),
    # --- eval.report on something that is not a run
    Case("eval.report --runs a file", report.main,
         lambda f, w, ro: ["--runs", f["text_pt"], "--out", str(w / "r.md")],
         "nothing to report: not a run", "--runs"),
    # --- misleading words, now precise
    Case("qat --resume without --out", qat.main, lambda f, w, ro: ["--resume"],
         "needs --out", "--resume"),
    Case("qat --out holding only a readme", qat.main,
         lambda f, w, ro: ["--out", f["plain_dir"]], "is not a run of this project", "--out"),
    Case("qat --overwrite on a folder not ours", qat.main,
         lambda f, w, ro: ["--out", f["plain_dir"], "--overwrite"],
         "is not a run of this project", "--out"),
    Case("qat --resume on a folder not ours", qat.main,
         lambda f, w, ro: ["--out", f["plain_dir"], "--resume"],
         "is not a run of this project", "--out"),
    Case("eval.image --ckpt a folder that is no checkpoint", eval_image.main,
         lambda f, w, ro: ["--ckpt", f["plain_dir"], "--out", str(w / "e")],
         "a folder but not a checkpoint of this project", "--ckpt"),
    Case("from_torch --ckpt a folder", from_torch.main,
         lambda f, w, ro: ["--ckpt", f["plain_dir"], "--out", str(w / "c")],
         "is a folder, expected a PyTorch .pt file", "--ckpt"),
    Case("from_torch --ckpt a text file", from_torch.main,
         lambda f, w, ro: ["--ckpt", f["text_pt"], "--out", str(w / "c")],
         "is a text file, not a PyTorch checkpoint", "--ckpt"),
    Case("from_torch --ckpt a truncated .pt", from_torch.main,
         lambda f, w, ro: ["--ckpt", f["truncated_pt"], "--out", str(w / "c")],
         "is truncated or damaged", "--ckpt"),
    Case("eval.size --ckpt a truncated .pt", size.main,
         lambda f, w, ro: ["--ckpt", f["truncated_pt"]], "is truncated or damaged", "--ckpt"),
    Case("qat --init a text file", qat.main,
         lambda f, w, ro: ["--init", f["text_pt"], "--out", str(w / "run"), "--batch-size", "8",
                           "--eval-batch-size", "8"],
         "is a text file, not a PyTorch checkpoint", "--init"),
    # --- bad input already handled before issue 12 (kept)
    Case("qat --bits 1", qat.main, lambda f, w, ro: ["--bits", "1"], "invalid choice: 1",
         "--bits"),
    Case("qat --data missing", qat.main, lambda f, w, ro: ["--data", str(w / "nope")],
         "does not exist", "--data"),
    Case("ptq --method gptq", ptq.main, lambda f, w, ro: ["--method", "gptq", "--out", "x"],
         "invalid choice: 'gptq'", "--method"),
    Case("calibrate --images 0", calibrate.main,
         lambda f, w, ro: ["--images", "0", "--out", str(w / "v")], "must be at least 1",
         "--images"),
    Case("from_torch --ckpt missing", from_torch.main,
         lambda f, w, ro: ["--ckpt", str(w / "nope.pt"), "--out", str(w / "c")],
         "checkpoint not found", "--ckpt"),
    Case("to_torch nothing to write", to_torch.main, lambda f, w, ro: ["--ckpt", f["fake_pt"]],
         "nothing to write", "--out"),
    Case("eval.size --packed missing", size.main,
         lambda f, w, ro: ["--packed", str(w / "nope.qsam2")], "no such file", "--packed"),
    Case("eval.image --max-images 0", eval_image.main, lambda f, w, ro: ["--max-images", "0"],
         "must be at least 1", "--max-images"),
    Case("eval.image --boxes missing", eval_image.main,
         lambda f, w, ro: ["--data", f["coco"], "--boxes", str(w / "dets.json"),
                           "--out", str(w / "e")], "does not exist", "--boxes"),
    Case("eval.video --data missing", eval_video.main,
         lambda f, w, ro: ["--data", str(w / "nope"), "--out", str(w / "v")],
         "data root not found", "nope"),
    Case("eval.synthetic --size 8", synthetic_cli.main,
         lambda f, w, ro: ["images", "--out", str(w / "s"), "--size", "8", "32"], ">= 16",
         "--size"),
    Case("random_checkpoint --out under a file", random_checkpoint.main,
         lambda f, w, ro: ["--out", f["a_file"] + "/r.pt"], "is a file, not a folder", "--out"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_mistakes_fail_fast_and_clean(case, files, readonly, tmp_path, monkeypatch,
                                           capsys):
  if case.needs_readonly and readonly is None:
    pytest.skip("root without mount rights: no way to make a read-only folder here")
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.chdir(work)   # default outputs (runs/...) would land here
  argv = case.argv(files, work, readonly)
  before = _tree(tmp_path)
  t = time.perf_counter()
  rc = case.main(argv)
  seconds = time.perf_counter() - t
  out, err = capsys.readouterr()
  lines = [ln for ln in (out + err).splitlines() if ln.strip()]
  assert rc == 2, (rc, out, err)
  assert len(lines) <= 3 and lines[-1].startswith("error: "), lines
  assert "Traceback" not in err
  assert case.fragment in lines[-1] and case.names in lines[-1], lines[-1]
  assert seconds < TIME_LIMIT_S, f"{case.name}: {seconds:.1f} s"
  assert _tree(tmp_path) == before, f"left behind: {_tree(tmp_path) - before}"


def test_demo_removes_what_it_created_when_it_fails(tmp_path, monkeypatch, capsys):
  """eval.demo writes a large random .pt and an Orbax folder before it can fail: both go.

  The two expensive writers (the random checkpoint, the conversion) are replaced by stand-ins
  that write like them; the conversion then fails as a bad checkpoint would."""
  from qsam2_jax.errors import UserError

  def fake_random(argv):   # like `save_official`: creates the folder, then the file
    pt = Path(argv[argv.index("--out") + 1])
    pt.parent.mkdir(parents=True, exist_ok=True)
    pt.write_bytes(b"\0" * 1_000_000)

  def fake_convert(argv):
    out = Path(argv[argv.index("--out") + 1])
    (out / "0").mkdir(parents=True)
    raise UserError(f"--ckpt {argv[argv.index('--ckpt') + 1]}: stand-in conversion failure")

  monkeypatch.setattr(random_checkpoint.main, "__wrapped__", fake_random)
  monkeypatch.setattr(from_torch.main, "__wrapped__", fake_convert)
  for out in (tmp_path / "new", tmp_path / "existing"):
    if out.name == "existing":
      out.mkdir()
      (out / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    assert demo.main(["--out", str(out)]) == 2
    assert "stand-in conversion failure" in capsys.readouterr().err
    assert _tree(tmp_path) == before, _tree(tmp_path) - before


def test_debug_shows_the_traceback_and_help_is_honest(files, tmp_path, capsys):
  assert from_torch.main(["--ckpt", files["text_pt"], "--out", str(tmp_path / "c"),
                          "--debug"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --ckpt")
  with pytest.raises(SystemExit) as e:
    random_checkpoint.parse_args(["--help"])
  text = capsys.readouterr().out
  assert e.value.code == 0 and "--no-randomize-constants" in text
  assert "--randomize-constants" not in text.replace("--no-randomize-constants", "")
  assert "--debug" in text


@pytest.mark.parametrize("module, argv, fragment", [
    ("train.qat", ["--out", "{file}/run"], "--out {file}/run: cannot be created"),
    ("convert.from_torch", ["--ckpt", "{file}", "--out", "{work}/c"],
     "--ckpt {file} is a text file"),
])
def test_as_a_real_process(module, argv, fragment, files, tmp_path):
  subs = {"file": files["text_pt"], "work": str(tmp_path)}
  argv = [a.format(**subs) for a in argv]
  t = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True,
                     text=True, timeout=60)
  lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert len(lines) <= 3 and fragment.format(**subs) in lines[-1], lines
  assert time.perf_counter() - t < 30   # interpreter and JAX start-up included
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- predictors


@pytest.fixture(scope="module")
def predictors():
  """Both predictors on one reduced random model (64² input), an image / a video set."""
  from qsam2_jax.model.configs import get_config
  from qsam2_jax.model.sam2 import build_sam2
  from qsam2_jax.predictor import ImagePredictor
  from qsam2_jax.video_predictor import VideoPredictor
  cfg = get_config("sam2.1_hiera_t", image_size=64)
  cfg = cfg.replace(hiera=dataclasses.replace(cfg.hiera, stages=(1, 1, 1, 1),
                                              global_att_blocks=(2,)))
  model = build_sam2(cfg, seed=0)
  image = ImagePredictor(model)
  image.set_image(np.zeros((40, 50, 3), np.uint8))
  video = VideoPredictor(model, show_progress=False)
  state = video.init_state([np.zeros((40, 50, 3), np.uint8)])
  return image, video, state


BAD_PROMPTS = [
    # name, image call, video call, words both use
    ("box x1 < x0",
     lambda p: p.predict(box=np.array([30.0, 5, 10, 20])),
     lambda v, st: v.add_new_points_or_box(st, 0, 1, box=np.array([30.0, 5, 10, 20])),
     "box 0 = [30.0, 5.0, 10.0, 20.0] has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1)"),
    ("box y1 < y0",
     lambda p: p.predict(box=np.array([1.0, 25, 10, 20])),
     lambda v, st: v.add_new_points_or_box(st, 0, 1, box=np.array([1.0, 25, 10, 20])),
     "has x1 < x0 or y1 < y0"),
    ("non-finite box",
     lambda p: p.predict(box=np.array([np.nan, 5, 10, 20])),
     lambda v, st: v.add_new_points_or_box(st, 0, 1, box=np.array([np.nan, 5, 10, 20])),
     "box holds a non-finite coordinate (NaN or inf)"),
    ("non-finite point",
     lambda p: p.predict(point_coords=np.array([[np.inf, 3.0]]), point_labels=np.array([1])),
     lambda v, st: v.add_new_points_or_box(st, 0, 1, points=np.array([[np.inf, 3.0]]),
                                           labels=np.array([1])),
     "holds a non-finite coordinate (NaN or inf)"),
    ("empty image",
     lambda p: p.set_image(np.zeros((0, 5, 3), np.uint8)),
     lambda v, st: v.init_state([np.zeros((0, 5, 3), np.uint8)]),
     "is empty (0x5 pixels); expected at least 1x1"),
]


@pytest.mark.parametrize("name, image_call, video_call, words", BAD_PROMPTS,
                         ids=[b[0] for b in BAD_PROMPTS])
def test_predictors_refuse_the_same_prompts_with_the_same_words(name, image_call, video_call,
                                                                words, predictors):
  from qsam2_jax.errors import UserError
  from qsam2_jax.prompt_checks import PromptError
  image, video, state = predictors
  t = time.perf_counter()
  with pytest.raises(PromptError if name != "empty image" else UserError) as e_image:
    image_call(image)
  with pytest.raises(UserError) as e_video:
    video_call(video, state)
  assert time.perf_counter() - t < TIME_LIMIT_S
  assert words in str(e_image.value) and words in str(e_video.value), (e_image, e_video)
  if name != "empty image":   # frames are read by video_io (VideoError); prompts are PromptErrors
    assert isinstance(e_video.value, PromptError)


def test_prompts_outside_the_image_are_kept_as_given(predictors, monkeypatch):
  """Documented behaviour: no clipping, and both predictors hand the model the same model-input
  coordinates (what each passes on is captured; the model itself is not run)."""
  image, video, state = predictors
  box = np.array([-10.0, -5.0, 70.0, 45.0])      # beyond the 50x40 image on every side
  click = np.array([[60.0, -3.0]])
  coords, labels, _ = image._prep_prompts(click, np.array([1]), box, None, True)
  seen = {}

  def capture(st, obj_idx, frame_idx, points=None, **kwargs):
    seen["points"] = points
    return "cond_frame_outputs"

  monkeypatch.setattr(video, "_prompt_frame", capture)
  monkeypatch.setattr(video, "_consolidated_video_res", lambda *a: None)
  video.add_new_points_or_box(state, 0, 7, points=click, labels=np.array([1]), box=box)
  s = image.cfg.image_size
  expected = [[-10 * s / 50, -5 * s / 40], [70 * s / 50, 45 * s / 40], [60 * s / 50, -3 * s / 40]]
  np.testing.assert_allclose(coords[0], expected, rtol=1e-6)
  np.testing.assert_allclose(seen["points"][0][0], expected, rtol=1e-6)
  np.testing.assert_array_equal(labels[0], seen["points"][1][0])   # [2, 3, 1] in both


def test_qat_removes_a_fresh_run_that_fails_before_its_first_checkpoint(tmp_path, monkeypatch,
                                                                       capsys):
  """What train.qat writes before its first checkpoint (logs, VRC report) goes when it fails;
  a folder the user made (empty) stays, emptied. The training itself is a stand-in here."""
  from qsam2_jax.errors import UserError

  def failing_run(cfg, out, *args):
    os.makedirs(os.path.join(out, "logs"))
    with open(os.path.join(out, "logs", "metrics.jsonl"), "w") as f:
      f.write("{}\n")
    raise UserError("--data stand-in: an image that cannot be read")

  monkeypatch.setattr(qat, "_run", failing_run)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "empty").mkdir()
  for out, remains in ((tmp_path / "new", None), (tmp_path / "empty", [])):
    assert qat.main(["--out", str(out), "--batch-size", "8", "--eval-batch-size", "8"]) == 2
    assert "stand-in" in capsys.readouterr().err
    assert (sorted(os.listdir(out)) if out.exists() else None) == remains

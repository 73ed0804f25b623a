"""eval.study: the row table, the skip / resume logic of a run folder, and the report.

The report is checked on run folders whose done.json files are written here by hand: every
table cell must equal the hand-made inputs (mean and sample std computed here independently),
the LR choice and the best baseline follow the validation numbers, and the gaps to the paper's
claims are the differences of those inputs. The end-to-end run of the real commands on a tiny
budget is in the slow suite.
"""

from __future__ import annotations

import json
import os
import statistics
import textwrap
import time

import pytest

from eval import study, study_report, study_runs
from eval import study_rows as sr
from qat_testlib import tiny_init  # noqa: F401 - fixture
from qsam2_jax.errors import UserError
from qsam2_jax.files import write_json


# ---------------------------------------------------------------------------- rows


def test_row_table_holds_the_issue_table():
  rows = sr.table_rows((0, 1, 2))
  names = [r.name for r in rows]
  assert len(names) == len(set(names))
  assert {r.name for r in rows if r.kind == "ptq"} == {
      f"ptq-{m}-w{b}a{b}" for m in ("minmax", "mse", "vrcmse") for b in (8, 4, 2)}
  assert {r.name for r in rows if r.kind == "qat" and r.seed == 0} == {
      f"qat-{m}-w{b}a{b}" for m in ("minmax", "pact", "lsq", "qsam2") for b in (4, 3, 2)}
  abl = {r.variant: r for r in rows if r.kind == "ablation"}
  assert set(abl) == {"lsc", "vrc+lsq", "nomomentum", "attnfloat"}
  assert all(r.bits == 2 for r in abl.values())
  assert abl["lsc"].method == "lsc" and abl["lsc"].lr_of == "qsam2"
  assert abl["vrc+lsq"].method == "lsq" and abl["vrc+lsq"].vrc_init
  assert abl["nomomentum"].qat_flags == ("--ema-momentum", "0")
  assert abl["attnfloat"].qat_flags == ("--attn-bits", "16", "--softmax-bits", "16")
  seeds = [r for r in rows if r.seed]
  assert sorted(r.name for r in seeds) == ["qat-best-w2a2-s1", "qat-best-w2a2-s2",
                                           "qat-qsam2-w2a2-s1", "qat-qsam2-w2a2-s2"]
  assert {r.group for r in seeds} == {"qat-best-w2a2", "qat-qsam2-w2a2"}
  best = sr.resolve_best(seeds[-1], "lsq")
  assert best.name == "qat-lsq-w2a2-s2" and best.group == "qat-lsq-w2a2" and best.lr_of == "lsq"
  assert [r.name for r in sr.table_rows((0,)) if r.seed] == []


def test_row_filter():
  rows = sr.table_rows()
  assert [r.name for r in sr.select(rows, "fp,ptq-minmax-w8a8")] == ["fp", "ptq-minmax-w8a8"]
  assert {r.name for r in sr.select(rows, "abl-*")} == {
      "abl-lsc-w2a2", "abl-vrclsq-w2a2", "abl-nomomentum-w2a2", "abl-attnfloat-w2a2"}
  with pytest.raises(UserError, match="'qat-foo' matches no row"):
    sr.select(rows, "fp,qat-foo")


def _plan(tmp_path, *extra):
  return study.Plan(study.parse_args(["--out", str(tmp_path / "study"), "--lr-grid",
                                      "1e-4,1e-3", *extra]))


def test_plan_commands(tmp_path):
  """The commands are the public ones with the study's flags; the pretraining is the recipe
  that climbs (box prompts, vision lr 1e-5), then boxes and clicks from its checkpoint; the
  ablations' flags reach train.qat; VRC + LSQ trains LSQ from a train.calibrate (VRC)
  checkpoint."""
  plan = _plan(tmp_path, "--pretrain-steps", "30", "--pretrain-warmup", "50",
               "--pretrain-mixed-steps", "20")
  pre = plan.pretrain_run()
  cmd = pre.command_line()
  assert cmd.startswith(f"python -m train.qat --method fp --init {plan.init_path} ")
  for flag in ("--lr 0.001", "--vision-lr 1e-05", "--box-prob 1 ", "--masks-per-image 8",
               "--batch-size 8", "--warmup-steps 30", "--dtype float32", "--image-size 128",
               "--steps 30"):
    assert flag in cmd, flag
  mixed = plan.pretrain_mixed_run()
  cmd2 = mixed.command_line()
  assert cmd2.startswith(f"python -m train.qat --method fp --init {pre.out} ")
  for flag in ("--lr 0.001", "--vision-lr 1e-05", "--box-prob 0.5 ", "--steps 20",
               "--warmup-steps 20"):
    assert flag in cmd2, flag
  assert mixed.folder != pre.folder and mixed.resumable
  assert plan.fp_path == mixed.out
  rows0 = {r.name: r for r in sr.table_rows()}
  assert [r.name for r in plan.model_runs(rows0["fp"])] == ["init", "pretrain", "pretrain-mixed"]
  assert all("--style varied" in r.command_line() for r in plan.data_runs())
  assert plan.init_run().command_line().startswith(
      "python -m convert.random_checkpoint --config sam2.1_hiera_t --seed 0 "
      "--no-randomize-constants")
  names = [r.name for r in plan.data_runs()]
  assert names == ["train-images", "val-images", "test-images", "train-videos", "test-videos"]
  seeds = [r.args[r.args.index("--seed") + 1] for r in plan.data_runs()]
  assert seeds == [0, 1, 2, 0, 2]
  rows = {r.name: r for r in sr.table_rows()}
  assert plan.model_runs(rows["qat-lsq-w4a4"]) is None    # the LR is not chosen yet
  ptq = plan.model_runs(rows["ptq-vrcmse-w2a2"])[0].command_line()
  assert "train.ptq" in ptq and "--method vrc+mse" in ptq and "--bits 2" in ptq
  assert f"--init {mixed.out} " in ptq     # the proxy is the second phase's model
  # PTQ calibrates the memory path on clips of the training videos, like QAT
  assert f"--video-data {plan.split('train-videos')} --calib-clips 8 --video-frames 8" in ptq
  assert "--images 256" in ptq   # enough rows for VRC on the last Hiera stage at 128²
  _fake_lr(plan, {"qsam2": (0.2, 0.3), "lsq": (0.1, 0.05)})
  nomom = plan.model_runs(rows["abl-nomomentum-w2a2"])[-1].command_line()
  assert "--method qsam2 --bits 2" in nomom and "--ema-momentum 0" in nomom
  assert "--calib-clips 8" in nomom
  assert "--lr 0.001" in nomom          # qsam2's choice
  vl = plan.model_runs(rows["abl-vrclsq-w2a2"])
  assert [r.module for r in vl] == ["train.calibrate", "train.qat"]
  assert f"--init {vl[0].out}" in vl[1].command_line() and "--method lsq" in vl[1].command_line()
  assert "--lr 0.0001" in vl[1].command_line()
  q2 = plan.model_runs(rows["qat-qsam2-w2a2"])
  assert len(q2) == 1 and q2[0].folder.endswith(os.path.join("lr", "qat-qsam2-w2a2-lr0.001"))


def test_plan_pretraining_phases(tmp_path):
  """--pretrain-mixed-steps 0: the box phase makes the proxy; --pretrain-steps 0: no
  pretraining at all, --init is the proxy (the second phase continues the first)."""
  one = _plan(tmp_path, "--pretrain-mixed-steps", "0", "--synthetic-style", "basic")
  assert one.pretrain_mixed_run() is None and one.fp_path == one.pretrain_run().out
  assert all("--style basic" in r.command_line() for r in one.data_runs())
  (tmp_path / "ckpt").mkdir()
  none = _plan(tmp_path, "--pretrain-steps", "0", "--init", str(tmp_path / "ckpt"))
  assert none.pretrain_runs() == [] and none.fp_path == str(tmp_path / "ckpt")


def test_plan_with_user_data(tmp_path):
  """--data without --val-data: no synthetic validation split; the trainer holds out the last
  images of --data; the test split is the user's."""
  for d in ("coco", "coco_test"):
    (tmp_path / d).mkdir()
  plan = _plan(tmp_path, "--data", str(tmp_path / "coco"), "--test-data",
               str(tmp_path / "coco_test"))
  assert [r.name for r in plan.data_runs()] == ["train-videos", "test-videos"]
  cmd = plan.pretrain_run().command_line()
  assert f"--data {tmp_path / 'coco'} " in cmd and "--val-data" not in cmd
  assert plan.split("test-images") == str(tmp_path / "coco_test")


def _fake_lr(plan, vals):
  """done.json of the LR-selection runs: {method: (val mIoU at lr 1e-4, at 1e-3)}."""
  for m, (a, b) in vals.items():
    for run, v in zip(plan.lr_runs(m), (a, b)):
      _done(run, {"val_miou": v}, wall=10.0)


def _done(run, metrics, wall=1.0):
  write_json(os.path.join(run.folder, "done.json"),
             {"run": run.name, "command": run.command_line(), "wall_s": wall,
              "finished": "2026-12-07T12:00:00", "metrics": metrics})


# ---------------------------------------------------------------------------- run folders

FAKE_CMD = textwrap.dedent('''
  """A stand-in command: counts its starts; `--fail` exits 1 after leaving a checkpoint-like
  step folder in --out (as an interrupted train.qat)."""
  import os, sys
  args = sys.argv[1:]
  out = args[args.index("--out") + 1]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "..", "starts.txt"), "a") as f:
    f.write(" ".join(args) + "\\n")
  if "--fail" in args and not os.path.exists(os.path.join(out, "..", "failed_once")):
    os.makedirs(os.path.join(out, "3"), exist_ok=True)
    open(os.path.join(out, "3", "_CHECKPOINT_METADATA"), "w").close()
    open(os.path.join(out, "..", "failed_once"), "w").close()
    sys.exit(1)
  with open(os.path.join(out, "result.txt"), "w") as f:
    f.write("42")
''')


@pytest.fixture()
def fake_env(tmp_path, monkeypatch):
  (tmp_path / "mods").mkdir()
  (tmp_path / "mods" / "fake_cmd.py").write_text(FAKE_CMD)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
  return tmp_path


def _starts(folder):
  with open(os.path.join(folder, "starts.txt")) as f:
    return f.read().splitlines()


def test_finished_run_is_skipped(fake_env):
  folder = str(fake_env / "runs" / "a")
  read = lambda out: {"value": int(open(os.path.join(out, "result.txt")).read())}
  run = study_runs.Run("a", folder, "fake_cmd", ["--x", 1], metrics=read)
  done = study_runs.execute(run, say=lambda s: None)
  assert not done["skipped"] and done["metrics"] == {"value": 42}
  saved = json.loads(open(os.path.join(folder, "done.json")).read())
  assert saved["command"] == f"python -m fake_cmd --x 1 --out {run.out}" == run.command_line()
  assert saved["wall_s"] > 0 and saved["machine"]["python"]
  assert open(os.path.join(folder, "command.txt")).read().strip() == run.command_line()
  again = study_runs.execute(run, say=lambda s: None)
  assert again["skipped"] and len(_starts(folder)) == 1          # not started again
  changed = study_runs.Run("a", folder, "fake_cmd", ["--x", 2])
  with pytest.raises(UserError, match="another command than planned"):
    study_runs.execute(changed, say=lambda s: None)


def test_interrupted_run_resumes_or_restarts(fake_env):
  """A resumable command that left a checkpoint continues with --resume (wall times of both
  attempts add up); a non-resumable one starts over from an empty out/."""
  folder = str(fake_env / "runs" / "r")
  run = study_runs.Run("r", folder, "fake_cmd", ["--fail"], resumable=True)
  with pytest.raises(study_runs.RunFailed, match="resume it"):
    study_runs.execute(run, say=lambda s: None)
  assert study_runs.read_done(folder) is None
  done = study_runs.execute(run, say=lambda s: None)
  starts = _starts(folder)
  assert not starts[0].endswith("--resume") and starts[1].endswith("--resume")
  attempts = json.loads(open(os.path.join(folder, "attempts.json")).read())["attempts"]
  assert done["resumes"] == 1 and done["attempts"] == 2
  assert done["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts), abs=0.02)
  assert done["command"] == run.command_line()   # the planned command, without --resume

  folder2 = str(fake_env / "runs" / "n")
  run2 = study_runs.Run("n", folder2, "fake_cmd", ["--fail"])
  with pytest.raises(study_runs.RunFailed, match="retry it"):
    study_runs.execute(run2, say=lambda s: None)
  assert os.path.isdir(os.path.join(run2.out, "3"))
  study_runs.execute(run2, say=lambda s: None)
  assert not _starts(folder2)[1].endswith("--resume")
  assert not os.path.exists(os.path.join(run2.out, "3"))   # the failed attempt's out/ removed


# ---------------------------------------------------------------------------- report


def _fake_eval(plan, name, box=None, click=None, jf=None, size=None, small=None):
  f = lambda what: plan.folder("eval", name, what)
  write = lambda what, m: write_json(os.path.join(f(what), "done.json"),
                                     {"command": "x", "wall_s": 1.0, "metrics": m})
  if box is not None:
    write("image-box", {"mIoU": box, "mIoU_small": small, "mIoU_medium": None,
                        "mIoU_large": None})
  if click is not None:
    write("image-click", {"mIoU": click})
  if jf is not None:
    write("video", {"J&F": jf})
  if size is not None:
    write("size", {"model_ratio": size})


def test_report_from_fake_run_folders(tmp_path):
  plan = _plan(tmp_path, "--pretrain-steps", "100")
  rows = {r.name: r for r in sr.table_rows()}
  _done(plan.init_run(), {}, wall=5.0)
  _done(plan.pretrain_run(), {"val_miou": 0.7}, wall=3000.0)
  _done(plan.pretrain_mixed_run(), {"val_miou": 0.6}, wall=600.0)
  _fake_eval(plan, "fp", box=80.0, click=70.0, jf=65.0, size=1.0, small=75.0)
  # Validation: qsam2 prefers lr 1e-3; baselines: lsq has the best validation mIoU (so it gets
  # the extra seeds) although pact is best on the test split.
  _fake_lr(plan, {"qsam2": (0.20, 0.30), "lsq": (0.25, 0.10), "pact": (0.05, 0.15),
                  "minmax": (0.01, 0.02)})
  assert plan.lr_choice("qsam2") == (1e-3, 0.30) and plan.lr_choice("lsq") == (1e-4, 0.25)
  assert plan.best_baseline() == "lsq"
  test_box = {"qat-qsam2-w2a2": 50.0, "qat-qsam2-w2a2-s1": 54.0, "qat-qsam2-w2a2-s2": 58.0,
              "qat-lsq-w2a2": 40.0, "qat-lsq-w2a2-s1": 42.0, "qat-lsq-w2a2-s2": 44.0,
              "qat-pact-w2a2": 45.0, "qat-minmax-w2a2": 10.0}
  test_jf = {"qat-qsam2-w2a2": 40.0, "qat-qsam2-w2a2-s1": 42.0, "qat-qsam2-w2a2-s2": 47.0,
             "qat-lsq-w2a2": 30.0, "qat-lsq-w2a2-s1": 30.0, "qat-lsq-w2a2-s2": 33.0,
             "qat-pact-w2a2": 20.0, "qat-minmax-w2a2": 5.0}
  for name, box in test_box.items():
    r = rows.get(name) or sr.resolve_best(rows[name.replace("lsq", "best")], "lsq")
    for run in plan.model_runs(r):
      if study_runs.read_done(run.folder) is None:
        _done(run, {"val_miou": 0.1}, wall=100.0)
    _fake_eval(plan, name, box=box, click=box - 5, jf=test_jf[name], size=7.5)
  for name, box in (("ptq-mse-w2a2", 20.0), ("ptq-vrcmse-w2a2", 30.0), ("ptq-mse-w8a8", 78.0),
                    ("ptq-vrcmse-w8a8", 78.0)):
    _done(plan.model_runs(rows[name])[0], {}, wall=20.0)
    _fake_eval(plan, name, box=box)
  _fake_eval(plan, "floor-box", box=60.0)
  _fake_eval(plan, "floor-ellipse", box=65.0)

  out = tmp_path / "docs" / "results.md"
  t0 = time.time()
  text = study_report.build(plan, str(out))
  assert time.time() - t0 < 30
  table = _table(text, "| model | bits |")
  q2 = table[("Q-SAM2 (VRC + LSC)", "W2A2")]
  qs = [50.0, 54.0, 58.0]
  assert q2["box mIoU"] == f"{statistics.mean(qs):.2f} ± {statistics.stdev(qs):.2f}" \
      == "54.00 ± 4.00"
  jf = [40.0, 42.0, 47.0]
  assert q2["J&F"] == f"{statistics.mean(jf):.2f} ± {statistics.stdev(jf):.2f}"
  assert q2["1-click mIoU"] == "49.00 ± 4.00" and q2["runs"] == "3"
  assert q2["wall"] == "70 s"   # mean of the seed-0 LR run (10 s) and two seed runs (100 s)
  lsq = table[("LSQ", "W2A2")]
  assert lsq["box mIoU"] == "42.00 ± 2.00" and lsq["runs"] == "3"   # best baseline's seeds
  assert table[("PACT", "W2A2")]["box mIoU"] == "45.00" and \
      table[("PACT", "W2A2")]["runs"] == "1"
  fp = table[("FP (proxy)", "16")]
  assert (fp["box mIoU"], fp["1-click mIoU"], fp["box small"], fp["J&F"]) == (
      "80.00", "70.00", "75.00", "65.00")
  assert fp["box medium"] == "–" and fp["wall"] == "60.0 min" and fp["× smaller than BF16"] == \
      "1.00"
  assert table[("PTQ VRC + MSE", "W2A2")]["box mIoU"] == "30.00"
  assert table[("LSQ", "W4A4")]["runs"] == "0 (+1 not done)"
  floors = _table(text, "| floor |")
  assert floors[("floor-box", "60.00")]["box mIoU"] == "60.00"
  # Gaps: Q-SAM2 54 vs the best baseline on the test split (pact 45): +9; J&F 43 vs lsq 31.
  g = study_report.gaps(study_report.collect(plan), study_report.floors(plan))
  assert g["box"]["best"] == "pact" and g["box"]["gap"] == pytest.approx(9.0)
  assert g["jf"]["best"] == "lsq" and g["jf"]["gap"] == pytest.approx(
      statistics.mean(jf) - statistics.mean([30.0, 30.0, 33.0]))
  assert g["vrc"][2]["rel"] == pytest.approx(50.0) and g["vrc"][8]["rel"] == pytest.approx(0.0)
  assert g["size"] == pytest.approx(7.5) and g["fp_vs_floor"] == pytest.approx(15.0)
  assert "**+9.00 ppt**" in text and "largest **+50.0 %**" in text and "PLACEHOLDER" in text
  assert "qsam2 0.001 (val 0.3000)" in text and "best baseline (val): lsq" in text
  assert (tmp_path / "docs" / "results_figures" / "miou_vs_bits.png").is_file()
  assert plan.pretrain_run().command_line() in text
  assert plan.pretrain_mixed_run().command_line() in text


def _table(text, head):
  """{(first cell, second cell): {header: cell}} of the markdown table starting with `head`."""
  lines = text.splitlines()
  i = next(k for k, ln in enumerate(lines) if ln.startswith(head))
  header = [c.strip() for c in lines[i].strip("|").split("|")]
  out = {}
  for ln in lines[i + 2:]:
    if not ln.startswith("|"):
      break
    cells = [c.strip() for c in ln.strip("|").split("|")]
    out[(cells[0], cells[1])] = dict(zip(header, cells))
  return out


def test_cli_errors(tmp_path, capsys):
  assert study.main(["--data", str(tmp_path), "--list-rows"]) == 2
  assert "--test-data" in capsys.readouterr().err
  assert study.main(["--stage", "bogus"]) == 2
  assert study.main(["--pretrain-box-prob", "1.5", "--list-rows"]) == 2
  assert "[0, 1]" in capsys.readouterr().err
  assert study.main(["--synthetic-style", "hard", "--list-rows"]) == 2
  capsys.readouterr()
  assert study.main(["--train-images", "9", "--vrc-images", "2", "--list-rows"]) == 2
  err = capsys.readouterr().err
  assert "--train-images 9" in err and "at least 10" in err
  assert study.main(["--out", str(tmp_path / "s"), "--stage", "quantize"]) == 2
  assert "run --stage pretrain first" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_study_end_to_end_then_skips(tmp_path, monkeypatch):
  """fp, one PTQ row and one QAT row through the real commands at 64², a couple of steps;
  the second invocation starts nothing. Image steps only and the `encoder` preset for QAT: the
  whole-model quantized clip step alone compiles for most of an hour on a loaded 2-core CPU
  (measured: the first version of this test hit a 60-min timeout there)."""
  monkeypatch.setenv("XLA_FLAGS", "")   # one CPU device in the commands (conftest forces 8)
  argv = ["--out", str(tmp_path / "study"), "--report", str(tmp_path / "results.md"),
          "--rows", "fp,ptq-minmax-w8a8,qat-qsam2-w2a2", "--image-size", "64",
          "--train-images", "12", "--val-images", "4", "--test-images", "3",
          "--train-videos", "2", "--test-videos", "1", "--video-length", "4",
          "--video-frames", "2", "--pretrain-steps", "2", "--pretrain-mixed-steps", "2",
          "--qat-steps", "2",
          "--lr-grid", "1e-4", "--seeds", "0", "--batch-size", "2", "--masks-per-image", "2",
          "--calib-images", "2", "--calib-clips", "2", "--vrc-images", "2", "--save-every", "1",
          "--eval-every", "0",
          "--video-ratio", "0", "--qat-args", "--preset encoder --calib-clips 0",
          "--train-args", "--eval-batch-size 2"]
  t0 = time.time()
  assert study.main(argv) == 0, open(next(iter(_logs(tmp_path)), os.devnull)).read()[-3000:]
  first = time.time() - t0
  print(f"tiny study: {first:.0f} s")
  text = (tmp_path / "results.md").read_text()
  table = _table(text, "| model | bits |")
  for key in (("FP (proxy)", "16"), ("PTQ min-max", "W8A8"), ("Q-SAM2 (VRC + LSC)", "W2A2")):
    cells = table[key]
    assert cells["runs"] == "1"
    for col in ("box mIoU", "1-click mIoU", "J&F", "× smaller than BF16"):
      assert cells[col] != "–", (key, col)
  eval_done = study_runs.read_done(str(tmp_path / "study" / "eval" / "qat-qsam2-w2a2" /
                                       "image-box"))
  image = json.loads(open(os.path.join(eval_done["out"], "image_metrics.json")).read())
  assert table[("Q-SAM2 (VRC + LSC)", "W2A2")]["box mIoU"] == f"{image['mIoU']:.2f}"
  size = float(table[("Q-SAM2 (VRC + LSC)", "W2A2")]["× smaller than BF16"])
  assert size > 2.0
  dones = sorted(p for p in _walk_done(tmp_path / "study"))
  mtimes = {p: os.path.getmtime(p) for p in dones}
  t1 = time.time()
  assert study.main(argv) == 0
  assert time.time() - t1 < 60
  assert {p: os.path.getmtime(p) for p in _walk_done(tmp_path / "study")} == mtimes


def _walk_done(root):
  for d, _, files in os.walk(root):
    if "done.json" in files:
      yield os.path.join(d, "done.json")


def _logs(tmp_path):
  for d, _, files in os.walk(tmp_path):
    if "log.txt" in files and "done.json" not in files:
      yield os.path.join(d, "log.txt")


@pytest.mark.slow
def test_tiny_ablations_nomomentum_and_vrc_lsq(tmp_path, monkeypatch, tiny_init):  # noqa: F811
  """The two ablations whose recipe is not a --method of its own, through the study's commands
  on the reduced SAM2.1-t (`qat_testlib`, 64², the proxy = its init, 2 steps, image steps,
  `encoder` preset): "LSC without momentum" trains Q-SAM2 with --ema-momentum 0 (the saved
  recipe holds 0, the plain Q-SAM2 run 0.9); "VRC + LSQ" trains LSQ from `train.calibrate`'s
  VRC checkpoint of the proxy (its --init; VRC changed encoder weights there)."""
  import numpy as np

  from qsam2_jax import checkpoint
  monkeypatch.setenv("XLA_FLAGS", "")   # one CPU device in the commands (conftest forces 8)
  argv = ["--out", str(tmp_path / "study"), "--stage", "quantize", "--init", tiny_init,
          "--pretrain-steps", "0", "--rows", "abl-nomomentum-w2a2,abl-vrclsq-w2a2",
          "--image-size", "64", "--train-images", "10", "--val-images", "2", "--test-images", "2",
          "--train-videos", "1", "--test-videos", "1", "--video-length", "3",
          "--video-frames", "2", "--qat-steps", "2", "--lr-grid", "1e-4", "--seeds", "0",
          "--batch-size", "2", "--masks-per-image", "2", "--calib-images", "2",
          "--vrc-images", "2", "--save-every", "0", "--video-ratio", "0",
          "--qat-args", "--preset encoder --calib-clips 0 --eval-images 0"]
  t0 = time.time()
  assert study.main(argv) == 0, open(next(iter(_logs(tmp_path)), os.devnull)).read()[-3000:]
  print(f"tiny ablations: {time.time() - t0:.0f} s")
  plan = study.Plan(study.parse_args(argv))
  rows = {r.name: r for r in sr.table_rows((0,))}
  nomom = plan.model_runs(rows["abl-nomomentum-w2a2"])[-1]
  qsam2 = plan.lr_runs("qsam2")[0]
  recipe = lambda run: checkpoint.check(run.out)["quant"]
  assert recipe(nomom)["ema_momentum"] == 0 and recipe(qsam2)["ema_momentum"] == 0.9
  assert recipe(nomom)["method"] == recipe(qsam2)["method"]
  vrc, lsq = plan.model_runs(rows["abl-vrclsq-w2a2"])
  assert checkpoint.check(vrc.out)["kind"] == "calibrated"
  meta = checkpoint.check(lsq.out)
  assert meta["origin"] == vrc.out and meta["run"]["init"] == vrc.out
  assert meta["quant"]["method"] == "lsq"
  refit, _ = checkpoint.load_sam2(vrc.out)
  init, _ = checkpoint.load_sam2(tiny_init)
  k = lambda m: np.asarray(m.image_encoder.trunk.blocks[0].mlp.layers[0].kernel[...])
  assert not np.allclose(k(refit), k(init))

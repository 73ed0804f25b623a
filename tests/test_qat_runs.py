"""QAT trainer as a command: kill -9 then --resume repeats the losses, SIGTERM saves, two
processes on localhost (jax.distributed), the bare `python -m train.qat --bits 2`. Subprocess
runs share a persistent compilation cache, so the later runs compile little."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qat_testlib import REPO, SIZE, data_dir, tiny_init  # noqa: F401 - fixtures
from qsam2_jax import checkpoint
from train.logging_utils import read_metrics


# ------------------------------------------------------------------------------ processes


def _env(tmp_path_factory, devices=1):
  cache = os.environ.get("QSAM2_TEST_JAX_CACHE") or str(tmp_path_factory.getbasetemp() / "jaxcc")
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="",
              JAX_NUM_CPU_DEVICES=str(devices), JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _qat_args(init, data, out, *extra):
  return [sys.executable, "-m", "train.qat", "--init", init, "--data", data, "--out", str(out),
          "--method", "fp", "--image-size", str(SIZE), "--batch-size", "2",
          "--masks-per-image", "2", "--dtype", "float32", "--eval-images", "0",
          "--log-every", "1", "--no-progress", "--lr", "1e-3", "--seed", "5", *extra]


def _losses(out):
  return [r["loss"] for r in read_metrics(os.path.join(out, "logs")) if "loss" in r]


def test_kill9_then_resume_repeats_the_losses(tiny_init, data_dir, tmp_path, tmp_path_factory):
  env = _env(tmp_path_factory)
  steps = ["--steps", "6", "--save-every", "2"]
  ref = subprocess.run(_qat_args(tiny_init, data_dir, tmp_path / "ref", *steps), env=env,
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert "done: step 6/6" in ref.stdout
  want = _losses(tmp_path / "ref")
  assert len(want) == 6 and len(set(want)) > 1

  out = tmp_path / "killed"
  proc = subprocess.Popen(_qat_args(tiny_init, data_dir, out, *steps), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while not (out / "2" / "meta").is_dir() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  done = checkpoint.RunCheckpointer(out).all_steps()
  assert 2 in done and 6 not in done, done
  resumed = subprocess.run(_qat_args(tiny_init, data_dir, out, *steps, "--resume"), env=env,
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed {out} at step {max(done)}" in resumed.stdout
  rows = read_metrics(os.path.join(out, "logs"))
  got = {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows win
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], want, rtol=1e-6, atol=0)


def test_sigterm_saves_before_exit(tiny_init, data_dir, tmp_path, tmp_path_factory):
  out = tmp_path / "term"
  metrics = out / "logs" / "metrics.jsonl"
  proc = subprocess.Popen(_qat_args(tiny_init, data_dir, out, "--steps", "6", "--save-every", "0"),
                          env=_env(tmp_path_factory), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.stat().st_size) and proc.poll() is None \
        and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 143, stderr[-3000:]
  saved = checkpoint.RunCheckpointer(out).all_steps()
  assert len(saved) == 1 and 1 <= saved[0] < 6
  assert f"SIGTERM: saved step {saved[0]}" in stdout + stderr


@pytest.mark.multiprocess
def test_two_processes_train_and_save(tiny_init, data_dir, tmp_path, tmp_path_factory):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "mp"
  procs = [subprocess.Popen(
      _qat_args(tiny_init, data_dir, out, "--steps", "3", "--save-every", "3",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i)),
      env=_env(tmp_path_factory), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=900))
  finally:
    for p in procs:
      p.kill()
  for p, (o, e) in zip(procs, outputs):
    assert p.returncode == 0, e[-3000:]
  assert "in 2 process(es)" in outputs[0][0] and "done: step 3/3" in outputs[0][0]
  assert "QAT" not in outputs[1][0] and "done" not in outputs[1][0]  # only process 0 reports
  assert checkpoint.RunCheckpointer(out).all_steps() == [3]
  states = sorted(f for f in os.listdir(out / "3" / "data") if f.endswith(".json"))
  assert states == ["process_0-of-2.json", "process_1-of-2.json"]  # one iterator per process
  assert len(_losses(out)) == 3


# ------------------------------------------------------------------------------ the bare command


@pytest.mark.slow
def test_bare_command_runs_on_the_embedded_default(tmp_path):
  """`python -m train.qat --bits 2` with no other flag (run in a scratch folder)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  t = time.time()
  res = subprocess.run([sys.executable, "-m", "train.qat", "--bits", "2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=3600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "VRC" in res.stdout and "done: step 4/4" in res.stdout and "eval mIoU" in res.stdout
  runs = os.listdir(tmp_path / "runs")
  assert len(runs) == 1 and runs[0].startswith("w2a2-qsam2-paper-")
  model, cfg = checkpoint.load_sam2(tmp_path / "runs" / runs[0])
  assert cfg.image_size == 256 and checkpoint.read_meta(tmp_path / "runs" / runs[0])["kind"] == "qat"
  print(f"bare command: {time.time() - t:.0f} s")

"""Converters: .pt -> Orbax -> .pt bit-exact and strict-loadable, config detection, clear errors."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from torch_reference import build_torch_sam2, save_official
from qsam2_jax import keymap
from qsam2_jax.checkpoint import detect_config, load_sam2, read_torch_state_dict
from qsam2_jax.model.configs import CONFIGS, get_config
from qsam2_jax.model.sam2 import abstract_sam2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys per config in the official checkpoints (sam2-port.md §4); SAM2.0 has 3 fewer.
N_KEYS = {"t": 471, "s": 519, "b+": 615, "l": 903}


def _cli(*args):
  """Runs `python -m <args>` in this process (the converters' `main`), as a subprocess would
  be seen: exit code, stdout, stderr. `test_module_entry_point` runs one real subprocess."""
  module = importlib.import_module(args[0])
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = module.main([str(a) for a in args[1:]])
    except SystemExit as e:
      code = e.code
  return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_module_entry_point(tmp_path):
  """`python -m convert.from_torch` as a real process: exit status and one-line error."""
  r = subprocess.run([sys.executable, "-m", "convert.from_torch", "--ckpt",
                      str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope.pt" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", [
    n if n.endswith("_t") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)])
def test_keys_and_detection(name):
  """Our key set has the official count and detection recovers the config from shapes alone."""
  cfg = get_config(name)
  keys = keymap.torch_keys(abstract_sam2(cfg))
  assert len(keys) == N_KEYS[cfg.size] - (3 if cfg.version == "2.0" else 0)
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in keys.items()}
  assert detect_config(fake).name == name


def _roundtrip(tmp_path, name):
  cfg = get_config(name, image_size=256)
  tmodel = build_torch_sam2(cfg, seed=1)
  pt = save_official(tmodel, tmp_path / "in.pt")
  assert set(keymap.torch_keys(abstract_sam2(cfg))) == set(tmodel.state_dict())
  r = _cli("convert.from_torch", "--ckpt", pt, "--out", str(tmp_path / "orbax"))
  assert r.returncode == 0, r.stderr
  assert name in r.stdout
  r = _cli("convert.to_torch", "--ckpt", str(tmp_path / "orbax"), "--out", str(tmp_path / "out.pt"))
  assert r.returncode == 0, r.stderr
  a = torch.load(pt, weights_only=True)["model"]
  b = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k
    assert b[k].is_contiguous()
  from sam2.build_sam import build_sam2
  build_sam2(cfg.torch_yaml, ckpt_path=str(tmp_path / "out.pt"), device="cpu",
             hydra_overrides_extra=[f"++model.image_size={cfg.image_size}"])  # strict load


@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2_hiera_t"])
def test_roundtrip_bit_exact(tmp_path, name):
  _roundtrip(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if not n.endswith("_t")])
def test_roundtrip_bit_exact_large(tmp_path, name):
  _roundtrip(tmp_path, name)


def test_pure_reader_equals_torch_load(torch_t256_ckpt):
  """The torch-free reader gives exactly what torch.load(weights_only=True) gives."""
  _, path = torch_t256_ckpt
  ours = read_torch_state_dict(path)
  ref = torch.load(path, weights_only=True)["model"]
  assert set(ours) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(ours[k], v.numpy())


def test_load_pt_and_orbax_same_model(torch_t256_ckpt, tmp_path):
  cfg, path = torch_t256_ckpt
  m1, c1 = load_sam2(path, image_size=256)
  assert c1 == cfg
  r = _cli("convert.from_torch", "--ckpt", path, "--out", str(tmp_path / "o"), "--image-size",
           "256")
  assert r.returncode == 0, r.stderr
  m2, c2 = load_sam2(tmp_path / "o")
  assert c2 == cfg
  s1, s2 = keymap.state_dict(m1), keymap.state_dict(m2)
  for k in s1:
    np.testing.assert_array_equal(s1[k], s2[k])


def _bad_checkpoint(tmp_path, sd, fname):
  torch.save({"model": sd}, tmp_path / fname)
  r = _cli("convert.from_torch", "--ckpt", str(tmp_path / fname), "--out", str(tmp_path / "out"))
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "out")
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  return r.stderr


def test_errors(torch_t256, tmp_path):
  _, model = torch_t256
  sd = dict(model.state_dict())
  missing = dict(sd)
  del missing["sam_mask_decoder.iou_token.weight"]
  missing["not.a.key"] = torch.zeros(3)
  missing["no_mem_embed"] = torch.zeros(1, 1, 7)
  err = _bad_checkpoint(tmp_path, missing, "bad.pt")
  assert "sam_mask_decoder.iou_token.weight" in err and "missing" in err
  assert "not.a.key" in err and "unexpected" in err
  assert "no_mem_embed" in err and "(1, 1, 7)" in err
  (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
  r = _cli("convert.from_torch", "--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o"))
  assert r.returncode == 2 and "is a text file, not a PyTorch checkpoint" in r.stderr
  assert "Traceback" not in r.stderr
  r = _cli("convert.from_torch", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"))
  assert r.returncode == 2 and "not found" in r.stderr
  r = _cli("convert.to_torch", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x.pt"))
  assert r.returncode == 2 and "no Orbax checkpoint" in r.stderr
  # The torch-free reader refuses non-checkpoints as clearly.
  from qsam2_jax.torch_format import NotACheckpointError
  with pytest.raises(NotACheckpointError, match="not a PyTorch checkpoint"):
    read_torch_state_dict(tmp_path / "junk.pt")

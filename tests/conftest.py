"""Test setup: 8 fake CPU devices (before JAX is imported), fp32 matmuls, shared references."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/torch_reference.py

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Test modules that need neither PyTorch nor the `sam2` package (no parity reference, no embedded
# default checkpoint, which `sam2` builds). Every other module is marked `torch`. Without torch /
# sam2 (the compatibility job: newest jax on Python 3.12) those modules are not collected, and the
# header says so: `pytest -m "not torch"` runs the same selection where torch is installed.
TORCH_FREE = ("test_checkpoint.py", "test_clips_data.py", "test_data_pipeline.py", "test_metrics.py",
              "test_quant_core.py", "test_quant_model.py", "test_quant_packing.py",
              "test_quant_vrc.py", "test_synthetic.py", "test_fail_fast.py", "test_study.py",
              "test_curve.py", "test_host_memory.py")
try:
  import sam2  # noqa: F401
  import torch  # noqa: F401
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False
_HERE = os.path.dirname(os.path.abspath(__file__))
_NEED_TORCH = sorted(f for f in os.listdir(_HERE)
                     if f.startswith("test_") and f.endswith(".py") and f not in TORCH_FREE)
collect_ignore = [] if HAVE_TORCH else _NEED_TORCH


def pytest_report_header(config):
  if not HAVE_TORCH:
    return (f"torch / sam2 not installed: {len(_NEED_TORCH)} test modules that need them "
            f"(marker `torch`) are not collected: {', '.join(_NEED_TORCH)}")
  return None


@pytest.fixture(scope="session")
def torch_t256():
  """Randomized SAM2.1-t reference (PyTorch) at 256², shared by the parity tests."""
  from qsam2_jax.model.configs import get_config
  from torch_reference import build_torch_sam2
  cfg = get_config("sam2.1_hiera_t", image_size=256)
  return cfg, build_torch_sam2(cfg, seed=0)


@pytest.fixture(scope="session")
def torch_t256_ckpt(torch_t256, tmp_path_factory):
  """The same reference saved as an official checkpoint."""
  from torch_reference import save_official
  cfg, model = torch_t256
  return cfg, save_official(model, tmp_path_factory.mktemp("ref") / "sam2.1_hiera_t.pt")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops each module's compiled executables when it ends: with two xdist workers on a CI
  machine, every worker would otherwise keep the whole suite's programs in memory."""
  yield
  import gc
  jax.clear_caches()
  gc.collect()


# The longest modules first (measured on 2 CPU cores), so that `make test`'s two xdist workers
# (--dist loadfile --no-loadscope-reorder hands out whole modules in collection order) finish at
# about the same time.
_LONG_FIRST = ("test_qat_runs.py", "test_calibrate_ptq.py", "test_export.py", "test_qat.py",
               "test_quant_baselines.py", "test_packed_model.py", "test_clip_forward.py",
               "test_video_predictor.py", "test_quant_model.py", "test_eval_video.py",
               "test_convert.py")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name not in TORCH_FREE:
      item.add_marker(pytest.mark.torch)
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a module

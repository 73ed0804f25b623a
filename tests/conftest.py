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
               "test_video_predictor.py", "test_quant_model.py", "test_eval_video.py",
               "test_convert.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a module

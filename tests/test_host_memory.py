"""`train.host_memory`: ahead-of-time compile once per signature, then release the freed heap."""

import platform

import jax
import jax.numpy as jnp
import numpy as np

from train import host_memory


def test_compiled_once_compiles_once_per_signature_and_equals_jit():
  jitted = jax.jit(lambda x, y: {"s": x * 2.0 + y})
  lowered = []

  class Spy:
    def lower(self, *args):
      lowered.append(args)
      return jitted.lower(*args)

  fn = host_memory.CompiledOnce(Spy())
  x = jnp.arange(3.0)
  for _ in range(3):
    out = fn(x, 1.0)
    np.testing.assert_array_equal(out["s"], np.arange(3.0) * 2.0 + 1.0)
  assert len(lowered) == 1
  fn(jnp.arange(4.0), 1.0)  # a new shape: a second compile
  assert len(lowered) == 2


def test_release_runs_where_glibc_is():
  ran = host_memory.release_freed_memory()
  if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
    assert ran
  else:
    assert ran in (True, False)

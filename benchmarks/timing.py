"""One way to time a compiled call for every benchmark: warm-up, then the median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def median_seconds(fn: Callable[[], object], iters: int, repeats: int,
                   sync: Optional[Callable[[object], None]] = None) -> float:
  """Median seconds per call over `repeats` loops of `iters` calls, after two warm-up calls
  (compilation, autotuning). `sync` blocks until a result is ready (default: JAX's)."""
  if sync is None:
    import jax
    sync = jax.block_until_ready
  sync(fn())
  sync(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn()
    sync(out)
    times.append((time.perf_counter() - t) / iters)
  return statistics.median(times)

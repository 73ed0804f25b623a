"""One way to time things for every benchmark.

`median_seconds`: warm-up, then the median of repeats (one implementation alone).
`alternate`: two or more implementations timed round by round (A, B, A, B, ...) and compared
by the median of per-round ratios. On a shared machine the load drifts over minutes; timing all
of A and then all of B measures the drift as much as the code (the same pair read 1.11× and
0.89×), while neighbouring rounds see nearly the same load.
`setup_device`: the device and a fair thread count for both frameworks (before jax starts).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional


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
    times.append(loop_seconds(fn, iters, sync))
  return statistics.median(times)


def loop_seconds(fn: Callable[[], object], iters: int,
                 sync: Callable[[object], None]) -> float:
  """Seconds per call of one timed loop of `iters` calls, synchronised once at the end."""
  t = time.perf_counter()
  out = None
  for _ in range(iters):
    out = fn()
  sync(out)
  return (time.perf_counter() - t) / iters


def alternate(rounds: int, timers: Dict[str, Callable[[], float]],
              warmup: int = 1) -> Dict[str, List[float]]:
  """Runs every timer once per round, in the given order, `rounds` times after `warmup`
  untimed rounds. A timer does its own setup and returns the seconds it measured, so work that
  must not count (resetting a video state) can sit outside the measurement."""
  for _ in range(warmup):
    for fn in timers.values():
      fn()
  out: Dict[str, List[float]] = {name: [] for name in timers}
  for _ in range(rounds):
    for name, fn in timers.items():
      out[name].append(fn())
  return out


def median_ratio(times: Dict[str, List[float]], slow: str, fast: str) -> float:
  """Median over rounds of times[slow] / times[fast]: > 1 when `fast` is faster."""
  return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def setup_device(device: str, threads: Optional[int] = None) -> Dict[str, object]:
  """Selects the device for JAX and PyTorch and gives both the same CPU threads.

  Must run before jax creates its backends (first `jax.devices()` or array). `device`:
  "cpu" forces both sides onto the CPU even where a GPU exists; "auto" leaves JAX's default
  and uses CUDA for PyTorch when present. `threads` pins the process to that many cores, so
  XLA's thread pool (sized from the affinity mask) and `torch.set_num_threads` agree; by
  default every core the process may use.
  """
  if device not in ("cpu", "auto"):
    raise SystemExit(f"--device {device!r}: expected cpu or auto")
  cores = sorted(os.sched_getaffinity(0))
  if threads is not None:
    if not 1 <= threads <= len(cores):
      raise SystemExit(f"--threads {threads}: this process may use {len(cores)} cores")
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  if device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    import torch
    torch.set_num_threads(len(cores))
  except ImportError:
    pass
  return {"device": device, "threads": len(cores), "cpu": _cpu_name(),
          "load_avg_1m": round(os.getloadavg()[0], 2)}


def torch_device(device: str) -> str:
  import torch
  return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"

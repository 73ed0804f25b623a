"""Device mesh, shardings and multi-host start-up for training.

One mesh with two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
replicas also split the parameters and optimizer state). The batch is split over both axes;
parameters follow regex rules (first match wins) or, by default, put their largest dimension
that `fsdp` divides on `fsdp` (replicated when fsdp = 1). GSPMD inserts the all-gathers and
reduce-scatters, so the train step is one `jax.jit` with these shardings as in/out shardings.

Axis types are always passed explicitly (`jax.make_mesh` and `Mesh(...)` disagree on the
default). The default is `Auto`: the model code carries no per-op sharding annotations, and in
`Explicit` mode a matmul of a batch-sharded activation with an FSDP-sharded weight is a sharding
type error (`f32[16@(data,fsdp),16] x f32[16,64@fsdp]`, checked on jax 0.10.2), so `Explicit`
works only with replicated parameters (fsdp = 1) unless the model gathers its weights itself.

Multi-host order: `initialize_distributed` first (before any JAX computation, device query or
`ShardByJaxProcess`), then `make_mesh`, then the input pipeline.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qsam2_jax.errors import UserError

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
BATCH_SPEC = P((DATA, FSDP))
Rules = Sequence[Tuple[str, P]]
DEFAULT_MIN_FSDP_SIZE = 2**14  # smaller arrays stay replicated: gathering them costs more

log = logging.getLogger(__name__)


class MeshError(UserError):
  """A `--mesh` spec that cannot be built on the available devices."""


# ------------------------------------------------------------------------------------- mesh


def parse_mesh_spec(spec: Union[str, Mapping[str, int], None], num_devices: int
                    ) -> dict[str, int]:
  """"data=4,fsdp=2" / {"data": 4, "fsdp": 2} -> {"data": 4, "fsdp": 2}.

  `fsdp` defaults to 1; an omitted `data`, or an axis given as -1, takes the remaining devices
  (None or "" means all devices on `data`). The product must equal `num_devices`.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    sizes: dict[str, int] = {}
  elif isinstance(spec, str):
    sizes = {}
    for part in spec.split(","):
      name, sep, value = part.partition("=")
      name = name.strip()
      if not sep or name not in AXES:
        raise MeshError(f"bad mesh spec {spec!r}: expected comma-separated 'data=N' and "
                        f"'fsdp=M'")
      if name in sizes:
        raise MeshError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
      try:
        sizes[name] = int(value)
      except ValueError:
        raise MeshError(f"bad mesh spec {spec!r}: {value.strip()!r} is not an integer") from None
  else:
    sizes = {str(k): int(v) for k, v in spec.items()}
    unknown = set(sizes) - set(AXES)
    if unknown:
      raise MeshError(f"unknown mesh axes {sorted(unknown)}; use {AXES}")
  for name, value in sizes.items():
    if value == 0 or value < -1:
      raise MeshError(f"mesh axis {name} must be a positive integer (or -1), got {value}")
  sizes.setdefault(DATA, -1)
  sizes.setdefault(FSDP, 1)
  free = [n for n in AXES if sizes[n] == -1]
  if len(free) > 1:
    raise MeshError(f"mesh spec {spec!r}: at most one axis may be -1")
  fixed = int(np.prod([sizes[n] for n in AXES if sizes[n] != -1]))
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh spec {spec!r}: {num_devices} devices do not divide by {fixed}")
    sizes[free[0]] = num_devices // fixed
  if sizes[DATA] * sizes[FSDP] != num_devices:
    raise MeshError(f"mesh spec {spec!r} needs data x fsdp = {sizes[DATA] * sizes[FSDP]} devices "
                    f"but {num_devices} are available ({jax.default_backend()})")
  return {n: sizes[n] for n in AXES}


def make_mesh(spec: Union[str, Mapping[str, int], None] = None, *,
              devices: Optional[Sequence[Any]] = None, axis_type: str = "auto") -> Mesh:
  """The (`data`, `fsdp`) mesh over all devices (or `devices`) of every process.

  Args:
    spec: "data=4,fsdp=2", a dict, or None (all devices on `data`); see `parse_mesh_spec`.
    devices: devices to use (default: `jax.devices()`, all processes).
    axis_type: "auto" (GSPMD propagation) or "explicit" (sharding in types).
  """
  types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if axis_type not in types:
    raise ValueError(f"axis_type must be 'auto' or 'explicit', got {axis_type!r}")
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = (sizes[DATA], sizes[FSDP])
  axis_types = (types[axis_type],) * 2
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    # Lets JAX order devices for the interconnect (and across hosts).
    return jax.make_mesh(shape, AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` and `fsdp`; other axes whole."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------- param shardings


def path_str(path: Sequence[Any]) -> str:
  """A pytree key path as "a/b/0/kernel" (what sharding rules match)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue  # an nnx.Variable's payload: match rules on the variable's own path
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fits(spec: P, shape: Sequence[int], mesh: Mesh) -> bool:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if dim % int(np.prod([mesh.shape[a] for a in names])):
      return False
  return True


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules = (),
                   min_size: int = DEFAULT_MIN_FSDP_SIZE) -> P:
  """PartitionSpec of one array.

  The first rule whose regex `re.search`es `path` decides (its spec padded with None to the
  rank); otherwise the largest dimension that the `fsdp` size divides goes on `fsdp` (the first
  such on ties), if fsdp > 1 and the array has at least `min_size` elements; else replicated.
  """
  shape = tuple(int(d) for d in shape)
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = P(*spec)
      if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {spec} for {path} of rank "
                         f"{len(shape)}")
      spec = P(*spec, *([None] * (len(shape) - len(spec))))
      if not _fits(spec, shape, mesh):
        raise ValueError(f"sharding rule {pattern!r}: {spec} does not divide {path} {shape} on "
                         f"mesh {dict(mesh.shape)}")
      return spec
  n = mesh.shape[FSDP]
  if n == 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  divisible = [i for i, d in enumerate(shape) if d % n == 0]
  if not divisible:
    return P()
  best = max(divisible, key=lambda i: (shape[i], -i))
  return P(*[FSDP if i == best else None for i in range(len(shape))])


def state_shardings(state: Any, mesh: Mesh, rules: Rules = (),
                    min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """A pytree of `NamedSharding`s matching `state` (arrays or ShapeDtypeStructs; scalars and
  non-array leaves are replicated). Works on `nnx.State` / optimizer state trees: Adam moments
  have the shapes of their parameters, so they get the same specs."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, partition_spec(path_str(path), shape, mesh, rules, min_size))
  return jax.tree_util.tree_map_with_path(one, state)


def shard_state(state: Any, mesh: Mesh, rules: Rules = (),
                min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """`state` placed on the mesh with `state_shardings` (call on every process alike)."""
  return jax.device_put(state, state_shardings(state, mesh, rules, min_size))


def abstract_with_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = (),
                            min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """`ShapeDtypeStruct`s carrying this mesh's shardings: the Orbax restore target that lets a
  checkpoint written on any mesh load onto this one."""
  shardings = state_shardings(abstract_state, mesh, rules, min_size)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


# ------------------------------------------------------------------------------- multi-host


_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "JAX_NUM_PROCESSES": "JAX_NUM_PROCESSES",
}


def _detected_cluster() -> Optional[str]:
  """The multi-process launcher we are under, if any (single-process launches return None)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for var, name in _CLUSTER_ENV.items():
    try:
      if int(os.environ.get(var, "1")) > 1:
        return name
    except ValueError:
      pass
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU pod"
  return None


def initialize_distributed(mode: Union[bool, str, None] = "auto", *,
                           coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           timeout_s: int = 300) -> bool:
  """Starts `jax.distributed` when the run spans several processes.

  Args:
    mode: "auto"/None: initialise when coordinates are given or a multi-process launch is
      detected (SLURM, Open MPI, a multi-host Cloud TPU, `JAX_COORDINATOR_ADDRESS`);
      True/"on": always (JAX's own cluster auto-detection fills missing coordinates);
      False/"off": never.
    coordinator_address: "host:port" of process 0 (else `JAX_COORDINATOR_ADDRESS` or detection).
    num_processes, process_id: explicit coordinates (else `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
      or detection).
    timeout_s: how long to wait for the other processes.

  Returns:
    Whether JAX now runs distributed.
  """
  if isinstance(mode, str):
    mode = mode.lower()
    if mode not in ("auto", "on", "off", "true", "false"):
      raise UserError(f"distributed mode must be auto, on or off, got {mode!r}")
    mode = {"auto": None, "on": True, "true": True, "off": False, "false": False}[mode]
  if mode is False:
    return False
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  explicit = coordinator_address is not None or num_processes is not None
  if mode is None and not explicit and _detected_cluster() is None:
    return False
  if num_processes == 1 and process_id in (None, 0) and coordinator_address is None:
    return False  # one process: nothing to coordinate
  log.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
           coordinator_address, num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
  except RuntimeError as e:
    if "before" in str(e) or "already" in str(e):
      raise RuntimeError("jax.distributed.initialize must run before any JAX computation or "
                         f"device query in this process ({e})") from e
    raise
  return True


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays split over (`data`, `fsdp`).

  Every process passes its own `global_batch_size / process_count` rows (the Grain pipeline's
  per-process batch); JAX places them on the process's devices, which `jax.make_mesh` lays out
  as one contiguous block of the batch axis per process (process order). The global batch must
  divide evenly over the devices.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def place(state: Any, shardings: Any) -> Any:
  """Host or single-device values -> global arrays with `shardings` (every process passes the
  same values; works across processes, unlike a plain `device_put`)."""
  def one(x, s):
    x = jax.device_get(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, state, shardings)


def commit_to_device(tree, device=None):
  """Places every array of `tree` on `device` (default: the first local one), committed."""
  device = device or jax.local_devices()[0]
  return jax.tree.map(lambda x: jax.device_put(x, device) if isinstance(x, jax.Array) else x,
                      tree)

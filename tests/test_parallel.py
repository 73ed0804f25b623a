"""Mesh parsing, parameter shardings, and a sharded train step equal to the 1-device step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from qsam2_jax import parallel
from qsam2_jax.errors import UserError
from torch_reference import rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("spec,want", [
    ("data=4,fsdp=2", (4, 2)), (" fsdp = 2 ", (4, 2)), ("data=8", (8, 1)), (None, (8, 1)),
    ("", (8, 1)), ("data=-1,fsdp=4", (2, 4)), ({"data": 2, "fsdp": 4}, (2, 4)),
    ("fsdp=8", (1, 8))])
def test_parse_mesh_spec(spec, want):
  got = parallel.parse_mesh_spec(spec, 8)
  assert (got["data"], got["fsdp"]) == want


@pytest.mark.parametrize("spec,match", [
    ("data=3", "needs data x fsdp = 3 devices but 8"), ("data=4,fsdp=4", "16 devices"),
    ("model=2", "expected comma-separated"), ("data=x", "not an integer"),
    ("data=2,data=4", "given twice"), ("data=-1,fsdp=-1", "at most one"),
    ("fsdp=3", "do not divide"), ("data=0", "positive"), ({"tp": 2}, "unknown mesh axes")])
def test_parse_mesh_spec_errors(spec, match):
  with pytest.raises(UserError, match=match):
    parallel.parse_mesh_spec(spec, 8)


def test_make_mesh():
  mesh = parallel.make_mesh("data=4,fsdp=2")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  mesh = parallel.make_mesh("data=2,fsdp=4", axis_type="explicit")
  assert mesh.axis_types == (AxisType.Explicit, AxisType.Explicit)
  one = parallel.make_mesh(None, devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1}
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 8, rngs=rngs)])
    self.norm = nnx.LayerNorm(64, rngs=rngs)

  def __call__(self, x):
    return self.layers[1](self.norm(jax.nn.gelu(self.layers[0](x))))


def _model_and_opt(seed=0):
  model = MLP(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)


def _specs(tree):
  return {parallel.path_str(p): s.spec
          for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_state_shardings_default_and_rules():
  mesh = parallel.make_mesh("data=4,fsdp=2")
  state = nnx.state(_model_and_opt())
  specs = _specs(parallel.state_shardings(state, mesh, min_size=0))
  assert specs["0/layers/0/kernel"] == P(None, "fsdp")  # (16, 64): largest dim
  assert specs["0/layers/1/kernel"] == P("fsdp", None)  # (64, 8)
  assert specs["0/norm/scale"] == P("fsdp")
  assert specs["1/opt_state/0/mu/layers/0/kernel"] == P(None, "fsdp")  # moments follow params
  assert specs["1/opt_state/0/count"] == P() and specs["1/step"] == P()
  # Small arrays stay replicated by default; fsdp = 1 replicates everything.
  assert set(_specs(parallel.state_shardings(state, mesh)).values()) == {P()}
  assert set(_specs(parallel.state_shardings(state, parallel.make_mesh("data=8"),
                                             min_size=0)).values()) == {P()}
  # First matching rule wins, over the default too; specs are padded to the rank.
  rules = [(r"layers/0/kernel$", P("fsdp")), (r"kernel$", P()), (r"norm", P(None))]
  specs = _specs(parallel.state_shardings(state, mesh, rules, min_size=0))
  assert specs["0/layers/0/kernel"] == P("fsdp", None)
  assert specs["1/opt_state/0/nu/layers/0/kernel"] == P("fsdp", None)
  assert specs["0/layers/1/kernel"] == P(None, None)
  assert specs["0/norm/bias"] == P(None)
  assert specs["0/layers/1/bias"] == P("fsdp")  # no rule: default
  with pytest.raises(ValueError, match="does not divide"):
    parallel.partition_spec("w", (3, 5), mesh, [("w", P("fsdp"))])
  with pytest.raises(ValueError, match="rank"):
    parallel.partition_spec("w", (4,), mesh, [("w", P("fsdp", None))])


def _batches(n=3, b=16):
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(b, 16)).astype(np.float32),
           "y": rng.normal(size=(b, 8)).astype(np.float32)} for _ in range(n)]


def _train(mesh, batches, axis_explicit=False):
  """Runs the functional train loop on `mesh`; returns (losses, final params as numpy)."""
  model, opt = _model_and_opt()
  graphdef, state = nnx.split((model, opt))

  def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  def step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  shardings = parallel.state_shardings(state, mesh, min_size=0)
  jstep = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                  out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  state = parallel.shard_state(state, mesh, min_size=0)
  losses = []
  with jax.set_mesh(mesh):
    for batch in batches:
      state, loss = jstep(state, parallel.global_batch(batch, mesh))
      losses.append(float(loss))
  kernel = state[0]["layers"][0]["kernel"][...]
  assert kernel.sharding.spec == shardings[0]["layers"][0]["kernel"].get_value().spec
  params = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(state[0]))
  return np.array(losses), params


@pytest.fixture(scope="module")
def one_device_run():
  return _train(parallel.make_mesh(None, devices=jax.devices()[:1]), _batches())


@pytest.mark.parametrize("spec,axis_type", [("data=4,fsdp=2", "auto"), ("data=8", "auto"),
                                            ("data=8", "explicit"), ("fsdp=8", "auto")])
def test_sharded_step_matches_one_device(one_device_run, spec, axis_type):
  ref_losses, ref_params = one_device_run
  losses, params = _train(parallel.make_mesh(spec, axis_type=axis_type), _batches())
  assert rel_err(losses, ref_losses) <= 1e-5
  assert ref_losses[-1] < ref_losses[0]  # it trains
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(ref_params)):
    assert rel_err(a, b) <= 1e-5, path


def test_abstract_with_shardings_restores_onto_another_mesh(tmp_path):
  import orbax.checkpoint as ocp
  mesh8 = parallel.make_mesh("data=2,fsdp=4")
  state = parallel.shard_state(nnx.state(_model_and_opt(seed=3)[0]), mesh8, min_size=0)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", state)
  mesh1 = parallel.make_mesh(None, devices=jax.devices()[:1])
  abstract = nnx.state(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))))
  target = parallel.abstract_with_shardings(abstract, mesh1, min_size=0)
  leaf = target["layers"][0]["kernel"].get_value()
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.mesh.size == 1
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "ckpt", target)
  kernel = restored["layers"][0]["kernel"][...]
  assert kernel.sharding.mesh.size == 1
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state["layers"][0]["kernel"][...]))


def test_global_batch_single_process():
  mesh = parallel.make_mesh("data=4,fsdp=2")
  local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
           "valid": np.ones((8, 2), bool)}
  out = parallel.global_batch(local, mesh)
  assert out["image"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
  assert out["image"].addressable_shards[1].data.shape == (1, 3)
  np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
  assert out["valid"].dtype == jnp.bool_


def test_initialize_distributed_modes(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize_distributed("off") is False
  assert parallel.initialize_distributed("auto") is False  # a plain single-process launch
  assert parallel.initialize_distributed(True, num_processes=1) is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.initialize_distributed(None) is False
  with pytest.raises(UserError, match="auto, on or off"):
    parallel.initialize_distributed("maybe")


_CHILD = textwrap.dedent("""
    import os, sys, json
    import numpy as np
    from qsam2_jax import parallel
    port, pid, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert parallel.initialize_distributed("auto", coordinator_address=f"127.0.0.1:{port}",
                                           num_processes=2, process_id=pid, timeout_s=60)
    import jax
    from jax.experimental import multihost_utils
    from qsam2_jax.data import coco, pipeline, prompts
    mesh = parallel.make_mesh("data=2,fsdp=2")
    cfg = pipeline.DataConfig(image_size=32, prompts=prompts.PromptConfig(max_masks=2),
                              num_threads=1, seed=5)
    it = pipeline.make_iterator(coco.open_source(data), 4, cfg)  # ShardByJaxProcess
    out = []
    for _ in range(2):
      local = next(it)
      g = parallel.global_batch({"index": local["index"], "image": local["image"]}, mesh)
      sums = jax.jit(lambda x: x.sum(axis=(1, 2, 3)), out_shardings=parallel.replicated(mesh))(
          g["image"])
      idx = multihost_utils.process_allgather(g["index"], tiled=True)
      out.append({"index": np.asarray(idx).tolist(), "sums": np.asarray(sums).tolist()})
    print("RESULT" + json.dumps({"pid": pid, "count": jax.process_count(), "out": out}))
""")


@pytest.mark.multiprocess
def test_two_processes_assemble_the_global_batch(tmp_path):
  import json
  from qsam2_jax.data import coco, pipeline, prompts, synthetic
  data = synthetic.make_image_dataset(tmp_path / "ds", 8, (48, 48), seed=2)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS="", PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(i), str(data)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process children timed out")
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT", 1)[1]))
  assert all(r["count"] == 2 for r in results)
  assert results[0]["out"] == results[1]["out"]
  # The same global batches (same rows, same order) as one process reading everything.
  cfg = pipeline.DataConfig(image_size=32, prompts=prompts.PromptConfig(max_masks=2),
                            num_threads=1, seed=5)
  it = pipeline.make_iterator(coco.open_source(data), 4, cfg, shard_index=0, shard_count=1)
  for step in results[0]["out"]:
    ref = next(it)
    assert step["index"] == ref["index"].tolist()
    np.testing.assert_allclose(step["sums"], ref["image"].sum(axis=(1, 2, 3)), rtol=1e-5)

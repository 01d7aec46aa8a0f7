"""Meshes from configs, logical-axis rules, train-state shardings, global batches, initialize()."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mpxla.nn.moe import MoE, NNXMoE
from mpxla.parallel import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    batch_axes,
    distributed,
    global_batch,
    make_mesh,
    mesh,
    state_shardings,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


@pytest.mark.parametrize("cfg, shape", [
    (dict(data=1), (1, 1, 1, 1)),
    (dict(data=2, fsdp=4), (2, 4, 1, 1)),
    (dict(), (8, 1, 1, 1)),  # data=-1 takes every device
    (dict(data=4, tensor=2), (4, 1, 2, 1)),
    (dict(data=-1, expert=2, fsdp=2), (2, 2, 1, 2)),
])
def test_make_mesh_shapes(cfg, shape):
  n = int(np.prod(shape))
  m = make_mesh(MeshConfig(**cfg), devices=jax.devices()[:n])
  assert m.axis_names == MESH_AXES and tuple(m.shape.values()) == shape
  assert all(t == AxisType.Auto for t in m.axis_types)
  assert batch_axes(m) == ("data", "fsdp", "expert")
  # Devices in order: the outer (data) axis crosses process boundaries first.
  assert [d.id for d in m.devices.flat] == [d.id for d in jax.devices()[:n]]


def test_make_mesh_explicit_and_dict_config():
  m = make_mesh({"data": 2, "fsdp": 4, "axis_types": "explicit"})
  assert all(t == AxisType.Explicit for t in m.axis_types)


def test_mesh_that_does_not_match_the_devices_raises():
  with pytest.raises(ValueError, match="has 6 devices but 8 were given"):
    make_mesh(MeshConfig(data=3, fsdp=2))
  with pytest.raises(ValueError, match="8 is not a multiple of 3"):
    make_mesh(MeshConfig(data=-1, tensor=3))
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    make_mesh(MeshConfig(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match="sizes must be positive ints"):
    make_mesh(MeshConfig(data=0))
  with pytest.raises(ValueError, match="axis_types must be 'auto' or 'explicit'"):
    make_mesh(MeshConfig(axis_types="manual"))


def test_logical_rules():
  spec = mesh.logical_to_spec
  assert spec(("batch", "length", "act_embed")) == P(("data", "fsdp", "expert"), None, None)
  assert spec(("exp", "embed", "mlp")) == P("expert", "fsdp", "tensor")
  assert spec(("embed", "vocab")) == P("fsdp", "tensor")
  # A mesh axis is used once per array: the MoE activations keep 'expert' for the batch.
  assert spec(("batch", "act_exp", "act_mlp")) == P(("data", "fsdp", "expert"), None, "tensor")
  m = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert spec(("embed", "mlp"), DEFAULT_RULES, (3, 8), m) == P(None, "tensor")  # 3 % 2: replicate


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    k = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    x = nn.Dense(16, kernel_init=k)(x)
    return MoE(num_experts=4, d_ff=8, partitioned=True)(x)


def test_linen_train_state_shardings():
  m = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
  x = jnp.ones((8, 5))
  tx = optax.adam(1e-3)

  def init(key):
    params = Net().init(key, x)["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = state_shardings(abstract, m)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  p = nn.unbox(state["params"])
  assert p["Dense_0"]["kernel"].sharding.spec == P(None, "tensor")  # 5 rows: not on fsdp=2
  assert p["MoE_0"]["gate"].sharding.spec == P("expert", "fsdp", "tensor")
  assert p["MoE_0"]["down"].sharding.spec == P("expert", "tensor", "fsdp")
  assert p["MoE_0"]["router"]["kernel"].sharding.spec == P("fsdp", None)
  mu = nn.unbox(state["opt"][0].mu)
  assert mu["MoE_0"]["gate"].sharding.spec == P("expert", "fsdp", "tensor")  # optimizer too
  assert state["step"].sharding.spec == P()
  assert p["Dense_0"]["bias"].sharding.spec == P()


def test_nnx_state_shardings():
  m = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
  zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731  (cheap init)
  model = NNXMoE(16, 4, 8, partitioned=True, kernel_init=zeros, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  shardings = state_shardings(state, m)
  placed = jax.device_put(state, shardings)
  assert placed["gate"][...].sharding.spec == P("expert", "fsdp", "tensor")
  assert placed["router"]["kernel"][...].sharding.spec == P("fsdp", None)
  nnx.update(model, placed)
  assert model.gate[...].sharding.spec == P("expert", "fsdp", "tensor")


def test_global_batch_places_rows_by_process_and_checks_divisibility():
  m = make_mesh(MeshConfig(data=2, fsdp=4))
  rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = global_batch({"x": rows, "y": rows[:, 0].astype(np.int32)}, m)
  assert g["x"].sharding.spec == P(("data", "fsdp", "expert"), None)
  np.testing.assert_array_equal(g["x"], rows)
  for shard in g["x"].addressable_shards:  # device d holds rows [2d, 2d + 2)
    d = list(m.devices.flat).index(shard.device)
    np.testing.assert_array_equal(shard.data, rows[2 * d:2 * d + 2])
  with pytest.raises(ValueError, match="global batch of 12 rows .* does not divide the 8 shards"):
    global_batch(rows[:12], m)
  with pytest.raises(ValueError, match="needs arrays with a batch axis"):
    global_batch(np.float32(1), m)


# initialize(): environment resolution (pure) and the single-host no-op.


def test_resolve_single_host_is_a_no_op():
  spec = distributed.resolve(environ={})
  assert spec.source == "single" and not spec.multi_process
  assert distributed.initialize().source == "single"  # the test process: one host
  assert not jax.distributed.is_initialized()


def test_resolve_jax_environment_and_arguments():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve(environ=env) == distributed.DistributedSpec(
      "env", "10.0.0.1:1234", 4, 3)
  assert distributed.resolve("h:1", 2, 1, environ=env).source == "args"
  assert distributed.resolve(environ={**env, "JAX_NUM_PROCESSES": "1"}).source == "single"


def test_resolve_slurm_and_tpu():
  slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
  spec = distributed.resolve(environ=slurm)
  assert (spec.source, spec.num_processes, spec.process_id, spec.cluster_detection_method) == (
      "slurm", 4, 2, "slurm")
  assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "1"}).source == "single"
  tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"}
  assert distributed.resolve(environ=tpu).source == "tpu"
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "localhost"}).source == "single"
  assert distributed.resolve(environ={"MEGASCALE_COORDINATOR_ADDRESS": "c:8080"}).source == "tpu"


@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "set JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "together"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process_id must be in \[0, 2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "must be 'host:port'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "says how many processes"),
])
def test_resolve_bad_environments(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(environ=env)


def test_initialize_arguments_must_come_together():
  with pytest.raises(ValueError, match="needs all three"):
    distributed.initialize("127.0.0.1:1", num_processes=2)

"""Expert parallelism (mpxla.parallel.experts): experts sharded over 'expert', tokens by all-to-all.

On meshes expert=8, data=2 x expert=4 and data=4 x expert=2 (Auto and Explicit axes, under
`jax.set_mesh` or from the mesh of x's sharding), the MoE layer's output, aux loss and
gradients (input, router kernel, expert weights) equal the single-device layer's within 1e-5
in float32, dropless and with a capacity (and a padding mask). The compiled step holds all-to-alls of R-row buffers and no
all-gather (the tokens never gather; the expert weights stay sharded).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.nn.moe import MoE, NNXMoE
from mpxla.parallel import MeshConfig, batch_axes, make_mesh
from mpxla.parallel import experts as pexperts

B, T, D, E, F, K = 8, 6, 5, 8, 4, 2  # D != E: no weight shares a shape with the router's
TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = {"expert8": dict(data=1, expert=8), "data2xexpert4": dict(data=2, expert=4),
          "data4xexpert2": dict(data=4, expert=2)}


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  mask = jnp.asarray(rng.random((B, T)) > 0.2)
  return x, r, mask


@functools.cache
def model_and_params(capacity_factor):
  model = MoE(num_experts=E, d_ff=F, top_k=K, capacity_factor=capacity_factor)
  x, _, _ = inputs()
  return model, jax.jit(model.init)(jax.random.key(0), x)["params"]


def loss_fn(model):
  _, r, _ = inputs()

  def loss(p, x, mask):
    y, inter = model.apply({"params": p}, x, mask=mask, mutable=["intermediates"])
    return jnp.sum(y * r) + inter["intermediates"]["aux_loss"][0], y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@functools.cache
def reference(capacity_factor):
  model, params = model_and_params(capacity_factor)
  x, _, mask = inputs()
  return jax.device_get(loss_fn(model)(params, x, mask))


def place(mesh, params, x, mask):
  ax = batch_axes(mesh)
  expert = lambda a: NamedSharding(mesh, P("expert") if a.shape[0] == E else P())  # noqa: E731
  return (jax.tree.map(lambda a: jax.device_put(a, expert(a)), params),
          jax.device_put(x, NamedSharding(mesh, P(ax))),
          jax.device_put(mask, NamedSharding(mesh, P(ax))))


@functools.cache
def sharded(mesh_name, axis_types, capacity_factor):
  """(outputs, gradients) on the mesh, and the compiled HLO text."""
  mesh = make_mesh(MeshConfig(**MESHES[mesh_name], axis_types=axis_types))
  model, params = model_and_params(capacity_factor)
  x, _, mask = inputs()
  f = loss_fn(model)
  with jax.set_mesh(mesh):
    args = place(mesh, params, x, mask)
    compiled = f.lower(*args).compile()
    got = compiled(*args)
  return jax.device_get(got), compiled.as_text()


def assert_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, **TOL)


CASES = [(m, t, None) for m in MESHES for t in ("auto", "explicit")] + [
    ("data2xexpert4", "auto", 1.0), ("expert8", "explicit", 1.0)]


@pytest.mark.parametrize("mesh_name,axis_types,capacity_factor", CASES)
def test_expert_parallel_equals_one_device(mesh_name, axis_types, capacity_factor):
  got, _ = sharded(mesh_name, axis_types, capacity_factor)
  assert_close(got, reference(capacity_factor))


def collectives(text):
  """[(op, result shapes)] of every collective in compiled HLO text."""
  out = []
  op = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
  for line in text.splitlines():
    m = re.search(r"= (.*?) " + op, line)
    if m:
      shapes = [tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))]
      out.append((m.group(2), shapes))
  return out


@pytest.mark.parametrize("mesh_name,axis_types,capacity_factor", [
    ("data2xexpert4", "auto", None), ("expert8", "explicit", 1.0)])
def test_tokens_move_by_all_to_all_never_all_gather(mesh_name, axis_types, capacity_factor):
  _, text = sharded(mesh_name, axis_types, capacity_factor)
  ops = collectives(text)
  assert not [o for o in ops if o[0] == "all-gather"], ops
  peers = MESHES[mesh_name]["expert"]
  tokens_local = B * T // 8
  rows = tokens_local * K if capacity_factor is None else pexperts.peer_rows(
      tokens_local, K, E // peers, int(np.ceil(capacity_factor * T * K / E)), B // 8)
  # the R-row buffers, forward (there and back) and backward, as one tuple or one array
  row_buffers = [o for o in ops if o[0] == "all-to-all"
                 and all(s[-2:] == (rows, D) for s in o[1])]
  assert len(row_buffers) >= 3, ops
  assert all(np.prod(s) <= peers * rows * D for o in ops for s in o[1]), ops


def test_rank2_input_and_nnx_layer():
  """x [S, D] (one dispatch group, S split over the devices) and the NNX layer, expert=8."""
  model, params = model_and_params(None)
  x, _, _ = inputs()
  x2 = x.reshape(B * T, D)
  want = jax.jit(lambda p, x_: model.apply({"params": p}, x_, mutable=["intermediates"])[0])(
      params, x2)
  m = NNXMoE(D, E, F, K, rngs=nnx.Rngs(0))
  m.router.kernel[...] = params["router"]["kernel"]
  for name in ("gate", "up", "down"):
    getattr(m, name)[...] = params[name]
  graph, state = nnx.split(m)
  mesh = make_mesh(MeshConfig(data=1, expert=8))
  with jax.set_mesh(mesh):
    p, xs, _ = place(mesh, params, x2, x2[:, 0])
    f = jax.jit(lambda p, x_: model.apply({"params": p}, x_, mutable=["intermediates"])[0])
    got = f(p, xs)
    got_nnx = jax.jit(lambda s, x_: nnx.capture(nnx.merge(graph, s), nnx.Intermediate)(x_)[0])(
        state, xs)
    assert "all-to-all" in f.lower(p, xs).compile().as_text()
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(got_nnx, want, **TOL)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_without_set_mesh_the_mesh_comes_from_the_input(axis_types):
  """No `jax.set_mesh`: x placed with a NamedSharding carries the mesh in its type."""
  model, params = model_and_params(None)
  x, _, _ = inputs()
  f = jax.jit(lambda p, x_: model.apply({"params": p}, x_, mutable=["intermediates"])[0])
  mesh = make_mesh(MeshConfig(data=2, expert=4, axis_types=axis_types))
  xs = jax.device_put(x, NamedSharding(mesh, P(batch_axes(mesh))))
  compiled = f.lower(params, xs).compile()
  assert "all-to-all" in compiled.as_text()
  np.testing.assert_allclose(compiled(params, xs), f(params, x), **TOL)


def test_inside_a_shard_map_over_data():
  """A shard_map over 'data' only (LBL over it): the layer shards experts over the free
  'expert' axis of the same mesh; equal to one device."""
  model, params = model_and_params(None)
  x, _, _ = inputs()
  want = jax.jit(lambda p, x_: model.apply({"params": p}, x_, mutable=["intermediates"])[0])(
      params, x)
  inner = MoE(num_experts=E, d_ff=F, top_k=K, axis_name=("data",))
  body = lambda p, x_: inner.apply({"params": p}, x_, mutable=["intermediates"])[0]  # noqa: E731
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"),
                              axis_names={"data"}))
    compiled = f.lower(params, x).compile()
    assert "all-to-all" in compiled.as_text()
    np.testing.assert_allclose(compiled(params, x), want, **TOL)


def test_bad_configurations_raise_naming_the_fix():
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  x, _, _ = inputs()
  model = MoE(num_experts=6, d_ff=F, top_k=K)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="multiple of 4 experts"):
    jax.eval_shape(model.init, jax.random.key(0), x)
  model8 = MoE(num_experts=E, d_ff=F, top_k=K)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="multiple of 8"):
    jax.eval_shape(model8.init, jax.random.key(0), x[:4])
  # expert_axis=None: the experts stay replicated (no check, no all-to-all)
  with jax.set_mesh(mesh):
    jax.eval_shape(MoE(num_experts=6, d_ff=F, top_k=K, expert_axis=None).init,
                   jax.random.key(0), x)


def test_pallas_gpu_grouped_matmul_under_expert_parallelism():
  """grouped_matmul='pallas_gpu' (interpret mode here) in the expert-parallel shard_map:
  outputs, aux loss and gradients equal the single-device 'ragged_dot' layer's."""
  _, params = model_and_params(None)
  model = MoE(num_experts=E, d_ff=F, top_k=K, grouped_matmul="pallas_gpu", block_size=16)
  x, _, mask = inputs()
  mesh = make_mesh(MeshConfig(data=2, expert=4, axis_types="auto"))
  with jax.set_mesh(mesh):
    got = jax.device_get(loss_fn(model)(*place(mesh, params, x, mask)))
  assert_close(got, reference(None))


@pytest.mark.parametrize("names", [("data", "ep"), ("data", "tensor")])
def test_expert_axis_outside_the_batch_axes(names):
  """An expert axis that is not one of mpxla's batch axes also splits the tokens (each peer
  sends its own): equal to one device."""
  _, params = model_and_params(None)
  model = MoE(num_experts=E, d_ff=F, top_k=K, expert_axis=names[1])
  x, _, mask = inputs()
  mesh = jax.make_mesh((2, 4), names, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    args = (jax.tree.map(lambda a: jax.device_put(
        a, NamedSharding(mesh, P(names[1]) if a.shape[0] == E else P())), params),
            jax.device_put(x, NamedSharding(mesh, P(names))),
            jax.device_put(mask, NamedSharding(mesh, P(names))))
    compiled = loss_fn(model).lower(*args).compile()
    assert "all-to-all" in compiled.as_text()
    got = jax.device_get(compiled(*args))
  assert_close(got, reference(None))


def test_pallas_gpu_inside_a_checked_shard_map_raises_naming_the_fix():
  _, params = model_and_params(None)
  x, _, _ = inputs()
  model = MoE(num_experts=E, d_ff=F, top_k=K, grouped_matmul="pallas_gpu", block_size=16,
              expert_axis=None, axis_name=("data",))
  body = lambda p, x_: model.apply({"params": p}, x_, mutable=["intermediates"])[0]  # noqa: E731
  mesh = make_mesh(MeshConfig(data=8))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="pallas_gpu.*check_vma=False"):
    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=P("data"))).lower(params, x)

"""BatchNorm (global / local / ghost) on meshes 1, 2x4, 8, 4x2 vs dense per-group definitions."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.nn.batch_norm import BatchNorm, NNXBatchNorm
from mpxla.parallel import MeshConfig, batch_axes, make_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

MESHES = {
    "1": dict(data=1),
    "2x4": dict(data=2, fsdp=4),
    "8": dict(data=8),
    "4x2": dict(data=4, tensor=2),  # batch over data, the 8 features over tensor
}
B, EPS, MOM = 32, 1e-5, 0.9


def mesh_for(name, axis_types="auto"):
  cfg = MESHES[name]
  n = int(np.prod(list(cfg.values())))
  return make_mesh(MeshConfig(**cfg, axis_types=axis_types), devices=jax.devices()[:n])


def inputs():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((B, 3, 8)) * 2 + 0.7).astype(np.float32)
  r = rng.standard_normal((B, 3, 8)).astype(np.float32)  # cotangent of the output
  scale = (1 + 0.3 * rng.standard_normal(8)).astype(np.float32)
  bias = (0.2 * rng.standard_normal(8)).astype(np.float32)
  return x, r, {"params": {"scale": scale, "bias": bias},
                "batch_stats": {"mean": np.zeros(8, np.float32), "var": np.ones(8, np.float32)}}


def dense_bn(x, scale, bias, group):
  """Independent reference: plain jnp per group of `group` consecutive examples."""
  xg = x.reshape(x.shape[0] // group, group, *x.shape[1:])
  mean = xg.mean((1, 2), keepdims=True)
  var = ((xg - mean) ** 2).mean((1, 2), keepdims=True)
  y = (xg - mean) / jnp.sqrt(var + EPS) * scale + bias
  return y.reshape(x.shape), mean.reshape(-1, 8), var.reshape(-1, 8)


def group_sizes(mesh):
  per_device = B // int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
  sizes = {"global": B, "local": per_device, "ghost_small": per_device // 2}
  if per_device < B:
    sizes["ghost_large"] = 2 * per_device  # spans two devices
  return sizes


def kwargs_for(mode, size):
  if mode == "global":
    return {}
  if mode == "local":
    return dict(stat_scope="local")
  return dict(ghost_batch_size=size)


VSPEC = {"params": {"scale": P("tensor"), "bias": P("tensor")},
         "batch_stats": {"mean": P("tensor"), "var": P("tensor")}}


def run_all_modes(mesh, view, x, r, variables):
  """{mode: (loss, grads wrt (params, x), new batch_stats, per-device batch_stats, y)}."""
  ax = batch_axes(mesh)
  sizes = group_sizes(mesh)
  xspec = P(ax, None, "tensor")

  def forward(mode):
    bn = BatchNorm(momentum=MOM, epsilon=EPS, axis_name=ax, **kwargs_for(mode, sizes[mode]))

    def body(v, x_):
      y, st = bn.apply(v, x_, use_running_average=False, mutable=["batch_stats"])
      return y, st["batch_stats"], jax.tree.map(lambda a: a[None], st["batch_stats"])

    if view != "shard_map":
      return body
    per_dev = {"mean": P(ax, "tensor"), "var": P(ax, "tensor")}
    return jax.shard_map(body, mesh=mesh, in_specs=(VSPEC, xspec),
                         out_specs=(xspec, VSPEC["batch_stats"], per_dev))

  def all_modes(params, x_):
    out = {}
    for mode in sizes:
      f = forward(mode)

      def loss(p, x__, f=f):
        y, st, per_dev = f({"params": p, "batch_stats": variables["batch_stats"]}, x__)
        return jnp.sum(y * r), (st, per_dev, y)

      (value, (st, per_dev, y)), grads = jax.value_and_grad(
          loss, argnums=(0, 1), has_aux=True)(params, x_)
      out[mode] = (value, grads, st, per_dev, y)
    return out

  with jax.set_mesh(mesh):
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    params = jax.tree.map(put, variables["params"], VSPEC["params"])
    return jax.jit(all_modes)(params, put(x, xspec))


@functools.cache
def reference(group):
  """Dense single-device output, loss and grads for groups of `group` examples (cached)."""
  x, r, variables = inputs()
  params = {k: jnp.asarray(v) for k, v in variables["params"].items()}

  def ref_loss(p, x_):
    y_, _, _ = dense_bn(x_, p["scale"], p["bias"], group)
    return jnp.sum(y_ * r), y_

  (value, y), grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(
      params, jnp.asarray(x))
  return np.asarray(y), np.asarray(value), jax.tree.map(np.asarray, grads)


def check_against_reference(results, mesh, x, r, variables):
  for mode, group in group_sizes(mesh).items():
    loss, grads, st, per_dev, y = results[mode]
    ref_y, ref_value, ref_grads = reference(group)
    tol = dict(rtol=1e-6, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(y, ref_y, **tol)
    np.testing.assert_allclose(loss, ref_value, rtol=1e-6, atol=1e-5, err_msg=mode)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=mode)
    # Running averages: the mean over groups of the group statistics (float64 reference).
    xg = np.float64(x).reshape(B // group, group, 3, 8)
    np.testing.assert_allclose(st["mean"], (1 - MOM) * xg.mean((1, 2)).mean(0), **tol)
    np.testing.assert_allclose(st["var"], MOM + (1 - MOM) * xg.var((1, 2)).mean(0), **tol)
    # ... and identical, bit for bit, on every device.
    for leaf in jax.tree.leaves(per_dev):
      leaf = np.asarray(leaf)
      assert np.all(leaf == leaf[:1]), mode


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_batch_norm_modes_match_dense_reference(mesh_name, view):
  mesh = mesh_for(mesh_name)
  x, r, variables = inputs()
  results = run_all_modes(mesh, view, x, r, variables)
  check_against_reference(results, mesh, x, r, variables)


def test_batch_norm_under_explicit_axes():
  mesh = mesh_for("2x4", axis_types="explicit")
  x, r, variables = inputs()
  results = run_all_modes(mesh, "jit", x, r, variables)
  check_against_reference(results, mesh, x, r, variables)


def test_nnx_equals_linen_and_eval_uses_running_averages():
  mesh = mesh_for("2x4")
  ax = batch_axes(mesh)
  x, _, variables = inputs()
  kw = dict(momentum=MOM, epsilon=EPS, axis_name=ax, ghost_batch_size=8)
  linen = BatchNorm(**kw)
  model = NNXBatchNorm(8, rngs=nnx.Rngs(0), **kw)
  model.scale[...] = variables["params"]["scale"]
  model.bias[...] = variables["params"]["bias"]
  graphdef, state = nnx.split(model)

  def nnx_step(state, x_):
    m = nnx.merge(graphdef, state)
    y = m(x_)
    return y, nnx.state(m)

  def linen_step(v, x_):
    y, st = linen.apply(v, x_, use_running_average=False, mutable=["batch_stats"])
    return y, {**v, **st}

  sspec = jax.tree.map(lambda _: P(), state)
  nnx_f = jax.jit(jax.shard_map(nnx_step, mesh=mesh, in_specs=(sspec, P(ax)),
                                out_specs=(P(ax), sspec)))
  linen_f = jax.jit(jax.shard_map(linen_step, mesh=mesh, in_specs=(P(), P(ax)),
                                  out_specs=(P(ax), P())))
  v = variables
  for step in range(2):  # running averages evolve identically
    y_nnx, state = nnx_f(state, x + step)
    y_linen, v = linen_f(v, x + step)
    np.testing.assert_array_equal(y_nnx, y_linen)
  np.testing.assert_array_equal(state["mean"][...], v["batch_stats"]["mean"])
  np.testing.assert_array_equal(state["var"][...], v["batch_stats"]["var"])
  # Eval: (x - running mean) / sqrt(running var + eps) * scale + bias, for both APIs.
  model = nnx.merge(graphdef, state)
  ref = ((np.float64(x) - v["batch_stats"]["mean"]) / np.sqrt(v["batch_stats"]["var"] + EPS)
         * variables["params"]["scale"] + variables["params"]["bias"])
  np.testing.assert_allclose(model(x, use_running_average=True), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nnx.view(model, use_running_average=True)(x), ref, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(linen.apply(v, x, use_running_average=True), ref, rtol=1e-6,
                             atol=1e-6)


def test_mask_excludes_padded_examples():
  x, _, variables = inputs()
  valid = np.arange(B) % 5 != 0
  mesh = mesh_for("8")

  def f(v, x_, m):
    return BatchNorm(axis_name="data", momentum=MOM, epsilon=EPS).apply(
        v, x_, use_running_average=False, mask=m[:, None, None], mutable=["batch_stats"])

  y, st = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=(P("data"), P())))(variables, x, valid)
  xv = np.float64(x[valid])
  mean, var = xv.mean((0, 1)), xv.var((0, 1))
  ref = (np.float64(x) - mean) / np.sqrt(var + EPS) * variables["params"]["scale"] + \
      variables["params"]["bias"]
  np.testing.assert_allclose(y[valid], ref[valid], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(st["batch_stats"]["mean"], (1 - MOM) * mean, rtol=1e-6, atol=1e-7)


def test_fast_variance_and_bf16_inputs():
  x, _, variables = inputs()
  xb = jnp.asarray(x, jnp.bfloat16)
  y32, _ = BatchNorm(fast_variance=True).apply(variables, x, use_running_average=False,
                                               mutable=["batch_stats"])
  ref, _, _ = dense_bn(x, variables["params"]["scale"], variables["params"]["bias"], B)
  np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5)
  yb, st = BatchNorm(dtype=jnp.bfloat16).apply(variables, xb, use_running_average=False,
                                               mutable=["batch_stats"])
  assert yb.dtype == jnp.bfloat16 and st["batch_stats"]["mean"].dtype == jnp.float32
  xbf = np.float64(np.asarray(xb, np.float32))  # statistics of the bf16 values, in float32
  np.testing.assert_allclose(st["batch_stats"]["mean"], 0.01 * xbf.mean((0, 1)), rtol=1e-5,
                             atol=1e-7)


def test_bad_input_errors():
  x, _, variables = inputs()
  mesh = mesh_for("8")

  def apply(x_, **kw):
    return BatchNorm(**kw).apply(variables, x_, use_running_average=False,
                                 mutable=["batch_stats"])

  with pytest.raises(ValueError, match="ghost_batch_size=5 does not divide the batch of 32"):
    apply(x, ghost_batch_size=5)
  with pytest.raises(ValueError, match="includes axis 0, the batch axis"):
    apply(x, axis=0)
  with pytest.raises(ValueError, match=r"stat_scope='local'\) outside shard_map needs axis_name"):
    apply(x, stat_scope="local")  # jit/eager without axis_name: shard count unknown
  with pytest.raises(ValueError, match="scope='local' needs the number of device shards"):
    apply(x, stat_scope="local", axis_name="data")  # no mesh context: 'data' is unknown
  with pytest.raises(ValueError, match=r"axis_name=None, so the statistic would be per device"):
    jax.jit(jax.shard_map(lambda v, x_: apply(x_)[0], mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=P("data")))(variables, x)
  with pytest.raises(ValueError, match="multiple of the per-device batch"):
    jax.jit(jax.shard_map(lambda x_: apply(x_, axis_name="data", ghost_batch_size=6)[0],
                          mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
  with pytest.raises(ValueError, match=r"does not divide into 8 device shards"):
    with jax.set_mesh(mesh):
      apply(x[:12], stat_scope="local", axis_name="data")
  with pytest.raises(ValueError, match=r"built for features \(8,\)"):
    NNXBatchNorm(8, rngs=nnx.Rngs(0))(jnp.ones((4, 3)))
  assert isinstance(BatchNorm(), nn.Module)


def collective_sizes(compiled_text):
  """Element counts of every collective's results (tuple results counted per element)."""
  sizes = []
  op = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
  for line in compiled_text.splitlines():
    m = re.search(r"= (.*?) " + op, line)
    if m:
      sizes += [int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))]
  return sorted(sizes)


@pytest.mark.parametrize("kw, expected", [
    (dict(), [8, 8]),  # two-pass: sum, then sum of squared deviations
    (dict(fast_variance=True), [16]),  # one [2, C] all-reduce
    (dict(ghost_batch_size=8), [8, 8, 32, 32]),  # 4 groups over 8 devices: [4, C] twice,
])                                              # + the running-average pmean [C] twice
def test_batch_norm_collectives_are_feature_sized(kw, expected):
  mesh = mesh_for("8")
  x, _, variables = inputs()
  bn = BatchNorm(axis_name="data", **kw)
  f = jax.jit(jax.shard_map(
      lambda v, x_: bn.apply(v, x_, use_running_average=False, mutable=["batch_stats"]),
      mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
  assert collective_sizes(f.lower(variables, x).compile().as_text()) == sorted(expected)


def test_running_averages_weight_groups_by_their_unmasked_rows():
  """Per-device ('local') and ghost groups: a fully padded group counts for nothing in the
  running averages (they move by the statistics of the unmasked rows), and a step with every
  row masked leaves them unchanged (float64 numpy reference)."""
  mesh = make_mesh(MeshConfig(data=8, axis_types="auto"))
  x = (np.random.default_rng(0).standard_normal((16, 4)) + 3).astype(np.float32)
  keep = np.ones(16, bool)
  keep[:2] = False  # device 0's rows
  sharded = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
  for kw in (dict(stat_scope="local"), dict(ghost_batch_size=2)):
    bn = BatchNorm(axis_name="data", momentum=0.0, **kw)
    v = bn.init(jax.random.key(0), x, use_running_average=True)
    step = jax.jit(lambda a, m, bn=bn, v=v: bn.apply(
        v, a, use_running_average=False, mask=m[:, None], mutable=["batch_stats"])[1])
    with jax.set_mesh(mesh):
      got = step(sharded(x), sharded(keep))["batch_stats"]
      unchanged = step(sharded(x), sharded(np.zeros(16, bool)))["batch_stats"]
    valid = x[keep].astype(np.float64).reshape(7, 2, 4)  # 7 groups of 2 rows
    np.testing.assert_allclose(got["mean"], valid.mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(got["var"], valid.var(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(unchanged["mean"], v["batch_stats"]["mean"])
    np.testing.assert_allclose(unchanged["var"], v["batch_stats"]["var"])

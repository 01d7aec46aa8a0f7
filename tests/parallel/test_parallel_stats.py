"""Global statistics on 8 simulated devices equal the full-batch computation (float64 numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import quant
from mpxla.parallel import MeshConfig, batch_axes, make_mesh, stats

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

# name -> (mesh sizes, feature axis split over 'tensor'?)
MESHES = {
    "1": dict(data=1),
    "2x4": dict(data=2, fsdp=4),
    "8": dict(data=8),
    "4x2": dict(data=4, tensor=2),  # batch over data, features over tensor
}


def mesh_for(name):
  cfg = MESHES[name]
  n = int(np.prod(list(cfg.values())))
  return make_mesh(MeshConfig(**cfg), devices=jax.devices()[:n])


def data():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((32, 3, 8)) * 3 + 1.5).astype(np.float32)
  x[13, 1, 5] = -977.25  # one outlier decides the amax, on one device only
  mask = rng.random((32, 3, 1)) < 0.7
  return x, mask


def x_spec(mesh):
  return P(batch_axes(mesh), None, "tensor")


def ref_moments(x, mask=None):
  x = np.float64(x)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  n = w.sum((0, 1))
  mean = (x * w).sum((0, 1)) / n
  return mean, ((x - mean) ** 2 * w).sum((0, 1)) / n


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_global_moments_and_amax_equal_full_batch(mesh_name, view):
  mesh = mesh_for(mesh_name)
  ax = batch_axes(mesh)
  x, mask = data()

  def f(x, mask):
    out = {}
    out["mean"], out["var"] = stats.global_mean_and_var(x, (0, 1), axis_name=ax)
    out["fmean"], out["fvar"] = stats.global_mean_and_var(x, (0, 1), axis_name=ax,
                                                          fast_variance=True)
    out["mmean"], out["mvar"] = stats.global_mean_and_var(x, (0, 1), axis_name=ax, where=mask)
    out["mean2"] = stats.global_mean(x, (0, 1), axis_name=ax, where=mask)
    out["sum"] = stats.global_sum(x, (0, 1), axis_name=ax)
    # amax over the whole tensor: the features are split over 'tensor' too.
    out["amax"] = stats.global_amax(x, axis_name=(*ax, "tensor") if view == "shard_map" else ax)
    out["scale"] = stats.global_scale(
        x, "e4m3", axis_name=(*ax, "tensor") if view == "shard_map" else ax)
    return out

  feat = P("tensor")
  out_specs = {k: (P() if k in ("amax", "scale") else feat) for k in
               ("mean", "var", "fmean", "fvar", "mmean", "mvar", "mean2", "sum", "amax", "scale")}
  if view == "shard_map":
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(x_spec(mesh), P(ax)), out_specs=out_specs))
    out = g(x, mask)
  else:
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, x_spec(mesh)))
      ms = jax.device_put(mask, NamedSharding(mesh, P(ax)))
      out = jax.jit(f)(xs, ms)
  # The same computation on one device over the full batch.
  ref_single = jax.jit(lambda v: dict(zip(("mean", "var"), stats.global_mean_and_var(v, (0, 1)),
                                          strict=True)))(x)
  mean, var = ref_moments(x)
  mmean, mvar = ref_moments(x, mask)
  tol = dict(rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["mean"], mean, **tol)
  np.testing.assert_allclose(out["var"], var, rtol=1e-6)
  np.testing.assert_allclose(out["mean"], ref_single["mean"], **tol)
  np.testing.assert_allclose(out["var"], ref_single["var"], rtol=1e-6)
  np.testing.assert_allclose(out["fmean"], mean, **tol)
  np.testing.assert_allclose(out["fvar"], var, rtol=2e-6)  # one-pass: cancellation
  np.testing.assert_allclose(out["mmean"], mmean, **tol)
  np.testing.assert_allclose(out["mvar"], mvar, rtol=1e-6)
  np.testing.assert_allclose(out["mean2"], mmean, **tol)
  np.testing.assert_allclose(out["sum"], np.float64(x).sum((0, 1)), rtol=1e-6)
  # A max is exact: bit-equal to the single-device per-tensor amax and scale.
  assert out["amax"] == np.float32(977.25) == quant.amax(jnp.asarray(x), "tensor")
  assert out["scale"] == quant.scale_from_amax(quant.amax(jnp.asarray(x)), "e4m3")


def test_amax_agrees_on_every_device_and_missing_axes_raise():
  mesh = mesh_for("4x2")
  x, _ = data()
  spec = x_spec(mesh)

  def per_device(axis_name):
    def f(v):
      return stats.global_amax(v, axis_name=axis_name)[None, None, None]
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))(x)

  every = np.asarray(per_device(("data", "fsdp", "expert", "tensor")))
  assert every.shape == (4, 1, 2) and np.all(every == np.float32(977.25))
  with pytest.raises(ValueError, match=r"varies over mesh axes \['tensor'\].*Pass axis_name="):
    per_device(("data", "fsdp", "expert"))
  with pytest.raises(ValueError, match="varies over mesh axes"):
    per_device(None)


def test_forgotten_axis_name_inside_shard_map_raises_and_empty_tuple_opts_out():
  mesh = mesh_for("8")
  x, _ = data()

  def run(axis_name):
    f = lambda v: stats.global_mean(v, (0, 1), axis_name=axis_name)[None]  # noqa: E731
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)

  with pytest.raises(ValueError, match=r"axis_name=None, so the statistic would be per device"):
    run(None)
  local = np.asarray(run(()))  # per device on purpose
  np.testing.assert_allclose(local, np.float64(x).reshape(8, 4, 3, 8).mean((1, 2)), rtol=1e-6,
                             atol=1e-6)


def test_vmap_axis_name_is_a_batch_axis():
  x, _ = data()
  xs = x.reshape(4, 8, 3, 8)
  mean, var = jax.vmap(lambda v: stats.global_mean_and_var(v, (0, 1), axis_name="b"),
                       axis_name="b")(xs)
  ref_mean, ref_var = ref_moments(x)
  np.testing.assert_allclose(mean, np.broadcast_to(ref_mean, (4, 8)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, np.broadcast_to(ref_var, (4, 8)), rtol=1e-6)


def test_unbound_axis_name_under_plain_jit_is_global():
  x, _ = data()
  mean, _ = jax.jit(lambda v: stats.global_mean_and_var(v, (0, 1), axis_name="data"))(x)
  np.testing.assert_allclose(mean, ref_moments(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_grouped_moments_equal_per_group_definition(view):
  mesh = mesh_for("2x4")
  ax = batch_axes(mesh)
  x, _ = data()
  cases = {"global": dict(), "local": dict(scope="local"), "g2": dict(ghost_batch_size=2),
           "g16": dict(ghost_batch_size=16)}

  def f(v):
    out = {}
    for name, kw in cases.items():
      plan = stats.plan_groups(v.shape[0], axis_name=ax, **kw)
      m, s = stats.grouped_mean_and_var(v, plan, (2,))
      out[name] = (m, s)
    return out

  if view == "shard_map":
    spec = {k: (P(ax), P(ax)) for k in cases}
    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(ax), out_specs=spec))(x)
  else:
    with jax.set_mesh(mesh):
      out = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P(ax))))
  xd = np.float64(x)
  for name, group in [("global", 32), ("local", 4), ("g2", 2), ("g16", 16)]:
    xr = xd.reshape(32 // group, group, 3, 8)
    m, s = xr.mean((1, 2)), xr.var((1, 2))
    if view == "shard_map" and group > 4:  # one row per device, shared by its group
      m, s = np.repeat(m, group // 4, 0), np.repeat(s, group // 4, 0)
    if view == "jit" and name == "global":
      m, s = m[:1], s[:1]
    np.testing.assert_allclose(out[name][0], m, rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(out[name][1], s, rtol=1e-6, atol=1e-6, err_msg=name)


def test_plan_groups_errors_are_clear():
  mesh = mesh_for("8")

  def plan(batch, **kw):
    def f(v):
      stats.plan_groups(batch, axis_name="data", **kw)
      return v
    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
        jnp.zeros(8))

  with pytest.raises(ValueError, match="ghost_batch_size=3 does not divide the batch of 4"):
    plan(4, ghost_batch_size=3)
  with pytest.raises(ValueError, match="must be a multiple of the per-device batch"):
    plan(4, ghost_batch_size=6)
  with pytest.raises(ValueError, match="must be a multiple of the per-device batch"):
    plan(4, ghost_batch_size=64)  # larger than the global batch of 32
  with pytest.raises(ValueError, match="stat_scope\\) at 'global'"):
    plan(4, ghost_batch_size=2, scope="local")
  with pytest.raises(ValueError, match="scope must be 'global' or 'local'"):
    plan(4, scope="device")
  with pytest.raises(ValueError, match="scope='local' needs the number of device shards"):
    jax.jit(lambda v: stats.plan_groups(8, scope="local", axis_name="data") and v)(jnp.zeros(8))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="does not divide into 8 device shards"):
      stats.plan_groups(12, scope="local", axis_name="data")
  with pytest.raises(ValueError, match="ghost_batch_size=64 is larger than the batch of 32"):
    stats.plan_groups(32, ghost_batch_size=64)


def test_partially_manual_shard_map():
  mesh = mesh_for("2x4")
  x, _ = data()
  ax = ("data", "fsdp")

  def f(v):
    view = stats.batch_view(ax)
    assert view.manual == ("data",) and view.manual_size == 2 and view.shards == 4
    mean, var = stats.global_mean_and_var(v, (0, 1), axis_name=ax)
    plan = stats.plan_groups(v.shape[0], scope="local", axis_name=ax)
    lmean, _ = stats.grouped_mean_and_var(v, plan, (2,))
    return mean, var, lmean

  with jax.set_mesh(mesh):
    g = jax.jit(jax.shard_map(f, in_specs=P("data"), out_specs=(P(), P(), P("data")),
                              axis_names={"data"}))  # 'fsdp' stays Auto inside
    mean, var, lmean = g(jax.device_put(x, NamedSharding(mesh, P(ax))))
  ref_mean, ref_var = ref_moments(x)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=1e-6)
  np.testing.assert_allclose(lmean, np.float64(x).reshape(8, 4, 3, 8).mean((1, 2)), rtol=1e-6,
                             atol=1e-6)


def test_nonfinite_values_in_masked_entries_do_not_reach_the_statistics():
  """NaN / inf where the mask is 0 (padding filled with anything): the statistics of the
  unmasked entries, as float64 numpy gives them."""
  from mpxla.parallel import metrics

  rng = np.random.default_rng(0)
  x = (rng.standard_normal((16, 4)) + 3).astype(np.float32)
  keep = np.arange(16) < 13
  bad = x.copy()
  bad[13:] = np.nan
  bad[15, 0] = np.inf
  want = x[keep].astype(np.float64)
  mean, var = stats.global_mean_and_var(bad, axis=0, where=keep[:, None])
  np.testing.assert_allclose(mean, want.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, want.var(0), rtol=1e-5)
  fmean, fvar = stats.global_mean_and_var(bad, axis=0, where=keep[:, None], fast_variance=True)
  np.testing.assert_allclose(fmean, want.mean(0), rtol=1e-6)
  np.testing.assert_allclose(fvar, want.var(0), rtol=1e-3)
  np.testing.assert_allclose(stats.global_mean(bad, axis=0, where=keep[:, None]),
                             want.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.global_sum(bad, axis=0, where=keep[:, None]),
                             want.sum(0), rtol=1e-6)
  np.testing.assert_allclose(metrics.weighted_mean(bad, keep[:, None]), want.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics.Average.from_values(bad, keep[:, None]).compute(),
                             want.mean(), rtol=1e-6)


def test_reducing_without_the_batch_axis_inside_shard_map_raises():
  """Inside shard_map each device holds other rows: a mean over axis 1 with axis_name would
  add rows of different devices; it raises, and axis_name=() is the per-device reduction."""
  mesh = make_mesh(MeshConfig(data=8))
  x = np.arange(64, dtype=np.float32).reshape(16, 4)
  for fn in (stats.global_mean, stats.global_sum,
             lambda a, **kw: stats.global_mean_and_var(a, **kw)[0]):
    f = jax.shard_map(lambda a, fn=fn: fn(a, axis=1, axis_name="data"), mesh=mesh,
                      in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(ValueError, match="leaves out the batch axis 0"):
      jax.jit(f)(x)
  ok = jax.shard_map(lambda a: stats.global_mean(a, axis=1, axis_name=()), mesh=mesh,
                     in_specs=P("data"), out_specs=P("data"))
  np.testing.assert_allclose(jax.jit(ok)(x), x.mean(1))

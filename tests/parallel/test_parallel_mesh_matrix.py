"""Every function family on the mesh matrix (mesh_matrix.py) equals the single-device result.

Cells: meshes 8 and 2x4 x axis types {Auto, Explicit} x {with jax.set_mesh, without} x
{jit on NamedSharding-placed inputs, shard_map}. Each test traces one function that calls
the family's public entry points, once per cell, and compares with float64 numpy or the
same function on one device over the full batch (bit-exact where the computation is a max
or elementwise).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_matrix import Cell, cells

from mpxla import attention, quant
from mpxla.nn import fp8_dot
from mpxla.nn.batch_norm import BatchNorm, NNXBatchNorm
from mpxla.nn.moe import MoE, NNXMoE
from mpxla.parallel import moe as pmoe
from mpxla.parallel import stats

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

B, SHARDS, EPS, MOM = 32, 8, 1e-5, 0.99
TOL = dict(rtol=1e-6, atol=1e-6)


def close(got, want, **tol):
  """Every leaf of `got` equals `want`'s within the tolerance; the structures must agree."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, **(tol or TOL))


def np_bn(x, group, mask=None):
  """float64 BatchNorm (no affine part) per `group` consecutive examples: y, mean, var."""
  x = np.float64(x)
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  xg, wg = (a.reshape(B // group, group, *x.shape[1:]) for a in (x, w))
  n = np.maximum(wg.sum((1, 2), keepdims=True), 1)
  mean = (xg * wg).sum((1, 2), keepdims=True) / n
  var = ((xg - mean) ** 2 * wg).sum((1, 2), keepdims=True) / n
  y = ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape)
  return y, mean.reshape(-1, x.shape[-1]), var.reshape(-1, x.shape[-1])


def bn_inputs():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((B, 3, 4)) * 2 + 0.7).astype(np.float32)
  x[13, 1, 2] = -97.25  # the amax, on one device
  return x, rng.random((B, 3, 1)) < 0.7


@pytest.mark.parametrize("cell", cells())
def test_stats_and_batch_norm(cell):
  """Global moments and amax, Linen BatchNorm global / local / ghost and NNX BatchNorm.

  Issue 13: Linen BatchNorm (also axis_name=None) recursed on Explicit meshes without
  jax.set_mesh (cells '*-explicit-no_mesh-jit').
  """
  ax = cell.axes
  x, mask = bn_inputs()
  variables = {"batch_stats": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
  nnx_graph, nnx_state = nnx.split(NNXBatchNorm(4, use_scale=False, use_bias=False,
                                                axis_name=ax, rngs=nnx.Rngs(0)))

  def f(x, mask, nnx_state):
    out = {}
    out["mean"], out["var"] = stats.global_mean_and_var(x, (0, 1), axis_name=ax)
    out["amax"] = stats.global_amax(x, axis_name=ax)
    for name, kw in [("global", {}), ("local", dict(stat_scope="local")),
                     ("ghost", dict(ghost_batch_size=8))]:  # ghost groups span 2 devices
      y, upd = BatchNorm(use_scale=False, use_bias=False, axis_name=ax, **kw).apply(
          variables, x, use_running_average=False, mutable=["batch_stats"])
      out[name] = (y, upd["batch_stats"])
    bn = nnx.merge(nnx_graph, nnx_state)
    out["nnx"] = (bn(x, mask=mask), {"mean": bn.mean[...], "var": bn.var[...]})
    if cell.view == "jit":  # axis_name=None: global under jit (inside shard_map it raises)
      out["none"] = BatchNorm(use_scale=False, use_bias=False).apply(
          variables, x, use_running_average=False, mutable=["batch_stats"])[0]
    return out

  xspec = P(ax)
  ra = {"mean": P(), "var": P()}
  out_specs = dict(mean=P(), var=P(), amax=P(), **{
      k: (xspec, ra) for k in ("global", "local", "ghost", "nnx")})
  if cell.view == "jit":
    out_specs["none"] = xspec
  out = cell.run(f, (x, mask, nnx_state), (xspec, P(ax), P()), out_specs)

  y, mean, var = np_bn(x, B)
  close((out["mean"], out["var"]), (mean[0], var[0]))
  if cell.view == "jit":
    close(out["none"], y)
  assert out["amax"] == np.float32(97.25)
  for name, group, m in [("global", B, None), ("local", B // SHARDS, None),
                         ("ghost", 8, None), ("nnx", B, mask)]:
    y, gmean, gvar = np_bn(x, group, m)
    ra_want = {"mean": (1 - MOM) * gmean.mean(0), "var": MOM + (1 - MOM) * gvar.mean(0)}
    close(out[name], (y, ra_want))


def moe_inputs(b=16, t=4, e=4, k=2):
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((b, t, e)).astype(np.float32)
  logits[:, :, 1] += np.linspace(-2, 2, b)[:, None]  # routing differs across the batch
  probs = np.asarray(jax.nn.softmax(logits, -1))
  idx = np.argsort(-probs, -1, kind="stable")[..., :k].astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[:3, 2:] = False
  return probs, idx, mask


def np_lbl(probs, idx, mask, e=4):
  """N_E * sum_i f_i P_i over one set of tokens, float64."""
  m = mask.reshape(-1)
  c = np.bincount(idx.reshape(-1, idx.shape[-1])[m].reshape(-1), minlength=e)
  p = np.float64(probs).reshape(-1, e)[m]
  return e * np.sum(c / c.sum() * p.mean(0))


@functools.cache
def moe_layer():
  """(MoE inputs, variables, single-device full-batch output and aux loss)."""
  h = np.random.default_rng(2).standard_normal((16, 4, 8)).astype(np.float32)
  moe = MoE(num_experts=4, d_ff=8, top_k=2)
  variables = jax.jit(moe.init)(jax.random.key(0), h)
  y, inter = jax.jit(lambda h: moe.apply(variables, h, mutable=["intermediates"]))(h)
  return h, variables, y, inter["intermediates"]["aux_loss"][0]


@pytest.mark.parametrize("cell", cells())
def test_load_balancing_loss_and_moe(cell):
  """LBL in every scope (and the count buffer) and the Linen and NNX MoE layers' outputs and
  losses (the NNX layer holds the Linen layer's parameters).

  Issue 13: scope='micro_batch' failed on Explicit meshes with a reshape ShardingTypeError
  (cells '*-explicit-*-jit').
  """
  ax = cell.axes
  probs, idx, mask = moe_inputs()
  h, variables, y1, aux1 = moe_layer()
  moe = MoE(num_experts=4, d_ff=8, top_k=2, axis_name=ax)
  nnx_moe = NNXMoE(8, 4, 8, 2, axis_name=ax, rngs=nnx.Rngs(0))
  nnx_moe.router.kernel[...] = variables["params"]["router"]["kernel"]
  for name in ("gate", "up", "down"):
    getattr(nnx_moe, name)[...] = variables["params"][name]
  nnx_graph, nnx_state = nnx.split(nnx_moe)

  def f(probs, idx, mask, h, nnx_state):
    lbl = lambda scope, **kw: pmoe.load_balancing_loss(  # noqa: E731
        probs, idx, 4, scope, axis_name=ax, mask=mask, **kw)
    y, inter = moe.apply(variables, h, mutable=["intermediates"])
    buf = pmoe.init_count_buffer(4)
    _, buf = pmoe.load_balancing_loss_with_buffer(probs, idx, 4, buf, axis_name=ax)
    buffered, _ = pmoe.load_balancing_loss_with_buffer(probs, idx, 4, buf, axis_name=ax)
    y_nnx, captured = nnx.capture(nnx.merge(nnx_graph, nnx_state), nnx.Intermediate)(h)
    return dict(glob=lbl("global"), micro=lbl("micro_batch"), seq=lbl("sequence"),
                buffered=buffered, y=y, aux=inter["intermediates"]["aux_loss"][0],
                y_nnx=y_nnx, aux_nnx=captured["aux_loss"][0])

  out_specs = dict(glob=P(), micro=P(), seq=P(), buffered=P(), y=P(ax), aux=P(), y_nnx=P(ax),
                   aux_nnx=P())
  out = cell.run(f, (probs, idx, mask, h, nnx_state), (P(ax),) * 4 + (P(),), out_specs)

  micro = [np_lbl(probs[i:i + 2], idx[i:i + 2], mask[i:i + 2]) for i in range(0, 16, 2)]
  seq = [np_lbl(probs[i:i + 1], idx[i:i + 1], mask[i:i + 1]) for i in range(16)]
  close(out["glob"], np_lbl(probs, idx, mask))
  close(out["micro"], np.mean(micro))
  close(out["seq"], np.mean(seq))
  close(out["buffered"], np_lbl(probs, idx, np.ones_like(mask)))  # buffer = 2x the counts
  close(out["y"], y1)
  close(out["aux"], aux1)
  close(out["y_nnx"], y1)
  close(out["aux_nnx"], aux1)


def x_with_outlier(shape=(32, 256)):
  x = np.array(jax.random.normal(jax.random.key(3), shape))
  x[21, 7] = 611.5  # decides the per-tensor amax, on one device
  return x


def bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def quant_fn(x, axis_name):
  q = quant.quantize(x, "e4m3", "tensor", axis_name=axis_name)
  q128 = quant.quantize(x, "e4m3", "1x128")
  return dict(amax=quant.amax(x, "tensor", axis_name=axis_name), codes=q.codes, scale=q.scales,
              deq=quant.dequantize(q), codes128=q128.codes, scales128=q128.scales)


def fp8_fn(x, w, axis_name):
  dn = (((1,), (0,)), ((), ()))
  config = fp8_dot.DotConfig(axis_name=axis_name)
  delayed = fp8_dot.DotConfig(scaling="delayed", history=4, axis_name=axis_name)
  state = jax.tree.map(lambda h: h.at[0].set(300.0), fp8_dot.init_delayed_state(delayed))

  def loss(x, w, state):
    y = fp8_dot.fp8_dot_general(x, w, dn, config=config)
    yd = fp8_dot.fp8_dot_general(x, w, dn, config=delayed, state=state)
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(yd * yd), (y, yd)

  grads, (y, yd) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, w, state)
  return dict(y=y, yd=yd, dx=grads[0], dw=grads[1], new_state=grads[2])


def attention_fn(q, k, v, ids):
  mask = attention.causal() & attention.document(ids) & attention.sliding_window(5, 0)

  def loss(q, k):
    o = attention.attention(q, k, v, mask=mask, block_q=8, block_kv=8)
    return jnp.sum(jnp.sin(o)), o

  (dq, dk), o = jax.grad(loss, (0, 1), has_aux=True)(q, k)
  return o, dq, dk


@functools.cache
def inputs_and_reference(family):
  """(inputs, the family's function on one device over the full batch)."""
  if family == "quant":
    args = (x_with_outlier(),)
    return args, jax.jit(lambda x: quant_fn(x, None))(*args)
  if family == "fp8":
    args = (x_with_outlier((32, 64)), np.asarray(jax.random.normal(jax.random.key(4), (64, 16))))
    return args, jax.jit(lambda x, w: fp8_fn(x, w, None))(*args)
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal((16, 24, 2, 8)).astype(np.float32) for _ in range(3))
  ids = (np.arange(16)[:, None] // 4 + np.arange(24)[None] // 10).astype(np.int32)
  return (q, k, v, ids), jax.jit(attention_fn)(q, k, v, ids)


def assert_bits_equal(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(bits(g), bits(w)), got, want)


@pytest.mark.parametrize("cell", cells())
def test_quant_global_amax(cell):
  """quant.amax / quantize per tensor ('tensor': axis_name inside shard_map) and 1x128."""
  args, want = inputs_and_reference("quant")
  ax = cell.axes
  out_specs = dict(amax=P(), codes=P(ax), scale=P(), deq=P(ax), codes128=P(ax),
                   scales128=P(ax))
  out = cell.run(lambda x: quant_fn(x, cell.manual), args, (P(ax),), out_specs)
  assert_bits_equal(out, want)  # a max and elementwise casts: the same bits
  assert out["amax"] == np.float32(611.5)


@pytest.mark.parametrize("cell", cells())
def test_fp8_dot_global_amax(cell):
  """fp8_dot_general with per-tensor scales ('tensor' and 'delayed'): output and gradients."""
  args, want = inputs_and_reference("fp8")
  ax = cell.axes
  out_specs = dict(y=P(ax), yd=P(ax), dx=P(ax), dw=P(), new_state=P())
  out = cell.run(lambda x, w: fp8_fn(x, w, cell.manual), args, (P(ax), P()), out_specs)
  for k in ("y", "yd", "dx", "new_state"):  # row-local or a max: the same bits
    assert_bits_equal(out[k], want[k])
  close(out["dw"], want["dw"], rtol=1e-6, atol=1e-6 * np.abs(want["dw"]).max())


@pytest.mark.parametrize("cell", cells())
def test_attention(cell):
  """attention() with causal & document & sliding-window masks: output, dq, dk."""
  args, want = inputs_and_reference("attention")
  ax = cell.axes
  out, dq, dk = cell.run(attention_fn, args, (P(ax),) * 4, (P(ax),) * 3)
  for name, got, ref in zip(("out", "dq", "dk"), (out, dq, dk), want, strict=True):
    assert got.shape == ref.shape, name
    np.testing.assert_allclose(got, ref, **TOL, err_msg=name)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_attention_gathers_nothing_across_the_batch(axis_type):
  """Under jit each device attends over its own sequences: the compiled forward and backward of
  the XLA path (sparse mode: block gathers per batch element) hold no all-gather."""
  cell = Cell("2x4", axis_type, set_mesh=True, view="jit")
  args, _ = inputs_and_reference("attention")
  bm = attention.make_block_mask(attention.causal() & attention.sliding_window(5, 0), 24, 24,
                                 block_q=8, block_kv=8)
  assert attention.xla.mode(bm) == "sparse"
  mesh = cell.mesh()
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, NamedSharding(mesh, P(cell.axes))) for a in args]
    hlo = jax.jit(attention_fn).lower(*placed).compile().as_text()
  assert "all-gather" not in hlo

"""Top-k router and MoE MLP (Linen and NNX) vs a per-token float64 reference; sharded runs."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.nn.moe import MoE, NNXMoE, reset_expert_counts, top_k_route
from mpxla.parallel import MeshConfig, batch_axes, make_mesh
from mpxla.parallel import moe as pmoe

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

B, T, D, E, F, K = 8, 4, 6, 4, 5, 2


def tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


def zeros_init(key, shape, dtype=jnp.float32):  # cheap: NNX tests copy the Linen params in
  del key
  return jnp.zeros(shape, dtype)


def nnx_like(v, **kw):
  """An NNXMoE holding the Linen MoE's parameters `v`."""
  m = NNXMoE(D, E, F, K, kernel_init=zeros_init, rngs=nnx.Rngs(0), **kw)
  m.router.kernel[...] = v["params"]["router"]["kernel"]
  for name in ("gate", "up", "down"):
    getattr(m, name)[...] = v["params"][name]
  return m


MODEL = MoE(num_experts=E, d_ff=F, top_k=K)


@functools.cache
def linen_model():
  """The Linen MoE and its variables (initialized once for the whole file)."""
  return MODEL, jax.jit(MODEL.init)(jax.random.key(1), tokens())


@jax.jit
def apply_linen(v, x):
  return MODEL.apply(v, x, mutable=["intermediates"])


@nnx.jit
def call_nnx(m, x):
  return nnx.capture(m, nnx.Intermediate)(x)


@jax.jit
def route(x, kernel):
  return top_k_route(x @ kernel, K)


def np_moe(x, p):
  """Per token: softmax router, top-k by sorting, SwiGLU of the chosen experts only."""
  x = np.float64(x).reshape(-1, D)
  w = {k: np.float64(v) for k, v in p.items() if k != "router"}
  logits = x @ np.float64(p["router"]["kernel"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    top = np.argsort(-probs[t], kind="stable")[:K]
    gates = probs[t, top] / probs[t, top].sum()
    for g, e in zip(gates, top, strict=True):
      a = x[t] @ w["gate"][e]
      h = a / (1 + np.exp(-a)) * (x[t] @ w["up"][e])
      out[t] += g * (h @ w["down"][e])
  return out.reshape(B, T, D)


def test_top_k_route_matches_lax_top_k_including_ties():
  logits = np.random.default_rng(2).standard_normal((64, E)).astype(np.float32)
  logits[:8] = 0.0  # all tied: lower indices first
  w, idx, probs = jax.jit(lambda lg: top_k_route(lg, K, normalize_weights=False))(logits)
  ref_w, ref_idx = jax.lax.top_k(jax.nn.softmax(logits), K)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(w, ref_w)
  np.testing.assert_array_equal(idx[:8], np.tile([0, 1], (8, 1)))
  wn, _, _ = jax.jit(lambda lg: top_k_route(lg, K))(logits)
  np.testing.assert_allclose(wn.sum(-1), 1.0, rtol=1e-6)
  assert probs.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
    top_k_route(logits, 5)


def test_linen_moe_matches_per_token_reference_and_sows_the_loss():
  model, v = linen_model()
  x = tokens()
  y, inter = apply_linen(v, x)
  np.testing.assert_allclose(y, np_moe(x, v["params"]), rtol=1e-5, atol=1e-6)
  w, idx, probs = route(x, v["params"]["router"]["kernel"])
  (aux,) = inter["intermediates"]["aux_loss"]
  np.testing.assert_allclose(aux, pmoe.load_balancing_loss(probs, idx, E), rtol=1e-6)


def test_nnx_equals_linen():
  model, v = linen_model()
  m = nnx_like(v)
  x = tokens(3)
  y_linen, inter = apply_linen(v, x)
  y_nnx, captured = call_nnx(m, x)
  np.testing.assert_array_equal(y_nnx, y_linen)
  np.testing.assert_array_equal(captured["aux_loss"][0], inter["intermediates"]["aux_loss"][0])


def hlo_collectives(text):
  """Element counts of every collective's results (tuple results counted per element)."""
  sizes = []
  op = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
  for line in text.splitlines():
    m = re.search(r"= (.*?) " + op, line)
    if m:
      sizes += [int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", m.group(1))]
  return sizes


def test_moe_in_shard_map_and_jit_equals_one_device():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  ax = batch_axes(mesh)
  model, v = linen_model()
  model_ax = MoE(num_experts=E, d_ff=F, top_k=K, axis_name=ax)
  x = tokens(4)
  r = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

  def loss(model_, params, x_):
    y, inter = model_.apply({"params": params}, x_, mutable=["intermediates"])
    return jnp.sum(y * r) + inter["intermediates"]["aux_loss"][0], y

  ref = jax.jit(jax.value_and_grad(lambda p, x_: loss(model, p, x_), argnums=(0, 1),
                                   has_aux=True))(v["params"], x)

  def body(p, x_, r_):
    y, inter = model_ax.apply({"params": p}, x_, mutable=["intermediates"])
    return jax.lax.psum(jnp.sum(y * r_), ax) + inter["intermediates"]["aux_loss"][0], y

  sm = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(ax), P(ax)), out_specs=(P(), P(ax)))
  got = jax.jit(jax.value_and_grad(lambda p, x_: sm(p, x_, r), argnums=(0, 1),
                                   has_aux=True))(v["params"], x)
  (value, y), grads = got
  (ref_value, ref_y), ref_grads = ref
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # jit with a batch-sharded input: the same forward, and the batch never moves.
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(ax)))
    forward = jax.jit(lambda p, x_: model_ax.apply({"params": p}, x_, mutable=["intermediates"]))
    y_jit, inter = forward(v["params"], xs)
    sizes = hlo_collectives(forward.lower(v["params"], xs).compile().as_text())
  assert all(n <= E for n in sizes), sizes  # only expert-sized vectors are all-reduced
  np.testing.assert_allclose(y_jit, ref_y, rtol=1e-6, atol=1e-6)
  _, idx, probs = route(x, v["params"]["router"]["kernel"])
  np.testing.assert_allclose(inter["intermediates"]["aux_loss"][0],
                             pmoe.load_balancing_loss(probs, idx, E), rtol=1e-6)


def test_count_buffer_linen_and_nnx():
  model = MoE(num_experts=E, d_ff=F, top_k=K, accumulate_counts=True)
  _, v = linen_model()  # the same parameters, plus an empty buffer
  v = {**v, "moe_counts": {"counts": pmoe.init_count_buffer(E)}}
  apply = jax.jit(lambda s_, x_: model.apply(s_, x_, mutable=["moe_counts", "intermediates"]))
  assert v["moe_counts"]["counts"].dtype == jnp.int32 and not v["moe_counts"]["counts"].any()
  nmodel = nnx_like(v, accumulate_counts=True)
  counts = np.zeros(E, np.int64)
  state = v
  for step in range(3):
    x = tokens(10 + step)
    _, idx, probs = route(x, v["params"]["router"]["kernel"])
    np.add.at(counts, np.asarray(idx).reshape(-1), 1)
    (_, upd) = apply(state, x)
    state = {**state, "moe_counts": upd["moe_counts"]}
    np.testing.assert_array_equal(state["moe_counts"]["counts"], counts)
    pm = np.float64(probs).reshape(-1, E).mean(0)
    np.testing.assert_allclose(upd["intermediates"]["aux_loss"][0],
                               E * np.sum(counts / counts.sum() * pm), rtol=1e-6)
    _, captured = call_nnx(nmodel, x)
    np.testing.assert_array_equal(nmodel.counts[...], counts)
    np.testing.assert_allclose(captured["aux_loss"][0], upd["intermediates"]["aux_loss"][0],
                               rtol=1e-6)
  zeroed = pmoe.reset_count_buffer(state["moe_counts"])
  assert not zeroed["counts"].any()
  reset_expert_counts(nmodel)
  assert not nmodel.counts[...].any()
  with pytest.raises(ValueError, match="accumulate_counts needs lbl_scope='global'"):
    MoE(num_experts=E, d_ff=F, accumulate_counts=True, lbl_scope="sequence").apply(
        v, tokens(), mutable=["moe_counts", "intermediates"])

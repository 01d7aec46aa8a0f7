"""Load-balancing loss: scopes on meshes 1, 2x4, 8, 4x2 vs float64 numpy; HLO collective sizes."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.parallel import MeshConfig, batch_axes, make_mesh
from mpxla.parallel import moe as pmoe

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

MESHES = {
    "1": dict(data=1),
    "2x4": dict(data=2, fsdp=4),
    "8": dict(data=8),
    "4x2": dict(data=4, expert=2),  # the batch is split over data and expert
}
B, T, E, K = 16, 8, 8, 2


def mesh_for(name):
  cfg = MESHES[name]
  n = int(np.prod(list(cfg.values())))
  return make_mesh(MeshConfig(**cfg), devices=jax.devices()[:n])


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((B, T, E)) * 1.5).astype(np.float32)
  logits[:, :, 3] += np.linspace(-2, 2, B)[:, None]  # routing differs across the batch
  mask = np.ones((B, T), bool)
  mask[:4, 5:] = False  # uneven padding: the first devices hold fewer tokens
  mask[9, :] = False  # one fully padded sequence
  return logits, mask


def route(logits):
  probs = jax.nn.softmax(logits, axis=-1)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(probs), K)
  return probs, idx


def np_lbl(probs, idx, mask):
  """N_E * sum_i f_i P_i over one set of tokens, float64, by counting."""
  p = np.float64(probs).reshape(-1, E)
  i = np.asarray(idx).reshape(-1, K)
  m = np.asarray(mask).reshape(-1)
  c = np.zeros(E)
  for t in np.nonzero(m)[0]:
    for e in i[t]:
      c[e] += 1
  if m.sum() == 0:
    return 0.0
  f = c / c.sum()
  pm = (p * m[:, None]).sum(0) / m.sum()
  return E * float((f * pm).sum())


def np_reference(logits, mask, scope, groups=1):
  probs, idx = jax.jit(route)(logits)
  probs, idx = np.asarray(probs), np.asarray(idx)
  if scope == "global":
    return np_lbl(probs, idx, mask)
  if scope == "sequence":
    return float(np.mean([np_lbl(probs[b], idx[b], mask[b]) for b in range(B)]))
  s = B // groups
  return float(np.mean([np_lbl(probs[g * s:(g + 1) * s], idx[g * s:(g + 1) * s],
                               mask[g * s:(g + 1) * s]) for g in range(groups)]))


def dense_loss(logits, mask, scope, groups=1):
  """Independent jnp reference (one device, full batch) for values and gradients."""
  probs, idx = route(logits)
  hot = jax.nn.one_hot(idx, E).sum(-2) * mask[..., None]  # [B, T, E]

  def lbl(p, h, m):
    f = h.sum((0, 1)) / jnp.maximum(h.sum(), 1)
    pm = (p * m[..., None]).sum((0, 1)) / jnp.maximum(m.sum(), 1)
    return E * jnp.sum(f * pm)

  m = mask.astype(jnp.float32)
  if scope == "global":
    return lbl(probs, hot, m)
  if scope == "sequence":
    return jnp.mean(jax.vmap(lambda p, h, mm: lbl(p[None], h[None], mm[None]))(probs, hot, m))
  split = lambda a: a.reshape(groups, B // groups, *a.shape[1:])  # noqa: E731
  return jnp.mean(jax.vmap(lbl)(split(probs), split(hot), split(m)))


@functools.cache
def references(devices):
  """(float64 numpy values, dense jnp values, dense jnp gradient) with `devices` micro-batches."""
  logits, mask = inputs()
  scopes = ("global", "micro_batch", "sequence")
  refs = {s: np_reference(logits, mask, s, groups=devices) for s in scopes}

  def total(lg):
    out = {s: dense_loss(lg, mask, s, devices) for s in scopes}
    return sum(out[s] * (i + 1) for i, s in enumerate(scopes)), out

  (_, dense), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(logits)
  return refs, dense, grad


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_scopes_values_and_gradients_equal_full_batch(mesh_name, view):
  mesh = mesh_for(mesh_name)
  ax = batch_axes(mesh)
  devices = int(np.prod([mesh.shape[a] for a in ax]))
  logits, mask = inputs()
  scopes = ("global", "micro_batch", "sequence")

  def losses(lg, m):
    probs, idx = route(lg)
    return {s: pmoe.load_balancing_loss(probs, idx, E, s, axis_name=ax, mask=m) for s in scopes}

  def total(lg, m):
    out = losses(lg, m)
    return sum(out[s] * (i + 1) for i, s in enumerate(scopes)), out

  f = total
  if view == "shard_map":
    f = jax.shard_map(total, mesh=mesh, in_specs=(P(ax), P(ax)), out_specs=(P(), P()))
  with jax.set_mesh(mesh):
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(ax)))  # noqa: E731
    (_, out), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(put(logits), put(mask))

  refs, dense, ref_grad = references(devices)
  for s in scopes:
    np.testing.assert_allclose(out[s], refs[s], rtol=1e-6, atol=1e-6, err_msg=s)
    np.testing.assert_allclose(out[s], dense[s], rtol=1e-6, err_msg=s)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  # Scopes differ on this data: the test would notice a scope mix-up.
  if devices > 1:
    assert abs(out["global"] - out["micro_batch"]) > 1e-3
  assert abs(out["global"] - out["sequence"]) > 1e-3


def test_shares_average_to_the_global_loss():
  mesh = mesh_for("8")
  logits, mask = inputs()

  def f(lg, m):
    probs, idx = route(lg)
    share = pmoe.load_balancing_loss(probs, idx, E, axis_name="data", mask=m, return_share=True)
    return share[None]

  shares = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                 out_specs=P("data")))(logits, mask)
  assert len(set(np.asarray(shares).tolist())) > 1  # per-device values differ ...
  np.testing.assert_allclose(np.mean(np.float64(shares)), np_reference(logits, mask, "global"),
                             rtol=1e-6)  # ... and their mean is the global loss


def collectives(hlo_text):
  """[(op, dtype, element count)] for every collective in compiled HLO text.

  A combined collective with a tuple result counts once per tuple element.
  """
  out = []
  op = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
  for line in hlo_text.splitlines():
    m = re.search(r"= (.*?) " + op, line)
    if m:
      for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1)):
        out.append((m.group(2), dtype, int(np.prod([int(d) for d in dims.split(",") if d]))))
  return out


@pytest.mark.parametrize("return_share", [True, False])
def test_global_scope_all_reduces_only_the_expert_counts(return_share):
  mesh = mesh_for("2x4")
  ax = batch_axes(mesh)
  logits, mask = inputs()

  def f(lg, m):
    probs, idx = route(lg)
    return pmoe.load_balancing_loss(probs, idx, E, axis_name=ax, mask=m,
                                    return_share=return_share)

  def step(lg, m):  # forward and backward on each device
    loss, grad = jax.value_and_grad(f)(lg, m)
    return loss[None], grad

  g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(ax), P(ax)), out_specs=(P(ax), P(ax))))
  ops = collectives(g.lower(logits, mask).compile().as_text())
  expected = [("all-reduce", "s32", E)] + ([] if return_share else [("all-reduce", "f32", 1)])
  assert sorted(ops) == sorted(expected), ops  # never the [tokens, experts] matrix


def test_jit_view_communicates_only_expert_sized_vectors():
  mesh = mesh_for("8")
  logits, mask = inputs()

  probs, idx = route(logits)

  def f(p, i, m):
    return pmoe.load_balancing_loss(p, i, E, mask=m)

  with jax.set_mesh(mesh):
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    text = jax.jit(f).lower(put(probs), put(idx), put(mask)).compile().as_text()
  ops = collectives(text)
  assert ops and all(n <= E for _, _, n in ops), ops


@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_count_buffer_accumulates_over_micro_steps(view):
  mesh = mesh_for("8")
  steps = [inputs(seed) for seed in (1, 2, 3)]

  def micro_step(buf, lg, m):
    probs, idx = route(lg)
    return pmoe.load_balancing_loss_with_buffer(probs, idx, E, buf, axis_name="data", mask=m)

  f = micro_step
  if view == "shard_map":
    f = jax.shard_map(micro_step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                      out_specs=(P(), P()))
  f = jax.jit(f)
  buf = pmoe.init_count_buffer(E)
  counts = np.zeros(E)
  for lg, m in steps:
    loss, buf = f(buf, lg, m)
    probs, idx = (np.asarray(a) for a in jax.jit(route)(lg))
    for b, t in zip(*np.nonzero(m), strict=True):
      for e in idx[b, t]:
        counts[e] += 1
    pm = (np.float64(probs) * m[..., None]).sum((0, 1)) / m.sum()
    np.testing.assert_allclose(loss, E * np.sum(counts / counts.sum() * pm), rtol=1e-6)
    np.testing.assert_array_equal(buf, counts)
  assert buf.dtype == jnp.int32
  np.testing.assert_array_equal(pmoe.reset_count_buffer(buf), np.zeros(E))


def test_bad_input_errors():
  logits, mask = inputs()
  probs, idx = route(logits)
  with pytest.raises(ValueError, match="num_experts=4"):
    pmoe.load_balancing_loss(probs, idx, 4)
  with pytest.raises(ValueError, match="expert axis replaced by the top-k axis"):
    pmoe.load_balancing_loss(probs, idx[:3], E)
  with pytest.raises(TypeError, match="must be integers"):
    pmoe.load_balancing_loss(probs, idx.astype(jnp.float32), E)
  with pytest.raises(ValueError, match="scope must be 'global', 'micro_batch' or 'sequence'"):
    pmoe.load_balancing_loss(probs, idx, E, "batch")
  with pytest.raises(ValueError, match="mask has shape"):
    pmoe.load_balancing_loss(probs, idx, E, mask=mask[:, :3])
  with pytest.raises(ValueError, match="scope='sequence' needs router_probs of shape"):
    pmoe.load_balancing_loss(probs.reshape(-1, E), idx.reshape(-1, K), E, "sequence")
  with pytest.raises(ValueError, match="micro_batch' under jit needs the number of micro"):
    pmoe.load_balancing_loss(probs, idx, E, "micro_batch")
  with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
    pmoe.load_balancing_loss(probs, idx, E, "micro_batch", num_micro_batches=3)
  with pytest.raises(ValueError, match=r"buffer has shape \(3,\)"):
    pmoe.load_balancing_loss_with_buffer(probs, idx, E, jnp.zeros(3, jnp.int32))
  mesh = mesh_for("8")
  with pytest.raises(ValueError, match="axis_name=None, so the statistic would be per device"):
    jax.jit(jax.shard_map(lambda p, i: pmoe.load_balancing_loss(p, i, E)[None], mesh=mesh,
                          in_specs=P("data"), out_specs=P("data")))(probs, idx)
  # Everything padded: a documented 0, not NaN.
  assert pmoe.load_balancing_loss(probs, idx, E, mask=jnp.zeros((B, T), bool)) == 0.0
  # A uniform router gives 1 (the minimum).
  uniform = jnp.full((B, T, E), 1 / E)
  rr = jnp.arange(B * T * K).reshape(B, T, K) % E
  np.testing.assert_allclose(pmoe.load_balancing_loss(uniform, rr, E), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scope", ["global", "sequence", "micro_batch"])
def test_nonfinite_probabilities_of_padding_do_not_reach_the_loss(scope):
  """A padding token whose router probabilities are NaN or inf adds nothing (not NaN * 0)."""
  logits, mask = inputs()
  probs, idx = route(jnp.asarray(logits))
  bad = jnp.where(jnp.asarray(mask)[..., None], probs, jnp.nan).at[9, 0, 0].set(jnp.inf)
  kw = dict(num_micro_batches=4) if scope == "micro_batch" else {}
  want = pmoe.load_balancing_loss(probs, idx, E, scope, mask=mask, **kw)
  got = pmoe.load_balancing_loss(bad, idx, E, scope, mask=mask, **kw)
  assert np.isfinite(want) and float(got) == float(want)


def test_global_loss_of_a_sequence_sharded_input_on_an_explicit_mesh():
  """Tokens split along the sequence axis (Explicit 'data'): counts sum over every token axis
  without regrouping the sharded one."""
  logits, mask = inputs()
  probs, idx = route(jnp.asarray(logits))
  want = pmoe.load_balancing_loss(probs, idx, E, "global", mask=mask)
  mesh = make_mesh(MeshConfig(data=8, axis_types="explicit"))
  with jax.set_mesh(mesh):
    sp, si, sm = (jax.device_put(a, NamedSharding(mesh, P(None, "data")))
                  for a in (probs, idx, jnp.asarray(mask)))
    got = jax.jit(lambda p, i, m: pmoe.load_balancing_loss(p, i, E, "global", mask=m))(sp, si, sm)
  np.testing.assert_allclose(got, want, rtol=1e-6)

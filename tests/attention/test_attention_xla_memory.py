"""XLA path, dense mode: one query chunk at a time, and the checkpoint names of its residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import np_attention_vjp, np_causal, rel_err
from jax._src.ad_checkpoint import saved_residuals

import mpxla.attention as A
from mpxla.attention import xla
from mpxla.attention.block_mask import make_block_mask


def _inputs(b, t, h, d, seed=0):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32) for _ in range(4)]


@pytest.mark.parametrize("masked", [False, True])
def test_dense_chunks_match_float64(masked):
  """40 queries in chunks of 16 (the last one padded), with and without a mask."""
  q, k, v, do = _inputs(2, 40, 2, 8)
  if masked:  # a mask function has no static structure: dense mode
    bm = make_block_mask(A.from_fn(lambda q, k: k <= q), 40, 40, block_q=16, block_kv=16)
    assert xla.mode(bm) == "dense"
    f = lambda q, k, v: xla.attention(q, k, v, bm, scale=0.3)  # noqa: E731
    allowed = np_causal(40, 40)[None, None]
  else:
    f = lambda q, k, v: xla.attention(q, k, v, None, scale=0.3, block_q=16)  # noqa: E731
    allowed = np.ones((1, 1, 40, 40), bool)

  def run(q, k, v, do):
    o, f_vjp = jax.vjp(f, q, k, v)
    return o, f_vjp(do)

  o, grads = jax.jit(run)(q, k, v, do)
  want = np_attention_vjp(q, k, v, do, allowed, 0.3)
  assert rel_err(o, want[0]) <= 1e-5
  for got, ref in zip(grads, want[1:], strict=True):
    assert rel_err(got, ref) <= 1e-5


def test_dense_gradient_working_set_is_one_chunk():
  """Compiled temp bytes of the gradient stay below ONE [heads, S, S] float32 score matrix
  (computing the whole matrix at once keeps several of them alive)."""
  s, h = 512, 2
  q = jnp.zeros((1, s, h, 16))

  def loss(q, k, v):
    return jnp.sum(A.attention(q, k, v, impl="xla", block_q=64))

  temp = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile().memory_analysis()
  assert temp.temp_size_in_bytes < h * s * s * 4


def test_residual_names_keep_out_and_lse():
  """Under a policy saving `A.RESIDUAL_NAMES`, the output and lse are saved (the attention
  forward is not recomputed); without it they are not."""
  b, t, h, d = 1, 32, 2, 8
  x = jnp.ones((b, t, h, d))

  def loss(x, policy):
    f = lambda x: jnp.sum(A.attention(x * 2, x * 3, x * 4, mask=A.causal(), impl="xla",  # noqa
                                      block_q=16, block_kv=16))
    return jax.checkpoint(f, policy=policy)(x)

  def saved(policy):
    return sorted(tuple(a.shape) for a, where in saved_residuals(lambda x: loss(x, policy), x)
                  if not where.startswith("from the argument"))

  names = jax.checkpoint_policies.save_only_these_names(*A.RESIDUAL_NAMES)
  assert saved(names) == sorted([(b, t, h, d), (b, h, t)])
  assert saved(jax.checkpoint_policies.nothing_saveable) == []


def test_block_q_must_be_positive():
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match="block_q"):
    xla.attention(q, q, q, None, scale=1.0, block_q=0)

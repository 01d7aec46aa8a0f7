"""`attention(...)` dispatch and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import np_attention, np_causal, rel_err

import mpxla.attention as A

Q = jnp.zeros((2, 32, 4, 8))
KV = jnp.zeros((2, 40, 2, 8))


def test_auto_on_cpu_is_xla_and_matches_reference():
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=s), jnp.float32) for s in
             ((2, 48, 4, 8), (2, 48, 2, 8), (2, 48, 2, 8)))
  f = jax.jit(lambda q, k, v: [A.attention(q, k, v, mask=A.causal(), impl=i, block_q=16,
                                           block_kv=16) for i in ("auto", "xla", "reference")])
  auto, xla_out, ref = f(q, k, v)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla_out))
  want = np_attention(q, k, v, np_causal(48, 48), 8 ** -0.5)
  assert rel_err(auto, want) <= 1e-5 and rel_err(ref, want) <= 1e-5


@pytest.mark.parametrize("call,match", [
    (lambda: A.attention(Q[0], KV, KV), "q must be"),
    (lambda: A.attention(Q, KV, KV[..., :4]), "same shape"),
    (lambda: A.attention(Q, KV.astype(jnp.bfloat16), KV.astype(jnp.bfloat16)), "one dtype"),
    (lambda: A.attention(Q.astype(jnp.int32), KV, KV), "floating"),
    (lambda: A.attention(Q, KV[:1], KV[:1]), "batch"),
    (lambda: A.attention(Q[..., :4], KV, KV), "head_dim"),
    (lambda: A.attention(Q[:, :, :3], KV, KV), "multiple of kv_heads"),
    (lambda: A.attention(Q, KV, KV, impl="flash"), "impl must be"),
    (lambda: A.attention(Q, KV, KV, scale=0.0), "scale"),
    (lambda: A.attention(Q, KV, KV, softcap=-1.0), "softcap"),
    (lambda: A.attention(Q, KV, KV, mask=np.ones((32, 40), bool)), "mask must be"),
    (lambda: A.attention(Q, KV, KV, mask=A.document(jnp.zeros((2, 31), jnp.int32))),
     "segment_ids has length 31"),
    (lambda: A.attention(Q, KV, KV, mask=A.document(jnp.zeros((3, 32), jnp.int32),
                                                    jnp.zeros((3, 40), jnp.int32))), "batch 3"),
    (lambda: A.attention(Q, KV, KV, mask=jax.jit(lambda: A.make_block_mask(A.causal(), 32, 32))()),
     "kv_len=32"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()

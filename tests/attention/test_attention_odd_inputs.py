"""Mask builders on any int bound (hypothesis, vs a dense Python-int reference) and attention
on zero-size inputs (issue 13)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import np_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from mpxla import attention

SETTINGS = settings(max_examples=40, deadline=None)
bounds = st.integers(0, 2**70) | st.sampled_from([0, 1, 2**31 - 1, 2**31, sys.maxsize])


def allowed(kind, args, q, k):
  """Python-int reference (no overflow) of one mask builder at query q, key k."""
  if kind == "sliding_window":
    return q - args[0] <= k <= q + args[1]
  if kind == "chunked":
    return q // args[0] == k // args[0]
  if kind == "prefix_lm":
    return k <= q or k < args[0]
  return k <= q  # causal


@st.composite
def masks(draw):
  kind = draw(st.sampled_from(["sliding_window", "chunked", "prefix_lm", "causal"]))
  n = {"sliding_window": 2, "chunked": 1, "prefix_lm": 1, "causal": 0}[kind]
  args = [draw(bounds) for _ in range(n)]
  if kind == "chunked":
    args[0] = max(args[0], 1)
  return kind, args


@SETTINGS
@given(a=masks(), b=masks(), op=st.sampled_from(["&", "|", None]),
       q_len=st.integers(0, 24), kv_len=st.integers(0, 24))
def test_masks_on_any_int_bound_equal_the_dense_reference(a, b, op, q_len, kv_len):
  make = lambda kind, args: getattr(attention, kind)(*args)  # noqa: E731
  m = make(*a) if op is None else (make(*a) & make(*b) if op == "&" else make(*a) | make(*b))
  got = np.asarray(m.dense(q_len, kv_len))[0]
  ref = np.zeros((q_len, kv_len), bool)
  for q in range(q_len):
    for k in range(kv_len):
      ra, rb = allowed(*a, q, k), allowed(*b, q, k)
      ref[q, k] = ra if op is None else (ra and rb if op == "&" else ra or rb)
  np.testing.assert_array_equal(got, ref)


@SETTINGS
@given(kind=st.sampled_from(["sliding_window", "chunked", "prefix_lm"]),
       bad=st.sampled_from([-1, -(2**40), 1.5, "3", None]))
def test_bad_bounds_raise_naming_the_argument(kind, bad):
  name = {"sliding_window": "left", "chunked": "size", "prefix_lm": "prefix_len"}[kind]
  with pytest.raises(ValueError, match=f"{kind}: {name} must be"):
    getattr(attention, kind)(bad)


@pytest.mark.parametrize("right", [2**31 - 1, 2**31, sys.maxsize])
def test_unbounded_window_attention_equals_dense_reference(right):
  """Issue row: sliding_window(0, 2**31 - 1) allowed only the diagonal at T=300."""
  assert int(attention.sliding_window(0, right).dense(300, 300).sum()) == 300 * 301 // 2
  t = 96
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, t, 2, 8)).astype(np.float32) for _ in range(3))
  o = attention.attention(q, k, v, mask=attention.sliding_window(0, right), block_q=32,
                          block_kv=32)
  ref = np_attention(q, k, v, np.triu(np.ones((t, t), bool)), 8**-0.5)  # every kv >= q
  np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


def test_lengths_beyond_int32_positions_are_refused():
  with pytest.raises(ValueError, match="q_len=1073741824: masks handle"):
    attention.causal().dense(2**30, 1)


CASES = {  # name -> (q shape, k/v shape)
    "q_len 0": ((2, 0, 2, 8), (2, 0, 2, 8)),
    "batch 0": ((0, 16, 2, 8), (0, 16, 2, 8)),
    "kv_len 0": ((2, 16, 2, 8), (2, 0, 2, 8)),
    "head_dim 0": ((2, 16, 2, 0), (2, 16, 2, 0)),
}


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("mask", [None, "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_size_inputs(case, mask, impl):
  """Issue row: these raised slice_sizes / ZeroDivisionError / reduction errors. Empty
  shapes give the empty output; no keys (kv_len 0) give zeros, as fully masked rows."""
  qs, ks = CASES[case]
  q, k = jnp.ones(qs), jnp.ones(ks)
  m = attention.causal() if mask else None
  f = lambda q, k: attention.attention(q, k, k, mask=m, impl=impl)  # noqa: E731
  o = f(q, k)
  assert o.shape == qs and o.dtype == q.dtype
  assert not np.any(np.asarray(o))
  dq, dk = jax.grad(lambda q, k: f(q, k).sum(), (0, 1))(q, k)
  assert dq.shape == qs and dk.shape == ks and not np.any(np.asarray(dq))

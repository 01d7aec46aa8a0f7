"""Models: GPT pieces against numpy references; documents do not see each other; CNN runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla.attention import rotary_embedding
from mpxla.models import CNN, GPT, CNNConfig, GPTConfig
from mpxla.models.gpt import document_positions


def test_document_positions_restart_per_segment():
  segs = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3], [1, 2, 2, 2, 0, 0, 0, 0, 0]])
  want = np.zeros_like(segs)
  for b in range(2):
    for t in range(1, segs.shape[1]):
      want[b, t] = want[b, t - 1] + 1 if segs[b, t] == segs[b, t - 1] else 0
  np.testing.assert_array_equal(np.asarray(document_positions(jnp.asarray(segs))), want)


def test_rotary_matches_complex_rotation():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 8)))
  pos = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 9, 2]])
  half = 4
  freq = 10_000.0 ** (-np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[:, :, None, None] * freq)
  want = np.concatenate([z.real, z.imag], axis=-1)
  got = np.asarray(rotary_embedding(jnp.asarray(x), jnp.asarray(pos), theta=10_000.0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [pytest.param("auto", marks=pytest.mark.slow), "dense_jax"])
def test_gpt_documents_are_independent(impl):  # auto (~19 s): the XLA path, tested in tests/attention
  cfg = GPTConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, dtype="float32",
                  attention_impl=impl, attention_block=8)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
  segs = jnp.array([[1] * 10 + [2] * 14, [1] * 24])
  params = model.init(jax.random.key(2), tokens, segs)
  logits = model.apply(params, tokens, segs)
  assert logits.shape == (2, 24, 256) and logits.dtype == jnp.float32
  # Document 2 of row 0 alone (positions restart) gives the same logits as inside the pack.
  alone = model.apply(params, tokens[:1, 10:], jnp.ones((1, 14), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits[0, 10:]), np.asarray(alone[0]), rtol=2e-5, atol=2e-5)
  # Causality: changing a later token leaves earlier logits unchanged.
  changed = model.apply(params, tokens.at[1, 20].set((tokens[1, 20] + 1) % 256), segs)
  np.testing.assert_array_equal(np.asarray(changed[1, :20]), np.asarray(logits[1, :20]))
  shapes = jax.tree.map(lambda x: x.shape, params["params"]["layer_0"]["attn"])  # GQA: 4 q, 2 kv heads
  assert shapes["key"]["kernel"] == (32, 2, 8) and shapes["query"]["kernel"] == (32, 4, 8)


def test_gpt_with_moe_sows_the_load_balancing_loss():
  cfg = GPTConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, dtype="float32",
                  attention_impl="dense_jax", num_experts=4, moe_top_k=2, moe_every=2)
  model = GPT(cfg)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  assert "moe" in params["params"]["layer_1"] and "mlp" in params["params"]["layer_0"]
  _, state = model.apply(params, tokens, mutable=["intermediates"])
  (aux,) = state["intermediates"]["layer_1"]["moe"]["aux_loss"]
  assert float(aux) >= 1.0 - 1e-6  # N_E * sum f_i P_i >= 1, with equality only when balanced


def test_bad_gpt_config_errors():
  with pytest.raises(ValueError, match="multiple of n_kv_heads"):
    GPTConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="multiple of n_heads"):
    GPTConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize("scope,ghost,axis", [("global", 0, None), ("local", 0, ()), ("global", 4, None)])
def test_cnn_trains_batch_stats(scope, ghost, axis):
  model = CNN(CNNConfig(widths=(8,), bn_scope=scope, ghost_batch_size=ghost, bn_axis_name=axis))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (16, 10)
  before = variables["batch_stats"]["bn0_0"]["mean"]
  after = new["batch_stats"]["bn0_0"]["mean"]
  assert not np.allclose(np.asarray(before), np.asarray(after))
  eval_logits = model.apply(variables, x, train=False)
  assert np.all(np.isfinite(np.asarray(eval_logits)))

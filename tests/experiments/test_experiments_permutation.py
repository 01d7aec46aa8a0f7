"""experiments/permutation_real.py: recall/block counting, output error, permutation, rendering."""

import importlib.util
import itertools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpxla.attention as A

_PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "permutation_real.py"
_spec = importlib.util.spec_from_file_location("permutation_real", _PATH)
PR = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PR)


def _causal_probs(logits):
  """float64 numpy causal softmax."""
  t = logits.shape[0]
  s = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _np_block_mass(p, perm, bq, bk):
  t, s = p.shape
  out = np.zeros((t // bq, s // bk))
  for i in range(t // bq):
    for j in range(s // bk):
      out[i, j] = sum(p[q, perm[slot]] for q in range(i * bq, (i + 1) * bq)
                      for slot in range(j * bk, (j + 1) * bk)) / bq
  return out


def _brute_min_blocks(row, recall):
  """Fewest blocks of any subset (exhaustive) whose mass reaches recall of the row."""
  for n in range(1, len(row) + 1):
    if any(sum(c) >= recall * row.sum() * (1 - 1e-12) for c in itertools.combinations(row, n)):
      return n
  return len(row)


def test_block_mass_matches_numpy_under_a_permutation():
  r = np.random.default_rng(0)
  t, bq, bk = 48, 8, 12
  p = _causal_probs(r.normal(size=(t, t)) * 2)
  perm = np.concatenate([r.permutation(24), 24 + r.permutation(24)])
  got = np.asarray(PR.block_mass(jnp.asarray(p, jnp.float32), jnp.asarray(perm), bq, bk))
  want = _np_block_mass(p, perm, bq, bk)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_blocks_for_recall_is_the_exhaustive_minimum():
  r = np.random.default_rng(1)
  mass = r.dirichlet(np.full(7, 0.4), size=40)  # 40 rows of 7 blocks, uneven mass
  mass[:5, 4:] = 0.0  # rows with empty (causally masked) blocks
  mass[:5] /= mass[:5].sum(-1, keepdims=True)
  for recall in (0.5, 0.9, 0.97, 1.0):
    got = PR.blocks_for_recall(mass, recall)
    want = [_brute_min_blocks(row, recall) for row in mass]
    np.testing.assert_array_equal(got, want)
    keep = PR.keep_top(mass, got)
    assert (keep.sum(-1) == got).all()
    assert ((mass * keep).sum(-1) >= recall * (1 - 1e-9)).all()


def test_blocks_for_recall_on_known_structure():
  """Each row spreads its mass evenly over m blocks: ceil(recall * m) blocks are needed."""
  nk = 16
  ms = np.arange(1, nk + 1)
  mass = np.stack([np.r_[np.full(m, 1.0 / m), np.zeros(nk - m)] for m in ms])
  mass = np.stack([np.random.default_rng(m).permutation(row) for m, row in zip(ms, mass, strict=True)])
  for recall in (0.9, 0.97):
    want = [math.ceil(recall * m - 1e-9) for m in ms]
    np.testing.assert_array_equal(PR.blocks_for_recall(mass, recall), want)


def test_sparse_output_error_matches_numpy():
  r = np.random.default_rng(2)
  t, e, bq, bk = 32, 4, 8, 8
  p = _causal_probs(r.normal(size=(t, t)) * 3)
  v = r.normal(size=(t, e))
  perm = np.concatenate([r.permutation(16), 16 + r.permutation(16)])
  keep = r.random((t // bq, t // bk)) < 0.5
  slot = np.argsort(perm)
  keep[np.arange(t) // bq, slot // bk] = True  # each query keeps its own key: no empty row
  o = p @ v
  o_s = np.zeros_like(o)
  for q in range(t):
    w = np.array([p[q, x] * keep[q // bq, slot[x] // bk] for x in range(t)])
    o_s[q] = w @ v / w.sum()
  want = np.linalg.norm(o_s - o) / np.linalg.norm(o)
  got = float(PR.sparse_output_error(jnp.asarray(p, jnp.float32), jnp.asarray(v, jnp.float32),
                                     jnp.asarray(perm), jnp.asarray(keep), bq, bk))
  assert want > 1e-3  # the selection drops real mass
  assert got == pytest.approx(want, rel=1e-4)


def test_segment_sort():
  r = np.random.default_rng(3)
  imp = r.random((2, 64))
  imp[0, 5] = imp[0, 9]  # a tie stays in position order
  got = PR.segment_sort(imp, 16)
  for h in range(2):
    for s0 in range(0, 64, 16):
      seg = got[h, s0:s0 + 16]
      assert sorted(seg) == list(range(s0, s0 + 16))  # stays inside its segment
      assert (np.diff(imp[h, seg]) <= 0).all()
  assert list(got[0]).index(5) < list(got[0]).index(9)
  with pytest.raises(ValueError, match="multiple of segment"):
    PR.segment_sort(imp, 24)


def _planted(t, d=32, heads=2, seed=0):
  """Causal attention with 3% heavy-hitter keys scattered uniformly (queries lean to them)."""
  r = np.random.default_rng(seed)
  u = r.normal(size=(heads, d))
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  heavy = r.random(t) < 0.03
  k = r.normal(size=(1, t, heads, d)) + heavy[None, :, None, None] * u * 8.0
  q = r.normal(size=(1, t, heads, d)) + u * 8.0
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_sorting_a_planted_cluster_structure_needs_fewer_blocks():
  t, bs, seg = 512, 32, 256
  q, k = _planted(t)
  perm = np.asarray(jax.jit(lambda q, k: A.permute_kv(
      q, k, k, A.causal(), block_q=bs, block_kv=bs, segment=seg).perm)(q, k))[0]
  head_fn, mass_fn, _ = PR._jit_metrics()
  for h in range(2):
    probs = head_fn(q[0, :, h], k[0, :, h], k[0, :, h])[0]
    imp = np.asarray(probs.sum(0))[None]
    for order in (perm[h], PR.segment_sort(imp, seg)[0]):
      # Causality: keys only move inside their aligned segment.
      assert (np.sort(order.reshape(-1, seg), -1) == np.arange(t).reshape(-1, seg)).all()
      counts = {}
      for name, o in (("none", np.arange(t)), ("sorted", order)):
        mass = np.asarray(mass_fn(probs, jnp.asarray(o), bs, bs), np.float64)
        counts[name] = PR.blocks_for_recall(mass, 0.97).sum()
      assert counts["none"] >= 1.5 * counts["sorted"], counts


def test_analyse_render_and_headline(tmp_path):
  """The analysis on random q/k/v of two layers, then render() and headline() from its JSON."""
  r = np.random.default_rng(4)
  t, h, hk, e = 256, 2, 1, 16
  layers = [tuple(r.normal(size=(1, t, n, e)).astype(np.float32) for n in (h, hk, hk))
            for _ in range(2)]
  res = PR.analyse(layers, 64, (128,), recalls=(0.97,), estimates=("tokens",))
  assert len(res["heads"]) == 4
  nq = t // 64
  for hd in res["heads"]:
    for var in res["variants"]:
      assert 0 < hd["blocks"][var]["0.97"] <= nq * nq
      if var != PR.BOUND:
        assert 0 <= hd["error"][var]["0.97"] < 0.5
        assert hd["blocks"][var]["0.97"] >= hd["blocks"][PR.BOUND]["0.97"]
    assert hd["blocks"]["none"]["0.97"] <= nq * (nq + 1) // 2  # only causal blocks hold mass
    for sel in hd["select"].values():
      assert 0 < sel["recall"] <= 1 + 1e-5 and sel["error"] >= 0
  res.update(command="test", quick=True, jax_version="x", date="d", cpu_count=2, wall_time_s=1.0,
             model=dict(source="random", workdir="-", step=0, recipe="bf16", train_seq_len=128,
                        n_layers=2, n_heads=h, n_kv_heads=hk, head_dim=e),
             context=t, docs=["random"], block=64, segments=[128], recalls=[0.97],
             causal_blocks=nq * (nq + 1) // 2,
             nll=dict(within_train_len=1.0, beyond_train_len=2.0))
  (tmp_path / "results.json").write_text(json.dumps(res))
  md = PR.render(tmp_path)
  assert md.count("\n|---") >= 3
  for png in ("permutation_blocks.png", "permutation_maps.png"):
    assert f"]({png})" in md and (tmp_path / png).stat().st_size > 1000
  (label, value), = PR.headline(tmp_path).items()
  assert "97%" in label and "x)" in value and "at most" in value


def test_dense_masked_reference_matches_mpxla_attention_on_a_permuted_selection():
  """sparse_output_error's masked dense formula == mpxla.attention over permute_kv's BlockMask."""
  r = np.random.default_rng(5)
  t, e = 256, 16
  q, k, v = (jnp.asarray(r.normal(size=(1, t, 1, e)) * s, jnp.float32) for s in (2.0, 2.0, 1.0))
  select = PR._selector(32, 128, True, "tokens", 0.8)
  perm, listed, out = (np.asarray(x)[0] for x in select(q, k, v))
  assert (perm[0] != np.arange(t)).any() and not listed[0].all()  # a real permutation and cut
  head_fn, _, err_fn = PR._jit_metrics()
  probs, dense, _ = head_fn(q[0, :, 0], k[0, :, 0], v[0, :, 0])
  lib_err = np.linalg.norm(out[:, 0] - dense) / np.linalg.norm(dense)
  ours = float(err_fn(probs, v[0, :, 0], jnp.asarray(perm[0]), jnp.asarray(listed[0]), 32, 32))
  assert lib_err > 1e-3
  assert ours == pytest.approx(lib_err, rel=1e-3)


def test_any_permutation_bound_is_a_tight_lower_bound():
  """No key order needs fewer blocks per row; sorting keys by one row's own mass attains it."""
  r = np.random.default_rng(6)
  t, bs = 64, 8
  p = _causal_probs(r.normal(size=(t, t)) * 3)
  for recall in (0.9, 0.97):
    bound = PR.any_permutation_blocks(p, bs, bs, recall)
    assert bound.shape == (t // bs,) and (bound >= 1).all()
    for seed in range(10):
      perm = np.random.default_rng(seed).permutation(t)
      need = PR.blocks_for_recall(_np_block_mass(p, perm, bs, bs), recall)
      assert (need >= bound).all()
    for i in (2, t // bs - 1):
      own = np.argsort(-p[i * bs:(i + 1) * bs].mean(0), kind="stable")
      need = PR.blocks_for_recall(_np_block_mass(p, own, bs, bs), recall)
      assert need[i] == bound[i]
  # Known case: a row spreading its mass evenly over 20 keys needs ceil(0.97 * 20 / 8) = 3.
  flat = np.zeros((bs, t))
  flat[:, 30:50] = 1 / 20
  assert PR.any_permutation_blocks(flat, bs, bs, 0.97)[0] == 3

"""experiments/parity.py (loss parity) and experiments/state_error.py (optimizer-state error)."""

import json
import math
import pathlib
import sys

import ml_dtypes
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import harness  # noqa: E402
import parity  # noqa: E402
import state_error  # noqa: E402

E4M3 = (ml_dtypes.float8_e4m3fn, 448.0, 2.0**-9)
E5M2 = (ml_dtypes.float8_e5m2, 57344.0, 2.0**-16)


def _moments(seed=0):
  """Adam-like moments with a wide in-group range of v, zeros, a zero row and padded groups."""
  rng = np.random.default_rng(seed)
  shapes = {"a/kernel": (8, 256), "b/kernel": (4, 2, 32), "c/scale": (200,)}
  mu, nu = {}, {}
  for k, shape in shapes.items():
    v = rng.lognormal(-14.0, 3.0, shape)
    m = 0.3 * rng.standard_normal(shape) * np.sqrt(v)
    zero = rng.random(shape) < 0.05
    m[zero], v[zero] = 0.0, 0.0
    mu[k], nu[k] = m.astype(np.float32), v.astype(np.float32)
  mu["a/kernel"][3], nu["a/kernel"][3] = 0.0, 0.0
  return mu, nu


def _plain_fq(x, fmt):
  """Per-group absmax fake quantization (groups of min(128, n) on the last axis), numpy +
  ml_dtypes, with the codec's documented policies: the group max maps to M exactly, a nonzero
  value never becomes 0 (clipped up to the smallest subnormal code)."""
  dtype, big, tiny = fmt
  x = np.asarray(x, np.float32)
  n = x.shape[-1]
  g = min(128, n)
  n_pad = -(-n // g) * g
  xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)]).reshape(*x.shape[:-1], n_pad // g, g)
  ax = np.abs(xp)
  amax = ax.max(-1, keepdims=True)
  safe = np.where(amax > 0, amax, np.float32(1.0))
  t = np.where(ax == amax, np.float32(big), ax * (np.float32(big) / safe))
  t = np.clip(t, np.float32(tiny), np.float32(big)) * np.sign(xp)
  q = t.astype(dtype).astype(np.float32)
  mag = np.abs(q) * (amax / np.float32(big))
  mag = np.where(np.abs(q) == big, amax, np.maximum(mag, np.float32(2.0**-126)))
  return (mag * np.sign(q)).reshape(*x.shape[:-1], n_pad)[..., :n]


def _u(m, v, eps=1e-8):
  return np.asarray(m, np.float64) / (np.sqrt(np.asarray(v, np.float64)) + eps)


def _flat(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


@pytest.fixture(scope="module")
def table():
  mu, nu = _moments()
  return mu, nu, state_error.error_table(mu, nu, formats=("e4m3", "e5m2"))


@pytest.mark.parametrize("fmt_v", ["e4m3", "e5m2"])
def test_no_expansion_cells_match_numpy(table, fmt_v):
  mu, nu, res = table
  ref_fmt = {"e4m3": E4M3, "e5m2": E5M2}[fmt_v]
  u = _u(_flat(mu), _flat(nu))
  uq = _u(_flat({k: _plain_fq(x, E4M3) for k, x in mu.items()}),
          _flat({k: _plain_fq(x, ref_fmt) for k, x in nu.items()}))
  mse = np.mean((uq - u) ** 2)
  c = state_error.cell(res, "e4m3", fmt_v, "none")
  # Decoded values agree to float32 rounding of the decode scale (below), so the MSE to ~1e-9.
  np.testing.assert_allclose(c["mse"], mse, rtol=1e-6)
  np.testing.assert_allclose(c["nmse"], mse / np.mean(u * u), rtol=1e-6)


def test_decoded_values_match_numpy():
  mu, _ = _moments(1)
  decoded, k16, _ = state_error.roundtrip(mu, "e4m3", False)
  assert k16 is None
  for k, x in mu.items():
    # Same codes (a different E4M3 code is >= 1/16 away); the float32 decode amax / 448 may
    # differ in the last bit (XLA may multiply by 1/448), hence 2 ulps.
    np.testing.assert_allclose(decoded[k], _plain_fq(x, E4M3), rtol=2.5e-7, atol=0, err_msg=k)


def test_k_quantiles_follow_coat_formula(table):
  mu, nu, res = table
  for name, tree in (("m", mu), ("v", nu)):
    ks = []
    for x in tree.values():
      n = x.shape[-1]
      g = min(128, n)
      xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -(-n // g) * g - n)])
      for grp in np.abs(xp.astype(np.float64)).reshape(-1, g):
        if grp.max() == 0:
          continue
        r = grp.max() / grp[grp > 0].min()
        k16 = 255 if r == 1 else np.clip(math.floor(16 * math.log2(448.0**2 / 2) / math.log2(r)),
                                         1, 255)
        ks.append(k16 / 16)
    s = res["k"][f"{name}/e4m3"]
    assert s["groups"] - s["zero_groups"] == len(ks)
    for q, got in s["quantiles"].items():
      assert abs(got - np.quantile(ks, float(q))) <= 1 / 16 + 1e-12, (name, q)


def test_expansion_helps_on_wide_range_v(table):
  _, _, res = table
  none = state_error.cell(res, "e4m3", "e4m3", "none")["nmse"]
  both = state_error.cell(res, "e4m3", "e4m3", "both")["nmse"]
  assert both < none / 2


def test_packing_equals_per_leaf_compression():
  import jax

  from mpxla import optim

  mu, _ = _moments(2)
  decoded, k16, amax = state_error.roundtrip(mu, "e5m2", True)

  @jax.jit
  def per_leaf(tree):
    c = optim.compress(tree, fmt="e5m2", expansion=True, group_size=128, min_size=0)
    return optim.decompress(c), c

  plain, comp = per_leaf({k: jax.numpy.asarray(x) for k, x in mu.items()})
  for k in mu:
    np.testing.assert_array_equal(decoded[k], np.asarray(plain[k], np.float64), err_msg=k)
    np.testing.assert_array_equal(k16[k].ravel(), np.asarray(comp[k].k16).ravel(), err_msg=k)
    np.testing.assert_array_equal(amax[k].ravel(), np.asarray(comp[k].amax).ravel(), err_msg=k)


def test_state_error_render(table, tmp_path):
  _, _, res = table
  res = dict(res, name="state_error", quick=True, group_size=128, command="cmd",
             input={"source": "synthetic", "step": 0}, wall_time_s=1.0, cpu_count=2,
             jax_version="x", date="2000-01-01")
  (tmp_path / "results.json").write_text(json.dumps(res))
  md = state_error.render(tmp_path)
  assert (tmp_path / "state_error_k.png").stat().st_size > 0
  assert "| E4M3 | E5M2 |" in md and "state_error_k.png" in md


def _check_parity(out, recipes):
  res = json.loads((out / "results.json").read_text())
  assert [r["recipe"] for r in res["runs"]] == list(recipes)
  for r in res["runs"]:
    assert [s for s, _ in r["val"]] == [2, 4]
    assert all(math.isfinite(v) for _, v in r["val"] + r["train"])
    assert r["final_val_loss"] == r["val"][-1][1]
  for recipe in set(recipes) & set(parity.DUMP_RECIPES):
    _, step, state = harness.restore(out / "runs" / f"{recipe}_s0")
    assert step == 4
    with np.load(out / "runs" / f"moments_{recipe}_s0.npz") as z:
      import jax

      params = {"/".join(str(k.key) for k in p): x
                for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
      assert sorted(z.files) == sorted([f"mu/{k}" for k in params] + [f"nu/{k}" for k in params])
      for k, p in params.items():
        for field in ("mu", "nu"):
          a = z[f"{field}/{k}"]
          assert a.shape == p.shape and a.dtype == np.float32, (field, k)
          assert np.all(np.isfinite(a))
        assert np.all(z[f"nu/{k}"] >= 0) and np.any(z[f"nu/{k}"] > 0), k
  return res


@pytest.mark.slow  # ~13 s: a quick parity run (also run by report.py --quick, test_report.py)
def test_parity_quick_bf16(tmp_path):
  parity.run(tmp_path, quick=True, recipes=("bf16",))
  res = _check_parity(tmp_path, ("bf16",))
  assert res["table"]["bf16"]["final_val_loss"]["n"] == 1
  md = parity.render(tmp_path)
  assert (tmp_path / "parity_val_loss.png").stat().st_size > 0
  assert "| `bf16` |" in md and "python -m mpxla.train" in md


@pytest.mark.slow
def test_parity_quick_coat_moments_decompressed(tmp_path):
  parity.run(tmp_path, quick=True)
  res = _check_parity(tmp_path, parity.QUICK["recipes"])
  assert "coat" in res["table"] and math.isfinite(res["table"]["coat"]["rel_to_bf16_pct"])


@pytest.mark.slow
def test_state_error_quick(tmp_path):
  res = state_error.run(tmp_path, quick=True)
  assert len(res["cells"]) == 9 * 4
  assert all(math.isfinite(c["mse"]) for c in res["cells"])
  assert "Does HiF8" in state_error.render(tmp_path)

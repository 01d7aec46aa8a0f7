"""experiments/moe_balance.py and experiments/ghost_bn.py: the LBL scope switch of the GPT vs numpy,
the routing statistics vs independent formulas, domain labels vs the corpus packing, and
miniature end-to-end runs through the Trainer."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.data import corpus
from mpxla.models.gpt import GPT, GPTConfig
from mpxla.nn.moe import TopKRouter
from mpxla.parallel import MeshConfig, make_mesh
from mpxla.parallel import moe as pmoe

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


moe_balance = _load("moe_balance")
ghost_bn = _load("ghost_bn")

BATCH_AXES = ("data", "fsdp", "expert")


# --- the scope switch -------------------------------------------------------------------------


def _np_lbl(probs, idx, e):
  """N_E * sum_i f_i P_i, float64, by counting (independent of the library)."""
  p = np.float64(probs).reshape(-1, e)
  i = np.asarray(idx).reshape(-1, idx.shape[-1])
  c = np.zeros(e)
  for row in i:
    for x in row:
      c[x] += 1
  return e * float(np.sum(c / c.sum() * p.mean(0)))


def _gpt(scope, axis_name=BATCH_AXES):
  cfg = GPTConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, dtype="float32",
                  attention_impl="dense_jax", num_experts=4, moe_top_k=2, moe_every=1,
                  moe_lbl_scope=scope, moe_axis_name=axis_name)
  return GPT(cfg)


def test_gpt_lbl_scope_switch_matches_numpy():
  """config.model.moe_lbl_scope: the sown LBL is the global-batch or per-device formula."""
  mesh = make_mesh(MeshConfig(data=8))
  b, t, e = 16, 12, 4
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
  tokens[:8] = rng.integers(97, 123, (8, t))  # two halves of the batch with different bytes
  params = jax.jit(_gpt("global").init)(jax.random.key(0), jnp.asarray(tokens))
  shard = NamedSharding(mesh, P(BATCH_AXES))

  def apply(scope):
    model = _gpt(scope)
    f = jax.jit(lambda p, x: model.apply(
        p, x, mutable=["intermediates"],
        capture_intermediates=lambda m, n: isinstance(m, TopKRouter) and n == "__call__")[1],
        in_shardings=(None, shard))
    with jax.set_mesh(mesh):
      inter = jax.device_get(f(params, tokens))["intermediates"]["layer_0"]["moe"]
    (aux,) = inter["aux_loss"]
    (_, idx, probs), = inter["router"]["__call__"]
    return float(aux), np.asarray(idx), np.asarray(probs)

  aux_g, idx_g, probs_g = apply("global")
  aux_m, idx_m, probs_m = apply("micro_batch")
  np.testing.assert_array_equal(idx_g, idx_m)  # same parameters, same routing
  ref_g = _np_lbl(probs_g, idx_g, e)
  per_device = b // 8
  ref_m = np.mean([_np_lbl(probs_m[d * per_device:(d + 1) * per_device],
                           idx_m[d * per_device:(d + 1) * per_device], e) for d in range(8)])
  np.testing.assert_allclose(aux_g, ref_g, rtol=1e-5)
  np.testing.assert_allclose(aux_m, ref_m, rtol=1e-5)
  assert aux_m - aux_g > 1e-3  # per-device balance is harder than global balance here


def test_micro_batch_scope_without_axes_or_mesh_is_a_clear_error():
  model = _gpt("micro_batch", axis_name=None)
  with pytest.raises(ValueError, match="micro_batch"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, 4), jnp.int32))


def test_trainer_builds_a_micro_batch_moe_state():
  """The Trainer traces the init under its mesh, so the per-device LBL can be initialized."""
  from mpxla.train.trainer import Trainer

  config = moe_balance.make_config("micro_batch", 0, moe_balance.QUICK)
  trainer = Trainer(config, "/nonexistent-not-created")
  abstract = trainer.abstract_state()
  assert abstract["params"]["layer_0"]["moe"]["gate"].shape == (8, 32, 32)


# --- statistics ---------------------------------------------------------------------------------


def test_routing_information_vs_joint_formula():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 50, (6, 8))
  counts[2] = 0  # an empty label is ignored
  info = moe_balance.routing_information(counts)
  pj = counts / counts.sum()
  pl, pe = pj.sum(1, keepdims=True), pj.sum(0, keepdims=True)
  nz = pj > 0
  mi = float(np.sum(pj[nz] * np.log2(pj[nz] / (pl @ pe)[nz])))
  np.testing.assert_allclose(info["mutual_information"], mi, rtol=1e-12, atol=1e-12)
  shares = np.array(info["shares"])
  np.testing.assert_allclose(shares[[0, 1, 3, 4, 5]].sum(1), 1.0, atol=1e-12)
  h = np.array(info["entropy_given"])
  assert np.all(h >= 0) and np.all(h <= 3.0 + 1e-12)
  # Extremes: every label on its own expert -> I = H(label); identical rows -> I = 0.
  one_hot = np.diag([5, 5, 10, 20])
  p = np.array([5, 5, 10, 20]) / 40
  np.testing.assert_allclose(moe_balance.routing_information(one_hot)["mutual_information"],
                             -np.sum(p * np.log2(p)), rtol=1e-12)
  same = np.tile([3, 1, 0, 4], (3, 1))
  assert abs(moe_balance.routing_information(same)["mutual_information"]) < 1e-12


def test_lbl_numpy_matches_the_library():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((8, 16, 8)).astype(np.float32) * 2

  @jax.jit
  def library(logits):
    probs = jax.nn.softmax(logits, -1)
    _, idx = jax.lax.top_k(probs, 2)
    return (probs, idx, pmoe.load_balancing_loss(probs, idx, 8, "global"),
            pmoe.load_balancing_loss(probs, idx, 8, "micro_batch", num_micro_batches=4))

  probs, idx, lbl_global, lbl_micro = jax.device_get(library(logits))
  p, i = probs.reshape(-1, 8), idx.reshape(-1, 2)
  np.testing.assert_allclose(moe_balance.lbl_numpy(p, i), lbl_global, rtol=1e-5)
  np.testing.assert_allclose(moe_balance.lbl_numpy(p, i, groups=4), lbl_micro, rtol=1e-5)
  np.testing.assert_allclose(moe_balance.lbl_numpy(p, i), _np_lbl(p, i, 8), rtol=1e-12)


def test_domain_labels_follow_the_packing(tmp_path):
  files = {"a.py": b"x = 1\n" * 7, "pkg/b.py": b"import os\n" * 5, "pkg/c.py": b"#c\n" * 30,
           "z/d.py": b"pass\n" * 3, "zz.py": b"y=2\n" * 11, "q/e.py": b"1\n"}  # q: < 4%
  for rel, data in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
  layout = moe_balance.validation_layout(100, root=tmp_path)  # every file is validation
  assert layout["rel"] == sorted(files)
  docs = [files[r] for r in layout["rel"]]
  width = 9
  tokens, segs = corpus.pack_rows(docs, width - 1)
  rows = np.arange(len(tokens))
  np.testing.assert_array_equal(moe_balance.packed_bytes(layout, rows, width), tokens)
  labels = moe_balance.token_domains(layout, rows, width)
  # Independent: the document of each token from the packed segment ids, then its top level.
  doc_of_row_start = np.searchsorted(np.cumsum([len(d) for d in docs]), rows * width, side="right")
  for r in rows:
    for j in range(width):
      doc = doc_of_row_start[r] + segs[r, j] - 1
      top = moe_balance.top_level(layout["rel"][doc])
      name = top if top in layout["domains"] else "other"
      assert layout["domains"][labels[r, j]] == name
  assert "pkg" in layout["domains"] and "<modules>" in layout["domains"]
  assert "q" not in layout["domains"] and "other" in [layout["domains"][x] for x in labels.flat]
  assert math.isclose(sum(layout["byte_share"].values()), 1.0)


def test_byte_classes():
  cls = moe_balance.byte_class(np.array([32, 10, 97, 90, 95, 48, 57, 40, 126, 200, 0]))
  np.testing.assert_array_equal(cls, [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])


# --- miniature end-to-end runs (the Trainer, one arm each) ------------------------------------


def test_moe_balance_routing_analysis_of_a_fresh_model(tmp_path):
  """The Trainer's initial state through the routing capture and the statistics."""
  from mpxla.train.trainer import Trainer

  config = moe_balance.make_config("micro_batch", 0, moe_balance.QUICK)
  trainer = Trainer(config, tmp_path)
  state = trainer.init_state()
  sample = moe_balance.eval_sample(config, 64)
  ce, routes = moe_balance.forward_with_routing(trainer, state, sample["tokens"], sample["segs"],
                                                64)
  e = config.model.num_experts
  assert list(routes) == ["layer_0/moe"] and ce.shape == sample["domain"].shape
  idx, probs = routes["layer_0/moe"]
  assert idx.shape == (*ce.shape, 2) and probs.shape == (*ce.shape, e)
  stats = moe_balance.analyse(ce, routes, sample, e, micro_rows=2)
  # The loss of the sample agrees with the trainer's own loss function (LMTask.loss) on it.
  batch = {"tokens": sample["tokens"], "segment_ids": sample["segs"]}
  with jax.set_mesh(trainer.mesh):
    _, (metrics, _) = jax.jit(lambda st, b: trainer.task.loss(
        st["params"], st["model_state"], b, train=False))(state, batch)
  np.testing.assert_allclose(stats["val_loss"], metrics["loss_sum"] / metrics["weight"],
                             rtol=1e-5)
  assert stats["tokens"] == sample["domain"].size
  layer = stats["layers"]["layer_0/moe"]
  for kind in ("domain", "byte_class"):
    st = layer[kind]
    present = np.array(st["label_share"]) > 0
    np.testing.assert_allclose(np.array(st["shares"])[present].sum(1), 1.0, atol=1e-6)
    h = np.array(st["entropy_given"])
    assert np.all(h >= 0) and np.all(h <= math.log2(e) + 1e-9)
    assert 0 <= st["mutual_information"] <= min(math.log2(e), st["h_expert"]) + 1e-9
  counts = np.bincount(idx.reshape(-1), minlength=e)
  np.testing.assert_allclose(layer["expert_load"], counts / counts.sum(), rtol=1e-12)
  assert layer["lbl_global"] == pytest.approx(moe_balance.lbl_numpy(
      probs.reshape(-1, e), idx.reshape(-1, 2)), rel=1e-12)


@pytest.mark.slow  # ~20 CPU s (two compiles per Trainer); report.py --quick runs it by default
def test_moe_balance_miniature_run(tmp_path):
  res = moe_balance.run(tmp_path, quick=True, scopes=("micro_batch",))
  assert json.loads((tmp_path / "results.json").read_text())["name"] == "moe_balance"
  (rec,) = res["runs"]
  e = res["settings"]["model"]["num_experts"]
  ev = rec["eval"]
  assert set(ev["val_loss_per_domain"]) == set(res["domains"])
  assert 0 < ev["val_loss"] < 8 and math.isfinite(rec["final_train_loss"])
  for layer in ev["layers"].values():
    for kind in ("domain", "byte_class"):
      st = layer[kind]
      shares = np.array(st["shares"])
      present = np.array(st["label_share"]) > 0
      np.testing.assert_allclose(shares[present].sum(1), 1.0, atol=1e-6)
      assert np.all(np.array(st["entropy_given"]) >= 0)
      assert np.all(np.array(st["entropy_given"]) <= math.log2(e) + 1e-9)
      assert 0 <= st["mutual_information"] <= min(math.log2(e), st["h_expert"]) + 1e-9
    assert math.isclose(sum(layer["expert_load"]), 1.0, rel_tol=1e-9)
    assert 0 < layer["lbl_global"] < e and 0 < layer["lbl_micro_batch"] < e
  md = moe_balance.render(tmp_path)
  assert "| `micro_batch` |" in md and (tmp_path / "moe_balance_shares.png").exists()
  assert (tmp_path / "moe_balance_loss.png").exists()


@pytest.mark.slow  # ~10 CPU s; the default suite runs ghost_bn's quick mode in test_report.py
def test_ghost_bn_miniature_run(tmp_path):
  res = ghost_bn.run(tmp_path, quick=True, variants=("ghost",))
  (rec,) = res["runs"]
  assert rec["bn_scope"] == "global" and rec["ghost_batch_size"] == 16
  for _, acc, loss in rec["val"]:
    assert 0.0 <= acc <= 1.0 and loss > 0
  assert res["n_val"] == 180 and 0 <= res["table"][0]["val_accuracy"]["mean"] <= 1
  md = ghost_bn.render(tmp_path)
  assert "| `ghost` |" in md and (tmp_path / "ghost_bn_val.png").exists()


def test_ghost_bn_aggregate_spread():
  runs = [{"lr": 1e-3, "variant": "ghost", "seed": s, "final_val_accuracy": a,
           "final_val_loss": 1 - a, "final_train_loss": 0.5, "val": [(1, a, 1 - a), (2, a, 1 - a)]}
          for s, a in enumerate([0.9, 0.95, 1.0])]
  (row,) = ghost_bn.aggregate(runs)
  np.testing.assert_allclose(row["val_accuracy"]["mean"], 0.95)
  np.testing.assert_allclose(row["val_accuracy"]["std"], np.std([0.9, 0.95, 1.0], ddof=1))
  assert row["val_accuracy"]["min"] == 0.9 and row["val_accuracy"]["max"] == 1.0


@pytest.mark.slow
def test_full_quick_modes(tmp_path):
  """Both arms of both sections' quick modes (what report.py --quick runs)."""
  moe = moe_balance.run(tmp_path / "moe", quick=True)
  assert [r["scope"] for r in moe["runs"]] == list(moe_balance.SCOPES)
  ghost = ghost_bn.run(tmp_path / "ghost", quick=True)
  by = {r["variant"]: r for r in ghost["runs"]}
  # Quick: 16 images per device = the ghost batch, so 'local' and 'ghost' group alike.
  np.testing.assert_allclose(by["local"]["final_val_loss"], by["ghost"]["final_val_loss"],
                             rtol=1e-5)

"""The MoE GPT with its experts sharded over 'expert' (8 simulated devices): the expert weights
and their Adam moments sharded over 'expert'; (slow, ~3 min on 2 busy cores) exact resume and
the same losses as with the experts replicated (mesh data=8)."""

import jax
import numpy as np
import pytest

from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer

MOE = {"model.num_experts": "8", "model.moe_d_ff": "32",
       "model.attention_impl": "'dense_jax'", "model.dtype": "'float32'"}
EP = {"mesh.data": "1", "mesh.expert": "8"}


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.parametrize("recipe", ["bf16", "coat"])
def test_experts_and_their_moments_are_sharded_over_expert(tiny_config, tmp_path, recipe):
  """bf16: AdamW's mu and nu like the weights; coat: the compressed moments' codes and
  scales ([E, ...] of other trailing sizes) over 'expert' on their expert axis."""
  trainer = Trainer(tiny_config(recipe=recipe, **MOE, **EP), tmp_path)
  sh = trainer.state_shardings
  for name in ("gate", "up", "down"):
    assert sh["params"]["layer_1"]["moe"][name].spec[0] == "expert"
  abstract = jax.tree.leaves(trainer._abstract_init()["opt_state"])
  moments = [(a.shape, s.spec) for (p, s), a in zip(
      jax.tree_util.tree_flatten_with_path(sh["opt_state"])[0], abstract, strict=True)
      if "['moe']['down']" in jax.tree_util.keystr(p) and a.ndim == 3]
  assert len(moments) == (2 if recipe == "bf16" else 6), moments  # mu, nu (x codes, 2 scales)
  assert all(shape[0] == 8 and spec[0] == "expert" for shape, spec in moments), moments
  assert jax.tree.structure(trainer.abstract_state()) == jax.tree.structure(
      trainer._abstract_init())  # the state holds plain arrays (boxes unboxed)


@pytest.mark.slow
def test_moe_expert_parallel_trains_resumes_bit_exact_and_matches_replicated(tiny_config,
                                                                             tmp_path):
  trainer = Trainer(tiny_config(**MOE, **EP), tmp_path / "full")
  assert "all-to-all" in trainer.compile_train_step().as_text()
  full = trainer.run()
  Trainer(tiny_config(total_steps="3", **MOE, **EP), tmp_path / "split").run()
  resumed = Trainer(tiny_config(**MOE, **EP), tmp_path / "split").run()
  a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])  # bit-identical, every step
  assert resumed["resumed_from"] == 3 and full["final_val_loss"] == resumed["final_val_loss"]
  Trainer(tiny_config(total_steps="3", **MOE, **{"mesh.data": "8"}), tmp_path / "dp").run()
  replicated = losses(tmp_path / "dp")
  np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [replicated[s] for s in (1, 2, 3)],
                             rtol=1e-5)

"""The trainer: exact resume, refusal of incompatible workdirs, NaN stop, metrics files."""

import json
import re

import jax
import numpy as np
import pytest

from mpxla.train import checkpoint
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import NonFiniteLoss, NonFiniteState, Trainer


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_resume_is_bit_exact(tiny_config, tmp_path):
  full = Trainer(tiny_config(**{"model.attention_impl": "'dense_jax'"}), tmp_path / "full").run()
  Trainer(tiny_config(total_steps="3", **{"model.attention_impl": "'dense_jax'"}), tmp_path / "split").run()
  resumed = Trainer(tiny_config(**{"model.attention_impl": "'dense_jax'"}), tmp_path / "split").run()
  a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])  # bit-identical, every step
  assert resumed["resumed_from"] == 3
  assert full["final_val_loss"] == resumed["final_val_loss"]
  assert a[6] < a[1]  # it trains
  cfg = json.loads((tmp_path / "full" / "config.json").read_text())
  assert cfg["total_steps"] == 6 and cfg["recipe"] == "bf16"


def test_incompatible_workdir_is_refused(tiny_config, tmp_path):
  Trainer(tiny_config(total_steps="1", **{"model.attention_impl": "'dense_jax'"}), tmp_path).run()
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(checkpoint.IncompatibleWorkdir, match="model.d_model"):
    Trainer(tiny_config(**{"model.d_model": "64", "model.attention_impl": "'dense_jax'"}), tmp_path).run()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_divergence_stops_naming_the_step_and_keeps_last_checkpoint(tiny_config, tmp_path):
  # A learning rate of 1e30 blows the weights up within a few steps: the state (or the loss)
  # stops being finite, and the step that made it is never saved.
  c = tiny_config(total_steps="12", checkpoint_every="1", **{
      "optim.lr": "1e30", "optim.grad_clip": "0.0", "optim.warmup_steps": "0",
      "model.attention_impl": "'dense_jax'"})
  with pytest.raises((NonFiniteLoss, NonFiniteState)) as info:
    Trainer(c, tmp_path).run()
  bad_step = int(re.search(r"(?:at|after) step (\d+)", info.value.args[0]).group(1))
  ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts and max(ckpts) == bad_step - 1  # the last good step, never the NaN one
  assert all(np.isfinite(v) for v in losses(tmp_path).values())


def test_resume_onto_another_mesh(tiny_config, tmp_path):
  # float32 compute: another layout changes only the reduction order (BF16 would amplify it).
  dense = {"model.attention_impl": "'dense_jax'", "model.dtype": "'float32'"}
  Trainer(tiny_config(**dense), tmp_path / "ref").run()  # 6 steps on data=8
  Trainer(tiny_config(total_steps="3", **dense), tmp_path / "run").run()
  other = Trainer(tiny_config(**{"mesh.data": "2", "mesh.fsdp": "4", **dense}), tmp_path / "run")
  # The checkpoint restores onto the fsdp=4 layout bit for bit.
  ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", keep=3)
  restored, data_state = ckpt.restore(3, other.abstract_state())
  ckpt.close()
  assert data_state == {"step": 3}
  first = Trainer(tiny_config(total_steps="3", **dense), tmp_path / "run")
  ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", keep=3)
  original, _ = ckpt.restore(3, first.abstract_state())
  ckpt.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sharded = [x for x in jax.tree.leaves(restored["params"]) if "fsdp" in str(x.sharding.spec)]
  assert sharded  # the large matrices really are split over fsdp now
  other.run()
  a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
  assert [a[s] for s in (1, 2, 3)] == [b[s] for s in (1, 2, 3)]
  # Another layout may reduce in another order: equal up to float32 rounding.
  np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-5)

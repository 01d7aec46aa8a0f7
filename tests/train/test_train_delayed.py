"""The fp8_delayed recipe: the trainer carries the amax histories as their gradients."""

import jax
import numpy as np
import pytest

from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import FP8_STATE, Trainer


def _histories(state, name):
  return [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state["model_state"])
          if name in jax.tree_util.keystr(p)]


_DENSE = {"model.attention_impl": "'dense_jax'"}


def test_fp8_delayed_fills_histories(tiny_config, tmp_path):
  dense = _DENSE
  trainer = Trainer(tiny_config(recipe="'fp8_delayed'", total_steps="2", **dense), tmp_path / "a")
  state = trainer.init_state()
  assert FP8_STATE in state["model_state"]
  for name in ("lhs_amax_history", "rhs_amax_history", "grad_amax_history"):
    assert all((h == 0).all() for h in _histories(state, name)), name
  batch = trainer._global(next(trainer._iterator("train", train=True)))
  state, _ = trainer.compile_train_step()(state, batch)
  # After one step the newest entry (index 0) holds each matmul's amax of the forward inputs
  # and, through the backward pass, of the output gradient; the older entries are still 0.
  for name in ("lhs_amax_history", "rhs_amax_history", "grad_amax_history"):
    hs = _histories(state, name)
    assert len(hs) >= 4, name  # q/k/v/o and the MLP's matmuls of 2 layers
    for h in hs:
      assert h[0] > 0 and np.isfinite(h[0]) and (h[1:] == 0).all(), (name, h[:3])


@pytest.mark.slow
def test_fp8_delayed_resume_is_exact(tiny_config, tmp_path):
  """The fp8 state is checkpointed with the model state: 4 steps == 2 + 2, bit for bit."""
  dense = _DENSE
  Trainer(tiny_config(recipe="'fp8_delayed'", total_steps="4", **dense), tmp_path / "full").run()
  Trainer(tiny_config(recipe="'fp8_delayed'", total_steps="2", **dense), tmp_path / "split").run()
  Trainer(tiny_config(recipe="'fp8_delayed'", total_steps="4", **dense), tmp_path / "split").run()
  a, b = ({r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r}
          for d in ("full", "split"))
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert all(a[s] == b[s] for s in a), (a, b)

"""Shared fixtures for the harness tests: a tiny GPT config on the embedded corpus."""

import pytest

from mpxla.train import config as config_lib


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mpxla_cache"))


def make_tiny_config(data_cache, **overrides):
  c = config_lib.load("configs/gpt_tiny.py")
  base = {"model.d_model": "32", "model.n_layers": "2", "model.n_heads": "2",
          "model.n_kv_heads": "1", "model.d_ff": "64", "model.attention_block": "16",
          "data.seq_len": "32", "data.batch_size": "8", "total_steps": "6", "log_every": "1",
          "eval_every": "3", "eval_batches": "2", "checkpoint_every": "3", "progress": "False",
          "plot": "False", "optim.warmup_steps": "2", "optim.decay_steps": "6"}
  base.update(overrides)
  for k, v in base.items():
    config_lib.override(c, k, v)
  with c.unlocked():
    c.data.cache_dir = data_cache
  return c


@pytest.fixture
def tiny_config(data_cache):
  return lambda **overrides: make_tiny_config(data_cache, **overrides)


DENSE = {"model.attention_impl": "'dense_jax'"}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_cache):
  """A finished 6-step run (checkpoints 3 and 6), to copy and damage: (workdir, losses)."""
  from mpxla.train.monitor import read_metrics
  from mpxla.train.trainer import Trainer

  workdir = tmp_path_factory.mktemp("finished") / "run"
  Trainer(make_tiny_config(data_cache, **DENSE), workdir).run()
  return workdir, {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

"""The trainer's FP8 statistics: logged every N steps, a heatmap, a table when a run stops."""

import pytest

from mpxla.train import monitor
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import NonFiniteLoss, NonFiniteState, Trainer

DENSE = {"model.attention_impl": "'dense_jax'"}


@pytest.mark.slow  # a trainer run; the statistics themselves: tests/nn/test_nn_fp8_stats.py
def test_fp8_statistics_are_logged_with_a_heatmap_and_a_worst_table(tiny_config, tmp_path):
  c = dict(total_steps="2", fp8_stats_every="2", recipe="'fp8_linear'", plot="True",
           checkpoint_every="2", eval_every="2", eval_batches="1", **DENSE)
  summary = Trainer(tiny_config(**c), tmp_path).run()
  (rec,) = [r for r in read_metrics(tmp_path) if any(k.startswith("fp8/") for k in r)]
  assert rec["step"] == 2
  stats = {k[4:]: v for k, v in rec.items() if k.startswith("fp8/")}
  layers = {k.rsplit("/", 2)[0] for k in stats}
  assert "layer_0/attn/query" in layers and "layer_1/mlp/down" in layers
  assert len(stats) == len(layers) * 3 * 5  # input, weight, grad x 5 statistics
  assert all(v > 0 for k, v in stats.items() if k.endswith("/amax") or k.endswith("/scale"))
  assert all(0 <= v <= 1 for k, v in stats.items() if k.endswith(("underflow", "saturated")))
  assert (tmp_path / "fp8_heatmap.png").stat().st_size > 1000
  assert summary["fp8_heatmap"].endswith("fp8_heatmap.png")
  table = monitor.fp8_worst_table(stats, 2, top=3).splitlines()
  assert table[0].startswith("FP8 statistics at step 2") and len(table) == 2 + 3


@pytest.mark.slow
def test_fp8_statistics_are_logged_every_n_steps_without_changing_training(tiny_config,
                                                                             tmp_path):
  c = dict(total_steps="4", fp8_stats_every="2", recipe="'coat'", plot="True",
           checkpoint_every="4", eval_every="4", **DENSE)
  summary = Trainer(tiny_config(**c), tmp_path / "stats").run()
  records = read_metrics(tmp_path / "stats")
  with_fp8 = [r for r in records if any(k.startswith("fp8/") for k in r)]
  assert [r["step"] for r in with_fp8] == [2, 4]
  keys = {k for k in with_fp8[0] if k.startswith("fp8/")}
  assert "fp8/layer_0/attn/query/input/amax" in keys and "fp8/layer_1/mlp/down/grad/underflow" in keys
  assert all(len(k.split("/")) >= 4 for k in keys)
  assert all(with_fp8[0][k] > 0 for k in keys if k.endswith("/amax"))
  assert (tmp_path / "stats" / "fp8_heatmap.png").stat().st_size > 1000
  assert summary["fp8_heatmap"].endswith("fp8_heatmap.png")
  # The statistics step trains exactly like the plain one.
  Trainer(tiny_config(**{**c, "fp8_stats_every": "0"}), tmp_path / "plain").run()
  losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}  # noqa: E731
  assert losses(tmp_path / "stats") == losses(tmp_path / "plain")


@pytest.mark.slow
def test_a_stopped_run_prints_the_worst_fp8_tensors(tiny_config, tmp_path, capsys):
  c = tiny_config(total_steps="12", fp8_stats_every="1", recipe="'fp8_linear'",
                  checkpoint_every="1", **{"optim.lr": "1e30", "optim.grad_clip": "0.0",
                                           "optim.warmup_steps": "0"}, **DENSE)
  with pytest.raises((NonFiniteLoss, NonFiniteState)):
    Trainer(c, tmp_path).run()
  out = capsys.readouterr().out
  assert "FP8 statistics at step" in out and "underflow" in out and "saturated" in out

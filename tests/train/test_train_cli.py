"""`python -m mpxla.train` end to end: overrides, AOT, SIGTERM + resume, many processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer

TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.model.attention_block=16",
        "--config.model.attention_impl='dense_jax'", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.log_every=1", "--config.eval_every=100",
        "--config.eval_batches=2", "--config.checkpoint_every=100", "--config.progress=False",
        "--config.plot=False", "--config.optim.warmup_steps=2", "--config.optim.decay_steps=6"]


def cli(args, env_extra=None, data_cache=None, timeout=240, **kw):
  env = dict(os.environ, **(env_extra or {}))
  if data_cache:
    env["MPXLA_CACHE"] = data_cache
  return subprocess.run([sys.executable, "-m", "mpxla.train", "--config=configs/gpt_tiny.py", *args],
                        env=env, capture_output=True, text=True, timeout=timeout, **kw)


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_unknown_key_lists_close_matches(tmp_path):
  r = cli([f"--workdir={tmp_path}", "--config.total_step=5"], timeout=60)
  assert r.returncode == 2
  assert "unknown key 'total_step'" in r.stderr and "--config.total_steps" in r.stderr
  r = cli([f"--workdir={tmp_path}", "--config.optim.lr=fast"], timeout=60)
  assert r.returncode == 2 and "expected float" in r.stderr


def test_aot_prints_the_memory_breakdown(tmp_path):
  # The mesh names 2 fsdp devices; --aot simulates them on CPU by itself.
  r = cli(["--aot", *TINY, "--config.mesh.fsdp=2"], env_extra={"XLA_FLAGS": ""}, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  mem = json.loads(r.stdout[r.stdout.index("{"):])
  params = 32 * 256 * 2 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # embed+head, layers, norms
  # Attention: q and out are 32x32; k and v are 32x16 (one kv head of 16).
  params -= 2 * (2 * 32 * 16)
  # fsdp=2 halves the leaves of >= 1024 elements: embed and head (8192 each), and per layer
  # q, out (1024 each), gate, up, down (2048 each); k, v and the norms stay whole.
  assert mem["params"] == 4 * (params - (8192 + 8192 + 2 * 8192) // 2)
  assert mem["optimizer"] >= 2 * mem["params"]  # AdamW's two float32 moments, plus counts
  assert mem["step_temp"] > 0
  assert mem["grads"] == mem["params"] and mem["activations"] == mem["step_temp"] - mem["grads"]
  assert mem["peak"] == (mem["step_arguments"] + mem["step_outputs"] + mem["step_temp"]
                         - mem["step_aliased"])
  assert 0 <= mem["other"] < 2**20  # the batch and the metrics
  assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_and_resume_is_exact(tiny_config, data_cache, tmp_path):
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", *TINY]
  env = dict(os.environ, MPXLA_CACHE=data_cache)
  # A long run, stopped by SIGTERM after its first steps.
  proc = subprocess.Popen(
      [sys.executable, "-m", "mpxla.train", "--config=configs/gpt_tiny.py", *args,
       "--config.total_steps=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  deadline = time.time() + 180
  while time.time() < deadline and len(losses(workdir)) < 2:
    time.sleep(0.1)
  # A second trainer on the same workdir is refused while the first runs.
  second = cli([*args, "--config.total_steps=100000"], data_cache=data_cache)
  assert second.returncode == 1 and "is in use by another trainer" in second.stderr
  assert f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in out
  saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
  assert saved >= 2
  # Resume for 3 more steps (total_steps may change between runs; the schedule does not).
  total = saved + 3
  r = cli([*args, f"--config.total_steps={total}"], data_cache=data_cache)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {saved}" in r.stdout
  ref = Trainer(tiny_config(total_steps=str(total), **{"model.attention_impl": "'dense_jax'"}),
                tmp_path / "ref").run()
  got, want = losses(workdir), losses(tmp_path / "ref")
  assert sorted(got) == list(range(1, total + 1))
  assert all(got[s] == want[s] for s in want), "resume across SIGTERM must be bit-exact"
  assert ref["final_train_loss"] == got[total]


# Slow tier: about a minute of CPU; the fast tier already runs two real processes in
# tests/parallel/test_parallel_multiprocess.py.
@pytest.mark.slow
def test_two_processes_match_one(data_cache, tmp_path):
  env = {"MPXLA_CACHE": data_cache, "MPXLA_VENV": sys.prefix, "MPXLA_DEVICES_PER_PROCESS": "2",
         "XLA_FLAGS": ""}
  args = ["--config=configs/gpt_tiny.py", "--config.total_steps=4", *TINY,
          "--config.model.attention_impl='dense_jax'"]
  r = subprocess.run(["bash", "launch/cpu_multiprocess.sh", "2", *args, f"--workdir={tmp_path}/mp"],
                     env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  one = subprocess.run(
      [sys.executable, "-m", "mpxla.train", *args, f"--workdir={tmp_path}/one"],
      env=dict(os.environ, MPXLA_CACHE=data_cache, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  a, b = losses(tmp_path / "mp"), losses(tmp_path / "one")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-6)

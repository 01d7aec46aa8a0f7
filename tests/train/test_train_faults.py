"""Faults the trainer meets, produced for real: damaged checkpoints, non-finite states, a
missing config.json, torn metrics, a second trainer, bad configs, finished runs.

Each test asserts the behaviour of docs/train.md's Faults table and that no checkpoint is
deleted. Process-level faults (signals, read-only and full file systems) are in
test_train_process_faults.py.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla.train import checkpoint
from mpxla.train import config as config_lib
from mpxla.train.lock import WorkdirLock, WorkdirLocked
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import NonFiniteState, Trainer

DENSE = {"model.attention_impl": "'dense_jax'"}  # as in conftest's finished_run


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def copy_run(finished_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  return workdir


def tree_listing(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file under root."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The state's array data files (OCDBT spreads the arrays over a few; which one holds which
  array varies from save to save, so the faults below damage all of them)."""
  return [p for p in sorted((step_dir / "state").rglob("d/*")) if p.stat().st_size > 1024]


# --- damaged checkpoints ------------------------------------------------------------------

def overwrite_bytes(step_dir):
  rng = np.random.default_rng(0)
  for f in data_files(step_dir):
    data = bytearray(f.read_bytes())
    data[len(data) // 3: len(data) // 3 + 512] = rng.integers(0, 256, 512, np.uint8).tobytes()
    f.write_bytes(bytes(data))


def truncate_data_files(step_dir):
  for f in data_files(step_dir):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garble_metadata(step_dir):
  f = step_dir / "state" / "_METADATA"
  data = bytearray(f.read_bytes())
  data[10:60] = b"x" * 50
  f.write_bytes(bytes(data))


def empty_manifest(step_dir):
  (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")


def broken_json(step_dir):
  (step_dir / "data" / "metadata").write_text('{"step": ')


def missing_state(step_dir):
  shutil.rmtree(step_dir / "state")


def test_overwritten_bytes_fall_back_to_the_previous_checkpoint(finished_run, tmp_path, tiny_config,
                                                                capsys):
  """Random bytes in a data file: caught by the checksum, moved aside, step 3 resumed exactly."""
  workdir = copy_run(finished_run, tmp_path)
  overwrite_bytes(workdir / "checkpoints" / "6")
  damaged = tree_listing(workdir / "checkpoints" / "6")
  Trainer(tiny_config(**DENSE), workdir).run()
  out = capsys.readouterr().out
  # Where the bytes land decides which check sees them: a checksum, or the reader itself.
  assert ("does not match its checksum" in out or "checkpoint 6 cannot be read" in out), out
  assert f"moved it to {workdir / 'corrupt' / '6'}" in out and "resumed from step 3" in out
  assert tree_listing(workdir / "corrupt" / "6") == damaged  # moved whole, never deleted
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
  want = finished_run[1]
  got = losses(workdir)
  assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]  # bit-exact redo


@pytest.mark.parametrize("damage", [truncate_data_files, garble_metadata, empty_manifest,
                                    broken_json, missing_state], ids=lambda f: f.__name__)
def test_unreadable_checkpoint_is_moved_aside(damage, finished_run, tmp_path, tiny_config):
  workdir = copy_run(finished_run, tmp_path)
  damage(workdir / "checkpoints" / "6")
  trainer = Trainer(tiny_config(**DENSE), workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=3)
  log = []
  step, state, data_state = ckpt.restore_latest(trainer.abstract_state(), lambda *_: None,
                                                log.append)
  ckpt.close()
  assert (step, data_state) == (3, {"step": 3})
  assert len(log) == 1 and log[0].startswith("checkpoint 6 cannot be read:"), log
  assert (workdir / "corrupt" / "6").is_dir()
  assert checkpoint.first_non_finite(state) is None


def test_no_good_checkpoint_left_stops_and_keeps_them_all(finished_run, tmp_path, tiny_config):
  workdir = copy_run(finished_run, tmp_path)
  overwrite_bytes(workdir / "checkpoints" / "6")
  missing_state(workdir / "checkpoints" / "3")
  with pytest.raises(checkpoint.NoGoodCheckpoint, match="no good checkpoint left"):
    Trainer(tiny_config(**DENSE), workdir).run()
  assert sorted(p.name for p in (workdir / "corrupt").iterdir()) == ["3", "6"]
  assert not list((workdir / "checkpoints").iterdir())


def test_a_non_finite_checkpoint_is_never_restored(finished_run, tmp_path, tiny_config):
  """A checkpoint whose checksums match but which holds a NaN (saved by an older version)."""
  workdir = copy_run(finished_run, tmp_path)
  trainer = Trainer(tiny_config(**DENSE), workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
  _, state, data_state = ckpt.restore_latest(trainer.abstract_state(), lambda *_: None, print)
  state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(jnp.nan)
  ckpt.save(7, state, data_state, {})
  log = []
  step, _, _ = ckpt.restore_latest(trainer.abstract_state(), lambda *_: None, log.append)
  ckpt.close()
  assert step == 6
  assert log == [f"checkpoint 7 leaf ['params']['final_norm']['scale'] is not finite; moved it to "
                 f"{workdir / 'corrupt' / '7'} and trying the previous one."]


def test_a_checksum_mismatch_is_caught(finished_run, tmp_path, tiny_config):
  """Finite values that are not the saved ones: only the fingerprint can tell."""
  workdir = copy_run(finished_run, tmp_path)
  three, six = (workdir / "checkpoints" / s / "fingerprint" / "metadata" for s in ("3", "6"))
  six.write_text(three.read_text())  # step 6's arrays now have step 3's checksums
  trainer = Trainer(tiny_config(**DENSE), workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=3)
  log = []
  step, _, _ = ckpt.restore_latest(trainer.abstract_state(), lambda *_: None, log.append)
  ckpt.close()
  assert step == 3
  assert len(log) == 1 and "does not match its checksum" in log[0], log


def test_fingerprint_is_the_same_for_any_sharding_and_sees_one_bit():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  x = jax.random.normal(jax.random.key(0), (64, 24))
  tree = {"a": x, "b": jnp.arange(10, dtype=jnp.int8), "k": jax.random.key(1),
          "c": jnp.array([1 + 2j], jnp.complex64), "t": jnp.array([True, False])}
  sharded = {**tree, "a": jax.device_put(x, jax.NamedSharding(mesh, jax.P("x")))}
  assert checkpoint.fingerprint(sharded) == checkpoint.fingerprint(tree)
  bits = np.asarray(x).view(np.uint32)
  flipped = bits.copy()
  flipped[5, 7] ^= 1 << 3
  swapped = bits.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same words, other places: the weighted sum differs
  for other in (flipped, swapped):
    fp = checkpoint.fingerprint({**tree, "a": jnp.asarray(other.view(np.float32))})
    assert fp["['a']"]["sum"] != checkpoint.fingerprint(tree)["['a']"]["sum"]
  # The plain sum is the sum of the words mod 2^32 (an independent numpy reference).
  assert checkpoint.fingerprint(tree)["['a']"]["sum"][0] == int(bits.astype(np.uint64).sum() % 2**32)


# --- non-finite state while the loss is finite --------------------------------------------

class PoisonedTrainer(Trainer):
  """Writes a NaN into one parameter at the update of step 2 (a test-only bad update)."""

  def _update(self, state, batch):
    new_state, metrics = super()._update(state, batch)
    scale = new_state["params"]["final_norm"]["scale"]
    new_state["params"]["final_norm"]["scale"] = jnp.where(state["step"] == 1, scale.at[0].set(jnp.nan),
                                                     scale)
    return new_state, metrics


def test_non_finite_parameters_stop_without_saving(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(NonFiniteState) as info:
    PoisonedTrainer(tiny_config(checkpoint_every="1", **DENSE), workdir).run()
  message = str(info.value)
  assert "after step 2" in message and "['params']['final_norm']['scale'] is not finite" in message
  assert "The last good checkpoint is step 1" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  assert sorted(losses(workdir)) == [1]  # step 2's metrics were not logged either


# --- config.json, metrics.jsonl --------------------------------------------------------------

def test_missing_config_json_is_checked_against_the_checkpoint(finished_run, tmp_path, tiny_config):
  workdir = copy_run(finished_run, tmp_path)
  (workdir / "config.json").unlink()
  before = tree_listing(workdir)
  with pytest.raises(checkpoint.IncompatibleWorkdir, match=r"checkpoint 6 .*\n  model.d_ff: "
                     r"saved 64, now 128"):
    Trainer(tiny_config(**{"model.d_ff": "128", **DENSE}), workdir).run()
  assert tree_listing(workdir) == before  # nothing written, nothing moved
  # The original config still resumes from its own workdir.
  summary = Trainer(tiny_config(total_steps="7", **DENSE), workdir).run()
  assert summary["resumed_from"] == 6
  assert json.loads((workdir / "config.json").read_text())["model"]["d_ff"] == 64


def test_torn_metrics_line_is_dropped_with_a_warning(finished_run, tmp_path, tiny_config, capsys):
  workdir = copy_run(finished_run, tmp_path)
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 7, "loss": 4.9')  # a write cut short
  Trainer(tiny_config(total_steps="7", **DENSE), workdir).run()
  assert "metrics.jsonl:" in capsys.readouterr().err
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert all(json.loads(ln) for ln in lines)
  assert sorted(losses(workdir)) == list(range(1, 8))


# --- finished runs, config ranges, the lock -------------------------------------------------

def test_a_finished_run_writes_nothing(finished_run, tmp_path, tiny_config, capsys):
  workdir = copy_run(finished_run, tmp_path)
  before = tree_listing(workdir)
  summary = Trainer(tiny_config(**DENSE), workdir).run()
  assert "already complete at step 6" in capsys.readouterr().out
  assert summary["already_complete"] and summary["final_val_loss"] is not None
  assert tree_listing(workdir) == before


@pytest.mark.parametrize("key,value,match", [
    ("total_steps", "0", "total_steps=0: the number of training steps must be an integer >= 1"),
    ("total_steps", "-5", "total_steps=-5"),
    ("data.batch_size", "0", "data.batch_size=0: the global batch size"),
    ("log_every", "0", "log_every=0"), ("eval_every", "-1", "eval_every=-1"),
    ("checkpoint_every", "0", "checkpoint_every=0"), ("optim.lr", "-0.1", "optim.lr=-0.1"),
    ("optim.lr", "1e999", "optim.lr=inf: must be a finite number > 0")])
def test_out_of_range_config_is_refused(key, value, match):
  c = config_lib.load("configs/gpt_tiny.py")
  config_lib.override(c, key, value)
  with pytest.raises(config_lib.ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
    config_lib.resolve(c)


@pytest.mark.parametrize("key,value,match", [
    ("optim.grad_clip", "-1.0", "optim.grad_clip=-1.0: the global-norm clip"),  # trained uphill
    ("optim.weight_decay", "-0.1", "optim.weight_decay=-0.1"),
    ("optim.b1", "1.0", r"optim.b1=1.0: Adam's first-moment decay must be in \[0.0, 1.0\)"),
    ("optim.b2", "-0.5", "optim.b2=-0.5"), ("optim.final_lr_fraction", "-1.0", "final_lr"),
    ("seed", "-1", "seed=-1"),
    ("data.val_percent", "0", "data.val_percent=0: the percent of documents held out")])
def test_out_of_range_real_numbers_are_refused(key, value, match):
  c = config_lib.load("configs/gpt_tiny.py")
  config_lib.override(c, key, value)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.resolve(c)


def test_a_batch_the_mesh_cannot_split_is_refused_by_name(tiny_config):
  """6 sequences on 2 batch devices x ... (8 here): a ConfigError naming data.batch_size, not
  JAX's IndivisibleError while the step compiles."""
  c = tiny_config(**{**DENSE, "mesh.data": "-1", "data.batch_size": "6"})
  with pytest.raises(config_lib.ConfigError, match="data.batch_size=6.*multiple of 8"):
    Trainer(c, "/nonexistent")


def test_cli_refuses_a_bad_config_before_writing(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mpxla.train", "--config=configs/gpt_tiny.py",
                      f"--workdir={tmp_path / 'w'}", "--config.total_steps=-5"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "--config.total_steps=-5" in r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()


def test_decay_follows_total_steps_unless_set():
  c = config_lib.load("configs/gpt_tiny.py")
  config_lib.override(c, "total_steps", "60")
  assert config_lib.resolve(c).optim.decay_steps == 60
  config_lib.override(c, "optim.decay_steps", "40")
  assert config_lib.resolve(c).optim.decay_steps == 40
  assert config_lib.resolve(config_lib.load("configs/gpt_tiny.py")).optim.decay_steps == 300


def test_second_trainer_is_refused_and_a_stale_lock_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (tmp_path / "trainer.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": holder.pid, "since": "then"}))
    with pytest.raises(WorkdirLocked, match=f"in use by another trainer .*pid {holder.pid}"):
      WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  warnings = []
  with WorkdirLock(tmp_path, warn=warnings.append) as lock:  # that pid is gone now
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert warnings and f"pid {holder.pid} is gone" in warnings[0]
  assert not (tmp_path / "trainer.lock").exists()  # released
  (tmp_path / "trainer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(WorkdirLocked, match="host elsewhere"):  # never taken from another host
    WorkdirLock(tmp_path).acquire()

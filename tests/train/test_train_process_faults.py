"""Process-level faults of `python -m mpxla.train`, produced for real: SIGTERM during start-up,
SIGKILL during an asynchronous save, a read-only workdir and a full disk (the last two in a
user and mount namespace of their own, with `unshare`; skipped where it is not permitted).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mpxla.train import checkpoint
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer

TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.model.attention_block=16",
        "--config.model.attention_impl='dense_jax'", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.log_every=1", "--config.eval_every=3",
        "--config.eval_batches=2", "--config.checkpoint_every=3", "--config.progress=False",
        "--config.plot=False", "--config.optim.warmup_steps=2", "--config.optim.decay_steps=6"]
TRAIN = [sys.executable, "-m", "mpxla.train", "--config=configs/gpt_tiny.py", *TINY]


def env(data_cache):
  return dict(os.environ, MPXLA_CACHE=data_cache)


def listing(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


def steps_on_disk(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def all_verify(workdir: pathlib.Path, tiny_config) -> list[int]:
  """Restores every committed checkpoint of workdir and checks it against its fingerprint."""
  trainer = Trainer(tiny_config(**{"model.attention_impl": "'dense_jax'"}), workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=100)
  good = []
  for step in ckpt.manager.all_steps():
    saved = ckpt.manager.restore(step, args=checkpoint.ocp.args.Composite(
        fingerprint=checkpoint.ocp.args.JsonRestore()))["fingerprint"]
    state, _ = ckpt.restore(step, trainer.abstract_state())
    assert checkpoint.verify(state, saved) is None, step
    good.append(step)
  ckpt.close()
  return sorted(good)


def catches_sigterm(pid: int) -> bool:
  """Whether process `pid` has a SIGTERM handler installed (Linux: SigCgt in /proc)."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  mask = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
  return bool(mask & (1 << (signal.SIGTERM - 1)))


def _unshare_works() -> bool:
  try:
    r = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return r.returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -Urm` (user and "
                                   "mount namespaces) to make a read-only or full file system")


def test_sigterm_during_start_up_exits_cleanly(data_cache, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([*TRAIN, f"--workdir={workdir}", "--config.total_steps=50"],
                          env=env(data_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 60
  while time.time() < deadline and not catches_sigterm(proc.pid):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)  # as soon as it is caught: while JAX is still being imported
  out, err = proc.communicate(timeout=180)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM before the first step: nothing saved (no checkpoint exists)" in out
  assert not (workdir / "checkpoints").exists() or not steps_on_disk(workdir)
  assert not read_metrics(workdir)


@needs_unshare
def test_read_only_workdir_is_one_line_and_loses_nothing(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  before = listing(workdir)
  script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
  r = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(workdir), *TRAIN,
                      f"--workdir={workdir}", "--config.total_steps=9"],
                     capture_output=True, text=True, timeout=180)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip() == (f"error: cannot write {workdir}/trainer.lock: read-only file "
                              "system. Nothing already saved was removed.")
  assert listing(workdir) == before


@pytest.mark.slow
@needs_unshare
def test_full_disk_is_one_line_and_loses_nothing(finished_run, tmp_path, data_cache, tiny_config):
  """A tmpfs with room for about one more checkpoint: a later save fails for want of space."""
  used_kib = sum(p.stat().st_size for p in finished_run[0].rglob("*") if p.is_file()) // 1024
  mnt, out = tmp_path / "mnt", tmp_path / "out"
  mnt.mkdir()
  out.mkdir()
  script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" && cp -a "$3" "$2/run" && shift 3 && '
            '"$@"; rc=$?; cp -a "$MNT/run" "$OUT/run"; exit $rc')
  r = subprocess.run(
      ["unshare", "-Urm", "sh", "-c", script, "sh", str(used_kib + 400), str(mnt),
       str(finished_run[0]), *TRAIN, f"--workdir={mnt}/run", "--config.total_steps=30",
       "--config.checkpoint_every=1", "--config.keep_checkpoints=100"],
      capture_output=True, text=True, timeout=300,
      env=dict(env(data_cache), MNT=str(mnt), OUT=str(out)))
  assert r.returncode == 1, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {mnt}/run"), r.stderr[-2000:]
  assert lines[0].endswith("no space left on device. Nothing already saved was removed.")
  good = all_verify(out / "run", tiny_config)
  assert good[:2] == [3, 6] and len(good) < 30  # the old ones intact; the disk filled up


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_exactly(data_cache, tmp_path, tiny_config, finished_run):
  """kill -9 while checkpoints are being written: the next run resumes from the last committed
  one, and the whole run's losses equal an uninterrupted run's bit for bit."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([*TRAIN, f"--workdir={workdir}", "--config.total_steps=1000",
                           "--config.checkpoint_every=1", "--config.keep_checkpoints=2"],
                          env=env(data_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

  def saving() -> bool:  # two checkpoints committed and another being written
    names = [p.name for p in (workdir / "checkpoints").glob("*")]
    return sum(n.isdigit() for n in names) >= 2 and any("tmp" in n for n in names)

  deadline = time.time() + 180
  while time.time() < deadline and not saving():
    time.sleep(0.005)
  proc.kill()  # SIGKILL, with a save in flight
  proc.wait(timeout=60)
  killed_at = max(steps_on_disk(workdir))
  r = subprocess.run([*TRAIN, f"--workdir={workdir}", f"--config.total_steps={killed_at + 2}"],
                     env=env(data_cache), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from step" in r.stdout
  assert f"taking over the stale lock {workdir / 'trainer.lock'} (pid {proc.pid} is gone)" in r.stdout
  ref = tmp_path / "ref"
  Trainer(tiny_config(total_steps=str(killed_at + 2), checkpoint_every="1000",
                      **{"model.attention_impl": "'dense_jax'"}), ref).run()
  got = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
  want = {r["step"]: r["loss"] for r in read_metrics(ref) if "loss" in r}
  assert got == want

"""Cost of FP8 statistics: the default GPT (`coat`) with `fp8_stats_every=100` vs off, interleaved.

    .venv/bin/python experiments/fp8_stats_overhead.py [STEPS]     (default 200; ~7 min on 2 cores)

Prints the mean step time (logged windows after the first) of each run and the overhead of
the best run with statistics against the best without (docs/nn.md, "FP8 statistics").
"""

import pathlib
import shutil
import statistics
import sys
import tempfile

from mpxla.train import config as config_lib
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
times: dict[int, list[float]] = {0: [], 100: []}
for every in (0, 100, 0, 100):
  c = config_lib.load("configs/gpt_tiny.py:coat")
  for k, v in {"total_steps": steps, "fp8_stats_every": every, "progress": False, "plot": False,
               "eval_every": steps, "checkpoint_every": steps,
               "model.attention_impl": "'dense_jax'"}.items():
    config_lib.override(c, k, str(v))
  workdir = pathlib.Path(tempfile.mkdtemp())
  Trainer(c, workdir).run()
  logged = [r["step_time"] for r in read_metrics(workdir) if "step_time" in r]
  times[every].append(statistics.mean(logged[1:]))
  shutil.rmtree(workdir)
print(f"command: python experiments/fp8_stats_overhead.py {steps}")
print("| fp8_stats_every | mean step time per run (ms) |\n|---|---|")
for every, ts in times.items():
  print(f"| {every} | {' / '.join(f'{1000 * t:.1f}' for t in ts)} |")
print(f"overhead, best against best: {100 * (min(times[100]) / min(times[0]) - 1):+.1f}%")

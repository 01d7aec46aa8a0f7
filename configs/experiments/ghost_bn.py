"""Ghost BatchNorm at a large global batch: configs/cnn_digits.py:VARIANT on 8 CPU devices.

Command:  python experiments/ghost_bn.py                  (get_config("full"): global batch 1024,
          60 steps, 3 seeds, lr 3e-3 and 3e-3 * sqrt(8); about 6 CPU-min, 19 min wall)
          python experiments/ghost_bn.py --quick --out DIR (get_config("quick"): a narrow CNN,
          batch 128, 3 steps)
Expected (docs/results.md section 6): every run ends between 98% and 100% validation accuracy;
ghost batches of 16 give the lowest validation loss in every seed at both learning rates.
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        batch=1024, steps=60, eval_every=6, evals=10, seeds=(0, 1, 2),
        lrs=(3e-3, 3e-3 * 8 ** 0.5), widths=None))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(
        batch=128, steps=3, eval_every=3, evals=10, seeds=(0,), lrs=(3e-3,), widths=[8]))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

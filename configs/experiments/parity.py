"""Loss parity: the four recipes on the default GPT (configs/gpt_tiny.py), three seeds each.

Command:  python experiments/parity.py                  (get_config("full"): 12 trainer runs of
          300 steps in subprocesses, about 100 min on 2 CPU cores; --reuse keeps finished runs)
          python experiments/parity.py --quick --out DIR (get_config("quick"): a miniature GPT,
          bf16 and coat, one seed, 4 steps, trained in-process: about 40 s of CPU)
Expected (docs/results.md section 2): coat's mean final validation loss within 1% of bf16's
(+0.77% on the saved runs); the seed-0 AdamW moments of bf16 and coat are written for
experiments/state_error.py.

Method: each run is mpxla's own trainer in a subprocess, one CPU device (quick mode: in-process):
  python -m mpxla.train --config=configs/gpt_tiny.py:RECIPE --workdir=OUT/runs/RECIPE_sSEED
      --config.seed=SEED --config.total_steps=STEPS --config.eval_every=EVAL_EVERY ...
(the warmup/cosine schedule stretched to STEPS). After the bf16 and coat seed-0 runs the final
AdamW moments are restored from the run's last checkpoint and written as float32 arrays to
OUT/runs/moments_RECIPE_s0.npz, keyed 'mu/<param path>' and 'nu/<param path>' (coat's FP8 moments
decoded with mpxla.optim.decompress).
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        recipes=("bf16", "fp8_linear", "coat", "hif8"), seeds=(0, 1, 2), steps=300,
        eval_every=25, eval_batches=16, overrides={}))
  if arg == "quick":  # compilation dominates: about 10 s of CPU for bf16 and 25 s for coat
    return ml_collections.ConfigDict(dict(
        recipes=("bf16", "coat"), seeds=(0,), steps=4, eval_every=2, eval_batches=1,
        overrides=dict(model=dict(d_model=64, n_layers=1, d_ff=128, attention_impl="dense_jax"),
                       data=dict(seq_len=32, batch_size=8))))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

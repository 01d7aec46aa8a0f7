"""Loss parity: seven recipes on the default GPT (configs/gpt_tiny.py), three seeds each.

Command:  python experiments/parity.py --reuse          (get_config("full"): 18 trainer runs of
          300 steps and 2 of 900 in subprocesses, 5 to 16 min per 300-step run on 2 shared CPU
          cores; --reuse keeps finished runs, also those of the saved results.json)
          python experiments/parity.py --quick --out DIR (get_config("quick"): a miniature GPT,
          bf16, coat and coat_sr, one seed, 4 steps, and a 6-step bf16/coat_sr pair, in-process:
          about 2 min of CPU)
Expected (docs/results.md section 2): coat's mean final validation loss within 1% of bf16's
(+0.77% on the saved runs); the goal for coat_sr (no float32 master weights) is the same 1% and
no late drift in the 900-step bf16/coat_sr pair beyond the seed-to-seed spread (outcome in
docs/results.md); the seed-0 AdamW moments of bf16 and coat are written for state_error.py.

Method: each run is mpxla's own trainer in a subprocess, one CPU device (quick mode: in-process):
  python -m mpxla.train --config=configs/gpt_tiny.py:RECIPE --workdir=OUT/runs/RECIPE_sSEED
      --config.seed=SEED --config.total_steps=STEPS --config.eval_every=EVAL_EVERY ...
(the warmup/cosine schedule stretched to STEPS). After the bf16 and coat seed-0 runs the final
AdamW moments are restored from the run's last checkpoint and written as float32 arrays to
OUT/runs/moments_RECIPE_s0.npz, keyed 'mu/<param path>' and 'nu/<param path>' (coat's FP8 moments
decoded with mpxla.optim.decompress). `no_master` (bf16_sr, coat_sr: BF16 parameters, no float32
copy) get a table of their own; `long` is one longer run per recipe (OUT/runs/long_RECIPE_sSEED).
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        recipes=("bf16", "fp8_linear", "coat", "hif8", "mxfp8", "bf16_sr", "coat_sr"), seeds=(0, 1, 2),
        steps=300, eval_every=25, eval_batches=16, overrides={}, no_master=("bf16_sr", "coat_sr"),
        long=dict(recipes=("bf16", "coat_sr"), seed=0, steps=900, eval_every=50)))
  if arg == "quick":  # compilation dominates: about 10 s of CPU for bf16 and 25 s for coat
    return ml_collections.ConfigDict(dict(
        recipes=("bf16", "coat", "coat_sr"), seeds=(0,), steps=4, eval_every=2, eval_batches=1,
        no_master=("coat_sr",), long=dict(recipes=("bf16", "coat_sr"), seed=0, steps=6, eval_every=3),
        overrides=dict(model=dict(d_model=64, n_layers=1, d_ff=128, attention_impl="dense_jax"),
                       data=dict(seq_len=32, batch_size=8))))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

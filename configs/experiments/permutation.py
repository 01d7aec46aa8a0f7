"""Token permutation on real attention maps of the trained GPT (configs/gpt_tiny.py).

Command:  python experiments/permutation_real.py                  (get_config("full"): the parity
          run's bf16 seed-0 model at T = 8192 on the 2 largest validation files, plus the config
          trained on 2048-token rows; about 7 min on 2 CPU cores once both models exist)
          python experiments/permutation_real.py --quick --out DIR (get_config("quick"): a tiny
          model trained here, T = 512)
Expected (docs/results.md section 5): on these diffuse maps permute_kv needs slightly more
blocks than no permutation for 97% recall (0.95x); any key order saves at most 1.2x.
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        context=8192, docs=2, block=64, segments=(256, 1024), estimates=("pooled", "tokens"),
        long_train_len=2048, select_recalls=None))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(
        context=512, docs=1, block=64, segments=(256,), estimates=("tokens",), long_train_len=0,
        select_recalls=(0.97,)))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

"""Memory breakdown: the real train step compiled ahead of time for 8 simulated FSDP devices.

Command:  python experiments/memory.py --jobs=2           (get_config("full"): 125m, 350m and 1b
          of configs/llama_memory.py x four recipes at 4 x 2048 tokens per device, then the
          largest batch in 80 GB for 1b; about 55 min of CPU, --resume continues a broken run)
          python experiments/memory.py --quick --out DIR  (get_config("quick"): the tiny model,
          every recipe, no batch search; about 50 s of CPU)
Expected (docs/results.md section 1): 1b peak 27.4 GB (bf16) -> 12.8 GB (coat), 2.15x; largest
batch in 80 GB 13 -> 26 sequences per device (2.00x).
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        sizes=("125m", "350m", "1b"), batch=4, budget=80e9,  # GB = 1e9 bytes per device
        # whose largest batch is searched (the goal's pair first: --resume continues it)
        search_sizes=("1b",), search_recipes=("bf16", "coat", "hif8", "fp8_linear")))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(sizes=("tiny",), batch=2, budget=1e9, search_sizes=(),
                                          search_recipes=()))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

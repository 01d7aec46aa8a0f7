"""Memory breakdown: the real train step compiled ahead of time for 8 simulated FSDP devices,
and Llama-2-7B on one device.

Command:  python experiments/memory.py --jobs=2           (get_config("full"): 125m, 350m and 1b
          of configs/llama_memory.py x four recipes (1b also bf16_sr, coat_sr) at 4 x 2048 tokens
          per device, the largest batch in 80 GB for 1b, then 7b on one device x single_recipes
          at 1 x 2048 tokens and its largest batch; --resume continues a broken run, --add
          measures only what OUT/results.json lacks)
          python experiments/memory.py --quick --out DIR  (get_config("quick"): the tiny model,
          every recipe, tiny on one device for coat_sr; about 2 min of CPU)
Expected (docs/results.md section 1): 1b peak 26.3 GB (bf16) -> 11.2 GB (coat), 2.35x; largest
batch in 80 GB 13 -> 26 sequences per device (2.00x).
"""

import ml_collections

BASE = ("bf16", "fp8_linear", "coat", "hif8")  # every size; sr_sizes add bf16_sr and coat_sr


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        sizes=("125m", "350m", "1b"), batch=4, budget=80e9,  # GB = 1e9 bytes per device
        recipes=BASE, sr_sizes=("1b",),
        # whose largest batch is searched (the goal's pair first: --resume continues it)
        search_sizes=("1b",), search_recipes=("bf16", "coat", "hif8", "fp8_linear"),
        # one device (no FSDP), batch 1, then the largest batch in `budget`
        # extrapolated from compiles of 7b@4 and 7b@8 at 1 and 4 sequences (32 layers: > 23 GB
        # of compiler memory); batch 4 only where batch 1 fits the budget
        single_size="7b", single_mesh="fsdp=1", single_layers=(4, 8), single_batches=(1, 4),
        single_recipes=("coat_sr", "coat", "bf16_sr", "bf16")))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(
        sizes=("tiny",), batch=2, budget=1e9, recipes=BASE, sr_sizes=("tiny",), search_sizes=(),
        search_recipes=(), single_size="tiny", single_mesh="fsdp=1", single_layers=(1, 2),
        single_batches=(1, 2), single_recipes=("coat_sr",)))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")

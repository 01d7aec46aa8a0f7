"""Token permutation on real attention maps of the trained GPT (configs/gpt_tiny.py).

Command:  python experiments/permutation_real.py                  (get_config("full"): the parity
          run's bf16 seed-0 model at T = 8192 on the 2 largest validation files, plus the config
          trained on 2048-token rows; about 7 min on 2 CPU cores once both models exist)
          python experiments/permutation_real.py --quick --out DIR (get_config("quick"): a tiny
          model trained here, T = 512)
Expected (docs/results.md section 5): on these diffuse maps permute_kv needs slightly more
blocks than no permutation for 97% recall (0.95x); any key order saves at most 1.2x.

Method: takes a trained GPT (a Trainer workdir of configs/gpt_tiny.py: by default the parity section's
bf16 seed-0 run, else one trained here), runs it on the largest validation files of the
embedded corpus at a context far beyond its 128-token training length (the model uses rotary
position embeddings, so it runs at any length), and captures every layer's rotated queries,
keys and values. A second study does the same for the config trained on 2048-token rows
(trained here; long_train_len, 0: none), read at its training length. Per layer and query head it
computes the causal attention map P[q, t] = softmax_t(q . k_t / sqrt(d)) (t <= q) and:

* block mass   M[i, j] = (1 / |Q_i|) sum_{q in Q_i} sum_{t in K_j} P[q, t], where Q_i is query
  block i and K_j the keys in slots [j * block_kv, (j + 1) * block_kv) of the key order used
  (the original order, or a permutation); each row of M sums to 1;
* blocks for recall r: per query-block row, the fewest key blocks whose mass reaches r
  (greedy by mass within the row, i.e. an oracle selection from the true map), summed over
  the rows: the same definition with and without permutation, only the key order differs;
  also split into blocks in segments before the query block's own and in its own segment;
* output error of that selection: attention restricted to the kept blocks (softmax
  renormalized over the kept allowed keys) against dense causal attention, relative L2 over
  all queries, ||O_sparse - O||_F / ||O||_F.

Permutations: `mpxla.attention.permute_kv`'s (keys sorted within aligned segments by an
importance estimated from block-pooled queries), and, as an upper bound for a segment sort, the
same sort by the true importance (the mass each key receives, summed over queries and the
query heads sharing its kv head). Finally what `permute_kv` itself selects from its own
estimate at thresholds 0.9 / 0.97, run through `mpxla.attention.attention` with the returned
BlockMask (impl='xla'): blocks computed, true recall and output error.
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

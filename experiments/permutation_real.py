"""Token permutation on REAL attention maps of the trained GPT (settings and method:
configs/experiments/permutation.py).

    python experiments/permutation_real.py [--workdir DIR] [--context 8192] [--quick]
"""

from __future__ import annotations

import base64
import functools
import json
import pathlib

import harness as H
import numpy as np

NAME = "permutation"
TITLE = "5. Token permutation on real attention maps"
RECALLS = (0.9, 0.97)
HEADLINE_RECALL = 0.97
BOUND = "any-permutation bound"  # the fewest blocks any key order could need (a lower bound)
MAP_SIDE = 32  # block-mass maps stored for the plot are mean-pooled to at most this side


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions; tested against independent numpy in tests/experiments)


def block_mass(probs_TxS, perm_S, block_q: int, block_kv: int):
  """[nq, nk] mean over each query block of the attention mass of each key block.

  Key block j holds the keys perm_S[j * block_kv : (j + 1) * block_kv] (original positions);
  T and S must be multiples of the block sizes.
  """
  import jax.numpy as jnp

  t, s = probs_TxS.shape
  p_TxS = jnp.take(probs_TxS, perm_S, axis=1)
  return p_TxS.reshape(t // block_q, block_q, s // block_kv, block_kv).sum((1, 3)) / block_q


def blocks_for_recall(mass_QxK: np.ndarray, recall: float) -> np.ndarray:
  """int [nq]: per row, the fewest blocks (largest mass first) holding recall * the row's mass."""
  mass = np.asarray(mass_QxK, np.float64)
  srt = -np.sort(-mass, axis=-1)
  csum = np.cumsum(srt, axis=-1)
  need = (csum < recall * csum[:, -1:] * (1 - 1e-12)).sum(-1) + 1
  return np.minimum(need, (mass > 0).sum(-1))


def any_permutation_blocks(probs_TxS, block_q: int, block_kv: int, recall: float) -> np.ndarray:
  """int [nq]: per query-block row, a lower bound on the blocks for `recall` under ANY key order.

  Row i's mass on key t is m_i[t] = mean over the queries of block i of P[q, t]; no grouping of
  keys into blocks of block_kv can hold r of the row's mass in fewer than
  ceil(n_i / block_kv) blocks, where n_i is the fewest keys holding it. The bound holds even
  for a different permutation per row, so it caps what any permutation can save.
  """
  p = np.asarray(probs_TxS, np.float64)
  t, s = p.shape
  keys = blocks_for_recall(p.reshape(t // block_q, block_q, s).mean(1), recall)
  return -(-keys // block_kv)


def keep_top(mass_QxK: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """bool [nq, nk]: the counts[i] largest-mass blocks of each row i (stable ties)."""
  order = np.argsort(-np.asarray(mass_QxK, np.float64), axis=-1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(order.shape[-1])[None], axis=-1)
  return rank < np.asarray(counts)[:, None]


def sparse_output_error(probs_TxS, v_SxE, perm_S, keep_QxK, block_q: int, block_kv: int):
  """Relative L2 error of attention restricted to the kept blocks vs dense attention.

  O = P V; O_sparse[q] = sum_t P[q,t] m[q,t] v_t / sum_t P[q,t] m[q,t] with m[q,t] = 1 iff the
  block of key t's slot (its index in perm_S) is kept for q's block.
  """
  import jax.numpy as jnp

  s = probs_TxS.shape[1]
  slot = jnp.zeros((s,), jnp.int32).at[perm_S].set(jnp.arange(s, dtype=jnp.int32))
  m_TxS = jnp.repeat(keep_QxK[:, slot // block_kv], block_q, axis=0)
  pm = jnp.where(m_TxS, probs_TxS, 0.0)
  dense = probs_TxS @ v_SxE
  sparse = (pm @ v_SxE) / jnp.maximum(pm.sum(-1, keepdims=True), 1e-30)
  return jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense)


def segment_sort(importance: np.ndarray, segment: int) -> np.ndarray:
  """int [.., S]: original positions, sorted by importance (descending, stable) per segment."""
  imp = np.asarray(importance)
  s = imp.shape[-1]
  if s % segment:
    raise ValueError(f"length {s} must be a multiple of segment={segment}")
  seg = imp.reshape(imp.shape[:-1] + (s // segment, segment))
  order = np.argsort(-seg, axis=-1, kind="stable") + np.arange(0, s, segment)[:, None]
  return order.reshape(imp.shape).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Model: find or train a workdir, restore it, capture q/k/v on real text


def _has_checkpoint(wd: pathlib.Path) -> bool:
  """A finished run: config.json and a checkpoint of the config's last step."""
  ck = wd / "checkpoints"
  if not (wd / "config.json").is_file() or not ck.is_dir():
    return False
  last = json.loads((wd / "config.json").read_text())["total_steps"]
  return (ck / str(last)).is_dir()


def train(workdir: pathlib.Path, quick: bool, seq_len: int | None = None) -> None:
  """Trains configs/gpt_tiny.py (bf16) into workdir; quick: a narrower model for 2 steps.

  seq_len: train on rows of this length, with the batch cut to keep 16 x 128 tokens per step.
  """
  from mpxla.train.trainer import Trainer

  quick_overrides = {  # compile time dominates: fewer layers, dense attention in the model
      **H.schedule(2), "log_every": 2, "eval_every": 2, "eval_batches": 1, "data.batch_size": 8,
      "model": dict(n_layers=2, d_model=64, d_ff=128, attention_impl="dense_jax")}
  c = H.trainer_config("configs/gpt_tiny.py", {"progress": False, "plot": False},
                       quick_overrides if quick else {})
  if seq_len:
    c.data.batch_size = max(1, c.data.batch_size * c.data.seq_len // seq_len)
    c.data.seq_len = seq_len
  Trainer(c, workdir).run()


def load(workdir: pathlib.Path):
  """(config, model, variables, step) of the latest checkpoint, restored onto one device."""
  import jax

  trainer, step, state = H.restore(workdir, one_device=True)
  variables = {"params": state["params"], **state["model_state"]}
  return trainer.config, trainer.task.model, jax.device_get(variables), step


def documents(context: int, n: int, val_percent: int) -> list[tuple[str, np.ndarray]]:
  """The n largest validation files (ties by path) of at least `context` bytes, cut to context."""
  from mpxla.data import corpus

  files = [(p.stat().st_size, rel, p) for rel, p in corpus.stdlib_files()
           if corpus.is_validation(rel, val_percent)]
  files = sorted((f for f in files if f[0] >= context), key=lambda f: (-f[0], f[1]))[:n]
  if len(files) < n:
    raise ValueError(f"only {len(files)} validation files hold {context} bytes; lower --context "
                     f"or --docs")
  return [(rel, np.frombuffer(p.read_bytes()[:context], np.uint8).astype(np.int32))
          for _, rel, p in files]


def capture_qkv(model, variables, tokens_BxT, theta: float):
  """Per layer (q [B,T,H,E], k [B,T,K,E], v [B,T,K,E]) float32 after rotary, and NLL [B,T-1]."""
  import jax
  import jax.numpy as jnp
  import optax

  from mpxla.attention import rotary_embedding

  names = ("query", "key", "value")

  @jax.jit
  def fwd(variables, tokens):
    logits, inter = model.apply(variables, tokens, jnp.ones_like(tokens),
                                capture_intermediates=lambda m, _: m.name in names,
                                mutable=["intermediates"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return nll, inter["intermediates"]

  nll, inter = fwd(variables, jnp.asarray(tokens_BxT))
  pos = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  layers = []
  for i in range(len([k for k in inter if k.startswith("layer_")])):
    attn = inter[f"layer_{i}"]["attn"]
    try:
      q, k, v = (attn[n]["__call__"][0] for n in names)
    except KeyError as e:
      raise ValueError(f"could not capture {names} in layer {i}: the model's attention "
                       f"submodules are not named query/key/value") from e
    layers.append((np.asarray(rotary_embedding(q, pos, theta=theta), np.float32),
                   np.asarray(rotary_embedding(k, pos, theta=theta), np.float32), np.asarray(v, np.float32)))
  return layers, np.asarray(nll)


# ---------------------------------------------------------------------------------------------
# Analysis


def causal_probs(q_TxE, k_TxE):
  """float32 [T, T]: softmax_t(q . k_t / sqrt(d)) over the keys t <= q."""
  import jax
  import jax.numpy as jnp

  t = q_TxE.shape[0]
  s = (q_TxE @ k_TxE.T) * q_TxE.shape[-1] ** -0.5
  s = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1)


def _head(q_TxE, k_TxE, v_TxE):
  """(causal probs [T, T], dense output P v [T, E], mass each key receives [T])."""
  p = causal_probs(q_TxE, k_TxE)
  return p, p @ v_TxE, p.sum(0)


@functools.cache
def _jit_metrics():
  import jax

  return (jax.jit(_head), jax.jit(block_mass, static_argnums=(2, 3)),
          jax.jit(sparse_output_error, static_argnums=(4, 5)))


def _mean_tree(d):
  return {k: (_mean_tree(v) if isinstance(v, dict) else float(np.mean(v))) for k, v in d.items()}


@functools.cache
def _selector(block: int, segment: int, permute: bool, estimate: str, threshold: float):
  import jax

  from mpxla import attention as A

  @jax.jit
  def f(q, k, v):
    p = A.permute_kv(q, k, v, A.causal(), block_q=block, block_kv=block, threshold=threshold,
                     segment=segment, permute=permute, estimate=estimate)
    o = A.attention(q, p.k, p.v, mask=p.block_mask, impl="xla")
    return p.perm, p.block_mask.block_any(), o

  return f


def _pool_map(mass: np.ndarray) -> str:
  """A block-mass map for the plot: mean-pooled to at most MAP_SIDE per side, as base64 of
  uint8 codes round(-40 log10 mass) (1/40 decade steps, 255 for anything below 1e-6.4)."""
  f = max(1, mass.shape[0] // MAP_SIDE)
  n = mass.shape[0] // f
  pooled = mass[:n * f, :n * f].reshape(n, f, n, f).mean((1, 3))
  codes = np.clip(np.round(-40 * np.log10(np.maximum(pooled, 1e-30))), 0, 255).astype(np.uint8)
  return base64.b64encode(codes.tobytes()).decode()


def _unpool_map(text: str) -> np.ndarray:
  """log10 block mass [n, n] from `_pool_map`'s text."""
  codes = np.frombuffer(base64.b64decode(text), np.uint8)
  n = int(round(np.sqrt(codes.size)))
  return -codes.reshape(n, n).astype(np.float64) / 40


def analyse(layers, block: int, segments, recalls=RECALLS, estimates=("pooled", "tokens"),
            select_recalls=None) -> dict:
  """Per (layer, query head): block counts, output errors and permute_kv's own selections
  (at thresholds select_recalls, default recalls)."""
  select_recalls = tuple(recalls if select_recalls is None else select_recalls)
  import jax.numpy as jnp

  head_fn, mass_fn, err_fn = _jit_metrics()
  b, t, h, _ = layers[0][0].shape
  hk = layers[0][1].shape[2]
  g = h // hk
  ident = np.arange(t, dtype=np.int32)
  nq = t // block
  # Key blocks in a segment wholly before the query block's own (diagonal) segment.
  far = {s: (np.arange(nq)[None, :] * block) // s < (np.arange(nq)[:, None] * block) // s
         for s in segments}
  variants = ["none"] + [f"permute_kv s{s}" for s in segments] + [f"true-importance s{s}"
                                                                    for s in segments]
  selections = [("none", 0, False)] + [(f"permute_kv s{s}", s, True) for s in segments]
  heads, maps = [], {}
  for li, (q, k, v) in enumerate(layers):
    acc = {hd: {"blocks": {}, "far": {}, "error": {}, "select": {}} for hd in range(h)}
    for bi in range(b):
      qb, kb, vb = (jnp.asarray(x[bi:bi + 1]) for x in (q, k, v))
      vh = [jnp.asarray(v[bi, :, j]) for j in range(hk)]
      # What permute_kv selects from its own estimate, through mpxla.attention.attention.
      sel = {}
      for name, seg, permute in selections:
        for est in estimates:
          for r in select_recalls:
            f = _selector(block, seg or block, permute, est, r)
            sel[name, est, r] = tuple(np.asarray(x)[0] for x in f(qb, kb, vb))
      probs, dense, received = zip(*(
          head_fn(jnp.asarray(q[bi, :, hd]), jnp.asarray(k[bi, :, hd // g]), vh[hd // g])
          for hd in range(h)), strict=True)
      dense = np.stack([np.asarray(o) for o in dense], 1)
      for (name, est, r), (perm, listed, out) in sel.items():
        for hd in range(h):
          mass = np.asarray(mass_fn(probs[hd], jnp.asarray(perm[hd // g]), block, block))
          lst = listed[hd if listed.shape[0] > 1 else 0]
          err = np.linalg.norm(out[:, hd] - dense[:, hd]) / np.linalg.norm(dense[:, hd])
          rec = acc[hd]["select"].setdefault(f"{name}|{est}|{r}", {})
          rec.setdefault("blocks", []).append(int(lst.sum()))
          rec.setdefault("recall", []).append(float((mass * lst).sum(-1).mean()))
          rec.setdefault("error", []).append(float(err))
      # Block counts of the oracle selection under each key order.
      lib = {s: sel[f"permute_kv s{s}", estimates[0], select_recalls[0]][0] for s in segments}  # [Hk, T]
      true_imp = np.stack([sum(np.asarray(received[hd]) for hd in range(j * g, (j + 1) * g))
                           for j in range(hk)])  # [Hk, T]: the mass each key receives
      orc = {s: segment_sort(true_imp, s) for s in segments}
      for hd in range(h):
        j = hd // g
        p64 = np.asarray(probs[hd], np.float64)
        for r in recalls:
          acc[hd]["blocks"].setdefault(BOUND, {}).setdefault(str(r), []).append(
              int(any_permutation_blocks(p64, block, block, r).sum()))
        del p64
        perms = {"none": ident, **{f"permute_kv s{s}": lib[s][j] for s in segments},
                 **{f"true-importance s{s}": orc[s][j] for s in segments}}
        for name in variants:
          perm = jnp.asarray(perms[name])
          mass = np.asarray(mass_fn(probs[hd], perm, block, block), np.float64)
          if bi == 0 and name in ("none", f"permute_kv s{segments[-1]}"):
            maps.setdefault(name, {})[f"{li}/{hd}"] = _pool_map(mass)
          for r in recalls:
            counts = blocks_for_recall(mass, r)
            keep = keep_top(mass, counts)
            err = float(err_fn(probs[hd], vh[j], perm, jnp.asarray(keep), block, block))
            acc[hd]["blocks"].setdefault(name, {}).setdefault(str(r), []).append(
                int(counts.sum()))
            acc[hd]["error"].setdefault(name, {}).setdefault(str(r), []).append(err)
            for seg in segments if name == "none" else [int(name.rsplit(" s", 1)[1])]:
              key = f"none s{seg}" if name == "none" else name
              acc[hd]["far"].setdefault(key, {}).setdefault(str(r), []).append(
                  int((keep & far[seg]).sum()))
      del probs
    for hd in range(h):
      heads.append({"layer": li, "head": hd, "kv_head": hd // g, **_mean_tree(acc[hd])})
  return {"variants": variants + [BOUND], "selections": [s[0] for s in selections],
          "estimates": list(estimates), "select_recalls": list(select_recalls), "heads": heads,
          "maps": maps}


# ---------------------------------------------------------------------------------------------
# run / render / headline / main


def study(wd: pathlib.Path, source: str, context: int, docs: int, block: int, segments,
          estimates, select_recalls=None) -> dict:
  """Everything measured for one model: its description, the documents and the analysis."""
  config, model, variables, step = load(wd)
  docs_ = documents(context, docs, config.data.get("val_percent", 5))
  layers, nll = capture_qkv(model, variables, np.stack([d[1] for d in docs_]),
                            config.model.rope_theta)
  train_len = config.data.seq_len
  nq = context // block
  beyond = nll[:, train_len - 1:]
  return {
      "model": {"source": source, "workdir": H.show(wd), "step": step, "recipe": config.recipe,
                "train_seq_len": train_len, "n_layers": config.model.n_layers,
                "n_heads": config.model.n_heads, "n_kv_heads": config.model.n_kv_heads,
                "head_dim": config.model.d_model // config.model.n_heads},
      "context": context, "docs": [d[0] for d in docs_], "block": block,
      "segments": list(segments), "recalls": list(RECALLS), "causal_blocks": nq * (nq + 1) // 2,
      "nll": {"within_train_len": float(nll[:, :train_len - 1].mean()),
              "beyond_train_len": float(beyond.mean()) if beyond.size else None},
      **analyse(layers, block, segments, estimates=estimates, select_recalls=select_recalls),
  }


def run(out_dir: pathlib.Path, quick: bool = False, workdir: str | None = None,
        context: int | None = None, docs: int | None = None, block: int | None = None,
        segments=None, long_train_len: int | None = None, command: str | None = None) -> dict:
  """Runs the analysis and writes out_dir/results.json.

  The main study: the given workdir, else the parity section's bf16 seed-0 run, else
  configs/gpt_tiny.py trained into out_dir/runs/gpt_tiny (quick: a tiny model, runs/gpt_quick).
  long_train_len L > 0 adds a second study: the same config trained on L-token rows
  (out_dir/runs/gpt_tiny_L{L}, trained if missing), read at its training length.
  """
  out_dir, p, start = H.begin(NAME, quick, out_dir, context=context, docs=docs, block=block,
                              segments=segments, long_train_len=long_train_len)
  blk, segs = p["block"], tuple(p["segments"])
  for ctx in (p["context"], p["long_train_len"] or blk * max(segs)):
    if ctx % blk or any(s % blk or ctx % s for s in segs):
      raise ValueError(f"context {ctx} must be a multiple of --block={blk} and of every segment "
                       f"{segs}, and segments multiples of the block")
  parity = H.RESULTS / "parity" / "runs" / "bf16_s0"
  if workdir is not None:
    wd, source = pathlib.Path(workdir), "given with --workdir"
    if not _has_checkpoint(wd):
      raise FileNotFoundError(f"--workdir={wd}: no finished run there (config.json and a "
                              f"checkpoint of its last step)")
  elif not quick and _has_checkpoint(parity):
    wd, source = parity, "the parity section's bf16 seed-0 run"
  else:
    wd = out_dir / "runs" / ("gpt_quick" if quick else "gpt_tiny")
    source = ("trained here (quick: 2 narrow layers, 2 steps)" if quick
              else "configs/gpt_tiny.py trained here")
    if not _has_checkpoint(wd):
      print(f"training a model into {wd} ...", flush=True)
      train(wd, quick)
  studies = [study(wd, source, p["context"], p["docs"], blk, segs, p["estimates"],
                   p.get("select_recalls"))]
  if p["long_train_len"]:
    n = p["long_train_len"]
    wd = out_dir / "runs" / f"gpt_tiny_L{n}"
    if not _has_checkpoint(wd):
      print(f"training a model on {n}-token rows into {wd} ...", flush=True)
      train(wd, False, seq_len=n)
    studies.append(study(wd, f"configs/gpt_tiny.py trained here on {n}-token rows", n,
                         p["docs"], blk, segs, p["estimates"]))
  return H.save(out_dir, {"quick": quick, **studies[0], "extra": studies[1:], **H.metadata(
      start, command or "python experiments/permutation_real.py" + (" --quick" if quick else ""))},
                indent=None)


def _layer_mean(heads, layer, key, variant, r):
  return float(np.mean([hd[key][variant][str(r)] for hd in heads
                        if layer is None or hd["layer"] == layer]))


def _best(st, prefix, r=HEADLINE_RECALL):
  """(variant, ratio): the variant starting with prefix needing the fewest blocks at recall r."""
  base = _layer_mean(st["heads"], None, "blocks", "none", r)
  var = min((v for v in st["variants"] if v.startswith(prefix)),
            key=lambda v: _layer_mean(st["heads"], None, "blocks", v, r))
  return var, base / _layer_mean(st["heads"], None, "blocks", var, r)


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = H.load(out_dir)[1]
  out = {}
  for st in [res] + res.get("extra", []):
    r = HEADLINE_RECALL
    base = _layer_mean(st["heads"], None, "blocks", "none", r)
    var, ratio = _best(st, "permute_kv", r)
    label = (f"Blocks per head for {r:.0%} attention recall, real maps at T={st['context']} "
             f"(model trained on {st['model']['train_seq_len']}-token rows; goal 1.5x fewer)")
    bound = _layer_mean(st["heads"], None, "blocks", BOUND, r)
    out[label] = (f"{base:.0f} -> {base / ratio:.0f} with {var} ({ratio:.2f}x); any key order "
                  f">= {bound:.0f} ({base / bound:.2f}x at most)")
  return out


def _plots(st, out_dir: pathlib.Path, tag: str) -> list[str]:
  plt = H.pyplot()
  heads, variants = st["heads"], st["variants"]
  n_layers = max(hd["layer"] for hd in heads) + 1
  fig, axes = plt.subplots(1, len(st["recalls"]), figsize=(5 * len(st["recalls"]), 4.2),
                           squeeze=False)
  width = 0.8 / len(variants)
  for ax, r in zip(axes[0], st["recalls"], strict=True):
    for vi, var in enumerate(variants):
      ys = [_layer_mean(heads, li, "blocks", var, r) for li in range(n_layers)]
      ax.bar(np.arange(n_layers) + (vi - (len(variants) - 1) / 2) * width, ys, width, label=var)
    ax.axhline(st["causal_blocks"], color="k", lw=0.8, ls="--", label="all causal blocks")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("blocks per head (mean over heads)")
    ax.set_title(f"{r:.0%} recall, T={st['context']}, block {st['block']}", fontsize=9)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
  bars = f"permutation_blocks{tag}.png"
  H.save_figure(fig, out_dir / bars, dpi=80, rect=(0, 0.14, 1, 1))

  names = list(st["maps"])
  keys = list(st["maps"][names[0]])
  n_heads = max(int(key.split("/")[1]) for key in keys) + 1
  cols = n_heads * len(names)
  fig, axes = plt.subplots(n_layers, cols, figsize=(1.5 * cols, 1.6 * n_layers + 0.5),
                           squeeze=False)
  for li in range(n_layers):
    for hd in range(n_heads):
      for ni, name in enumerate(names):
        ax = axes[li][hd * len(names) + ni]
        ax.imshow(_unpool_map(st["maps"][name][f"{li}/{hd}"]), vmin=-4, vmax=0, cmap="magma")
        ax.set_xticks([])
        ax.set_yticks([])
        if li == 0:
          ax.set_title(f"H{hd}: {name}", fontsize=6)
        if hd == ni == 0:
          ax.set_ylabel(f"layer {li}", fontsize=8)
  fig.suptitle(f"log10 block mass, -4 (black) to 0 (white); rows: query blocks, columns: key "
               f"slots; {st['docs'][0]}, T={st['context']}", fontsize=9)
  maps = f"permutation_maps{tag}.png"
  H.save_figure(fig, out_dir / maps, dpi=80)
  return [bars, maps]


def _per_layer(n_layers: int, recalls, columns, cells) -> list[str]:
  """A table with a row per (layer, then all layers; recall): cells(layer or None, recall)."""
  return H.table(["layer", "recall", *columns], [
      ["**all**" if li is None else li, f"{r:.0%}", *cells(li, r)]
      for li in list(range(n_layers)) + [None] for r in recalls])


def _study_markdown(st, out_dir: pathlib.Path, tag: str) -> list[str]:
  """The tables and plots of one study."""
  heads, variants, m = st["heads"], st["variants"], st["model"]
  ordered = [v for v in variants if v != BOUND]  # the orders actually applied (with errors)
  n_layers = max(hd["layer"] for hd in heads) + 1
  bars, maps = _plots(st, out_dir, tag)
  ratio = st["context"] / m["train_seq_len"]
  where = (f"{ratio:.0f}x its training length: the model uses rotary embeddings, so it runs "
           f"at any length, but it never saw positions past {m['train_seq_len']}"
           if ratio > 1 else "its training length")
  nll = st["nll"]
  loss = (f"{nll['within_train_len']:.2f} nats/byte on positions < {m['train_seq_len']}, "
          f"{nll['beyond_train_len']:.2f} beyond" if nll["beyond_train_len"] is not None
          else f"{nll['within_train_len']:.2f} nats/byte")
  lines = [
      f"Model: {m['source']} (`{m['workdir']}`), step {m['step']}, recipe {m['recipe']}, "
      f"{m['n_layers']} layers, {m['n_heads']} query / {m['n_kv_heads']} kv heads of dim "
      f"{m['head_dim']}, trained on {m['train_seq_len']}-token rows. Attention maps at "
      f"**T = {st['context']}** ({where}), causal, on the {len(st['docs'])} largest validation "
      f"file(s) ({', '.join(st['docs'])}), the first {st['context']} bytes of each. The model's "
      f"loss there: {loss}. Blocks {st['block']} x {st['block']}: {st['context'] // st['block']} "
      f"query blocks, {st['causal_blocks']} non-empty causal blocks per head.",
      "",
      "Blocks needed (oracle selection), mean over heads; in brackets the reduction against no "
      "permutation:",
      "",
  ]
  def blocks(li, r):
    base = _layer_mean(heads, li, "blocks", "none", r)
    return [f"{v:.0f}" if var == "none" else f"{v:.0f} ({base / v:.2f}x)"
            for var in variants for v in [_layer_mean(heads, li, "blocks", var, r)]]

  lines += _per_layer(n_layers, st["recalls"], variants, blocks)
  lines += ["", "Where those blocks lie (all heads): in segments wholly before the query "
            "block's own segment (*earlier*, where a segment sort can gather heavy keys) or in "
            "the query block's own segment (*diagonal*, where permuted keys are only partly "
            "visible):", ""]
  def where(seg, r):
    for var, key in (("none", f"none s{seg}"), (f"permute_kv s{seg}",) * 2,
                     (f"true-importance s{seg}",) * 2):
      far_ = _layer_mean(heads, None, "far", key, r)
      yield from (f"{far_:.0f}", f"{_layer_mean(heads, None, 'blocks', var, r) - far_:.0f}")

  lines += H.table(["segment", "recall"] + [f"{v}: earlier" if i % 2 == 0 else "diagonal" for i, v in
                                             enumerate(("no permutation",) * 2 + ("permute_kv",) * 2
                                                       + ("true-importance",) * 2)],
                   [[seg, f"{r:.0%}", *where(seg, r)] for seg in st["segments"] for r in st["recalls"]])
  lines += ["", f"![blocks per layer]({bars})", "",
            "Output error of those selections (relative L2 against dense attention), mean over "
            "heads:", ""]
  lines += _per_layer(n_layers, st["recalls"], ordered, lambda li, r: [
      f"{_layer_mean(heads, li, 'error', var, r):.4f}" for var in ordered])
  lines += ["", "What `permute_kv` selects from its own estimate (threshold = target recall): "
            "blocks listed by the returned BlockMask, the true recall they hold, and the output "
            "error of `mpxla.attention.attention(q, p.k, p.v, mask=p.block_mask, impl='xla')` "
            "against dense attention; mean over all heads:", ""]
  def selected(name, r):
    for est in st["estimates"]:
      sel = [hd["select"][f"{name}|{est}|{r}"] for hd in heads]
      yield from (f"{np.mean([s[k] for s in sel]):{f}}"
                  for k, f in (("blocks", ".0f"), ("recall", ".3f"), ("error", ".4f")))

  lines += H.table(["keys", "threshold"] + [c for e in st["estimates"] for c in (
      f"{e} estimate: blocks", "recall", "error")], [
          [name, r, *selected(name, r)] for name in st["selections"]
          for r in st.get("select_recalls", st["recalls"])])
  r = HEADLINE_RECALL
  lines += ["", f"<details><summary>Blocks per head, {r:.0%} recall</summary>", ""] + H.table(
      ["layer", "head", *variants], [[hd["layer"], hd["head"]] + [
          f"{hd['blocks'][v][str(r)]:.0f}" for v in variants] for hd in heads])
  lines += ["", "</details>", "", f"![block-mass maps]({maps})", ""]
  return lines


def render(out_dir: pathlib.Path) -> str:
  """Markdown for docs/results.md from out_dir/results.json (writes the PNGs there)."""
  out_dir, res = H.load(out_dir)
  studies = [res] + res.get("extra", [])
  lines = [H.prose(NAME, "definitions", res["quick"]), ""]
  for i, st in enumerate(studies):
    m = st["model"]
    lines += [f"### {'Main: ' if i == 0 else 'Also: '}model trained on {m['train_seq_len']}-token "
              f"rows, T = {st['context']}", ""]
    lines += _study_markdown(st, out_dir, "" if i == 0 else f"_{i}")
  return "\n".join(lines + [H.prose(NAME, "reading"), "",
                            f"Command: `{res['command']}` ({res['wall_time_s']:.0f} s on "
                            f"{res['cpu_count']} shared CPUs, jax {res['jax_version']}, {res['date']})."])


def main(argv=None):
  args, command = H.cli(__doc__, NAME, argv, script="permutation_real.py", options=(
      ("--workdir", dict(help="a Trainer workdir of configs/gpt_tiny.py (default: the parity "
                         "section's bf16 seed-0 run, else one trained into OUT/runs/gpt_tiny)")),
      ("--context", dict(type=int, help="tokens (default 8192)")),
      ("--docs", dict(type=int, help="documents (default 2)")),
      ("--block", dict(type=int, help="block_q = block_kv (default 64)")),
      ("--segments", dict(type=H.ints, help="comma-separated permutation segment lengths")),
      ("--long-train-len", dict(type=int, help="also study the config trained on rows of this "
                                "length, read at it (default 2048; 0: skip)"))))
  run(args.out, quick=args.quick, workdir=args.workdir, context=args.context,
      docs=args.docs, block=args.block, segments=args.segments,
      long_train_len=args.long_train_len, command=command)
  print(f"$ {command}")
  print(render(args.out))


if __name__ == "__main__":
  main()

"""Token permutation on REAL attention maps of the trained GPT (settings and method:
configs/experiments/permutation.py).

    python experiments/permutation_real.py [--workdir DIR] [--context 8192] [--quick]
"""

from __future__ import annotations

import base64
import collections
import functools
import itertools
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
PARITY = H.RESULTS / "parity" / "runs" / "bf16_s0"


def block_mass(probs_TxS, perm_S, block_q: int, block_kv: int):
  """[nq, nk] mean over each query block of the attention mass of each key block; key block j
  holds the keys perm_S[j * block_kv : (j + 1) * block_kv] (T, S multiples of the blocks)."""
  t, s = probs_TxS.shape
  p = probs_TxS[:, perm_S].reshape(t // block_q, block_q, s // block_kv, block_kv)
  return p.sum((1, 3)) / block_q


def blocks_for_recall(mass_QxK: np.ndarray, recall: float) -> np.ndarray:
  """int [nq]: per row, the fewest blocks (largest mass first) holding recall * the row's mass."""
  mass = np.asarray(mass_QxK, np.float64)
  csum = np.cumsum(-np.sort(-mass, axis=-1), axis=-1)
  need = (csum < recall * csum[:, -1:] * (1 - 1e-12)).sum(-1) + 1
  return np.minimum(need, (mass > 0).sum(-1))


def any_permutation_blocks(probs_TxS, block_q: int, block_kv: int, recall: float) -> np.ndarray:
  """int [nq]: per query-block row, a lower bound on the blocks for `recall` under ANY key order
  (even one per row): ceil(n / block_kv), n the fewest keys holding `recall` of the row's mass."""
  p = np.asarray(probs_TxS, np.float64)
  keys = blocks_for_recall(p.reshape(p.shape[0] // block_q, block_q, -1).mean(1), recall)
  return -(-keys // block_kv)


def keep_top(mass_QxK: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """bool [nq, nk]: the counts[i] largest-mass blocks of each row i (stable ties)."""
  order = np.argsort(-np.asarray(mass_QxK, np.float64), axis=-1, kind="stable")
  return np.argsort(order, axis=-1) < np.asarray(counts)[:, None]  # the rank of each block


def sparse_output_error(probs_TxS, v_SxE, perm_S, keep_QxK, block_q: int, block_kv: int):
  """Relative L2 error vs P V of attention over the keys in the blocks kept for each query block
  (key t in the block of its slot, its index in perm_S), the kept probabilities renormalized."""
  import jax.numpy as jnp

  s = probs_TxS.shape[1]
  slot = jnp.zeros((s,), jnp.int32).at[perm_S].set(jnp.arange(s, dtype=jnp.int32))
  pm = jnp.where(jnp.repeat(keep_QxK[:, slot // block_kv], block_q, axis=0), probs_TxS, 0.0)
  dense = probs_TxS @ v_SxE
  sparse = (pm @ v_SxE) / jnp.maximum(pm.sum(-1, keepdims=True), 1e-30)
  return jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense)


def segment_sort(importance: np.ndarray, segment: int) -> np.ndarray:
  """int32 [.., S]: original positions sorted by importance (descending, stable) per segment."""
  from mpxla.attention import permute

  if np.shape(importance)[-1] % segment:
    raise ValueError(f"length {np.shape(importance)[-1]} must be a multiple of segment={segment}")
  return np.asarray(permute.segment_sort(importance, segment))


def causal_probs(q_TxE, k_TxE):
  """float32 [T, T]: softmax_t(q . k_t / sqrt(d)) over the keys t <= q."""
  import jax
  import jax.numpy as jnp

  s = (q_TxE @ k_TxE.T) * q_TxE.shape[-1] ** -0.5
  return jax.nn.softmax(jnp.where(jnp.tri(s.shape[0], dtype=bool), s, -jnp.inf), axis=-1)


@functools.cache
def _jit_metrics():
  """jitted: one head's (causal probs, P v, mass each key receives); block_mass; the error."""
  import jax

  def head(q_TxE, k_TxE, v_TxE):
    p = causal_probs(q_TxE, k_TxE)
    return p, p @ v_TxE, p.sum(0)

  return (jax.jit(head), jax.jit(block_mass, static_argnums=(2, 3)),
          jax.jit(sparse_output_error, static_argnums=(4, 5)))


@functools.cache
def _selector(block: int, segment: int, permute: bool, estimate: str, threshold: float):
  """jitted (q, k, v) -> (perm, blocks listed, output) of permute_kv and attention over its mask."""
  import jax

  from mpxla import attention as A

  def f(q, k, v):
    p = A.permute_kv(q, k, v, A.causal(), block_q=block, block_kv=block, threshold=threshold,
                     segment=segment, permute=permute, estimate=estimate)
    return p.perm, p.block_mask.block_any(), A.attention(q, p.k, p.v, mask=p.block_mask,
                                                         impl="xla")

  return jax.jit(f)


def _pool_map(mass: np.ndarray) -> str:
  """A block-mass map mean-pooled to at most MAP_SIDE per side, as base64 of uint8 codes
  round(-40 log10 mass) (1/40 decade steps, 255 for anything below 1e-6.4)."""
  f = max(1, mass.shape[0] // MAP_SIDE)
  n = mass.shape[0] // f
  pooled = mass[:n * f, :n * f].reshape(n, f, n, f).mean((1, 3))
  codes = np.clip(np.round(-40 * np.log10(np.maximum(pooled, 1e-30))), 0, 255).astype(np.uint8)
  return base64.b64encode(codes.tobytes()).decode()


def analyse(layers, block: int, segments, recalls=RECALLS, estimates=("pooled", "tokens"),
            select_recalls=None) -> dict:
  """Per (layer, query head) of layers [(q [B,T,H,E], k, v [B,T,K,E])], means over the B
  documents: oracle block counts, where they lie and their output errors under each key order,
  and permute_kv's own selections (at thresholds select_recalls, default recalls)."""
  import jax.numpy as jnp

  select_recalls = tuple(recalls if select_recalls is None else select_recalls)
  head_fn, mass_fn, err_fn = _jit_metrics()
  (b, t, h, _), hk = layers[0][0].shape, layers[0][1].shape[2]
  g, nq = h // hk, t // block
  # Key blocks in a segment wholly before the query block's own (diagonal) segment.
  far = {s: (np.arange(nq)[None, :] * block) // s < (np.arange(nq)[:, None] * block) // s
         for s in segments}
  selections = [("none", block, False)] + [(f"permute_kv s{s}", s, True) for s in segments]
  variants = [s[0] for s in selections] + [f"true-importance s{s}" for s in segments]
  acc, maps = collections.defaultdict(list), {}  # (layer, head, kind, variant, key): per doc
  for (li, (q, k, v)), bi in itertools.product(enumerate(layers), range(b)):
    qkv = [jnp.asarray(x[bi:bi + 1]) for x in (q, k, v)]
    kh, vh = ([jnp.asarray(x[bi, :, j]) for j in range(hk)] for x in (k, v))
    probs, dense, received = zip(*(head_fn(jnp.asarray(q[bi, :, hd]), kh[hd // g], vh[hd // g])
                                   for hd in range(h)), strict=True)
    dense = [np.asarray(o) for o in dense]
    # What permute_kv selects from its own estimate, through mpxla.attention.attention.
    perms = {}
    for (name, seg, permute), est, r in itertools.product(selections, estimates, select_recalls):
      perm, listed, out = (np.asarray(x)[0] for x in _selector(block, seg, permute, est, r)(*qkv))
      perms.setdefault(name, perm)
      for hd in range(h):
        mass = np.asarray(mass_fn(probs[hd], jnp.asarray(perm[hd // g]), block, block))
        lst = listed[hd if listed.shape[0] > 1 else 0]
        err = np.linalg.norm(out[:, hd] - dense[hd]) / np.linalg.norm(dense[hd])
        for key, value in (("blocks", int(lst.sum())),
                           ("recall", float((mass * lst).sum(-1).mean())), ("error", float(err))):
          acc[li, hd, "select", f"{name}|{est}|{r}", key].append(value)
    # Block counts of the oracle selection under each key order; true importance: the mass
    # each key receives from the query heads of its kv head.
    true_imp = np.stack([np.asarray(x) for x in received]).reshape(hk, g, t).sum(1)
    perms.update({f"true-importance s{s}": segment_sort(true_imp, s) for s in segments})
    for hd in range(h):
      for r in recalls:
        acc[li, hd, "blocks", BOUND, str(r)].append(
            int(any_permutation_blocks(probs[hd], block, block, r).sum()))
      for name in variants:
        perm = jnp.asarray(perms[name][hd // g])
        mass = np.asarray(mass_fn(probs[hd], perm, block, block), np.float64)
        if bi == 0 and name in ("none", f"permute_kv s{segments[-1]}"):
          maps.setdefault(name, {})[f"{li}/{hd}"] = _pool_map(mass)
        for r in recalls:
          counts = blocks_for_recall(mass, r)
          keep = keep_top(mass, counts)
          acc[li, hd, "blocks", name, str(r)].append(int(counts.sum()))
          acc[li, hd, "error", name, str(r)].append(float(
              err_fn(probs[hd], vh[hd // g], perm, jnp.asarray(keep), block, block)))
          for seg in segments if name == "none" else [int(name.rsplit(" s", 1)[1])]:
            acc[li, hd, "far", f"none s{seg}" if name == "none" else name, str(r)].append(
                int((keep & far[seg]).sum()))
    del probs

  heads = {}  # the means over the documents, nested per head: kind -> variant -> key
  for (li, hd, kind, var, key), values in acc.items():
    head = heads.setdefault((li, hd), {"layer": li, "head": hd, "kv_head": hd // g,
                                       "blocks": {}, "far": {}, "error": {}, "select": {}})
    head[kind].setdefault(var, {})[key] = float(np.mean(values))
  return {"variants": variants + [BOUND], "selections": [s[0] for s in selections],
          "estimates": list(estimates), "select_recalls": list(select_recalls),
          "heads": list(heads.values()), "maps": maps}


def _has_checkpoint(wd: pathlib.Path) -> bool:
  """A finished run: config.json and a checkpoint of the config's last step."""
  cfg = wd / "config.json"
  return cfg.is_file() and (
      wd / "checkpoints" / str(json.loads(cfg.read_text())["total_steps"])).is_dir()


def train(workdir: pathlib.Path, quick: bool, seq_len: int | None = None) -> None:
  """Trains configs/gpt_tiny.py (bf16) into workdir unless finished there; quick: a narrower
  model for 2 steps; seq_len: rows of this length, the batch cut to keep 16 x 128 tokens."""
  from mpxla.train.trainer import Trainer

  if _has_checkpoint(workdir):
    return
  print(f"training a model into {workdir} ...", flush=True)
  quick_overrides = {  # compile time dominates: fewer layers, dense attention in the model
      **H.schedule(2), "log_every": 2, "eval_every": 2, "eval_batches": 1, "data.batch_size": 8,
      "model": dict(n_layers=2, d_model=64, d_ff=128, attention_impl="dense_jax")}
  c = H.trainer_config("configs/gpt_tiny.py", {"progress": False, "plot": False},
                       quick_overrides if quick else {})
  if seq_len:
    c.data.batch_size = max(1, c.data.batch_size * c.data.seq_len // seq_len)
    c.data.seq_len = seq_len
  Trainer(c, workdir).run()


def study(wd: pathlib.Path, source: str, context: int, p: dict) -> dict:
  """Everything measured for one model on the p["docs"] largest validation files (ties by
  path) cut to `context` bytes: the model, the documents, its loss on them and the analysis."""
  import jax
  import jax.numpy as jnp
  import optax

  from mpxla.attention import rotary_embedding
  from mpxla.data import corpus

  trainer, step, state = H.restore(wd, one_device=True)
  c, m, names = trainer.config, trainer.config.model, ("query", "key", "value")
  files = sorted(((f.stat().st_size, rel, f) for rel, f in corpus.stdlib_files()
                  if corpus.is_validation(rel, c.data.get("val_percent", 5))
                  and f.stat().st_size >= context), key=lambda x: (-x[0], x[1]))[:p["docs"]]
  if len(files) < p["docs"]:
    raise ValueError(f"only {len(files)} validation files hold {context} bytes; lower --context")
  tokens = jnp.asarray(np.stack([np.frombuffer(f.read_bytes()[:context], np.uint8)
                                 .astype(np.int32) for *_, f in files]))

  @jax.jit
  def forward(variables, tokens):  # NLL [B, T-1] and every attention's q, k, v
    logits, inter = trainer.task.model.apply(
        variables, tokens, jnp.ones_like(tokens), mutable=["intermediates"],
        capture_intermediates=lambda mod, _: mod.name in names)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return nll, inter["intermediates"]

  nll, inter = forward(jax.device_get({"params": state["params"], **state["model_state"]}),
                       tokens)
  pos, nll, layers = jnp.broadcast_to(jnp.arange(context), tokens.shape), np.asarray(nll), []
  for i in range(m.n_layers):  # float32 q, k after rotary, v
    q, k, v = (inter[f"layer_{i}"]["attn"][n]["__call__"][0] for n in names)
    q, k = (rotary_embedding(x, pos, theta=m.rope_theta) for x in (q, k))
    layers.append(tuple(np.asarray(x, np.float32) for x in (q, k, v)))
  train_len, nq = c.data.seq_len, context // p["block"]
  beyond = nll[:, train_len - 1:]
  return {
      "model": {"source": source, "workdir": H.show(wd), "step": step, "recipe": c.recipe,
                "train_seq_len": train_len, "n_layers": m.n_layers, "n_heads": m.n_heads,
                "n_kv_heads": m.n_kv_heads, "head_dim": m.d_model // m.n_heads},
      "context": context, "docs": [f[1] for f in files], "block": p["block"],
      "segments": p["segments"], "recalls": list(RECALLS), "causal_blocks": nq * (nq + 1) // 2,
      "nll": {"within_train_len": float(nll[:, :train_len - 1].mean()),
              "beyond_train_len": float(beyond.mean()) if beyond.size else None},
      **analyse(layers, p["block"], tuple(p["segments"]), estimates=p["estimates"],
                select_recalls=p["select_recalls"]),
  }


def run(out_dir: pathlib.Path, quick: bool, command: str, workdir: str | None = None,
        context: int | None = None) -> dict:
  """Runs the studies (see configs/experiments/permutation.py) and writes out_dir/results.json:
  the model of `workdir`, else the parity section's bf16 seed-0 run, else one trained here."""
  out_dir, p, start = H.begin(NAME, quick, out_dir, context=context)
  n = p["long_train_len"]
  if any(p["context"] % s for s in (p["block"], *p["segments"])):
    raise ValueError(f"--context={p['context']} must be a multiple of the block {p['block']} "
                     f"and of every segment {p['segments']}")
  if workdir is not None:
    wd, source = pathlib.Path(workdir), "given with --workdir"
  elif not quick and _has_checkpoint(PARITY):
    wd, source = PARITY, "the parity section's bf16 seed-0 run"
  else:
    wd = out_dir / "runs" / ("gpt_quick" if quick else "gpt_tiny")
    source = ("trained here (quick: 2 narrow layers, 2 steps)" if quick
              else "configs/gpt_tiny.py trained here")
    train(wd, quick)
  studies = [study(wd, source, p["context"], p)]
  if n:
    train(out_dir / "runs" / f"gpt_tiny_L{n}", False, seq_len=n)
    studies.append(study(out_dir / "runs" / f"gpt_tiny_L{n}",
                         f"configs/gpt_tiny.py trained here on {n}-token rows", n, p))
  return H.save(out_dir, {"quick": quick, **studies[0], "extra": studies[1:],
                          **H.metadata(start, command)}, indent=None)


def _layer_mean(heads, layer, key, variant, r):
  return float(np.mean([hd[key][variant][str(r)] for hd in heads
                        if layer is None or hd["layer"] == layer]))


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res, r, out = H.load(out_dir)[1], HEADLINE_RECALL, {}
  for st in [res] + res.get("extra", []):
    blocks = {v: _layer_mean(st["heads"], None, "blocks", v, r) for v in st["variants"]}
    base = blocks["none"]
    var = min((v for v in blocks if v.startswith("permute_kv")), key=blocks.get)
    ratio = base / blocks[var]
    label = (f"Blocks per head for {r:.0%} attention recall, real maps at T={st['context']} "
             f"(model trained on {st['model']['train_seq_len']}-token rows; goal 1.5x fewer)")
    out[label] = (f"{base:.0f} -> {base / ratio:.0f} with {var} ({ratio:.2f}x); any key order "
                  f">= {blocks[BOUND]:.0f} ({base / blocks[BOUND]:.2f}x at most)")
  return out


def _plots(st, out_dir: pathlib.Path, tag: str) -> list[str]:
  """Writes the bar chart of blocks per layer and the block-mass maps; their file names."""
  plt = H.pyplot()
  heads, variants, recalls = st["heads"], st["variants"], st["recalls"]
  n_layers, n_heads = st["model"]["n_layers"], st["model"]["n_heads"]
  fig, axes = plt.subplots(1, len(recalls), figsize=(5 * len(recalls), 4.2), squeeze=False)
  width = 0.8 / len(variants)
  for ax, r in zip(axes[0], recalls, strict=True):
    for vi, var in enumerate(variants):
      ys = [_layer_mean(heads, li, "blocks", var, r) for li in range(n_layers)]
      ax.bar(np.arange(n_layers) + (vi - (len(variants) - 1) / 2) * width, ys, width, label=var)
    ax.axhline(st["causal_blocks"], color="k", lw=0.8, ls="--", label="all causal blocks")
    ax.set(xticks=range(n_layers), xlabel="layer", ylabel="blocks per head (mean over heads)")
    ax.set_title(f"{r:.0%} recall, T={st['context']}, block {st['block']}", fontsize=9)
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
  H.save_figure(fig, out_dir / f"permutation_blocks{tag}.png", dpi=80, rect=(0, 0.14, 1, 1))

  names = list(st["maps"])  # each stored map: log10 mass = -(its uint8 codes) / 40
  cols = n_heads * len(names)
  fig, axes = plt.subplots(n_layers, cols, figsize=(1.5 * cols, 1.6 * n_layers + 0.5),
                           squeeze=False)
  for ax, (li, hd, (ni, name)) in zip(axes.flat, itertools.product(
      range(n_layers), range(n_heads), enumerate(names)), strict=True):
    codes = np.frombuffer(base64.b64decode(st["maps"][name][f"{li}/{hd}"]), np.uint8)
    side = int(round(np.sqrt(codes.size)))
    ax.imshow(-codes.reshape(side, side).astype(np.float64) / 40, vmin=-4, vmax=0, cmap="magma")
    ax.set(xticks=[], yticks=[])
    if li == 0:
      ax.set_title(f"H{hd}: {name}", fontsize=6)
    if hd == ni == 0:
      ax.set_ylabel(f"layer {li}", fontsize=8)
  fig.suptitle(f"log10 block mass, -4 (black) to 0 (white); rows: query blocks, columns: key "
               f"slots; {st['docs'][0]}, T={st['context']}", fontsize=9)
  H.save_figure(fig, out_dir / f"permutation_maps{tag}.png", dpi=80)
  return [f"permutation_blocks{tag}.png", f"permutation_maps{tag}.png"]


def _study_markdown(st, out_dir: pathlib.Path, tag: str) -> list[str]:
  """The tables and plots of one study."""
  heads, variants, m, recalls = st["heads"], st["variants"], st["model"], st["recalls"]
  ordered = [v for v in variants if v != BOUND]  # the orders actually applied (with errors)
  mean = functools.partial(_layer_mean, heads)
  bars, maps = _plots(st, out_dir, tag)
  ratio = st["context"] / m["train_seq_len"]
  where = (f"{ratio:.0f}x its training length: the model uses rotary embeddings, so it runs "
           f"at any length, but it never saw positions past {m['train_seq_len']}"
           if ratio > 1 else "its training length")
  nll = st["nll"]
  loss = f"{nll['within_train_len']:.2f} nats/byte"
  if nll["beyond_train_len"] is not None:
    loss += f" on positions < {m['train_seq_len']}, {nll['beyond_train_len']:.2f} beyond"

  def per_layer(columns, cells):  # a row per (layer, then all layers; recall)
    return H.table(["layer", "recall", *columns], [
        ["**all**" if li is None else li, f"{r:.0%}", *cells(li, r)]
        for li in [*range(m["n_layers"]), None] for r in recalls])

  def blocks(li, r):
    return [f"{v:.0f}" if var == "none" else f"{v:.0f} ({mean(li, 'blocks', 'none', r) / v:.2f}x)"
            for var in variants for v in [mean(li, "blocks", var, r)]]

  def split(seg, r):  # blocks in earlier segments, then in the diagonal one, per key order
    for var in ("none", f"permute_kv s{seg}", f"true-importance s{seg}"):
      far = mean(None, "far", f"none s{seg}" if var == "none" else var, r)
      yield from (f"{far:.0f}", f"{mean(None, 'blocks', var, r) - far:.0f}")

  def selected(name, r):
    for est in st["estimates"]:
      sel = [hd["select"][f"{name}|{est}|{r}"] for hd in heads]
      yield from (f"{np.mean([s[k] for s in sel]):{f}}"
                  for k, f in (("blocks", ".0f"), ("recall", ".3f"), ("error", ".4f")))

  return [
      f"Model: {m['source']} (`{m['workdir']}`), step {m['step']}, recipe {m['recipe']}, "
      f"{m['n_layers']} layers, {m['n_heads']} query / {m['n_kv_heads']} kv heads of dim "
      f"{m['head_dim']}, trained on {m['train_seq_len']}-token rows. Attention maps at "
      f"**T = {st['context']}** ({where}), causal, on the {len(st['docs'])} largest validation "
      f"file(s) ({', '.join(st['docs'])}), the first {st['context']} bytes of each. The model's "
      f"loss there: {loss}. Blocks {st['block']} x {st['block']}: {st['context'] // st['block']} "
      f"query blocks, {st['causal_blocks']} non-empty causal blocks per head.", "",
      "Blocks needed (oracle selection), mean over heads; in brackets the reduction against no "
      "permutation:", "", *per_layer(variants, blocks), "",
      H.prose(NAME, "where"), "",
      *H.table(["segment", "recall"] + [c for v in ("no permutation", "permute_kv",
                                                     "true-importance")
                                        for c in (f"{v}: earlier", "diagonal")],
               [[seg, f"{r:.0%}", *split(seg, r)] for seg in st["segments"] for r in recalls]),
      "", f"![blocks per layer]({bars})", "",
      "Output error of those selections (relative L2 against dense attention), mean over "
      "heads:", "",
      *per_layer(ordered, lambda li, r: [f"{mean(li, 'error', var, r):.4f}" for var in ordered]),
      "", H.prose(NAME, "selects"), "",
      *H.table(["keys", "threshold"] + [c for e in st["estimates"] for c in (
          f"{e} estimate: blocks", "recall", "error")],
               [[name, r, *selected(name, r)] for name in st["selections"]
                for r in st["select_recalls"]]),
      "", f"<details><summary>Blocks per head, {HEADLINE_RECALL:.0%} recall</summary>", "",
      *H.table(["layer", "head", *variants], [[hd["layer"], hd["head"]] + [
          f"{hd['blocks'][v][str(HEADLINE_RECALL)]:.0f}" for v in variants] for hd in heads]),
      "", "</details>", "", f"![block-mass maps]({maps})", ""]


def render(out_dir: pathlib.Path) -> str:
  """Markdown for docs/results.md from out_dir/results.json (writes the PNGs there)."""
  out_dir, res = H.load(out_dir)
  lines = [H.prose(NAME, "definitions", res["quick"]), ""]
  for i, st in enumerate([res] + res.get("extra", [])):
    lines += [f"### {'Main: ' if i == 0 else 'Also: '}model trained on "
              f"{st['model']['train_seq_len']}-token rows, T = {st['context']}", "",
              *_study_markdown(st, out_dir, "" if i == 0 else f"_{i}")]
  return "\n".join(lines + [H.prose(NAME, "reading"), "",
                            f"Command: `{res['command']}` ({res['wall_time_s']:.0f} s on "
                            f"{res['cpu_count']} shared CPUs, jax {res['jax_version']}, "
                            f"{res['date']})."])


def main(argv=None):
  args, command = H.cli(__doc__, NAME, argv, script="permutation_real.py", options=(
      ("--workdir", dict(help="a Trainer workdir of configs/gpt_tiny.py (default: the parity "
                         "section's bf16 seed-0 run, else one trained into OUT/runs/gpt_tiny)")),
      ("--context", dict(type=int, help="tokens (default 8192)"))))
  run(args.out, args.quick, command, args.workdir, args.context)
  print(f"$ {command}")
  print(render(args.out))


if __name__ == "__main__":
  main()

"""Global-batch vs micro-batch load balancing of a small MoE GPT on 8 simulated CPU devices
(settings and method: configs/experiments/moe_balance.py).

    python experiments/moe_balance.py [--out DIR] [--steps 400] [--seeds 0,1,2]
        [--scopes micro_batch,global] [--quick]
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import string

import harness as H
import numpy as np

NAME = "moe_balance"
TITLE = "4. Global vs micro-batch load balancing (MoE GPT, 8 devices)"
CONFIG = "configs/gpt_tiny.py"
SCOPES = ("micro_batch", "global")
COLORS = {"micro_batch": "tab:blue", "global": "tab:red"}
DEVICES = 8
MIN_DOMAIN_SHARE = 0.04  # a top-level package with >= 4% of the validation bytes is a domain
BYTE_CLASSES = ("space", "letter", "digit", "punct", "other")
QUICK = H.settings(NAME, quick=True)
# The per-layer statistics that aggregate() summarizes over seeds: paths into analyse()'s record.
LAYER_STATS = {"mi_domain": ("domain", "mutual_information"),
               "h_expert_given_domain": ("domain", "h_expert_given"),
               "h_expert": ("domain", "h_expert"),
               "mi_byte_class": ("byte_class", "mutual_information"),
               "lbl_global": ("lbl_global",), "lbl_micro_batch": ("lbl_micro_batch",),
               "max_load_over_mean": ("max_load_over_mean",)}


def top_level(rel_path: str) -> str:
  """The top-level stdlib package of a file ('<modules>' for a top-level module)."""
  return rel_path.split("/", 1)[0] if "/" in rel_path else "<modules>"


def validation_layout(val_percent: int, root=None) -> dict:
  """The validation documents in packing order: paths, end offsets, domain per document."""
  from mpxla.data import corpus

  docs = [(r, p) for r, p in corpus.stdlib_files(root) if corpus.is_validation(r, val_percent)]
  lengths = np.array([p.stat().st_size for _, p in docs], np.int64)
  tops = [top_level(rel) for rel, _ in docs]
  share = {t: int(lengths[[x == t for x in tops]].sum()) for t in dict.fromkeys(tops)}
  total = int(lengths.sum())
  kept = sorted((t for t in share if share[t] >= MIN_DOMAIN_SHARE * total), key=lambda t: -share[t])
  domains = kept + ["other"]
  doc_domain = np.array([domains.index(t) if t in kept else len(kept) for t in tops], np.int64)
  byte_share = np.bincount(doc_domain, weights=lengths, minlength=len(domains)) / total
  return {"paths": [p for _, p in docs], "rel": [r for r, _ in docs], "ends": np.cumsum(lengths),
          "domains": domains, "doc_domain": doc_domain,
          "byte_share": dict(zip(domains, byte_share.tolist(), strict=True))}


def _positions(rows: np.ndarray, width: int) -> np.ndarray:
  """Offsets in the packed validation split of every token of the rows `rows` ([R, width])."""
  return rows[:, None].astype(np.int64) * width + np.arange(width)[None, :]


def token_domains(layout: dict, rows: np.ndarray, width: int) -> np.ndarray:
  """Domain id of every token of the packed validation rows `rows` ([R, width])."""
  doc = np.searchsorted(layout["ends"], _positions(rows, width), side="right")
  return layout["doc_domain"][doc]


def packed_bytes(layout: dict, rows: np.ndarray, width: int) -> np.ndarray:
  """The bytes of the packed validation rows, rebuilt from the files (to check the labels)."""
  data = np.frombuffer(b"".join(p.read_bytes() for p in layout["paths"]), np.uint8)
  return data[_positions(rows, width)].astype(np.int32)


def byte_class(tokens: np.ndarray) -> np.ndarray:
  """0 space/tab/newline, 1 letter or '_', 2 digit, 3 other printable ASCII, 4 anything else."""
  t = np.asarray(tokens)
  cls = np.where((t >= 33) & (t < 127), 3, 4)
  for label, chars in ((2, string.digits), (1, string.ascii_letters + "_"), (0, " \t\n\r")):
    cls[np.isin(t, [ord(c) for c in chars])] = label
  return cls


def slot_counts(idx_NxK: np.ndarray, labels_N: np.ndarray, n_labels: int, num_experts: int):
  """c[l, e]: (token, slot) pairs with label l routed to expert e, int64 [n_labels, E]."""
  lab = np.repeat(np.asarray(labels_N, np.int64), idx_NxK.shape[1])
  flat = np.bincount(lab * num_experts + idx_NxK.reshape(-1), minlength=n_labels * num_experts)
  return flat.reshape(n_labels, num_experts)


def entropy_bits(p: np.ndarray) -> np.ndarray:
  """-sum p log2 p over the last axis (0 log 0 = 0)."""
  p = np.asarray(p, np.float64)
  return np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def routing_information(counts_LxE: np.ndarray) -> dict:
  """Shares per label, H(E | l), H(E) and I(E; L) = H(E) - sum_l p(l) H(E | l), in bits."""
  c = np.asarray(counts_LxE, np.float64)
  per_label = c.sum(1, keepdims=True)
  shares = np.divide(c, per_label, out=np.zeros_like(c), where=per_label > 0)
  h_given = entropy_bits(shares)
  p_label = per_label[:, 0] / per_label.sum()
  h_expert = float(entropy_bits(c.sum(0) / c.sum()))
  h_cond = float(np.sum(p_label * h_given))
  return {"shares": shares.tolist(), "entropy_given": h_given.tolist(),
          "label_share": p_label.tolist(), "h_expert": h_expert, "h_expert_given": h_cond,
          "mutual_information": max(h_expert - h_cond, 0.0)}


def lbl_numpy(probs_NxE: np.ndarray, indices_NxK: np.ndarray, groups: int = 1) -> float:
  """Mean over `groups` consecutive chunks of N_E * sum_i f_i P_i (float64)."""
  p, idx = np.asarray(probs_NxE, np.float64), np.asarray(indices_NxK)
  e = p.shape[1]
  vals = [e * float(np.sum(np.bincount(i.reshape(-1), minlength=e) / i.size * q.mean(0)))
          for q, i in zip(np.split(p, groups), np.split(idx, groups), strict=True)]
  return float(np.mean(vals))


def make_config(scope: str, seed: int, s: dict):
  """configs/gpt_tiny.py (bf16) as the MoE GPT of this section, LBL scope `scope`."""
  return H.trainer_config(CONFIG, H.schedule(s["steps"]), {
      "model": dict(s["model"], moe_lbl_scope=scope, moe_axis_name=["data", "fsdp", "expert"]),
      "seed": seed, "eval_every": s["eval_every"], "eval_batches": s["eval_batches"],
      "log_every": min(10, s["steps"]), "data.seq_len": s["seq_len"],
      "data.batch_size": s["batch_size"]})


def forward_with_routing(trainer, state, tokens: np.ndarray, segs: np.ndarray, batch: int):
  """Per-target cross-entropy [R, T] and per MoE layer (indices [R, T, k], probs [R, T, E])."""
  import jax
  import optax
  from flax import traverse_util

  from mpxla import parallel
  from mpxla.nn.moe import TopKRouter

  def fwd(params, model_state, tok, seg):
    logits, inter = trainer.task.model.apply(
        {"params": params, **model_state}, tok[:, :-1], seg[:, :-1], mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: isinstance(mdl, TopKRouter)
        and method == "__call__")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:])
    flat = traverse_util.flatten_dict(inter["intermediates"])  # router: (weights, idx, probs)
    return ce, {"/".join(k[:-2]): v[0][1:] for k, v in flat.items()
                if k[-2:] == ("router", "__call__")}

  shard = parallel.batch_sharding(trainer.mesh)
  step = jax.jit(fwd, in_shardings=(trainer.state_shardings["params"],
                                    trainer.state_shardings["model_state"], shard, shard))
  with jax.set_mesh(trainer.mesh):  # the MoE's micro_batch LBL reads the device shards
    outs = [jax.device_get(step(state["params"], state["model_state"], tokens[i:i + batch],
                                segs[i:i + batch])) for i in range(0, len(tokens), batch)]
  return jax.tree.map(lambda *x: np.concatenate(x), *outs)


def eval_sample(config, n_rows: int) -> dict:
  """Evenly spaced validation rows with tokens, segment ids, target weights and labels."""
  from mpxla.data import make_source

  source = make_source(config.data, "validation")
  width = config.data.seq_len + 1
  rows = np.unique(np.linspace(0, len(source) - 1, n_rows).round().astype(np.int64))
  if len(rows) != n_rows:
    raise ValueError(f"the validation split has {len(source)} rows, fewer than {n_rows}.")
  recs = [source[int(r)] for r in rows]
  tokens, segs = (np.stack([x[k] for x in recs]).astype(np.int32)
                  for k in ("tokens", "segment_ids"))
  layout = validation_layout(config.data.get("val_percent", 5))
  if not np.array_equal(packed_bytes(layout, rows, width), tokens):
    raise RuntimeError("the cached validation rows do not match the stdlib files; the domain "
                       "labels would be wrong (delete the corpus cache and rerun).")
  return {"rows": rows, "tokens": tokens, "segs": segs,
          "domain": token_domains(layout, rows, width)[:, :-1],
          "weight": (segs[:, :-1] == segs[:, 1:]) & (segs[:, 1:] > 0),  # LMTask's target weights
          "byte_class": byte_class(tokens[:, :-1]), "layout": layout}


def analyse(ce: np.ndarray, routes: dict, sample: dict, num_experts: int, micro_rows: int) -> dict:
  """Validation loss per domain and routing statistics per MoE layer of one trained model."""
  domains, d = sample["layout"]["domains"], sample["domain"]
  w = sample["weight"].astype(np.float64)
  valid = (sample["segs"][:, :-1] > 0).reshape(-1)
  out = {"val_loss": float((ce * w).sum() / w.sum()),
         "val_loss_per_domain": {name: float((ce * w)[d == i].sum() / max(w[d == i].sum(), 1.0))
                                 for i, name in enumerate(domains)},
         "tokens": int(valid.sum()), "layers": {}}
  for layer, (idx, probs) in routes.items():
    n_rows, k = idx.shape[0], idx.shape[-1]
    idx_f = idx.reshape(-1, k)[valid]
    dom, byt = (routing_information(slot_counts(idx_f, labels.reshape(-1)[valid], n, num_experts))
                for labels, n in ((d, len(domains)), (sample["byte_class"], len(BYTE_CLASSES))))
    load = np.bincount(idx_f.reshape(-1), minlength=num_experts) / idx_f.size
    mix = np.random.default_rng(0).permutation(n_rows)  # micro-batches of random rows, as trained
    out["layers"][layer] = {
        "domain": dom, "byte_class": byt, "expert_load": load.tolist(),
        "max_load_over_mean": float(load.max() * num_experts),
        "lbl_global": lbl_numpy(probs.reshape(-1, num_experts), idx.reshape(-1, k)),
        "lbl_micro_batch": lbl_numpy(probs[mix].reshape(-1, num_experts),
                                     idx[mix].reshape(-1, k), groups=n_rows // micro_rows)}
  return out


def train_and_analyse(seed: int, scope: str, s: dict, sample: dict, runs_dir) -> dict:
  """One Trainer run (fresh workdir), then the routing analysis of its final checkpoint."""
  from mpxla.train import monitor
  from mpxla.train.trainer import Trainer

  workdir = runs_dir / f"{scope}_s{seed}"
  shutil.rmtree(workdir, ignore_errors=True)
  start = H.clock()
  trainer = Trainer(make_config(scope, seed, s), workdir)
  summary = trainer.run()
  ce, routes = forward_with_routing(trainer, H.restore(workdir, trainer)[2], sample["tokens"],
                                    sample["segs"], s["eval_batch"])
  stats = analyse(ce, routes, sample, s["model"]["num_experts"], s["batch_size"] // DEVICES)
  records = monitor.read_metrics(workdir)
  end = H.clock()
  return {"scope": scope, "seed": seed,
          "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
          "train": [(r["step"], r["loss"]) for r in records if "loss" in r],
          "trainer_final_val_loss": summary["final_val_loss"],
          "final_train_loss": summary["final_train_loss"], "eval": stats,
          "wall_s": round(end[0] - start[0], 1), "cpu_s": round(end[1] - start[1], 1)}


def aggregate(runs: list[dict]) -> dict:
  """Per scope, mean/std over seeds of the losses and the per-layer routing statistics."""
  def stats(sel, *path):
    return H.stats([functools.reduce(lambda x, key: x[key], path, r) for r in sel])

  table = {}
  for scope in SCOPES:
    sel = [r for r in runs if r["scope"] == scope]
    if not sel:
      continue
    ev = sel[0]["eval"]
    table[scope] = {
        "val_loss": stats(sel, "eval", "val_loss"),
        "trainer_val_loss": stats(sel, "trainer_final_val_loss"),
        "train_loss": stats(sel, "final_train_loss"),
        "val_loss_per_domain": {d: stats(sel, "eval", "val_loss_per_domain", d)
                                for d in ev["val_loss_per_domain"]},
        "layers": {ly: {k: stats(sel, "eval", "layers", ly, *p) for k, p in LAYER_STATS.items()}
                   for ly in sorted(ev["layers"])}}
  return table


def run(out_dir, quick: bool = False, *, steps: int | None = None, seeds=None, scopes=SCOPES,
        command: str | None = None) -> dict:
  """Trains the LBL `scopes` for every seed, analyses the routing, writes out_dir/results.json."""
  H.check_choice("scopes", scopes, SCOPES)
  out_dir, s, start = H.begin(NAME, quick, out_dir, DEVICES, steps=steps, seeds=seeds)
  config = make_config("global", 0, s)  # (micro_batch needs the mesh to init the parameters)
  sample = eval_sample(config, s["eval_rows"])

  def describe(r):
    mis = ", ".join(f"{x['domain']['mutual_information']:.3f}"
                    for x in r["eval"]["layers"].values())
    return (f"{r['scope']:11s} seed {r['seed']}: val {r['eval']['val_loss']:.4f} I(E;D) {mis} "
            f"bits ({r['cpu_s']} CPU s)")

  train = functools.partial(train_and_analyse, s=s, sample=sample, runs_dir=out_dir / "runs")
  runs = H.sweep(train, NAME, describe, seed=s["seeds"], scope=scopes)
  layout = sample["layout"]
  counts = np.bincount(sample["domain"].reshape(-1), minlength=len(layout["domains"]))
  sizes = [({getattr(k, "key", "") for k in p}, x.size) for p, x in H.param_leaves(config)]
  total = sum(n for _, n in sizes)
  experts = sum(n for keys, n in sizes if "moe" in keys and "router" not in keys)
  return H.save(out_dir, {
      "name": NAME, "quick": quick, "config": CONFIG, "scopes": list(scopes), "settings": s,
      "devices": DEVICES, "micro_batch_rows": s["batch_size"] // DEVICES,
      "aux_loss_weight": float(config.aux_loss_weight),
      "domains": layout["domains"], "domain_byte_share": layout["byte_share"],
      "domain_sample_tokens": {d: int(n) for d, n in zip(layout["domains"], counts, strict=True)},
      "min_domain_share": MIN_DOMAIN_SHARE, "byte_classes": list(BYTE_CLASSES),
      "validation_docs": len(layout["rel"]), "sample_rows": len(sample["rows"]),
      "params": {"total": int(total), "experts": int(experts), "active": int(
          total - experts + experts * s["model"]["moe_top_k"] // s["model"]["num_experts"])},
      "runs": runs, "table": aggregate(runs),
      **H.metadata(start, command or f"python experiments/moe_balance.py --out {out_dir}"
                   + (" --quick" if quick else ""))})


def plot(res: dict, out_dir) -> None:
  """moe_balance_loss.png: validation loss per scope, and global - micro_batch per step paired
  by seed; moe_balance_shares.png: expert share per domain (first run's seed) per (scope, layer)."""
  fig, (ax, ax2) = H.pyplot().subplots(1, 2, figsize=(11, 4))
  for scope in res["scopes"]:
    sel = [r for r in res["runs"] if r["scope"] == scope]
    H.band(ax, np.array([x[0] for x in sel[0]["val"]]), [[x[1] for x in r["val"]] for r in sel],
           COLORS[scope], f"{scope} ({len(sel)} seeds)", marker="o", ms=3)
  H.style(ax, "step", "validation loss (nats/byte)",
          "trainer's validation batches (mean, band min..max)")
  by = {(r["seed"], r["scope"]): r for r in res["runs"]}
  curves = (("train", "gray", "training loss (EMA 0.8)"), ("val", "black", "validation loss"))
  if any(sc not in res["scopes"] for sc in SCOPES):
    curves = ()
    ax2.text(0.5, 0.5, "needs both scopes", ha="center", transform=ax2.transAxes)
  for kind, color, label in curves:  # global - micro_batch per step, per seed
    d = np.subtract(*([[x[1] for x in by[seed, sc][kind]] for seed in res["settings"]["seeds"]]
                      for sc in ("global", "micro_batch")))
    if kind == "train":  # per-batch losses are noisy: smooth each seed's difference
      for j in range(1, d.shape[1]):
        d[:, j] = 0.8 * d[:, j - 1] + 0.2 * d[:, j]
    H.band(ax2, np.array([x[0] for x in res["runs"][0][kind]]), d, color, label,
           marker="o" if kind == "val" else None, ms=3)
  ax2.axhline(0.0, color="tab:red", lw=0.8)
  H.style(ax2, "step", "global - micro_batch (nats/byte)",
          "global - micro_batch, paired by seed (band min..max)")
  H.save_figure(fig, out_dir / "moe_balance_loss.png", dpi=90)

  seed, layers = res["runs"][0]["seed"], sorted(res["runs"][0]["eval"]["layers"])
  e, n_dom, n_sc = res["settings"]["model"]["num_experts"], len(res["domains"]), len(res["scopes"])
  fig, axes = H.pyplot().subplots(len(layers), n_sc, squeeze=False,
                                  figsize=(4.6 * n_sc, 0.45 * n_dom * len(layers) + 1.2))
  for j, scope in enumerate(res["scopes"]):
    for i, layer in enumerate(layers):
      ax, st = axes[i, j], by[seed, scope]["eval"]["layers"][layer]["domain"]
      im = ax.imshow(np.array(st["shares"]), vmin=0, vmax=min(1.0, 4.0 / e), cmap="viridis",
                     aspect="auto")
      ax.set_yticks(range(n_dom), res["domains"], fontsize=8)
      ax.set_xticks(range(e), [str(x) for x in range(e)], fontsize=8)
      ax.set_xlabel("expert")
      ax.set_title(f"{scope}, {layer}: I(E;D) = {st['mutual_information']:.3f} bits", fontsize=9)
      fig.colorbar(im, ax=ax, fraction=0.04)
  fig.suptitle(f"share of each domain's routed slots per expert (seed {seed})", fontsize=10)
  H.save_figure(fig, out_dir / "moe_balance_shares.png", dpi=90)


def render(out_dir: pathlib.Path) -> str:
  """The section's markdown (and its two plots) from out_dir/results.json."""
  out_dir, res = H.load(out_dir)
  plot(res, out_dir)
  s, t, scopes = res["settings"], res["table"], res["scopes"]
  e, layers = s["model"]["num_experts"], sorted(res["runs"][0]["eval"]["layers"])
  run = {(x["seed"], x["scope"]): x["eval"] for x in res["runs"]}
  lines = H.command_block(res, f"{res['cpu_time_s'] / 60:.1f} CPU-min, "
                          f"{res['wall_time_s'] / 60:.1f} min wall on {res['cpu_count']} shared "
                          "CPU cores") + [
      H.prose(NAME, "setup", res["quick"]), "", "![loss curves](moe_balance_loss.png)", "",
      f"Mean ± std over {len(s['seeds'])} seed(s) (ddof=1). Information in bits; H(E|D) is the "
      f"token-weighted mean of the per-domain routing entropies (max log2 {e} = "
      f"{np.log2(e):.0f}); LBL measured on the evaluation sample over all of it (global) and "
      f"over groups of {res['micro_batch_rows']} rows (micro-batch), 1.0 = perfectly balanced:",
      ""]
  cols = ("I(E;D)", "H(E\\|D)", "I(E;byte class)", "LBL global / micro")
  lines += H.table(
      ["LBL scope", "val loss (sample)", "val loss (trainer)", "train loss"]
      + [f"{ly}: {c}" for ly in layers for c in cols],
      [[f"`{sc}`"] + [H.pm(t[sc][k]) for k in ("val_loss", "trainer_val_loss", "train_loss")]
       + [c for x in (t[sc]["layers"][ly] for ly in layers) for c in (
           H.pm(x["mi_domain"]), H.pm(x["h_expert_given_domain"], ".3f"),
           H.pm(x["mi_byte_class"], ".3f"),
           f"{x['lbl_global']['mean']:.3f} / {x['lbl_micro_batch']['mean']:.3f}")]
       for sc in scopes])
  lines += ["", "Per seed (validation loss on the sample; I(E;D) per MoE layer):", ""]
  lines += H.table(["seed"] + [f"`{sc}`" for sc in scopes], [[seed] + [
      f"{run[seed, sc]['val_loss']:.4f}; " + ", ".join(
          f"{run[seed, sc]['layers'][ly]['domain']['mutual_information']:.3f}" for ly in layers)
      for sc in scopes] for seed in s["seeds"]])
  lines += ["", "Validation loss per domain (mean over seeds):", ""]
  lines += H.table(["domain", "byte share of validation"] + [f"`{sc}`" for sc in scopes], [
      [f"`{d}`", f"{res['domain_byte_share'][d]:.1%}"]
      + [f"{t[sc]['val_loss_per_domain'][d]['mean']:.4f}" for sc in scopes]
      for d in res["domains"]])
  seed0, last = res["runs"][0]["seed"], layers[-1]
  lines += ["", f"Expert share per domain, {last}, seed {seed0} (each row sums to 1; uniform = "
            f"{1 / e:.3f}; last column: the routing entropy H(E|d) in bits):", ""]
  for scope in scopes:
    st = run[seed0, scope]["layers"][last]["domain"]
    lines += [f"`{scope}`:", ""] + H.table(
        ["domain"] + [f"e{i}" for i in range(e)] + ["H(E\\|d)"],
        [[f"`{d}`"] + [f"{v:.3f}" for v in row] + [f"{h:.3f}"] for d, row, h in zip(
            res["domains"], st["shares"], st["entropy_given"], strict=True)]) + [""]
  lines += ["![expert shares per domain](moe_balance_shares.png)", ""]
  if all(x in t for x in SCOPES):
    lines.append(H.prose(NAME, "reading"))
  return "\n".join(lines) + "\n"


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Header figures for docs/results.md: validation loss and expert-domain information by scope."""
  table = H.load(out_dir)[1]["table"]
  loss = " vs ".join(f"{table[s]['val_loss']['mean']:.4f}" for s in SCOPES)
  mi = "; ".join(f"{name.split('/')[0]}: " + " -> ".join(
      f"{table[s]['layers'][name]['mi_domain']['mean']:.4f}" for s in SCOPES)
                 for name in sorted(table["global"]["layers"]))
  return {"Validation loss, micro-batch vs global load balancing (mean of seeds)": loss,
          "I(expert; domain) in bits, micro-batch -> global": mi}


def main(argv: list[str] | None = None) -> None:
  args, command = H.cli(__doc__, NAME, argv, devices=DEVICES, options=(
      ("--steps", dict(type=int, help="steps per run (400)")),
      ("--seeds", dict(type=H.ints, help="comma-separated seeds (0,1,2)")),
      ("--scopes", dict(type=H.strs, default=SCOPES, help="comma-separated LBL scopes"))))
  run(args.out, args.quick, steps=args.steps, seeds=args.seeds, scopes=args.scopes,
      command=command)
  print(render(args.out))


if __name__ == "__main__":
  main()

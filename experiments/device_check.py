"""One device check: what the CPU cannot measure, in seven timed sections (docs/device.md).

  PYTHONPATH=. python experiments/device_check.py [--dry-run] [--out DIR]

Sections, each with its own budget in seconds (skipped with a message once spent; the whole
run stays under 8 minutes on one H100/H200). Writes DIR/<device>.json and DIR/<device>.md
(default DIR: experiments/results/device). --dry-run: every section at miniature sizes on
CPU. Runs from a source checkout with the machine's own JAX (0.10 or 0.11) and no other
package than the library imports: jax + jaxlib (+ its CUDA/TPU plugin), numpy, ml_dtypes,
optax, flax, ml_collections (pure Python: bring as wheels if missing); pytest only for
section 2 (skipped without it). On a TPU, attention times 'pallas_tpu' (Mosaic), cuDNN fails
(noted) and the optimizer uses the 'pallas_tpu' layout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGET = dict(environment=15, tests=120, fp8_gemm=60, attention=90, optimizer=60, training=120,
              moe=50)
TOTAL, DRY_BUDGET = 460.0, 8.0  # --dry-run: every section starts, its later parts may skip


def timed(f, *args, iters=5):
  """Median seconds of f(*args) after one warm-up call (compilation excluded)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[iters // 2]


def environment(dry, out, spent):
  import jax
  import jaxlib  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  stats = d.memory_stats() or {}
  out.update(device=d.device_kind, platform=d.platform, n_devices=jax.device_count(),
             jax=jax.__version__, jaxlib=jaxlib.__version__, python=sys.version.split()[0],
             platform_version=getattr(d.client, "platform_version", None),
             memory_bytes=stats.get("bytes_limit"))


def tests(dry, out, spent):
  tests_ = ["tests/optim/test_optim_fused.py", "tests/attention/test_attention_pallas.py"]
  select = "lowers_to_triton" if dry else "on_device"
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select,
         *(tests_[:1] if dry else tests_)]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                     timeout=BUDGET["tests"] - 5, env={**os.environ, "PYTHONPATH": str(ROOT)})
  out.update(command=" ".join(cmd[1:]), returncode=r.returncode,
             summary=(r.stdout.strip().splitlines() or [""])[-1])


def fp8_gemm(dry, out, spent):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp

  from mpxla.nn.fp8_dot import fp8_dot_general  # pylint: disable=import-outside-toplevel
  n = 256 if dry else 8192
  x = jnp.ones((n, n), jnp.bfloat16) * 0.01
  dims = (((1,), (0,)), ((), ()))
  fp8 = jax.jit(jax.grad(lambda a, b: fp8_dot_general(a, b, dims).astype(jnp.float32).sum(),
                         (0, 1)))
  bf16 = jax.jit(jax.grad(lambda a, b: jax.lax.dot_general(a, b, dims).astype(jnp.float32)
                          .sum(), (0, 1)))
  hlo = fp8.lower(x, x).compile().as_text()
  gemms = [ln for ln in hlo.splitlines() if ("custom-call" in ln and "matmul" in ln)
           or " dot(" in ln]
  out.update(gemms=len(gemms), fp8_gemms=sum("f8e" in ln.split("=", 1)[-1] for ln in gemms),
             n=n, fwd_bwd_fp8_s=timed(fp8, x, x), fwd_bwd_bf16_s=timed(bf16, x, x))
  out["speedup"] = out["fwd_bwd_bf16_s"] / out["fwd_bwd_fp8_s"]  # 8-bit GEMMs: fp8_gemms >= 3


def attention(dry, out, spent):
  import jax
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import mpxla.attention as A  # pylint: disable=import-outside-toplevel
  s, h, d = (128, 2, 32) if dry else (8192, 16, 128)
  kernel = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"
  q = jax.random.normal(jax.random.key(0), (1, s, h, d), jnp.bfloat16)
  w = 64 if dry else 512
  masks = {"causal": (A.causal(), dict(is_causal=True)), f"window{w}": (
      A.causal() & A.sliding_window(w, 0), dict(is_causal=True, local_window_size=(w - 1, 0)))}
  for name, (mask, nn_kw) in masks.items():
    impls = {kernel: lambda q, k, v, m=mask: A.attention(q, k, v, mask=m, impl=kernel,
                                                         interpret=dry)}
    for impl in ("cudnn", "xla"):
      impls[impl] = lambda q, k, v, i=impl, kw=nn_kw: jax.nn.dot_product_attention(
          q, k, v, implementation=i, **kw)
    for impl, f in impls.items():
      if spent():
        out[f"{name}/{impl}"] = "skipped: budget spent"
        continue
      loss = lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum()  # noqa: E731
      try:
        out[f"{name}/{impl}"] = dict(
            fwd_s=timed(jax.jit(f), q, q, q, iters=3),
            fwd_bwd_s=timed(jax.jit(jax.grad(loss, (0, 1, 2))), q, q, q, iters=3))
      except Exception as e:  # pylint: disable=broad-except
        out[f"{name}/{impl}"] = f"failed: {type(e).__name__}: {str(e)[:160]}"


def optimizer(dry, out, spent):
  import jax
  import jax.numpy as jnp
  import optax  # pylint: disable=import-outside-toplevel

  import mpxla.optim as mo  # pylint: disable=import-outside-toplevel
  rows, leaves = (512, 2) if dry else (8192, 16)  # 16 x 8192 x 8192 = 1.07e9 parameters
  params = {f"w{i}": jnp.full((rows, rows), 0.01, jnp.float32) for i in range(leaves)}
  n = rows * rows * leaves
  layout = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"
  opts = {"optax.adamw": optax.adamw(1e-3, weight_decay=0.1),
          "adamw_fp8 (fused)": mo.adamw_fp8(1e-3, weight_decay=0.1, impl=layout, interpret=dry)}
  bytes_per_param = {"optax.adamw": 28.0, "adamw_fp8 (fused)": 16.0 + 10.0 / 128}
  big = jnp.ones((n // 4,), jnp.float32)
  out["copy_GBps"] = 2 * big.nbytes / timed(jax.jit(lambda a: a * 1.0), big) / 1e9
  for name, opt in opts.items():
    if spent():
      out[name] = "skipped: budget spent"
      continue
    step = jax.jit(lambda g, s, p, opt=opt: opt.update(g, s, p), donate_argnums=1)
    state = opt.init(params)
    state = jax.block_until_ready(step(params, state, params)[1])
    t = time.perf_counter()
    for _ in range(3):
      state = step(params, state, params)[1]
    jax.block_until_ready(state)
    sec = (time.perf_counter() - t) / 3
    out[name] = dict(update_s=sec, params=n, GBps=bytes_per_param[name] * n / sec / 1e9)
    del state


def training(dry, out, spent):
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(ROOT / "configs"))
  import llama_memory  # pylint: disable=import-outside-toplevel

  from mpxla.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  steps = 1 if dry else 30
  for recipe in ("bf16", "coat", "coat_sr"):
    if spent():
      out[recipe] = "skipped: budget spent"
      continue
    c = llama_memory.get_config("tiny" if dry else "125m")
    c.recipe, c.mesh.fsdp, c.data.batch_size = recipe, 1, 2 if dry else 4
    tr = Trainer(c, "/tmp/mpxla-device-check", name=f"device_check:{recipe}")
    compiled = tr.compile_train_step()
    ma = compiled.memory_analysis()
    predicted = None if ma is None else int(ma.argument_size_in_bytes + ma.temp_size_in_bytes
                                            + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    state, zeros = tr.init_state(), lambda s: jax.numpy.zeros(s.shape, s.dtype)
    dummy = jax.tree.map(zeros, tr.task.dummy_batch(tr.batch_size))
    batch = tr._global(dummy)  # pylint: disable=protected-access
    state, _ = jax.block_until_ready(compiled(state, batch))
    t = time.perf_counter()
    for _ in range(steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    sec = (time.perf_counter() - t) / steps
    stats = jax.devices()[0].memory_stats() or {}
    out[recipe] = dict(step_s=sec, tokens_per_s=tr.batch_size * c.data.seq_len / sec,
                       peak_bytes=stats.get("peak_bytes_in_use"), aot_predicted_bytes=predicted)
    del state, compiled, tr


def moe(dry, out, spent):
  """The sparse MoE layer (E = 64, top 2, one dispatch group), forward + backward in BF16:
  compiled GFLOPs and seconds of each grouped matmul against a dense SwiGLU MLP with the active
  parameters. XLA:CPU runs 'ragged_dot' as a dense dot over all E groups (docs/nn.md), and
  XLA:GPU's default rewrites it the same way; 'ragged_dot_pallas' sets JAX's
  `jax_ragged_dot_use_gpu_pallas_triton_lowering` (a Triton grouped matmul, where the JAX
  has it); 'pallas_gpu' is mpxla's own Triton grouped matmul (no per-block weight copies)."""
  import jax
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mpxla.nn.moe import MoE  # pylint: disable=import-outside-toplevel
  t, d, f, e = (512, 64, 128, 8) if dry else (16384, 1024, 2048, 64)
  x, r = jnp.ones((t, d), jnp.bfloat16), jnp.ones((t, d), jnp.bfloat16)
  out.update(tokens=t, d=d, d_ff=f, experts=e)

  def step(name):  # (jitted gradient of sum(y * r), its parameters)
    if name == "mlp":
      p = {k: jnp.full(s, 0.01, jnp.bfloat16) for k, s in
           dict(gate=(d, 2 * f), up=(d, 2 * f), down=(2 * f, d)).items()}
      y = lambda p, x: (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]  # noqa: E731
    else:
      model = MoE(num_experts=e, d_ff=f, top_k=2, dtype=jnp.bfloat16,
                  grouped_matmul=name.removesuffix("_pallas"))
      p = model.init(jax.random.key(0), x)["params"]
      y = lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])[0]  # noqa: E731
    return jax.jit(jax.grad(lambda p, x: jnp.sum(y(p, x) * r).astype(jnp.float32), (0, 1))), p

  pallas = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
  for name in ("mlp", "ragged_dot", "pallas_gpu", "ragged_dot_pallas", "blocks"):
    if spent():
      out[name] = "skipped: budget spent"
      continue
    try:
      jax.config.update(pallas, name == "ragged_dot_pallas")
      fn, params = step(name)
      cost = fn.lower(params, x).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out[name] = dict(gflops=(cost or {}).get("flops", 0.0) / 1e9, seconds=timed(fn, params, x))
    except Exception as err:  # pylint: disable=broad-except
      out[name] = f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
      jax.config.update(pallas, False)


SECTIONS = dict(environment=environment, tests=tests, fp8_gemm=fp8_gemm, attention=attention,
                optimizer=optimizer, training=training, moe=moe)


def markdown(res) -> str:
  cell = lambda r: "; ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"  # noqa: E731
                             for k, v in r.items()).replace("|", "/")
  return "\n".join([f"# Device check: {res['environment'].get('device')}", "",
                    "| section | result |", "|---|---|"]
                   + [f"| {name} | {cell(res.get(name, {}))} |" for name in SECTIONS]) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry-run", action="store_true", help="miniature sizes on CPU")
  p.add_argument("--out", default=str(ROOT / "experiments/results/device"))
  args = p.parse_args(argv)
  if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"
  start, res = time.perf_counter(), {}
  for name, fn in SECTIONS.items():
    res[name], t0 = {}, time.perf_counter()
    budget = DRY_BUDGET if args.dry_run and name != "tests" else BUDGET[name]
    try:
      if time.perf_counter() - start > TOTAL:
        res[name]["skipped"] = "the whole run's budget is spent"
      else:
        fn(args.dry_run, res[name], lambda t0=t0, b=budget: time.perf_counter() - t0 > b)
    except Exception as e:  # pylint: disable=broad-except
      res[name]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res[name]["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {json.dumps(res[name], default=str)}", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = str(res["environment"].get("device", "unknown")).replace(" ", "_").replace("/", "_")
  (out / f"{device}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
  (out / f"{device}.md").write_text(markdown(res))
  print(markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())

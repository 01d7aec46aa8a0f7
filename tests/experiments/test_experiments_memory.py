"""experiments/memory.py: the AOT memory breakdown."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import memory  # noqa: E402  (imports no JAX: the CLI sets XLA_FLAGS first)

from mpxla.train import config as config_lib  # noqa: E402


def _tiny_shapes():
  """Parameter shapes of the tiny Llama config, written out from its hyperparameters."""
  m = config_lib.load(f"{memory.CONFIG}:tiny").model
  d, h, f, v = m.d_model, m.n_heads, m.d_ff, m.vocab_size
  e = d // h
  layer = [(d, h, e), (d, m.n_kv_heads, e), (d, m.n_kv_heads, e), (h, e, d),  # q, k, v, out
           (d, f), (d, f), (f, d), (d,), (d,)]  # gate, up, down, attention and MLP norms
  return [(v, d), (d, v), (d,)] + layer * m.n_layers  # embed, lm_head, final norm


def _shard_bytes(shape, devices=8, itemsize=4):
  """FSDP: leaves of >= 1024 elements with an axis divisible by 8 are split 8 ways."""
  n = math.prod(shape)
  split = n >= 1024 and any(s % devices == 0 for s in shape)
  return itemsize * (n // devices if split else n)


@pytest.mark.slow  # ~20 s: a subprocess compiling a tiny 8-device coat step
def test_json_cli_tiny_coat():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "experiments/memory.py", f"--config={memory.CONFIG}:tiny", "--recipe=coat",
       "--json", "--explain"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout)  # exactly one JSON object on stdout
  for key in memory.KEYS:
    assert isinstance(r[key], int) and r[key] > 0, key
  shapes = _tiny_shapes()
  assert r["n_params"] == sum(math.prod(s) for s in shapes)
  params = sum(_shard_bytes(s) for s in shapes)
  assert r["params"] == params
  assert r["grads"] == params  # float32 gradients, sharded like the parameters
  # AdamW's float32 mu and nu would take 2 x params; adamw_fp8 keeps ~1 byte per moment.
  assert r["optimizer"] < 0.35 * 2 * params
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1} and r["devices"] == 8
  assert r["batch_per_device"] == 2 and r["batch_global"] == 16 and r["seq_len"] == 256
  # The columns add up to the peak; the rest is the batch (tokens, segment ids) and metrics.
  assert r["peak"] == (r["step_arguments"] + r["step_outputs"] + r["step_temp"]
                       - r["step_aliased"])
  assert r["peak"] == sum(r[k] for k in ("params", "grads", "optimizer", "activations",
                                         "model_state", "other"))
  batch_bytes = 2 * r["batch_per_device"] * (r["seq_len"] + 1) * 4
  assert batch_bytes <= r["other"] < 2**20
  assert r["peak"] >= r["params"] + r["optimizer"] + r["grads"]
  # The loss needs the float32 logits of the device's tokens at least once.
  assert r["activations"] >= r["batch_per_device"] * r["seq_len"] * 32000 * 4
  comp = r["peak_composition"]
  assert comp["live_bytes"] == sum(comp["by_category"].values())
  assert comp["live_bytes"] <= r["step_arguments"] + r["step_temp"]
  assert comp["by_category"]["forward"] > 0 and comp["by_category"]["backward"] > 0
  assert 0 < comp["by_category"]["arguments"] <= r["step_arguments"]


def _exact_largest(peak, budget):
  b = 0
  while peak(b + 1) <= budget:
    b += 1
  return b


@pytest.mark.parametrize("fixed", [None, 3e9])
def test_largest_batch_affine(fixed):
  peak = lambda b: int(3e9 + 7.3e9 * b)  # noqa: E731
  calls = []
  r = memory.largest_batch(lambda b: calls.append(b) or peak(b), 80e9, {4: peak(4)}, fixed)
  assert r["largest_batch"] == _exact_largest(peak, 80e9) == 10
  assert r["verified"] and r["peak_at_largest"] == peak(10)
  assert r["compiles"] == len(calls) <= 3  # the second point, then at most two to verify
  assert r["predicted"] in (10, None)  # the line through any two points is exact here


@pytest.mark.parametrize("start", [1, 5, 12, 40])
def test_largest_batch_convex_from_any_start(start):
  peak = lambda b: int(1e9 + 5e9 * b + 0.4e9 * b * b)  # noqa: E731  (not affine)
  r = memory.largest_batch(peak, 80e9, {start: peak(start)})
  assert r["largest_batch"] == _exact_largest(peak, 80e9)
  assert r["verified"] and r["compiles"] <= 6


def test_largest_batch_nothing_fits():
  r = memory.largest_batch(lambda b: int(100e9 + b), 80e9, {4: int(100e9 + 4)})
  assert r["largest_batch"] == 0 and r["verified"] and r["peak_at_largest"] is None


def test_parse_and_resolve_mesh():
  assert memory.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
  assert memory.parse_mesh("data=2,fsdp=4")["data"] == 2
  assert memory.resolve_mesh({"data": -1, "fsdp": 2, "tensor": 1}) == {"data": 4, "fsdp": 2,
                                                                       "tensor": 1}
  for bad in ("fsdp", "fsdp=-1", "model=8"):
    with pytest.raises(ValueError, match="--mesh"):
      memory.parse_mesh(bad)


def _row(size, recipe, peak, opt, act):
  return {"size": size, "recipe": recipe, "n_params": 1_027_680_256, "seq_len": 2048,
          "batch_per_device": 4, "devices": 8, "params": 514_000_000, "grads": 514_000_000,
          "optimizer": opt, "activations": act, "model_state": 0, "other": 70_000, "peak": peak}


def test_render_from_results(tmp_path):
  rows = [_row("1b", "bf16", 47_100_000_000, 1_028_000_000, 45_000_000_000),
          _row("1b", "fp8_linear", 40_000_000_000, 1_028_000_000, 38_000_000_000),
          _row("1b", "coat", 29_400_000_000, 267_000_000, 28_000_000_000),
          _row("1b", "hif8", 29_000_000_000, 267_000_000, 27_500_000_000)]
  searches = [{"size": "1b", "recipe": "bf16", "budget": 80e9, "largest_batch": 6,
               "peak_at_largest": 70e9, "predicted": 6, "compiles": 2, "verified": True,
               "points": {"4": 47_100_000_000, "6": 70e9, "7": 81e9}},
              {"size": "1b", "recipe": "coat", "budget": 80e9, "largest_batch": 13,
               "peak_at_largest": 79e9, "predicted": 13, "compiles": 2, "verified": True,
               "points": {"4": 29_400_000_000, "13": 79e9, "14": 84e9}}]
  res = {"command": "python experiments/memory.py", "wall_s": 600, "cpu_s": 1200, "compiles": 20,
         "cpu_count": 2, "jax_version": "0", "date": "2026-01-01T00:00:00", "table_batch": 4,
         "rows": rows, "searches": searches}
  (tmp_path / "results.json").write_text(json.dumps(res))
  md = memory.render(tmp_path)
  assert "| 1b (1,028M) | `bf16` | 0.51 | 0.51 | 1.03 | 45.00 | 47.10 | 1.00x |" in md
  assert f"| `coat` | 0.51 | 0.51 | 0.27 | 28.00 | 29.40 | {47.1 / 29.4:.2f}x |" in md
  assert f"| 1b | `coat` | 13 | 79.00 | 13 | 2 | {13 / 6:.2f}x |" in md
  assert f"**{47.1 / 29.4:.2f}x** (met)" in md and f"**{13 / 6:.2f}x** (met)" in md
  for png in ("breakdown.png", "batch_search.png"):
    assert f"]({png})" in md and (tmp_path / png).stat().st_size > 1000
  head = memory.headline(tmp_path)
  assert any(v == f"47.1 -> 29.4 GB ({47.1 / 29.4:.2f}x)" for v in head.values())
  assert any(v == f"6 -> 13 ({13 / 6:.2f}x)" for v in head.values())


def test_coat_sr_static_bytes_tiny(tmp_path):
  """coat_sr stores BF16 parameters (so BF16 gradients) and no float32 copy: 4 static bytes per
  parameter fewer than coat, within the 6.2 goal. From the abstract state (nothing compiled)."""
  import jax
  import jax.numpy as jnp

  from mpxla.train.trainer import Trainer

  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  static = {}
  for recipe in ("coat", "coat_sr"):
    config = memory.load_config(f"{memory.CONFIG}:tiny", recipe)[0]
    state = Trainer(config, tmp_path).abstract_state()
    params = jax.tree.leaves(state["params"])
    # params + gradients (a cotangent has its primal's dtype) + optimizer states
    static[recipe] = (2 * nbytes(params) + nbytes(state["opt_state"])) / sum(p.size for p in params)
    assert all(p.dtype == (jnp.bfloat16 if recipe == "coat_sr" else jnp.float32) for p in params)
  assert static["coat_sr"] < static["coat"] - 3.9 and static["coat_sr"] <= 6.2, static

"""Numerics demo: each 8-bit format's range and precision, and quantization error per granularity.

Command: python experiments/numerics.py
Hardware: any CPU, a few seconds.
Expected: log2(max/min subnormal) is 17.8 for E4M3, 31.8 for E5M2, 37 for HiF8. On rows whose
scales spread over ~13 binades, 1x16 groups beat per-tensor scaling for every format, most of
all for HiF8, whose tapered precision penalizes rows far below the scale target (docs/formats.md).
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mpxla import formats, quant


def format_table() -> str:
  rows = ["| format | storage | max | min normal | min subnormal | log2(max/min sub) | mantissa bits | inf |",
          "|---|---|---|---|---|---|---|---|"]
  for f in (formats.E4M3, formats.E5M2, formats.HIF8):
    binades = math.log2(f.max / f.min_subnormal)
    mbits = "3 / 2 / 1 (tapered)" if f.name == "hif8" else str(f.mantissa_bits)
    rows.append(
        f"| {f.name} | {f.storage_dtype} | {f.max:g} | 2^{math.log2(f.min_normal):.0f} | "
        f"2^{math.log2(f.min_subnormal):.0f} | {binades:.1f} | {mbits} | {'yes' if f.has_inf else 'no'} |")
  return "\n".join(rows)


def error_table(shape=(256, 1024)) -> str:
  """Row-relative RMS error of quantize -> dequantize, averaged over rows."""
  k1, k2 = jax.random.split(jax.random.key(0))
  # Gaussian rows whose scales vary lognormally (sigma 1.5), like activations with outlier rows.
  x = jax.random.normal(k1, shape) * jnp.exp(1.5 * jax.random.normal(k2, (shape[0], 1)))
  grans = ["tensor", "1x128", "1x16", "128x128"]
  rows = ["| format | " + " | ".join(grans) + " |", "|---|" + "---|" * len(grans)]
  for fmt in ("e4m3", "e5m2", "hif8"):
    cells = []
    for g in grans:
      y = quant.dequantize(quant.quantize(x, fmt, g))
      rel = float(jnp.mean(jnp.sqrt(jnp.mean((y - x) ** 2, 1) / jnp.mean(x**2, 1))))
      cells.append(f"{rel:.4f}")
    rows.append(f"| {fmt} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main() -> None:
  print("$ python experiments/numerics.py " + " ".join(sys.argv[1:]))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, numpy {np.__version__}\n")
  print("Formats:\n" + format_table() + "\n")
  print("Row-relative RMS error of quantize->dequantize (mean over rows of rms(err)/rms(x)),\n"
        "x = N(0,1) rows scaled by exp(1.5 N(0,1)), shape 256x1024:\n" + error_table())


if __name__ == "__main__":
  main()

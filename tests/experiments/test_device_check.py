"""experiments/device_check.py --dry-run: every section runs (or reports its budget spent) at
miniature sizes on CPU, without errors, and writes the JSON and markdown results."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_device_check_dry_run(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a machine with one accelerator
  r = subprocess.run([sys.executable, "experiments/device_check.py", "--dry-run", "--out",
                      str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "cpu.json").read_text())
  assert list(res) == ["environment", "tests", "fp8_gemm", "attention", "optimizer", "training",
                       "moe"]
  for name, section in res.items():
    assert "error" not in section, (name, section)
  assert res["environment"]["jax"] and res["tests"]["returncode"] == 0
  assert (tmp_path / "cpu.md").read_text().startswith("# Device check: cpu")

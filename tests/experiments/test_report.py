"""experiments/report.py: page assembly (fast) and the quick run of every section (slow)."""

import importlib.util
import pathlib
import re
import subprocess
import sys
import time
import types
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("report", ROOT / "experiments" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

# All six section modules exist: a lost one fails the quick-report test (True would only warn).
ALLOW_MISSING = False


def _section(name, title, out_dir, module=None, error=None):
  sec = report.Section.__new__(report.Section)
  sec.name, sec.script, sec.path, sec.title = name, f"{name}.py", out_dir / "x.py", title
  sec.module, sec.error, sec.out_dir = module, error, out_dir
  return sec


def test_render_all_assembles_the_page(tmp_path):
  good_dir, bad_dir, empty_dir = (tmp_path / "results" / n for n in ("good", "bad", "empty"))
  for d in (good_dir, bad_dir):
    d.mkdir(parents=True)
    (d / "results.json").write_text("{}")
  (good_dir / "plot.png").write_bytes(b"png")

  def bad_render(out_dir):
    raise RuntimeError("broken section")

  good = types.SimpleNamespace(
      render=lambda out_dir: "| a |\n|---|\n| 1 |\n\n![plot](plot.png) [web](https://x.org)",
      headline=lambda out_dir: {"speedup": "2.0x"})
  secs = [_section("good", "1. Good", good_dir, good),
          _section("bad", "2. Bad", bad_dir, types.SimpleNamespace(render=bad_render)),
          _section("empty", "3. Empty", empty_dir, types.SimpleNamespace(render=bad_render)),
          _section("gone", "4. Gone", tmp_path / "gone", error="`experiments/gone.py` is missing")]
  doc = tmp_path / "docs" / "results.md"
  assert report.render_all(secs, doc, quick=False) is False  # the failing render counts
  page = doc.read_text()
  # Header table from the headline hook, then the sections in order.
  assert "| 1. Good | speedup | 2.0x |" in page
  assert [m for m in re.findall(r"^## (.*)$", page, re.M)] == [
      "Headline figures", "1. Good", "2. Bad", "3. Empty", "4. Gone",
      "7. Regenerating everything"]
  # Links relative to the section's directory are rewritten for the page's directory.
  assert "![plot](../results/good/plot.png)" in page and "(https://x.org)" in page
  assert "RuntimeError: broken section" in page
  assert "No results yet" in page and "python experiments/empty.py" in page
  assert "Not available: `experiments/gone.py` is missing" in page
  # Missing results are not failures unless strict.
  assert report.render_all(secs[:1] + secs[2:], doc, quick=False) is True
  assert report.render_all(secs[:1] + secs[2:], doc, quick=False, strict=True) is False


def test_cli_rejects_bad_arguments():
  for argv, msg in ((["--quick"], "--quick needs --out"), (["--run", "nope"], "unknown section")):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and msg in proc.stderr


@pytest.mark.slow
def test_quick_report(tmp_path):
  """Every section's quick mode, rendered: ~4 min of CPU on 2 cores today (see the report)."""
  t0 = time.time()
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"), "--quick",
                         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  elapsed = time.time() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  page = (tmp_path / "results.md").read_text()
  secs = report.sections(tmp_path)
  parts = re.split(r"^## ", page, flags=re.M)
  bodies = {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts[1:]}
  missing = []
  for sec in secs:
    assert sec.title in bodies, f"no section titled {sec.title!r}"
    body = bodies[sec.title]
    if sec.module is None:
      missing.append(sec.name)
      assert "Not available" in body and sec.script in body
      continue
    assert "No results yet" not in body, f"{sec.name}: quick run left no results"
    assert re.search(r"^\|.*\|\s*\n\|[-|: ]+\|\s*$", body, flags=re.M), f"{sec.name}: no table"
  assert bodies["Headline figures"].count("\n|") >= 3  # header row, rule, one figure at least
  links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page)
  assert links
  for link in links:
    assert link.endswith(".png") and (tmp_path / link).is_file(), f"missing image {link}"
  if missing:
    assert ALLOW_MISSING, f"section modules missing: {missing}"
    warnings.warn(f"section modules missing: {missing}", stacklevel=1)
  print(f"quick report: {elapsed:.1f} s\n{proc.stdout}")

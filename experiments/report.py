"""Section 7: one command regenerates docs/results.md from every section's saved results.

    python experiments/report.py                    # experiments/results/*/ -> docs/results.md
    python experiments/report.py --run parity,memory # rerun those sections first (or --run all)
    python experiments/report.py --quick --out DIR  # every section's quick mode -> DIR/results.md

A section is a script `experiments/<file>.py` and a module with NAME, TITLE, run, main,
render(out_dir) -> markdown and optionally headline(out_dir) -> {label: value}. Sections run only
in subprocesses (each sets its own XLA flags before importing jax); in-process this script calls
render and headline only. Links in a section's markdown may be relative to its results directory;
they are rewritten for the page. Hand-written text: docs/results_prose.md (`harness.prose`).
Exit status 1 if a run, render or headline failed (or, with --strict, a section is missing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sections and their harness are sibling modules
  sys.path.insert(0, str(HERE))
import harness as H  # noqa: E402

ROOT = H.ROOT
DEFAULT_DOC = ROOT / "docs" / "results.md"

# (results sub-directory / section NAME, script, title used when the module is missing)
SECTIONS = (
    ("memory", "memory.py", "1. Memory breakdown (AOT, 8-device FSDP)"),
    ("parity", "parity.py", "2. Loss parity"),
    ("state_error", "state_error.py", "3. Optimizer-state error from real AdamW moments"),
    ("moe_balance", "moe_balance.py", "4. Global vs micro-batch load balancing"),
    ("permutation", "permutation_real.py", "5. Token permutation on real attention maps"),
    ("ghost_bn", "ghost_bn.py", "6. Ghost BatchNorm"),
)
NAMES = tuple(s[0] for s in SECTIONS)


class Section:
  """One section: its script, module (or the reason it has none) and results directory."""

  def __init__(self, name: str, script: str, title: str, results_root: pathlib.Path):
    self.name, self.script, self.path, self.title = name, script, HERE / script, title
    self.module, self.error, self.out_dir = None, None, results_root / name
    if not self.path.is_file():
      self.error = f"`experiments/{script}` does not exist yet"
      return
    try:
      self.module = importlib.import_module(self.path.stem)
      self.title = getattr(self.module, "TITLE", title)
    except Exception as e:  # noqa: BLE001 -- a broken section must not stop the report
      self.error = f"`experiments/{script}` does not import: {type(e).__name__}: {e}"

  def command(self, quick: bool) -> str:
    return f"python experiments/{self.script}" + (
        f" --out {H.show(self.out_dir)} --quick" if quick else "")


def sections(results_root: pathlib.Path) -> list[Section]:
  return [Section(n, s, t, results_root) for n, s, t in SECTIONS]


def run_section(sec: Section, quick: bool, timeout: float | None) -> tuple[bool, str]:
  """Runs `python experiments/<script> --out DIR [--quick]` (its process group killed after
  `timeout` s); (ok, one-line summary)."""
  if not sec.path.is_file():
    return False, f"{sec.name}: {sec.error}"
  log_path = sec.out_dir / "runs" / ("report_quick.log" if quick else "report.log")
  log_path.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, str(sec.path), "--out", str(sec.out_dir)] + (["--quick"] if quick else [])
  t0, deadline = time.time(), time.monotonic() + (timeout or math.inf)
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
  while not (done := os.wait4(proc.pid, os.WNOHANG))[0] and time.monotonic() < deadline:
    time.sleep(0.2)
  if timed_out := not done[0]:
    os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group only
    done = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(done[1])  # reaped here (with the child's CPU time)
  dt, cpu = time.time() - t0, f"{done[2].ru_utime + done[2].ru_stime:.1f} s CPU"
  if proc.returncode == 0:
    return True, f"{sec.name}: ok in {dt:.1f} s ({cpu})"
  tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
  why = f"timed out after {timeout:.0f} s" if timed_out else f"exit status {proc.returncode}"
  return False, (f"{sec.name}: FAILED ({why}, {dt:.1f} s, {cpu}); log {log_path}\n    "
                 + "\n    ".join(tail))


def run_sections(secs: list[Section], quick: bool, jobs: int, timeout: float | None) -> bool:
  """Runs the sections (in parallel only in quick mode: full runs feed each other); all ok?"""
  ok = True
  with concurrent.futures.ThreadPoolExecutor(max(1, jobs) if quick else 1) as pool:
    for future in [pool.submit(run_section, s, quick, timeout) for s in secs]:
      good, msg = future.result()
      print(msg, flush=True)
      ok &= good
  return ok


def relink(markdown: str, out_dir: pathlib.Path, doc_dir: pathlib.Path) -> str:
  """Rewrites relative link targets that exist under out_dir (or the repo root) for doc_dir."""
  def fix(m):
    path, _, anchor = m.group(2).partition("#")
    if re.match(r"^[a-z]+:|^#|^/", m.group(2)):
      return m.group(0)
    for base in (out_dir, ROOT):
      if (base / path).exists():
        new = os.path.relpath((base / path).resolve(), doc_dir.resolve())
        return m.group(1) + pathlib.Path(new).as_posix() + (f"#{anchor}" if anchor else "") + ")"
    return m.group(0)

  return re.sub(r"(\]\()([^)\s]+)\)", fix, markdown)


def render_all(secs: list[Section], doc: pathlib.Path, quick: bool,
               strict: bool = False) -> bool:
  """Writes the results page; True if nothing failed (and, with strict, nothing is missing)."""
  doc.parent.mkdir(parents=True, exist_ok=True)
  ok, bodies, headlines, problems = True, [], [], []
  for sec in secs:
    if sec.module is None or not (sec.out_dir / "results.json").is_file():
      body = (f"_Not available: {sec.error}. `{sec.command(quick)}` will produce it._"
              if sec.module is None else
              f"_No results yet in `{H.show(sec.out_dir)}`: `{sec.command(quick)}` produces them "
              f"(or `python experiments/report.py --run {sec.name}`)._")
      problems.append(sec.name)
      ok &= not strict
    else:
      try:
        body = relink(sec.module.render(sec.out_dir), sec.out_dir, doc.parent)
      except Exception:  # noqa: BLE001 -- report the failure in the page and the exit status
        body = f"_render() failed:_\n\n```\n{traceback.format_exc(limit=3)}```"
        print(f"{sec.name}: render failed\n{traceback.format_exc()}", file=sys.stderr)
        ok = False
      try:
        hook = getattr(sec.module, "headline", lambda out_dir: {})
        headlines += [(sec, k, v) for k, v in hook(sec.out_dir).items()]
      except Exception:  # noqa: BLE001
        print(f"{sec.name}: headline failed\n{traceback.format_exc()}", file=sys.stderr)
        ok = False
    bodies.append(f"## {sec.title}\n\n{body.strip()}\n")

  head = ["# Results", ""]
  if quick:
    head += ["**Quick mode**: miniature runs that exercise every code path in seconds; the "
             "numbers below are not results.", ""]
  head += ["Every table and plot below is regenerated from the saved runs by "
           "`python experiments/report.py` (`--run NAME[,NAME|all]` reruns sections first; "
           "`--quick --out DIR` runs a miniature of everything). Each section names the command "
           "that produced its figures.", "",
           "## Headline figures", ""]
  if headlines:
    head += H.table(["section", "figure", "value"], [(s.title, k, v) for s, k, v in headlines],
                    "|---|---|---|")
  else:
    head += ["_No section has headline figures yet._"]
  if problems:
    head += ["", "Not yet available: " + ", ".join(f"`{p}`" for p in problems) + "."]
  tail = ["## 7. Regenerating everything", "",
          "```",
          "python experiments/report.py                     # re-render this page (saved results)",
          "python experiments/report.py --run parity,memory # rerun some sections first",
          "python experiments/report.py --run all           # rerun everything (hours of CPU)",
          "python experiments/report.py --quick --out /tmp/q  # a miniature of everything",
          "```", "",
          "Each section is also its own script, `python experiments/<section>.py [--quick] "
          "[--out DIR]`; `tests/experiments/test_report.py` runs the quick mode.", ""]
  doc.write_text("\n".join(head) + "\n\n" + "\n".join(bodies) + "\n" + "\n".join(tail))
  return ok


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--run", help=f"sections to rerun first: comma-separated of {', '.join(NAMES)},"
                  " or all")
  ap.add_argument("--quick", action="store_true",
                  help="run every section's quick mode (or those of --run) into --out")
  ap.add_argument("--out", help="results root (default experiments/results; required with "
                  "--quick); the page goes to OUT/results.md unless --doc")
  ap.add_argument("--doc", help="the page to write (default docs/results.md, or OUT/results.md)")
  ap.add_argument("--jobs", type=int, default=2, help="parallel quick runs (full runs: 1)")
  ap.add_argument("--timeout", type=float, help="seconds per section run (default: none; 300 "
                  "with --quick)")
  ap.add_argument("--strict", action="store_true",
                  help="exit 1 if a section module or its results are missing")
  args = ap.parse_args(argv)
  if args.quick and not args.out:
    ap.error("--quick needs --out DIR (quick results must not replace experiments/results)")
  root = pathlib.Path(args.out).resolve() if args.out else H.RESULTS
  doc = pathlib.Path(args.doc) if args.doc else (root / "results.md" if args.out else DEFAULT_DOC)
  run = "all" if args.quick and args.run is None else (args.run or "").strip()
  names = list(NAMES) if run == "all" else [n.strip() for n in run.split(",") if n.strip()]
  if unknown := [n for n in names if n not in NAMES]:
    ap.error(f"--run: unknown section(s) {unknown}; choose from {', '.join(NAMES)} or all")
  secs, ok = sections(root), True
  if names:
    t0, timeout = time.time(), args.timeout or (300.0 if args.quick else None)
    ok = run_sections([s for s in secs if s.name in names], args.quick, args.jobs, timeout)
    print(f"ran {len(names)} section(s) in {time.time() - t0:.1f} s", flush=True)
  ok &= render_all(secs, doc, args.quick, args.strict)
  print(f"wrote {doc}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

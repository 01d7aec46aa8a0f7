"""Section 7: one command regenerates docs/results.md from every section's saved results.

    python experiments/report.py                    # experiments/results/*/ -> docs/results.md
    python experiments/report.py --run parity,memory # rerun those sections first (or --run all)
    python experiments/report.py --quick --out DIR  # every section's quick mode -> DIR/results.md

Each section is a script `experiments/<file>.py` that is also a module with NAME, TITLE,
run(out_dir, quick), render(out_dir) -> markdown and main(), built on experiments/harness.py.
Sections run only in subprocesses (`python experiments/<file>.py --out DIR [--quick]`: each sets
its own XLA flags before importing jax); in-process this script calls only `render` (and the
optional `headline(out_dir) -> {label: value}` for the header table). A section whose module is
missing, does not import or has no results yet gets a line saying which command produces it.
Image and link targets in a section's markdown may be relative to its results directory (or to
the repository root); they are rewritten relative to the written results.md.

Hand-written text (the interpretation) lives in docs/results_prose.md, placed by `render` with
`harness.prose(SECTION, SLOT)`; edit it there, not in docs/results.md. Settings of the sections:
configs/experiments/<name>.py.

Exit status: 1 if a section run failed or a render/headline raised (the page is still written),
or, with --strict, if a section module or its results are missing; else 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_RESULTS = HERE / "results"
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
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


class Section:
  """One section: its script, module (or the reason it has none) and results directory."""

  def __init__(self, name: str, script: str, title: str, results_root: pathlib.Path):
    self.name, self.script, self.path = name, script, HERE / script
    self.module, self.error = None, None
    self.title = title
    if not self.path.is_file():
      self.error = f"`experiments/{script}` does not exist yet"
    else:
      try:
        self.module = importlib.import_module(self.path.stem)
        self.title = getattr(self.module, "TITLE", title)
      except Exception as e:  # noqa: BLE001 -- a broken section must not stop the report
        self.error = f"`experiments/{script}` does not import: {type(e).__name__}: {e}"
    self.out_dir = results_root / name

  def command(self, quick: bool = False, out: pathlib.Path | None = None) -> str:
    cmd = f"python experiments/{self.script}"
    if out is not None:
      cmd += f" --out {_show(out)}"
    return cmd + (" --quick" if quick else "")

  @property
  def has_results(self) -> bool:
    return (self.out_dir / "results.json").is_file()


def _rel(path: pathlib.Path, start: pathlib.Path) -> str:
  return pathlib.Path(os.path.relpath(pathlib.Path(path).resolve(), start.resolve())).as_posix()


def _show(path: pathlib.Path) -> str:
  """path relative to the repository root when inside it, else absolute."""
  path = pathlib.Path(path).resolve()
  return _rel(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def sections(results_root: pathlib.Path) -> list[Section]:
  if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
  return [Section(n, s, t, results_root) for n, s, t in SECTIONS]


# ---------------------------------------------------------------------------------------------
# Running sections (subprocesses)


def run_section(sec: Section, quick: bool, timeout: float | None) -> tuple[bool, str]:
  """Runs `python experiments/<script> --out DIR [--quick]`; (ok, one-line summary)."""
  if not sec.path.is_file():
    return False, f"{sec.name}: {sec.error}"
  log_path = sec.out_dir / "runs" / ("report_quick.log" if quick else "report.log")
  log_path.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, str(sec.path), "--out", str(sec.out_dir)] + (["--quick"] if quick else [])
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    rc, usage = _wait(proc, timeout)
  dt = time.time() - t0
  cpu = f"{usage.ru_utime + usage.ru_stime:.1f} s CPU" if usage else "CPU time unknown"
  if rc == 0:
    return True, f"{sec.name}: ok in {dt:.1f} s ({cpu})"
  tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
  why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
  return False, (f"{sec.name}: FAILED ({why}, {dt:.1f} s, {cpu}); log {log_path}\n    "
                 + "\n    ".join(tail))


def _wait(proc: subprocess.Popen, timeout: float | None):
  """(exit code or None on timeout, resource usage of the child) -- kills it on timeout."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      proc.returncode = os.waitstatus_to_exitcode(status)
      return proc.returncode, usage
    if deadline is not None and time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group only
      _, _, usage = os.wait4(proc.pid, 0)
      proc.returncode = -signal.SIGKILL
      return None, usage
    time.sleep(0.2)


def run_sections(secs: list[Section], quick: bool, jobs: int, timeout: float | None) -> bool:
  """Runs the sections (in parallel only in quick mode: full runs feed each other); all ok?"""
  ok = True
  workers = max(1, jobs) if quick else 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(run_section, s, quick, timeout) for s in secs]
    for f in futures:
      good, msg = f.result()
      print(msg, flush=True)
      ok &= good
  return ok


# ---------------------------------------------------------------------------------------------
# Rendering (in-process, from saved results only)


def relink(markdown: str, out_dir: pathlib.Path, doc_dir: pathlib.Path) -> str:
  """Rewrites relative link targets that exist under out_dir (or the repo root) for doc_dir."""
  def fix(m):
    target = m.group(2)
    if re.match(r"^[a-z]+:|^#|^/", target):
      return m.group(0)
    path, _, anchor = target.partition("#")
    for base in (out_dir, ROOT):
      if (base / path).exists():
        new = _rel(base / path, doc_dir) + (f"#{anchor}" if anchor else "")
        return m.group(1) + new + m.group(3)
    return m.group(0)

  return _LINK.sub(fix, markdown)


def render_all(secs: list[Section], doc: pathlib.Path, quick: bool,
               strict: bool = False) -> bool:
  """Writes the results page; True if nothing failed (and, with strict, nothing is missing)."""
  doc.parent.mkdir(parents=True, exist_ok=True)
  ok, bodies, headlines, problems = True, [], [], []
  for sec in secs:
    regen = sec.command(quick, sec.out_dir if quick else None)
    if sec.module is None:
      body = f"_Not available: {sec.error}. `{regen}` will produce it._"
      problems.append(sec.name)
      ok &= not strict
    elif not sec.has_results:
      body = (f"_No results yet in `{_show(sec.out_dir)}`: `{regen}` produces them "
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
      hook = getattr(sec.module, "headline", None)
      if hook is not None:
        try:
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
    head += ["| section | figure | value |", "|---|---|---|"]
    head += [f"| {sec.title} | {k} | {v} |" for sec, k, v in headlines]
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
  root = pathlib.Path(args.out).resolve() if args.out else DEFAULT_RESULTS
  doc = pathlib.Path(args.doc) if args.doc else (root / "results.md" if args.out else DEFAULT_DOC)
  if args.run is None:
    names = list(NAMES) if args.quick else []
  elif args.run.strip() == "all":
    names = list(NAMES)
  else:
    names = [n.strip() for n in args.run.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
      ap.error(f"--run: unknown section(s) {unknown}; choose from {', '.join(NAMES)} or all")
  secs = sections(root)
  ok = True
  if names:
    timeout = args.timeout if args.timeout else (300.0 if args.quick else None)
    t0 = time.time()
    ok = run_sections([s for s in secs if s.name in names], args.quick, args.jobs, timeout)
    print(f"ran {len(names)} section(s) in {time.time() - t0:.1f} s", flush=True)
  ok &= render_all(secs, doc, args.quick, args.strict)
  print(f"wrote {doc}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

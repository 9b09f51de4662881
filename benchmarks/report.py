"""Report rendering: today's `ebood report` against the baseline's (commit 75ef235), in one run.

Both render ``report.html`` from the same results directory (``results.json`` + ``scores.safetensors``),
each in a fresh Python process (imports are not timed; the rendering is, as ``write_report`` is
called by ``ebood bench``). The baseline's ``src/ebood`` is taken from git (``git archive``) into a
temporary folder, so the comparison needs no second checkout. Printed per side: wall time, CPU time
(the process and its figure workers), page size, image count and, with Chromium installed, the page
height as a browser lays it out; then today / baseline ratios. Target (issue 16): CPU and wall time
at most 1/4 of the baseline's, page size and height well down.

    python benchmarks/report.py                       # runs the built-in benchmark once for its results
    python benchmarks/report.py --results ebood-results --repeats 3
    python benchmarks/report.py --baseline 75ef235 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: render once, print wall and CPU seconds (own + waited-for workers) as JSON.
CHILD = r"""
import json, os, sys, time
from ebood.report import write_report
results, workers = sys.argv[1], (None if sys.argv[2] == "auto" else int(sys.argv[2]))
before, t = os.times(), time.perf_counter()
path = write_report(results, workers=workers)
wall, after = time.perf_counter() - t, os.times()
cpu = sum(after[i] - before[i] for i in range(4))  # user, system, children's user and system
print(json.dumps({"wall": wall, "cpu": cpu, "bytes": os.path.getsize(path), "file": str(path)}))
"""

# The page's height in a headless browser, with every <details> as the page opens (closed).
HEIGHT_PROBE = ("<script>window.addEventListener('load', function () { var p = document.createElement('pre'); "
                "p.id = 'ebood-height'; p.textContent = document.documentElement.scrollHeight; "
                "document.body.appendChild(p); });</script>")


def baseline_src(commit: str, into: Path) -> Path:
    """``src/`` of ``commit`` (its ebood package), with this checkout's compiled native kernel."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    native = ROOT / "src" / "ebood" / "_native"
    for lib in native.glob("*.so"):  # built, not tracked: the baseline uses the same kernel
        shutil.copy2(lib, into / "src" / "ebood" / "_native" / lib.name)
    return into / "src"


def render(src: Path, results: Path, workers: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([sys.executable, "-c", CHILD, str(results), workers], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rendering with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def page_height(page: Path) -> int | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", HEIGHT_PROBE + "</body>"), encoding="utf-8")
        done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={tmp}/profile", "--window-size=1400,900", "--dump-dom", probe.as_uri()],
                              capture_output=True, text=True, timeout=180)
    match = re.search(r'<pre id="ebood-height">(\d+)</pre>', done.stdout)
    return int(match.group(1)) if match else None


def builtin_results(into: Path) -> Path:
    """The built-in benchmark's results (what `ebood bench` renders), computed once."""
    sys.path.insert(0, str(ROOT / "src"))
    from ebood.bench.builtin import run_builtin

    cache = Path(os.environ.get("EBOOD_CACHE", into / "cache"))
    run_builtin(seed=0, cache_dir=cache, progress=False).save(into / "results")
    return into / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, help="a results directory (default: run the built-in benchmark once)")
    parser.add_argument("--baseline", default="75ef235", help="the commit to compare with (default: 75ef235, before issue 16)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved renders per side; the fastest counts")
    parser.add_argument("--workers", default="auto", help="figure processes for both sides (default: each side's own choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.results or builtin_results(tmp)
        sides = {"baseline": baseline_src(args.baseline, tmp), "today": ROOT / "src"}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, src in sides.items():  # interleaved, so load on a shared machine hits both sides alike
                copy = tmp / f"render-{name}"
                shutil.rmtree(copy, ignore_errors=True)
                copy.mkdir()
                for f in ("results.json", "scores.safetensors"):
                    shutil.copy2(source / f, copy / f)
                runs[name].append(render(src, copy, args.workers))
        best = {name: min(r, key=lambda x: x["cpu"]) for name, r in runs.items()}
        for name, r in best.items():
            page = Path(r["file"])
            text = page.read_text(encoding="utf-8")
            r["images"] = text.count("<img")
            r["height"] = page_height(page)
            height = "-" if r["height"] is None else f"{r['height']} px"
            print(f"{name:>8}: wall {r['wall']:6.2f} s   cpu {r['cpu']:6.2f} s   page {r['bytes'] / 1e6:5.2f} MB   "
                  f"{r['images']} images   height {height}")
        b, t = best["baseline"], best["today"]
        print(f"   ratio: wall {t['wall'] / b['wall']:.3f}   cpu {t['cpu'] / b['cpu']:.3f}   page {t['bytes'] / b['bytes']:.3f}"
              + (f"   height {t['height'] / b['height']:.3f}" if t["height"] and b["height"] else ""))
        print(f"({os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
              f"baseline {args.baseline}, results {'built-in benchmark' if args.results is None else args.results})")


if __name__ == "__main__":
    main()

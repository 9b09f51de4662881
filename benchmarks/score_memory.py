"""Peak memory of `ebood score BIG.npy` against reading the input twice (the path before issue 15).

Each variant runs in a fresh process that reports its own peak resident set (ru_maxrss), in one
run on the same file, and the script prints the ratio:

    python benchmarks/score_memory.py --mib 512

* ``two reads``: ``np.load`` of the whole file twice (``read_arrays`` then ``read_array``, as
  `ebood score` did), then the logit scores;
* ``ebood score``: the command itself (one memory-mapped read).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TWO_READS = """
import resource, sys, numpy as np
from ebood import scores
kept = np.load(sys.argv[1])            # read_arrays: the whole file
logits = np.load(sys.argv[1])          # read_array: the whole file again
scores.energy(logits)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

EBOOD = """
import resource, sys
from ebood.cli import main
sys.argv = ["ebood", "score", sys.argv[1], "-o", sys.argv[2]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mib(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="size of the float32 logits file (default 512 MiB)")
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    rows = args.mib * 2**20 // (4 * args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, args.classes))[:] = 1.0
        baseline = peak_mib(TWO_READS, str(path))
        ours = peak_mib(EBOOD, str(path), str(Path(tmp) / "s.npy"))
    print(f"input: {args.mib} MiB of float32 logits ({rows} x {args.classes})")
    print(f"peak RSS, two reads:   {baseline:8.0f} MiB")
    print(f"peak RSS, ebood score: {ours:8.0f} MiB")
    print(f"ratio (ebood / two reads): {ours / baseline:.2f}")


if __name__ == "__main__":
    main()

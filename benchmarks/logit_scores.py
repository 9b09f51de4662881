"""Benchmark: ebood.scores.logit_scores against one read pass, the naive torch sequence and
torch.logsumexp, measured in one run on the same data.

    python benchmarks/logit_scores.py                 # 20000x1000 and 256x128000 float32
    python benchmarks/logit_scores.py --shape 4096x32000 --repeat 11

For each shape it prints the best-of-k wall time of

* ``x.sum(-1)``: one read pass over the logits (the floor for a memory-bound reduction);
* ``ebood``: ``ebood.scores.logit_scores(x)`` (energy, msp, max_logit, entropy, prediction);
* ``ebood torch path``: the same with the native kernel switched off (the GPU / fallback code);
* ``naive torch``: softmax -> max, logsumexp, (softmax * log_softmax).sum, max, as a user
  would write the four scores;
* ``torch.logsumexp``: the energy alone;

each as a ratio to ``x.sum(-1)``, the speed-up of ebood over the naive sequence, and the peak
extra memory of each method (peak RSS above the input's, in a child process, after a warm-up,
using Linux's resettable peak RSS; elsewhere ru_maxrss in one child per method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from typing import Callable

import torch

from ebood import scores
from ebood._native import scores_kernel, scores_kernel_isa
from _timing import best_time  # benchmarks/_timing.py

DEFAULT_SHAPES = ("20000x1000", "256x128000")
METHODS = ("x.sum(-1)", "ebood", "ebood torch path", "naive torch", "torch.logsumexp")


def naive_scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores the way a torch user writes them: each materialises (N, C) temporaries."""
    p = torch.softmax(x, dim=-1)
    max_logit, prediction = x.max(dim=-1)
    return {
        "msp": -p.max(dim=-1).values,
        "energy": -torch.logsumexp(x, dim=-1),
        "entropy": -(p * torch.log_softmax(x, dim=-1)).sum(dim=-1),
        "max_logit": -max_logit,
        "prediction": prediction,
    }


def ebood_torch_path(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """logit_scores with the native kernel switched off (what runs on a GPU or without a compiler)."""
    kernel = scores.scores_kernel
    scores.scores_kernel = None
    try:
        return scores.logit_scores(x)
    finally:
        scores.scores_kernel = kernel


def method(name: str) -> Callable[[torch.Tensor], object]:
    return {
        "x.sum(-1)": lambda x: x.sum(-1),
        "ebood": scores.logit_scores,
        "ebood torch path": ebood_torch_path,
        "naive torch": naive_scores,
        "torch.logsumexp": lambda x: torch.logsumexp(x, dim=-1),
    }[name]


# ----- memory (child process) ---------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _can_reset_peak() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


def _child_memory(rows: int, cols: int, names: list[str]) -> dict[str, int]:
    """Peak extra bytes of each method, measured in this (child) process."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols)
    warm = x[: max(1, 2**20 // cols), : 2**20]  # maps library code, starts worker threads
    out = {}
    for name in names:
        fn = method(name)
        fn(warm)
        if _can_reset_peak():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            base = _status_bytes("VmRSS")
            fn(x)
            out[name] = _status_bytes("VmHWM") - base
        else:  # ru_maxrss cannot be reset: only meaningful for the first method of a process
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn(x)
            scale = 1 if sys.platform == "darwin" else 1024
            out[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * scale
    return out


def peak_memory(rows: int, cols: int) -> dict[str, int]:
    groups = [list(METHODS)] if _can_reset_peak() else [[m] for m in METHODS]
    result: dict[str, int] = {}
    for names in groups:
        cmd = [sys.executable, __file__, "--memory-child", f"{rows}x{cols}", *names]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return result


# ----- report ---------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores ({cpu}), "
        f"load average {load}"
    )


def run_shape(rows: int, cols: int, repeat: int, with_memory: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, cols)
    times = {name: best_time(lambda fn=method(name): fn(x), repeat, warmup=True) for name in METHODS}
    memory = peak_memory(rows, cols) if with_memory else {}
    base = times["x.sum(-1)"]
    print(f"\n{rows}x{cols} float32 ({rows * cols * 4 / 2**20:.0f} MiB), best of {repeat}")
    print(f"  {'method':<18} {'time':>10} {'/ x.sum(-1)':>12} {'peak extra memory':>18}")
    for name in METHODS:
        mem = f"{memory[name] / 2**20:.1f} MiB" if name in memory else "-"
        print(f"  {name:<18} {times[name] * 1e3:>8.2f} ms {times[name] / base:>11.2f}x {mem:>18}")
    print(f"  ebood speed-up over naive torch: {times['naive torch'] / times['ebood']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="ROWSxCOLS (repeatable); default: " + ", ".join(DEFAULT_SHAPES))
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per method (best is reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        rows, cols = parse_shape(args.memory_child[0])
        print(json.dumps(_child_memory(rows, cols, args.memory_child[1:])))
        return

    print(describe_machine())
    native = scores._native_usable(torch.empty(1, 1), 1.0)
    print(
        f"ebood native kernel: {'used' if native else 'NOT used'} for float32 CPU logits "
        f"(built: {scores_kernel is not None}, instruction set: {scores_kernel_isa or '-'})"
    )
    for shape in args.shape or DEFAULT_SHAPES:
        rows, cols = parse_shape(shape)
        run_shape(rows, cols, args.repeat, not args.no_memory)


if __name__ == "__main__":
    main()

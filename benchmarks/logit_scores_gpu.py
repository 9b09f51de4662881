"""Benchmark on a CUDA device: ebood.scores.logit_scores against one read pass, the naive torch
sequence and torch.logsumexp, measured in one run on the same data.

    python benchmarks/logit_scores_gpu.py                       # float32 and bfloat16, four shapes
    python benchmarks/logit_scores_gpu.py --shape 4096x128000 --repeat 50

For each shape and dtype it prints the best-of-k time (CUDA events) of

* ``x.sum(-1)``: one read pass over the logits, and the bandwidth it reaches;
* ``ebood``: ``ebood.scores.logit_scores(x)`` (energy, msp, max_logit, entropy, prediction),
  which runs ebood's Triton kernel on CUDA tensors;
* ``ebood torch path``: the same with the kernel switched off (chunked eager torch);
* ``naive torch``: softmax -> max, logsumexp, (softmax * log_softmax).sum, max;
* ``torch.logsumexp``: the energy alone;

each as a ratio to ``x.sum(-1)``, ebood's speed-up over the naive sequence, and each method's peak
extra device memory (``torch.cuda.max_memory_allocated`` above the input).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from ebood import scores

DEFAULT_SHAPES = ("20000x1000", "256x128000", "200000x1000", "4096x128000")


def naive_scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores the way a torch user writes them: each materialises (N, C) temporaries."""
    p = torch.softmax(x.float(), dim=-1)
    return {
        "msp": -p.max(dim=-1).values,
        "energy": -torch.logsumexp(x.float(), dim=-1),
        "entropy": -(p * torch.log_softmax(x.float(), dim=-1)).sum(dim=-1),
        "max_logit": -x.max(dim=-1).values,
    }


def ebood_torch_path(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """logit_scores with the Triton kernel switched off (chunked eager torch)."""
    usable = scores._triton_usable
    scores._triton_usable = lambda _: False
    try:
        return scores.logit_scores(x)
    finally:
        scores._triton_usable = usable


METHODS: dict[str, Callable[[torch.Tensor], object]] = {
    "x.sum(-1)": lambda x: x.sum(-1),
    "ebood": scores.logit_scores,
    "ebood torch path": ebood_torch_path,
    "naive torch": naive_scores,
    "torch.logsumexp": lambda x: torch.logsumexp(x.float(), dim=-1),
}


def best_time(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeat: int) -> float:
    for _ in range(3):
        fn(x)
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def peak_extra(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(x)
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_shape(rows: int, cols: int, dtype: torch.dtype, repeat: int) -> None:
    x = torch.randn(rows, cols, device="cuda", dtype=dtype) * 4
    size = x.numel() * x.element_size()
    times = {name: best_time(fn, x, repeat) for name, fn in METHODS.items()}
    memory = {name: peak_extra(fn, x) for name, fn in METHODS.items()}
    floor = times["x.sum(-1)"]
    print(f"\n{rows}x{cols} {str(dtype).replace('torch.', '')} ({size / 2**20:.0f} MiB); one read pass {floor * 1e3:.3f} ms "
          f"= {size / floor / 1e9:.0f} GB/s")
    print(f"{'method':<18}{'time':>12}{'/ x.sum(-1)':>14}{'peak extra':>14}")
    for name in METHODS:
        print(f"{name:<18}{times[name] * 1e3:>10.3f}ms{times[name] / floor:>13.2f}x{memory[name]:>10.0f} MiB")
    print(f"ebood speed-up over naive torch: {times['naive torch'] / times['ebood']:.1f}x")
    del x
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="ROWSxCOLS (repeatable); default: " + ", ".join(DEFAULT_SHAPES))
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"], help="default: float32 and bfloat16")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per method (best is reported)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/logit_scores_gpu.py needs a CUDA device")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, chunk budget {scores.CHUNK_BYTES / 2**20:.0f} MiB")
    for dtype in args.dtype or ["float32", "bfloat16"]:
        for shape in args.shape or DEFAULT_SHAPES:
            rows, cols = (int(v) for v in shape.lower().split("x"))
            run_shape(rows, cols, getattr(torch, dtype), args.repeat)


if __name__ == "__main__":
    main()

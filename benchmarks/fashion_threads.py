"""Training the Fashion-MNIST benchmark's CNN on one torch thread vs two, measured in one run.

The benchmark (``ebood bench fashion-mnist``) trains :class:`ebood.models.FashionCNN` with its preset's
recipe (Adam, batch 128) on ``ebood.bench.fashion_mnist.THREADS`` threads. This script times the same
optimisation steps on the real training images with 1 and with 2 threads, interleaved, the fastest of
``--repeats`` kept, and prints the ratio. Run it on an idle machine: a busy core makes threads wait on
each other.

    python benchmarks/fashion_threads.py --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import best_time  # benchmarks/_timing.py

from ebood.data.idx import fashion_mnist
from ebood.models import FashionCNN


def steps(threads: int, x: torch.Tensor, y: torch.Tensor, n: int, batch: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = FashionCNN(10).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(n):
        rows = slice((i * batch) % (len(x) - batch), (i * batch) % (len(x) - batch) + batch)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's copy)")
    args = ap.parse_args()
    train = fashion_mnist(args.root, "train")
    x, y = train.images.to(torch.float32).div_(255.0), train.labels
    before = torch.get_num_threads()
    times = {}
    for threads in (1, 2):
        times[threads] = best_time(lambda t=threads: steps(t, x, y, args.steps, args.batch_size), args.repeats, warmup=True)
    torch.set_num_threads(before)
    per_step = {t: 1000 * s / args.steps for t, s in times.items()}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.steps} steps of batch {args.batch_size}")
    for t, ms in per_step.items():
        print(f"{t} thread{'s' if t > 1 else ''}: {ms:6.1f} ms per step")
    print(f"speed-up of 2 threads over 1: {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()

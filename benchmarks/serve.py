"""Served detector vs the same wrapped module called in-process: throughput and p50 / p99 latency.

A digits CNN (``ebood.models.DigitsCNN``, random but fixed weights) with a KNN detector (k = 10)
fitted and calibrated on random 1x8x8 inputs, wrapped with ``ebood.wrap``. Two measurements, in
one run, on the same requests (``--rows`` inputs each):

* ``in-process``: ``wrapped(x)`` called ``--requests`` times one after the other (the floor: no
  HTTP, no serialisation, no batching);
* ``served``: ``ebood.deploy.serve`` on Ray Serve at 127.0.0.1 (loopback only), the same number
  of ``POST /score`` requests with ``.npy`` bodies from ``--concurrency`` client threads, so that
  Serve's dynamic batching merges concurrent requests into one forward pass.

The run is bounded: a fixed number of requests, each with a timeout, and a wall-clock limit
(``--time-limit``) after which the clients stop; Serve and Ray are shut down at the end.

    python benchmarks/serve.py                       # 400 requests of 1 input, 8 client threads
    python benchmarks/serve.py --rows 32 --requests 200
    python benchmarks/serve.py --quick               # a small smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import ebood
from ebood.detectors import create
from ebood.models import load_model

SHAPE = (1, 8, 8)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ms = np.asarray(latencies) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def setup(folder: Path, n_fit: int) -> tuple[torch.nn.Module, Path, Path]:
    torch.manual_seed(0)
    net = load_model("digits_cnn")
    torch.save(net.state_dict(), folder / "ck.pt")
    x = torch.rand(n_fit + 500, *SHAPE, generator=torch.Generator().manual_seed(1))
    det = create("knn", k=10).fit(ebood.extract(net, x[:n_fit], progress=False))
    det.calibrate(ebood.extract(net, x[n_fit:], progress=False))
    det.save(folder / "det.safetensors")
    return ebood.wrap(net, det), folder / "ck.pt", folder / "det.safetensors"


def in_process(wrapped: torch.nn.Module, batches: list[np.ndarray], deadline: float) -> tuple[int, float, list[float]]:
    latencies = []
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            t = time.perf_counter()
            wrapped(torch.from_numpy(b))
            latencies.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
    return len(latencies), time.perf_counter() - start, latencies


def served(url: str, bodies: list[bytes], concurrency: int, deadline: float) -> tuple[int, float, list[float], int]:
    def post(body: bytes) -> tuple[float, int]:
        if time.perf_counter() > deadline:
            return 0.0, -1
        req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/x-npy"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=30) as f:
                f.read()
                return time.perf_counter() - t, f.status
        except Exception:
            return time.perf_counter() - t, 0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(post, bodies))
    elapsed = time.perf_counter() - start
    ok = [lat for lat, status in results if status == 200]
    failed = sum(1 for _, status in results if status not in (200, -1))
    return len(ok), elapsed, ok, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rows", type=int, default=1, help="inputs per request")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads for the served run")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--n-fit", type=int, default=2000, help="KNN bank size")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds each measurement may take at most")
    parser.add_argument("--quick", action="store_true", help="40 requests, a 500-row bank")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.n_fit = 40, 500

    rng = np.random.default_rng(2)
    batches = [rng.random((args.rows, *SHAPE), dtype=np.float32) for _ in range(args.requests)]
    bodies = []
    for b in batches:
        buf = io.BytesIO()
        np.save(buf, b)
        bodies.append(buf.getvalue())

    with tempfile.TemporaryDirectory() as tmp:
        wrapped, ck, det = setup(Path(tmp), args.n_fit)
        local_n, local_s, local_lat = in_process(wrapped, batches, time.perf_counter() + args.time_limit)

        from ebood.deploy import serve as serve_module

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                url = serve_module.start({"model": "digits_cnn", "checkpoint": ck, "detector": det}, host="127.0.0.1", port=port,
                                         num_cpus=2, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
            urllib.request.urlopen(url + "/healthz", timeout=60).read()  # warm: the replica is up
            served(url, bodies[: min(20, len(bodies))], args.concurrency, time.perf_counter() + 30)
            remote_n, remote_s, remote_lat, failed = served(url, bodies, args.concurrency, time.perf_counter() + args.time_limit)
        finally:
            serve_module.stop()  # Serve and the Ray instance it started

    local_p50, local_p99 = percentiles(local_lat)
    remote_p50, remote_p99 = percentiles(remote_lat) if remote_lat else (float("nan"), float("nan"))
    report = {
        "rows_per_request": args.rows,
        "concurrency": args.concurrency,
        "in_process": {"requests": local_n, "req_per_s": local_n / local_s, "p50_ms": local_p50, "p99_ms": local_p99},
        "served": {"requests": remote_n, "failed": failed, "req_per_s": remote_n / remote_s, "p50_ms": remote_p50, "p99_ms": remote_p99},
    }
    report["served_over_in_process"] = {
        "throughput": report["served"]["req_per_s"] / report["in_process"]["req_per_s"],
        "p50_latency": remote_p50 / local_p50,
        "p99_latency": remote_p99 / local_p99,
    }
    print(f"{'':12s} {'requests':>9s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in ("in_process", "served"):
        r = report[name]
        print(f"{name:12s} {r['requests']:9d} {r['req_per_s']:9.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    ratio = report["served_over_in_process"]
    print(f"served / in-process: throughput x{ratio['throughput']:.3f}, p50 latency x{ratio['p50_latency']:.1f}, p99 latency x{ratio['p99_latency']:.1f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

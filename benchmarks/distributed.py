"""Benchmark: ebood.distributed rows per second with 1 and 2 Ray workers, in one run on the same data.

    python benchmarks/distributed.py                       # 1,000,000 x 100 logits, 200,000 x 256 features
    python benchmarks/distributed.py --rows 4000000 --classes 1000 --workers 1 2 4 --json

Writes Parquet files once (logits as a fixed-size list column of float32; features float32 with
labels), then for each worker count starts a local Ray instance with that many CPUs
(``ray.init(num_cpus=w)``: one task per CPU, so w tasks run at once) and times, after a warm-up:

* ``score energy``: ``distributed.score("energy", files, output=dir)``: read, score, write Parquet
  with the key column (the whole job, all-or-nothing write included);
* ``fit mahalanobis``: ``distributed.fit("mahalanobis", files)``: read, per-block float64 class
  moments, tree merge.

and, as a reference, the same work in this process without Ray (pyarrow read + ebood, torch with
its default threads). Rows per second are the input rows over the best wall time of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _timing import best_time  # benchmarks/_timing.py


def write_data(root: Path, rows: int, classes: int, feature_rows: int, dim: int, fit_classes: int, files: int) -> tuple[Path, Path]:
    """Logits (id, logits) and features (features, labels) as ``files`` Parquet files each."""
    rng = np.random.default_rng(0)
    logits_dir, features_dir = root / "logits", root / "features"
    logits_dir.mkdir(parents=True)
    features_dir.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        z = rng.normal(0, 3, size=(part.size, classes)).astype(np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), classes)
        pq.write_table(pa.table({"id": part, "logits": col}), logits_dir / f"part-{i:03d}.parquet", row_group_size=65536)
    means = rng.normal(0, 2, size=(fit_classes, dim))
    for i, part in enumerate(np.array_split(np.arange(feature_rows), files)):
        y = part % fit_classes
        x = (means[y] + rng.normal(size=(part.size, dim))).astype(np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
        pq.write_table(pa.table({"features": col, "labels": y}), features_dir / f"part-{i:03d}.parquet", row_group_size=65536)
    return logits_dir, features_dir


def local_reference(logits_dir: Path, features_dir: Path, out_dir: Path, repeat: int) -> dict[str, float]:
    """The same work in this process without Ray: read all files, score / fit."""
    import ebood
    from ebood import detectors, scores

    def score() -> None:
        table = pq.read_table(logits_dir)
        z = table.column("logits").combine_chunks()
        logits = z.flatten().to_numpy().reshape(len(z), -1)
        s = scores.energy(logits).numpy()  # numpy in: ebood copies the read-only Arrow buffer
        pq.write_table(pa.table({"id": table.column("id"), "energy": s}), out_dir / "local-scores.parquet")

    def fit() -> None:
        table = pq.read_table(features_dir)
        f = table.column("features").combine_chunks()
        x = f.flatten().to_numpy().reshape(len(f), -1)
        detectors.create("mahalanobis").fit(ebood.Outputs(features=x, labels=table.column("labels").to_numpy()))

    return {"score energy": best_time(score, repeat), "fit mahalanobis": best_time(fit, repeat)}


def on_ray(workers: int, logits_dir: Path, features_dir: Path, out_root: Path, repeat: int) -> dict[str, float]:
    import ray

    from ebood import distributed

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, object_store_memory=3 * 2**30)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        n = [0]

        def score() -> None:
            n[0] += 1
            distributed.score("energy", logits_dir, output=out_root / f"w{workers}-{n[0]}")

        def fit() -> None:
            distributed.fit("mahalanobis", features_dir)

        score(), fit()  # warm-up: worker processes, imports
        return {"score energy": best_time(score, repeat), "fit mahalanobis": best_time(fit, repeat)}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of logits to score")
    parser.add_argument("--classes", type=int, default=100, help="logits per row")
    parser.add_argument("--feature-rows", type=int, default=200_000, help="rows of features to fit on")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension")
    parser.add_argument("--fit-classes", type=int, default=10, help="classes of the Mahalanobis fit")
    parser.add_argument("--files", type=int, default=8, help="Parquet files per input (one block each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray CPUs to compare")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many timed runs")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ebood-bench-distributed-"))
    try:
        logits_dir, features_dir = write_data(root, args.rows, args.classes, args.feature_rows, args.dim, args.fit_classes, args.files)
        rows = {"score energy": args.rows, "fit mahalanobis": args.feature_rows}
        results: dict[str, dict[str, float]] = {"local (no Ray)": local_reference(logits_dir, features_dir, root, args.repeat)}
        for w in args.workers:
            results[f"ray {w} worker{'s' if w > 1 else ''}"] = on_ray(w, logits_dir, features_dir, root / "out", args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rate = {cfg: {task: rows[task] / t for task, t in times.items()} for cfg, times in results.items()}
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "data": f"score: {args.rows} x {args.classes} float32 logits; fit: {args.feature_rows} x {args.dim} float32 features, "
        f"{args.fit_classes} classes; {args.files} Parquet files each",
        "seconds": results,
        "rows_per_second": rate,
    }
    base = f"ray {args.workers[0]} worker{'s' if args.workers[0] > 1 else ''}"
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(info["machine"])
    print(info["data"])
    print(f"{'configuration':<18} {'task':<17} {'seconds':>9} {'rows/s':>12} {'vs ' + base:>16}")
    for cfg, times in results.items():
        for task, t in times.items():
            print(f"{cfg:<18} {task:<17} {t:>9.2f} {rate[cfg][task]:>12,.0f} {rate[cfg][task] / rate[base][task]:>15.2f}x")


if __name__ == "__main__":
    main()

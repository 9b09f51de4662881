"""Fit and score on a Ray cluster when one machine is not enough (needs the ``ray`` extra: ``pip install -e '.[ray]'`` in ebood's clone).

ebood does not schedule work itself: Ray Data reads, batches and writes (``map_batches``,
``write_parquet``), Ray tasks merge partial fits and Ray retries tasks lost to a failed worker.

* :func:`score`: scores a Ray Dataset or Parquet files of logits / features, writing Parquet with
  the input's key columns, the score and (for a calibrated detector) the decision.
* :func:`fit`: partial fits per block, merged in a tree; equal to a single-process fit. Exact KNN
  keeps one bank shard per block (:class:`ShardedKNN`) and merges top-k answers exactly.
* :func:`evaluate`: exact AUROC / AUPR / FPR@TPR over scores held across the cluster.

Connect to a running cluster with ``ray.init(address="auto")`` (or ``ray://head:10001``) before
calling these; without it Ray starts a local instance. ``import ebood`` never imports Ray.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401
    import ray.data  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ebood.distributed needs Ray Data: in ebood's clone, .venv/bin/pip install -c constraints-cpu.txt -e '.[ray]'") from exc

from ._api import check_mergeable, fit, mergeable, score
from ._knn import ShardedKNN
from ._metrics import evaluate
from ._runtime import init_ray, set_verbose, write_parquet_atomic
from ._source import PartitionError, parquet_files

__all__ = ["score", "fit", "evaluate", "mergeable", "check_mergeable", "ShardedKNN", "PartitionError", "init_ray", "set_verbose", "parquet_files", "write_parquet_atomic"]

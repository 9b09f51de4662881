"""Ray plumbing shared by the distributed functions: clean errors from worker exceptions, the
atomic Parquet write, and the tree reduction."""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ._source import PartitionError

#: tasks lost to a dead worker or node are re-run by Ray this many times (application errors are not)
MAX_RETRIES = 3


_verbose = False


def set_verbose(verbose: bool = True) -> None:
    """Show Ray Data's INFO lines (about 20 per job: execution plans, progress hints) during
    ebood's jobs, and Ray's own start-up lines; off by default (``ebood ... --ray --verbose``)."""
    global _verbose
    _verbose = bool(verbose)


@contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data's logger at WARNING for the duration (unless :func:`set_verbose`); restored after.
    Its log file in the Ray session directory keeps what the console would have shown at INFO."""
    if _verbose:
        yield
        return
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


_ERROR_LINE = re.compile(r"^(?P<kind>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.+)$")


def _worker_error(exc: BaseException) -> tuple[str, str] | None:
    """``(class name, message)`` of the exception raised in a Ray task.

    Ray Data re-raises a task's exception on the driver as a ``RayTaskError`` that carries only
    the worker's traceback as text (the original object is gone), so the first ``Kind: message``
    line of that text that is not one of Ray's own wrappers is the original error."""
    for line in str(exc).splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and not m.group("kind").startswith("ray."):
            return m.group("kind"), m.group("message").strip()
    return None


class _NoTracebacks(logging.Filter):
    """Drops log records that carry a traceback: Ray Data logs a failed task's whole remote
    traceback on the console before raising it, and :func:`clean_errors` raises it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None and not getattr(record, "exc_text", None)


@contextmanager
def _console_without_tracebacks() -> Iterator[None]:
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    quiet = _NoTracebacks()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


@contextmanager
def clean_errors(context: str = "") -> Iterator[None]:
    """Turn an exception raised in a Ray task into the user error it carries (one line, no remote
    traceback, on the console or in the message): a :class:`PartitionError` (bad input, naming
    file and rows; e.g. a corrupt Parquet file and the reader's cause), or a ValueError /
    TypeError (a detector refusing its input, prefixed with ``context``). Other failures (a node
    lost after its retries, a bug) propagate unchanged. Ray Data's INFO lines are quiet meanwhile
    (see :func:`set_verbose`)."""
    try:
        with quiet_ray_data(), _console_without_tracebacks():
            yield
    except Exception as exc:
        import ray.exceptions

        # Ray re-raises a task's error as a class deriving from both RayTaskError and the
        # original type, whose text is Ray's task header: read the original message from it.
        if not isinstance(exc, ray.exceptions.RayError):
            raise
        found = _worker_error(exc)
        if found is None:
            raise
        kind, message = found
        name = kind.rsplit(".", 1)[-1]
        if name == PartitionError.__name__:
            raise PartitionError(message) from None
        prefix = f"{context}: " if context else ""
        if name == "TypeError":
            raise TypeError(prefix + message) from None
        if name in ("ValueError", "KeyError", "IndexError") or (kind.startswith("ebood.") and name.endswith("Error")):
            raise ValueError(prefix + message) from None
        raise


# ----- writing ----------------------------------------------------------------------------------


def write_parquet_atomic(dataset: Any, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``dataset`` as a directory of Parquet files at ``output``, all or nothing.

    Ray Data writes into a hidden sibling directory; only when every task has succeeded is it
    renamed to ``output`` (a rename within one directory is atomic on POSIX file systems) and a
    ``_SUCCESS`` marker added. A failed job leaves nothing at ``output`` and removes its
    temporary directory. ``output`` must be on a file system that every worker sees.
    """
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists (pass overwrite=True / --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.ebood-tmp-{uuid.uuid4().hex[:12]}"
    try:
        with clean_errors():
            dataset.write_parquet(str(tmp))
        tmp.mkdir(exist_ok=True)  # a dataset of no rows writes no file
        (tmp / "_SUCCESS").write_text("")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():  # replace: move the old one aside first, so that output is never half-written
        old = output.parent / f".{output.name}.ebood-old-{uuid.uuid4().hex[:12]}"
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)
    return output


# ----- tree reduction ---------------------------------------------------------------------------


def tree_reduce(refs: Sequence[Any], combine: Any, fanout: int = 8) -> Any:
    """Combine ``refs`` (ObjectRefs) with the remote function ``combine(*refs) -> ref`` in a tree
    of the given fanout: ``ceil(log_fanout(n))`` rounds, each combining neighbours, so the order
    of the parts is kept and no single task receives all of them. Returns the final ObjectRef."""
    if fanout < 2:
        raise ValueError(f"fanout must be >= 2, got {fanout!r}")
    level = list(refs)
    if not level:
        raise ValueError("nothing to reduce")
    while len(level) > 1:
        level = [combine.remote(*level[i : i + fanout]) if len(level[i : i + fanout]) > 1 else level[i] for i in range(0, len(level), fanout)]
    return level[0]


def init_ray(address: str | None = None, **kwargs: Any) -> Callable[[], None]:
    """``ray.init`` (a local instance, or ``address`` e.g. ``ray://host:10001`` or ``auto``) unless
    Ray is already initialised; returns the function that undoes it (a no-op when nothing was started)."""
    import ray

    if ray.is_initialized():
        return lambda: None
    kwargs.setdefault("logging_level", logging.INFO if _verbose else logging.WARNING)
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
    return ray.shutdown


_REMOTES: dict[Any, Any] = {}


def remote(fn: Any) -> Any:
    """``ray.remote(fn)`` with :data:`MAX_RETRIES`, made once per function (Ray registers each one)."""
    import ray

    if fn not in _REMOTES:
        _REMOTES[fn] = ray.remote(max_retries=MAX_RETRIES)(fn)
    return _REMOTES[fn]

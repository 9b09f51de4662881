"""The benchmark scripts' clock: the best of several wall-clock runs (the least disturbed by the machine)."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int, *, warmup: bool = False) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` (seconds); ``warmup`` calls it once untimed
    first (first-touch page faults, thread start-up, lazy library loading)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)

"""Progress bars for ebood's long loops (extraction, training a score network, PALM): shown on a
terminal only, so logs and captured output stay clean."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


class _NoProgress:
    def advance(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _RichProgress:
    def __init__(self, total: int | None, description: str, unit: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        class Throughput(ProgressColumn):
            def render(self, task: Any) -> Text:
                if not task.speed:
                    return Text("")
                rate = f"{task.speed:,.0f}" if task.speed >= 10 else f"{task.speed:.2g}"
                return Text(f"{rate} {unit}/s", style="progress.data.speed")

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Throughput(), TimeElapsedColumn(), TimeRemainingColumn(),
            transient=True, redirect_stdout=False, redirect_stderr=False,
            console=__import__("rich.console", fromlist=["Console"]).Console(stderr=True),
        )
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def __enter__(self) -> "_RichProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


def progress_bar(enabled: bool, total: int | None, description: str, unit: str = "samples") -> _NoProgress | _RichProgress:
    """A context manager with ``advance(n)``: a rich bar with the throughput in ``unit`` per second on
    stderr when ``enabled`` and stderr is a terminal, otherwise one that does nothing."""
    if enabled and sys.stderr is not None and sys.stderr.isatty():
        return _RichProgress(total, description, unit)
    return _NoProgress()

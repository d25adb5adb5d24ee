"""Rich progress bars with rate and ETA, one helper for every long loop.

Example:
    >>> for item in track_progress(range(3), "counting", enabled=False):
    ...     pass
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

T = TypeVar("T")

__all__ = ["track_progress", "make_progress"]


class _Progress(Progress):
    """A rich progress that, when its output is not a terminal (a log file, CI), prints a line every 5 %."""

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        if task.total and task.visible:
            step = max(1, int(task.total) // 20)
            if int(task.completed) % step == 0 or task.completed >= task.total:
                elapsed = task.elapsed or 0.0
                self.console.print(f"{task.description}: {int(task.completed)}/{int(task.total)} "
                                   f"{task.fields.get('rate', '')} ({elapsed:.0f} s)")


def make_progress() -> Progress:
    """A rich progress display showing count, rate and remaining time (plain lines when not on a terminal)."""
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("[cyan]{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def track_progress(items: Iterable[T], description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar (rate and ETA) when ``enabled``."""
    if not enabled:
        yield from items
        return
    total = len(items) if isinstance(items, Sized) else None
    with make_progress() as progress:
        task = progress.add_task(description, total=total, rate="")
        for item in items:
            yield item
            speed = progress.tasks[0].speed
            progress.update(task, advance=1, rate=f"{speed:.1f}/s" if speed else "")

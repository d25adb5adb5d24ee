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


def make_progress() -> Progress:
    """A rich progress display showing count, rate and remaining time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
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

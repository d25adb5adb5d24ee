"""A child process that ends when the process that started it is gone.

A process started with ``multiprocessing`` (``daemon=True``) or ``subprocess`` outlives a parent killed by a signal
(``kill``, ``pkill``, a session's end): Python's default SIGTERM handling skips ``atexit``, where ``multiprocessing``
would have stopped its daemon children, and a ``subprocess`` child is never stopped. Such an orphan goes on taking a
core and writing into a work folder the next run resumes from. :func:`exit_with_parent`, called first thing in the
child, watches the parent's process id from a daemon thread and ends the child once the parent has exited (the
child is then handed to another process: its parent id changes).

Example:
    >>> import os
    >>> watcher = exit_with_parent(parent_pid=os.getppid(), poll_seconds=1.0)
    >>> watcher.daemon
    True
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]

ORPHAN_EXIT_CODE = 75  # what an orphaned child exits with (EX_TEMPFAIL: the run it belonged to can be resumed)


def exit_with_parent(parent_pid: int | None = None, poll_seconds: float = 2.0) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit(75)``) once ``parent_pid`` (the current parent by
    default) is no longer its parent; returns the thread. Work written atomically is kept; the rest of what the
    process was doing is dropped, as with a kill."""
    if isinstance(poll_seconds, bool) or not isinstance(poll_seconds, (int, float)) or not poll_seconds > 0:
        raise ValueError(f"poll_seconds must be a number > 0, got {poll_seconds!r}")
    parent = os.getppid() if parent_pid is None else int(parent_pid)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(ORPHAN_EXIT_CODE)

    watcher = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    watcher.start()
    return watcher
